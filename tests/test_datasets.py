"""Dataset loaders: the study's sin task and scikit-learn's digits split."""

from __future__ import annotations

import builtins

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkjax import datasets


def test_sin_regression_shapes_ranges_and_noise():
    data = datasets.sin_regression(jax.random.PRNGKey(0), n_train=2000, n_test=100, noise=0.1)
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
    a = datasets.sin_regression(jax.random.PRNGKey(1))
    b = datasets.sin_regression(jax.random.PRNGKey(1))
    c = datasets.sin_regression(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.allclose(a.x_train, c.x_train)
    assert a.x_train.dtype == jnp.float64  # JAX's default float under x64
    assert a.x_train.shape == (50, 1) and a.x_test.shape == (100, 1)


def test_sin_regression_bad_arguments():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="n_train"):
        datasets.sin_regression(key, n_train=0)
    with pytest.raises(ValueError, match="noise"):
        datasets.sin_regression(key, noise=-1.0)
    with pytest.raises(ValueError, match="x_range"):
        datasets.sin_regression(key, x_range=(1.0, -1.0))


def test_load_digits_split():
    pytest.importorskip("sklearn")
    data = datasets.load_digits()
    assert data.x_train.shape == (1257, 64) and data.x_test.shape == (540, 64)
    assert data.y_train.shape == (1257, 10) and data.y_test.shape == (540, 10)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    np.testing.assert_array_equal(np.argmax(data.y_test, 1), data.labels_test)
    np.testing.assert_array_equal(data.y_train.sum(1), 1.0)
    # stratified: class proportions of the test split match the full data within one sample
    counts_test = np.bincount(np.asarray(data.labels_test), minlength=10)
    counts_all = counts_test + np.bincount(np.asarray(data.labels_train), minlength=10)
    assert np.all(np.abs(counts_test - 0.3 * counts_all) <= 1.0)
    assert counts_all.sum() == 1797


def test_load_digits_without_sklearn(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install ntkjax\[examples\]"):
        datasets.load_digits()
