"""Worker processes for tests/test_distributed.py (run as ``python tests/distributed_worker.py
ROLE ...``): the many-device, multi-process and kill-and-restart runs. Float64 throughout (the
caller sets ``JAX_ENABLE_X64=1``). Inputs and models come from :func:`problem`, which the tests
also call, so both sides compute the same kernels."""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def problem():
    """Inputs (float64), an MLP, a small CNN and its images, and the MLP's parameters."""
    import jax

    from ntkjax import models

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    y = rng.standard_normal((23, 6))
    images = rng.standard_normal((6, 3, 3, 1))
    mlp = models.MLP((32, 32, 1), "relu", w_std=float(np.sqrt(2)), b_std=0.1)
    cnn = models.CNN((2, 1), kernel_size=2, activation="relu", readout="global_average_pool")
    params = mlp.init(jax.random.PRNGKey(0), x[:1])
    return x, y, images, mlp, cnn, params


CG_RIDGE = 0.1


def cg_targets(x: np.ndarray) -> np.ndarray:
    """Two target columns for the kernel-regression solves."""
    return np.stack([np.sin(x[:, 0]), np.cos(x[:, 1])], axis=1)


def solve_with_cg(mlp, x, y, stored) -> dict:
    """``kernel_regression_cg`` on the MLP recomputed in blocks and on a stored kernel, and
    ``kernel_ridge_predict`` at ``y``: arrays to compare with a direct solve."""
    import jax

    import ntkjax

    t = cg_targets(x)
    common = dict(ridge=CG_RIDGE, rank=10, key=jax.random.key(3), tol=1e-12,
                  max_iterations=200, block_size=8)
    blocked = ntkjax.kernel_regression_cg(mlp, t, x=x, **common)
    from_store = ntkjax.kernel_regression_cg(stored, t, **common)
    pred = ntkjax.kernel_ridge_predict(mlp, blocked.alpha, x_train=x, x_test=y, block_size=8)
    return {"cg_alpha": np.asarray(blocked.alpha), "cg_stored_alpha": np.asarray(from_store.alpha),
            "cg_pred": np.asarray(pred), "cg_converged": np.asarray(blocked.converged.all())}


def slow_block_fn(sleep_s: float, count_file: str):
    """The MLP NTK of a pair of blocks, with a host callback that sleeps ``sleep_s`` and
    appends a line to ``count_file`` (one line per computed block)."""
    import jax
    import jax.numpy as jnp

    import ntkjax

    _, _, _, mlp, _, _ = problem()
    compute = ntkjax.kernel_fn(mlp)

    def tick(_):
        time.sleep(sleep_s)
        with open(count_file, "a") as f:
            f.write("block\n")
        return np.zeros((), np.float64)

    def block_fn(a, b):
        zero = jax.pure_callback(tick, jax.ShapeDtypeStruct((), jnp.float64), a[0, 0])
        return compute(a, b).ntk + zero

    return block_fn


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "count_mismatch":  # initialize_distributed with this process's own count
        pid, port, count = int(argv[1]), argv[2], int(argv[3])
        import ntkjax

        try:
            ntkjax.initialize_distributed(f"127.0.0.1:{port}", num_processes=count,
                                          process_id=pid, timeout_s=20)
        except ValueError as err:
            print(f"refused: {err}")
            return
        print("started")
        return
    if role == "multi_process":
        pid, port, store, result = int(argv[1]), argv[2], argv[3], argv[4]
        import ntkjax

        ntkjax.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                      timeout_s=15)
    import jax

    import ntkjax

    assert jax.config.jax_enable_x64, "the tests run workers in float64"
    x, y, images, mlp, cnn, params = problem()
    if role == "many_devices":
        store, result = argv[1], argv[2]
        assert len(jax.devices()) == 4, jax.devices()
        cross = ntkjax.kernel_matrix(mlp, x, y, block_size=8)
        conv = ntkjax.kernel_matrix(cnn, images, block_size=2)
        emp = ntkjax.empirical_ntk_matrix(mlp.apply, params, x, y, block_size=8)
        stored = ntkjax.kernel_matrix(mlp, x, block_size=8, out=store)
        np.savez(result, sym_ntk=stored.ntk[:], sym_nngp=stored.nngp[:], cross_ntk=cross.ntk,
                 conv_ntk=conv.ntk, emp=emp, **solve_with_cg(mlp, x, y, stored.ntk))
    elif role == "multi_process":
        assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
        stored = ntkjax.kernel_matrix(mlp, x, block_size=8, out=store)
        gathered = ntkjax.kernel_matrix(mlp, x, y, block_size=8)
        try:  # each process its own devices: refused alike in both
            ntkjax.kernel_matrix(mlp, x, devices=jax.local_devices())
            refused = ""
        except ValueError as err:
            refused = str(err)
        np.savez(result, stored_ntk=stored.ntk[:], cross_ntk=gathered.ntk, refused=refused,
                 **solve_with_cg(mlp, x, y, stored.ntk))
    elif role == "slow_store":
        store, sleep_s, count_file = argv[1], float(argv[2]), argv[3]
        ntkjax.evaluate_in_blocks(slow_block_fn(sleep_s, count_file), x, block_size=5,
                                  out=store, store_key="slow relu NTK")
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
