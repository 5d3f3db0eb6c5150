"""Ensembles from a kernel function (ntkjax.ensemble), checked against outside truths: the
textbook GP posterior, the prior at t = 0, kernel regression at t = inf, the closed-form
matrix-exponential flow written here with scipy, and blocked = unblocked evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ntkjax
from ntkjax import nn
from ntkjax import predict as P
from ntkjax.ensemble import ensemble_predictor
from ntkjax.models import MLP

MODEL = MLP(features=(512, 512, 1), activation="erf", w_std=1.5, b_std=0.1)
KERNEL = jax.jit(ntkjax.kernel_fn(MODEL))


def data(dtype=jnp.float64, n=9, m=7):
    kx, kt = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (n, 3), dtype)
    x_test = jax.random.normal(kt, (m, 3), dtype)
    y = jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1])], axis=1)
    return x, y, x_test


def test_ntk_ensemble_matches_the_matrix_exponential_formula(x64):
    x, y, x_test = data()
    k = KERNEL
    kxx, kxt, ktt = k(x), k(x_test, x), k(x_test)
    lr, ts = 0.5, np.array([0.0, 3.0, 40.0])
    predict = ensemble_predictor(MODEL, x, y, learning_rate=lr, block_size=3)
    out = predict(x_test, t=jnp.asarray(ts))
    # Lee et al. 2019, eqs. 15-16, with scipy's expm and solve.
    theta, theta_xt = np.asarray(kxx.ntk), np.asarray(kxt.ntk)
    nngp, nngp_xt, nngp_tt = np.asarray(kxx.nngp), np.asarray(kxt.nngp), np.asarray(ktt.nngp)
    n = x.shape[0]
    for i, t in enumerate(ts):
        a = theta_xt @ np.linalg.solve(theta, np.eye(n) - scipy.linalg.expm(-lr * theta * t / n))
        np.testing.assert_allclose(out.mean[i], a @ np.asarray(y), rtol=0, atol=1e-9)
        cov = nngp_tt + a @ nngp @ a.T - a @ nngp_xt.T - nngp_xt @ a.T
        np.testing.assert_allclose(out.covariance[i], cov, rtol=0, atol=1e-9)
    assert out.mean.shape == (3, 7, 2) and out.covariance.shape == (3, 7, 7)
    # the prior at t = 0
    np.testing.assert_allclose(out.mean[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(out.covariance[0], nngp_tt, atol=1e-12)


def test_nngp_at_infinity_is_the_gp_posterior(x64):
    x, y, x_test = data()
    k = KERNEL
    kxx, kxt, ktt = (np.asarray(a.nngp) for a in (k(x), k(x_test, x), k(x_test)))
    # Rasmussen & Williams 2006, eqs. 2.23-2.24 (noise-free)
    exact = ensemble_predictor(MODEL, x, y)(x_test, get="nngp")  # t = inf by default
    np.testing.assert_allclose(exact.mean, kxt @ np.linalg.solve(kxx, np.asarray(y)), atol=1e-8)
    np.testing.assert_allclose(exact.covariance, ktt - kxt @ np.linalg.solve(kxx, kxt.T),
                               atol=1e-8)
    # with a ridge: the posterior mean with noise variance lambda; the covariance is that of the
    # ridge-trained ensemble, A = K(x, X) (K + lambda)^-1 in the general formula
    reg = 1e-3
    predict = ensemble_predictor(MODEL, x, y, diag_reg=reg)
    out = predict(x_test, get="nngp")
    noisy = kxx + reg * np.trace(kxx) / kxx.shape[0] * np.eye(kxx.shape[0])
    a = kxt @ np.linalg.inv(noisy)
    np.testing.assert_allclose(out.mean, a @ np.asarray(y), atol=1e-9)
    np.testing.assert_allclose(out.covariance, ktt + a @ kxx @ a.T - a @ kxt.T - kxt @ a.T,
                               atol=1e-9)
    # NTK regression at t = inf, by a linear solve
    theta = np.asarray(k(x).ntk)
    theta_xt = np.asarray(k(x_test, x).ntk)
    ntk_mean = predict(x_test, get="ntk", covariance="none")
    assert ntk_mean.covariance is None
    np.testing.assert_allclose(ntk_mean.mean, theta_xt @ np.linalg.solve(
        theta + reg * np.trace(theta) / theta.shape[0] * np.eye(theta.shape[0]), np.asarray(y)),
        atol=1e-9)


def test_blocks_diagonal_and_one_eigendecomposition(x64, monkeypatch):
    x, y, x_test = data(m=11)
    calls = []
    from ntkjax._spectral import eigh_psd as original

    monkeypatch.setattr("ntkjax.ensemble.eigh_psd",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    ts = jnp.array([1.0, 10.0, jnp.inf])
    whole = ensemble_predictor(MODEL, x, y[:, 0], learning_rate=2.0)(x_test, t=ts)
    blocked = ensemble_predictor(MODEL, x, y[:, 0], learning_rate=2.0, block_size=4)
    calls.clear()
    parts = blocked(x_test, t=ts)
    diag = blocked(x_test, t=ts, covariance="diagonal")
    again = blocked(x_test[:5], t=2.0)
    assert len(calls) == 1  # one decomposition across blocks, times and calls
    assert parts.mean.shape == (3, 11)
    np.testing.assert_allclose(parts.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(parts.covariance, whole.covariance, atol=1e-12)
    np.testing.assert_allclose(diag.covariance, np.diagonal(whole.covariance, axis1=1, axis2=2),
                               atol=1e-12)
    assert again.mean.shape == (5,) and again.covariance.shape == (5, 5)
    # the same computation on precomputed triples (ntkjax.gradient_flow_ensemble)
    k = KERNEL
    kxx, kxt, ktt = k(x), k(x_test, x), k(x_test)
    triple = P.gradient_flow_ensemble((kxx.nngp, kxt.nngp, ktt.nngp), (kxx.ntk, kxt.ntk, None),
                                      y[:, 0], learning_rate=2.0, t=ts)
    np.testing.assert_allclose(parts.mean, triple.mean, atol=1e-12)
    np.testing.assert_allclose(parts.covariance, triple.covariance, atol=1e-12)


def test_float32_kernel_function_and_bad_input():
    x, y, x_test = data(jnp.float32)
    out = ensemble_predictor(KERNEL, x, y)(x_test, t=5.0, covariance="diagonal")
    assert out.mean.dtype == np.float32 and out.mean.shape == (7, 2)
    assert np.all(out.covariance > 0)

    class Spatial(nn.Dense):  # a kernel function whose output keeps spatial axes
        pass

    conv = nn.Conv(4, kernel_size=3)
    images = jnp.ones((3, 5, 5, 2))
    with pytest.raises(ValueError, match="spatial axes"):
        ensemble_predictor(conv, images, jnp.ones(3))
    predict = ensemble_predictor(MODEL, x, y)
    with pytest.raises(ValueError, match="get"):
        predict(x_test, get="both")
    with pytest.raises(ValueError, match="covariance"):
        predict(x_test, covariance="diag")
    with pytest.raises(ValueError, match=">= 0"):
        predict(x_test, t=-1.0)
    with pytest.raises(ValueError, match="y_train"):
        ensemble_predictor(MODEL, x, y[:4])
    with pytest.raises(ValueError, match="kernel"):
        ensemble_predictor(3, x, y)
    with pytest.raises(ValueError, match="same per-example shape"):
        predict(jnp.ones((2, 4)))
