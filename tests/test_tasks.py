"""Synthetic regression tasks (ntkjax.tasks): distributions, determinism, bad arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from ntkjax import tasks


def test_sin_regression_shapes_ranges_and_noise():
    data = tasks.sin_regression(jax.random.PRNGKey(0), num_train=2000, num_test=100, noise=0.1)
    assert data.x_train.shape == data.y_train.shape == (2000, 1)
    assert data.x_test.shape == data.y_test.shape == (100, 1)
    assert data.x_train.dtype == jnp.float32
    assert float(data.x_train.min()) >= -3.0 and float(data.x_train.max()) <= 3.0
    # uniform on (-3, 3): mean 0, variance 3 (standard errors 0.04 and 0.05)
    assert abs(float(data.x_train.mean())) < 0.2
    assert abs(float(data.x_train.var()) - 3.0) < 0.25
    noise = np.asarray(data.y_train - jnp.sin(data.x_train))
    assert abs(noise.std() - 0.1) < 0.01  # std error of the std ~ 0.0016
    np.testing.assert_allclose(data.x_test[:, 0], np.linspace(-4, 4, 100), atol=1e-6)
    np.testing.assert_allclose(data.y_test, np.sin(np.asarray(data.x_test)), atol=1e-6)


def test_sin_regression_is_deterministic_in_the_key(x64):
    a = tasks.sin_regression(jax.random.PRNGKey(1))
    b = tasks.sin_regression(jax.random.PRNGKey(1))
    c = tasks.sin_regression(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.allclose(a.x_train, c.x_train)
    assert a.x_train.dtype == jnp.float64  # JAX's default float under x64
    assert a.x_train.shape == (50, 1) and a.x_test.shape == (100, 1)


def test_sin_regression_bad_arguments():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_train"):
        tasks.sin_regression(key, num_train=0)
    with pytest.raises(ValueError, match="noise"):
        tasks.sin_regression(key, noise=-1.0)
    with pytest.raises(ValueError, match="x_range"):
        tasks.sin_regression(key, x_range=(1.0, -1.0))


def test_gaussian_regression_targets_are_sin_of_a_unit_projection(x64):
    data = tasks.gaussian_regression(jax.random.key(3), num_train=500, num_test=50, input_dim=6)
    x, y = np.asarray(data.x_train), np.asarray(data.y_train)[:, 0]
    # Stein: E[sin(x . u) x] = exp(-1/2) u starts a least-squares fit of y = sin(x . u)
    start = np.exp(0.5) * (x * y[:, None]).mean(0)
    fit = optimize.least_squares(lambda u: np.sin(x @ u) - y, start, xtol=1e-15, ftol=1e-15)
    assert np.max(np.abs(fit.fun)) < 1e-10  # the targets are exactly sin of one projection
    np.testing.assert_allclose(np.linalg.norm(fit.x), 1.0, rtol=1e-8)
    np.testing.assert_allclose(np.sin(np.asarray(data.x_test) @ fit.x), data.y_test[:, 0],
                               atol=1e-8)
    assert abs(x.std() - 1.0) < 0.05 and data.x_train.dtype == jnp.float64
    with pytest.raises(ValueError, match="input_dim"):
        tasks.gaussian_regression(jax.random.key(0), num_train=2, num_test=2, input_dim=0)
