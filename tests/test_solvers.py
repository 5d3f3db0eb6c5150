"""Kernel regression by preconditioned CG (ntkjax.solvers) against float64 direct solves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntkjax
from ntkjax import models
from tests.helpers import xla_flags

MLP3 = models.MLP((512,) * 3 + (1,), "relu", w_std=float(np.sqrt(2)), b_std=0.1)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def targets(x) -> np.ndarray:
    x = np.asarray(x)
    return np.stack([np.sin(x[:, 0]), x[:, 0] * x[:, 1], np.zeros(len(x))], axis=1)


@pytest.fixture(scope="module")
def big():
    """n = 2,000 inputs in d = 2 and the dense float64 NTK of the depth-3 ReLU MLP."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2000, 2), jnp.float64)
        k = np.asarray(jax.jit(lambda a: ntkjax.kernel_fn(MLP3)(a).ntk)(x))
    return np.asarray(x), k


@pytest.fixture(scope="module")
def small():
    """n = 300 inputs in d = 3, 40 test inputs, and their dense float64 NTKs."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (300, 3), jnp.float64)
        xt = jax.random.normal(jax.random.key(1), (40, 3), jnp.float64)
        k = np.asarray(ntkjax.kernel_fn(MLP3)(x).ntk)
        kt = np.asarray(ntkjax.kernel_fn(MLP3)(xt, x).ntk)
    return np.asarray(x), np.asarray(xt), k, kt


@pytest.mark.slow
def test_blocked_analytic_kernel_equals_direct_solve_n2000(big, x64):
    x, k = big
    y = targets(x)
    ridge = 3e-2 * np.mean(np.diag(k))
    direct = np.linalg.solve(k + ridge * np.eye(len(x)), y)
    res = ntkjax.kernel_regression_cg(MLP3, y, x=x, ridge=ridge, rank=200,
                                      key=jax.random.key(1), tol=1e-11, max_iterations=300)
    assert res.converged.all() and res.iterations < 300
    assert rel(res.alpha, direct) < 1e-8
    # the zero column converges at once to exactly zero
    assert res.residual_history[0, 2] == 0 and not np.any(np.asarray(res.alpha[:, 2]))
    assert res.residual_history.shape == (res.iterations + 1, 3)


def test_memmap_kernel_equals_direct_solve(big, x64, tmp_path):
    x, k = big
    n = len(x)
    stored = np.lib.format.open_memmap(tmp_path / "K.npy", mode="w+", dtype=np.float64,
                                       shape=(n, n))
    stored[:] = k
    stored.flush()
    stored = np.load(tmp_path / "K.npy", mmap_mode="r")
    y = targets(x)[:, :2]
    ridge = 1e-2 * np.mean(np.diag(k))
    direct = np.linalg.solve(k + ridge * np.eye(n), y)
    pre = ntkjax.kernel_regression_cg(stored, y, ridge=ridge, rank=200, key=jax.random.key(2),
                                      tol=1e-11, max_iterations=3000)
    assert pre.converged.all() and rel(pre.alpha, direct) < 1e-8
    # the Nyström eigenvalues under-estimate the kernel's top eigenvalues (K - K_hat is PSD)
    top = np.linalg.eigvalsh(k)[::-1][:200]
    lam = np.asarray(pre.eigensystem.values)
    assert np.all(lam <= top * (1 + 1e-8)) and np.all(np.diff(lam) <= 0)


class _RowsOnly:
    """An out-of-core stand-in: only ``.shape`` and contiguous row slices ``a[i:j]``."""

    def __init__(self, a):
        self._a = a
        self.shape = a.shape
        self.reads = 0

    def __getitem__(self, index):
        assert isinstance(index, slice) and index.step is None, index
        self.reads += 1
        return self._a[index]


def test_any_row_sliceable_store_equals_direct_solve(small, x64):
    _, _, k, _ = small
    y = targets(small[0])[:, :2]
    ridge = 1e-2 * np.mean(np.diag(k))
    store = _RowsOnly(k)
    res = ntkjax.kernel_regression_cg(store, y, ridge=ridge, rank=50, key=jax.random.key(3),
                                      tol=1e-11, block_size=64)
    assert res.converged.all()
    assert rel(res.alpha, np.linalg.solve(k + ridge * np.eye(len(k)), y)) < 1e-8
    # Nyström rows: at most one pass (5 blocks); then 5 blocks per product
    assert store.reads <= 5 * (res.iterations + 1)


@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
def test_preconditioner_cuts_iterations_on_ill_conditioned_kernel(small, x64, sketch):
    _, _, k, _ = small
    y = targets(small[0])[:, :2]
    ridge = 1e-4 * np.mean(np.diag(k))
    assert np.linalg.cond(k + ridge * np.eye(len(k))) > 1e4
    direct = np.linalg.solve(k + ridge * np.eye(len(k)), y)
    plain = ntkjax.kernel_regression_cg(k, y, ridge=ridge, rank=0, tol=1e-10,
                                        max_iterations=3000)
    pre = ntkjax.kernel_regression_cg(k, y, ridge=ridge, rank=100, key=jax.random.key(2),
                                      sketch=sketch, tol=1e-10, max_iterations=3000)
    assert plain.converged.all() and pre.converged.all()
    assert rel(pre.alpha, direct) < 1e-6 and rel(plain.alpha, direct) < 1e-6
    assert pre.iterations < plain.iterations / 2, (pre.iterations, plain.iterations)


class _Net(nn.Module):
    out: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out)(jnp.tanh(nn.Dense(32)(x)))


@pytest.mark.parametrize("outputs", [1, 3])
def test_ntk_operator_callable_equals_dense_empirical_solve(outputs, x64):
    model = _Net(out=outputs)
    n = 20
    x = jax.random.normal(jax.random.key(0), (n, 4), jnp.float64)
    params = model.init(jax.random.key(1), x)
    theta = ntkjax.empirical_ntk_matrix(model.apply, params, x, outputs="full")  # (n, n, O, O)
    dense = np.transpose(np.asarray(theta), (0, 2, 1, 3)).reshape(n * outputs, n * outputs)
    op = ntkjax.ntk_operator(model.apply, params, x)
    y = np.asarray(jax.random.normal(jax.random.key(3), (n * outputs,)))
    ridge = 0.1
    res = ntkjax.kernel_regression_cg(
        jax.jit(lambda v: op(v.reshape(n, outputs)).reshape(-1)), y, ridge=ridge, rank=10,
        key=jax.random.key(4), tol=1e-12, max_iterations=2000)
    direct = np.linalg.solve(dense + ridge * np.eye(len(y)), y)
    assert res.converged.all() and rel(res.alpha, direct) < 1e-8


def test_predictions_at_infinite_time_equal_gradient_flow(small, x64):
    x, xt, k, kt = small
    y = targets(x)[:, :2]
    mean = np.mean(np.diag(k))
    ridge = 0.1 * mean
    res = ntkjax.kernel_regression_cg(MLP3, y, x=x, ridge=ridge, rank=60, key=jax.random.key(0),
                                      tol=1e-12, block_size=128)
    pred = ntkjax.kernel_ridge_predict(MLP3, res.alpha, x_train=x, x_test=xt, block_size=128)
    exact = ntkjax.gradient_flow_mse(k, y, learning_rate=1.0, k_test_train=kt,
                                     diag_reg=ridge / mean)(jnp.inf)
    assert rel(pred, exact.test) < 1e-8
    # a stored test-train kernel gives the same predictions
    assert rel(ntkjax.kernel_ridge_predict(kt, res.alpha, block_size=16), exact.test) < 1e-8
    # a single right-hand side keeps its 1-D shape
    one = ntkjax.kernel_regression_cg(k, y[:, 0], ridge=ridge, rank=0, tol=1e-12)
    assert one.alpha.shape == (300,) and rel(one.alpha, res.alpha[:, 0]) < 1e-8


def test_finite_time_lowrank_approximation_against_exact_flow(small, x64):
    """Error of gradient_flow_lowrank against the exact flow (one eigendecomposition, n = 300):
    relative error below 2 tau lam_{r+1} while tau lam_{r+1} is small, exact at t = inf,
    and bounded (below the size of the predictions) at every time."""
    x, xt, k, kt = small
    y = targets(x)[:, :2]
    mean = np.mean(np.diag(k))
    ridge = 1e-3 * mean
    rank, lr, n = 100, 1.0, len(x)
    res = ntkjax.kernel_regression_cg(k, y, ridge=ridge, rank=rank, key=jax.random.key(0),
                                      sketch="gaussian", tol=1e-12, max_iterations=500)
    times = np.array([0.0, 1.0, 3.0, 1e2, 1e4, 1e6, np.inf])
    approx = ntkjax.gradient_flow_lowrank(res, y, times, learning_rate=lr, kernel=MLP3,
                                          x_train=x, x_test=xt, block_size=128)
    exact = ntkjax.gradient_flow_mse(k, y, learning_rate=lr, k_test_train=kt,
                                     diag_reg=ridge / mean)(times)
    tail = np.linalg.eigvalsh(k)[::-1][rank]  # lam_{r+1}
    assert approx.train.shape == exact.train.shape and approx.test.shape == exact.test.shape
    assert np.all(np.asarray(approx.train)[0] == 0)
    for i, t in enumerate(times):
        err_train = rel(approx.train[i], exact.train[i]) if t > 0 else 0.0
        err_test = rel(approx.test[i], exact.test[i]) if t > 0 else 0.0
        if t == 0:
            continue
        if np.isinf(t):
            assert err_train < 1e-8 and err_test < 1e-8
        elif lr * t / n * tail < 0.02:
            assert err_train < 2 * lr * t / n * tail and err_test < 2 * lr * t / n * tail
        else:
            assert err_train < 1.0 and err_test < 1.0


def test_float32_default_and_devices_argument(small):
    x = np.asarray(small[0], np.float32)
    y = targets(x)[:, :2].astype(np.float32)
    res = ntkjax.kernel_regression_cg(MLP3, y, x=x, ridge=1.0, rank=30, key=jax.random.key(0),
                                      tol=1e-4, block_size=128, devices=jax.devices()[:1])
    assert res.alpha.dtype == jnp.float32 and res.converged.all()
    k = np.asarray(ntkjax.kernel_fn(MLP3)(x).ntk, np.float64)
    assert rel(res.alpha, np.linalg.solve(k + np.eye(len(x)), y)) < 1e-3


def test_bad_input_is_refused(small):
    x, _, k, _ = small
    y = targets(x)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="y's 300 rows"):
        ntkjax.kernel_regression_cg(k[:200, :200], y, rank=0)
    with pytest.raises(ValueError, match="x must have shape"):
        ntkjax.kernel_regression_cg(MLP3, y, x=x[:10], rank=0)
    with pytest.raises(ValueError, match="ridge"):
        ntkjax.kernel_regression_cg(k, y, ridge=-1.0, rank=0)
    with pytest.raises(ValueError, match="tol"):
        ntkjax.kernel_regression_cg(k, y, tol=0.0, rank=0)
    bad = y.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ntkjax.kernel_regression_cg(k, bad, rank=0)
    with pytest.raises(ValueError, match="key"):
        ntkjax.kernel_regression_cg(k, y, rank=10)
    with pytest.raises(ValueError, match="rank"):
        ntkjax.kernel_regression_cg(k, y, rank=301, key=key)
    with pytest.raises(ValueError, match="max_iterations"):
        ntkjax.kernel_regression_cg(k, y, rank=0, max_iterations=0)
    with pytest.raises(ValueError, match="needs the training inputs"):
        ntkjax.kernel_regression_cg(MLP3, y, rank=0)
    with pytest.raises(TypeError, match="kernel must be"):
        ntkjax.kernel_regression_cg("K.npy", y, rank=0)
    with pytest.raises(ValueError, match="sketch"):
        ntkjax.kernel_regression_cg(lambda v: v, y, rank=5, key=key, sketch="columns")
    # not positive definite: a clear error from the Nyström core or from CG itself, no NaN
    with pytest.raises(ValueError, match="not positive"):
        ntkjax.kernel_regression_cg(-k, y, rank=10, key=key)
    with pytest.raises(ValueError, match="not positive definite"):
        ntkjax.kernel_regression_cg(-k, y, rank=0)
    with pytest.raises(ValueError, match="non-finite"):
        ntkjax.kernel_regression_cg(lambda v: v * jnp.nan, y, rank=0)
    res = ntkjax.kernel_regression_cg(k, y, rank=0, tol=1e-12, max_iterations=3)
    assert res.iterations == 3 and not res.converged[0] and np.all(np.isfinite(res.alpha))
    with pytest.raises(ValueError, match="eigensystem"):
        ntkjax.gradient_flow_lowrank(res, y, 1.0, learning_rate=1.0, kernel=k)
    with pytest.raises(ValueError, match="both x_train and x_test"):
        ntkjax.kernel_ridge_predict(MLP3, res.alpha, x_train=x)


def test_progress_bar_is_drawn_and_finished(small, capsys):
    _, _, k, _ = small
    y = targets(small[0])[:, :1]
    res = ntkjax.kernel_regression_cg(k, y, ridge=1.0, rank=0, tol=1e-3, show_progress=True)
    err = capsys.readouterr().err
    assert "kernel CG" in err and err.endswith("\n") and f"{res.iterations}/1000" in err


@pytest.mark.slow
def test_four_devices_give_the_one_device_solve(tmp_path):
    """Row blocks dealt over 4 forced CPU devices give the 1-device weights."""
    script = textwrap.dedent("""
        import jax, numpy as np, ntkjax
        jax.config.update("jax_enable_x64", True)
        assert len(jax.devices()) == 4
        mlp = ntkjax.models.MLP((64, 64, 1), "relu", w_std=2 ** 0.5, b_std=0.1)
        x = np.asarray(jax.random.normal(jax.random.key(0), (200, 3), "float64"))
        y = np.sin(x[:, :2])
        out = {}
        for name, devs in (("one", jax.devices()[:1]), ("four", jax.devices())):
            res = ntkjax.kernel_regression_cg(mlp, y, x=x, ridge=0.1, rank=20,
                key=jax.random.key(1), tol=1e-12, block_size=32, devices=devs)
            out[name] = np.asarray(res.alpha)
        print(np.abs(out["one"] - out["four"]).max() / np.abs(out["one"]).max())
    """)
    env = {**os.environ, "XLA_FLAGS": xla_flags(4),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-10


@pytest.mark.parametrize("size", [1e-20, 1e-30, 1e20, 1e30])
@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.xla_optimized
def test_float32_targets_at_extreme_scales_match_a_float64_solve(size, rank):
    """Targets of 1e-20 square to below float32's smallest normal number, targets of 1e20 to
    above its largest: the residual norms are scaled before squaring, so CG runs as it does
    for targets of size 1 (and alpha is then that solution times the scale)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 60))
    k = (a @ a.T / 60).astype(np.float32)  # a PSD kernel, eigenvalues ~ 0.1 .. 3
    y = (rng.standard_normal((40, 2)) * size).astype(np.float32)
    exact = np.linalg.solve(k.astype(np.float64) + 0.1 * np.eye(40), y.astype(np.float64))
    key = jax.random.key(0) if rank else None
    res = ntkjax.kernel_regression_cg(k, y, ridge=0.1, rank=rank, key=key, tol=1e-5)
    assert res.alpha.dtype == jnp.float32
    assert res.iterations > 1 and res.converged.all()
    assert np.isfinite(res.residual_history).all() and res.residual_history[0].tolist() == [1, 1]
    assert rel(res.alpha, exact) < 1e-4
    # the same float32 solve on unit-size targets, scaled: the scale changes nothing else
    unit = ntkjax.kernel_regression_cg(k, (y / np.float32(size)), ridge=0.1, rank=rank, key=key,
                                       tol=1e-5)
    assert unit.iterations == res.iterations
    assert rel(np.asarray(unit.alpha, np.float64) * size, exact) < 1e-4
