"""Kernels spread over several devices (:func:`ntkjax.kernel_matrix` with ``devices``).

* ``kernel_matrix_devices``: the 20,000 x 20,000 NNGP and NTK of a depth-3 ReLU MLP
  (w_std = sqrt 2, b_std = 0.1, d = 64 standard normal inputs, float32, x2 = None so only the
  upper triangle of blocks is computed), on 1, 2 and 4 forced CPU devices
  (``--xla_force_host_platform_device_count``), each in its own process. ``--quick``: n = 2,000
  in blocks of 500 rows. On a 2-core machine
  this measures the overhead of spreading blocks, not a speedup. Accuracy: the first 64 rows
  against the one-call float64 kernel. Peak memory: per device where the backend reports it
  (accelerators); forced CPU devices share one process, whose peak resident set is given.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from benchmarks.harness import emit, log, time_call

DEVICE_COUNTS = (1, 2, 4)


def _measure(n: int, quick: bool) -> None:
    """Runs in a process with the forced device count: times kernel_matrix over all devices."""
    import jax
    import jax.numpy as jnp

    import ntkjax
    from ntkjax import models

    devices = jax.devices()
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 64), jnp.float32)
    mlp = models.MLP((512, 512, 512, 1), "relu", w_std=float(np.sqrt(2)), b_std=0.1)
    # Quick: blocks of 500 rows, so that the 2,000 rows make 10 blocks to spread (by default
    # they would be one block); full size: the block size chosen from the memory budget.
    block_size = 500 if quick else None
    timing = time_call(lambda: ntkjax.kernel_matrix(mlp, x, block_size=block_size).ntk,
                       repeats=2 if quick else 1)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        ref = np.asarray(jax.jit(lambda a, b: ntkjax.kernel_fn(mlp)(a, b).ntk)(x64[:64], x64))
    got = np.asarray(timing["result"][:64], np.float64)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    per_device = []
    for d in devices:
        stats = d.memory_stats() or {}
        per_device.append(
            round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None
        )
    log(f"{len(devices)} device(s), n = {n}: {timing['median_s']:.2f} s, err {err:.1e}")
    emit(
        "kernel_matrix_devices",
        {"n": n, "d": 64, "depth": 3, "devices": len(devices), "dtype": "float32",
         "block_size": block_size, "quick": quick},
        timing,
        accuracy={"max_rel_err_first_64_rows_vs_float64": err, "target": 1e-5},
        peak_memory_per_device_mb=per_device,
        note=None if any(per_device) else "CPU devices share the process; peak_memory_mb is "
        "the process's peak resident set",
    )


def kernel_matrix_devices(quick: bool = False) -> None:
    n = 2000 if quick else 20000
    for count in DEVICE_COUNTS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.bench_devices", str(n)]
        if quick:
            cmd.append("--quick")
        status = subprocess.call(cmd, env=env)
        if status:
            raise RuntimeError(f"kernel_matrix_devices on {count} device(s) failed ({status})")


WORKLOADS = {"kernel_matrix_devices": kernel_matrix_devices}


if __name__ == "__main__":
    _measure(int(sys.argv[1]), "--quick" in sys.argv[2:])
