"""Small datasets: the study notebook's sin regression task and scikit-learn's digits.

``load_digits`` needs scikit-learn, an optional dependency (``pip install ntkjax[examples]``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Digits", "RegressionData", "load_digits", "sin_regression"]


class RegressionData(NamedTuple):
    """Inputs ``(n, 1)`` and targets ``(n, 1)`` for training and testing."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


class Digits(NamedTuple):
    """Digits split: pixels in [0, 1] ``(n, 64)``, one-hot targets ``(n, 10)``, integer labels."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    labels_train: jax.Array
    labels_test: jax.Array


def _default_float(dtype) -> jnp.dtype:
    """``dtype`` if given, else JAX's default float (float32, or float64 under x64)."""
    return jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype


def sin_regression(
    key: jax.Array,
    *,
    n_train: int = 50,
    n_test: int = 100,
    noise: float = 0.1,
    x_range: tuple[float, float] = (-3.0, 3.0),
    test_range: tuple[float, float] = (-4.0, 4.0),
    dtype=None,
) -> RegressionData:
    """The study notebook's section 5 task: ``y = sin(x) + noise * N(0, 1)``.

    Training inputs are uniform on ``x_range``; test inputs are an evenly spaced grid of
    ``n_test`` points over ``test_range`` with noiseless targets ``sin(x)``.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1; got {n_train} and {n_test}.")
    if noise < 0:
        raise ValueError(f"noise must be >= 0; got {noise}.")
    for name, (lo, hi) in (("x_range", x_range), ("test_range", test_range)):
        if not lo < hi:
            raise ValueError(f"{name} must be (low, high) with low < high; got {(lo, hi)}.")
    dtype = _default_float(dtype)
    k_x, k_noise = jax.random.split(key)
    x_train = jax.random.uniform(
        k_x, (n_train, 1), dtype, minval=x_range[0], maxval=x_range[1]
    )
    y_train = jnp.sin(x_train) + noise * jax.random.normal(k_noise, (n_train, 1), dtype)
    x_test = jnp.linspace(test_range[0], test_range[1], n_test, dtype=dtype)[:, None]
    return RegressionData(x_train, y_train, x_test, jnp.sin(x_test))


def load_digits(*, test_size: float = 0.3, random_state: int = 0, dtype=None) -> Digits:
    """scikit-learn's bundled 8x8 digits (1,797 images), stratified train/test split.

    Pixels are divided by 16 (their maximum) into [0, 1]; targets are one-hot rows over the 10
    classes. The split is ``sklearn.model_selection.train_test_split(..., stratify=labels,
    test_size=test_size, random_state=random_state)``.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ntkjax.datasets.load_digits needs scikit-learn: pip install ntkjax[examples]"
        ) from err
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1); got {test_size}.")
    dtype = _default_float(dtype)
    data = sk_load_digits()
    pixels = np.asarray(data.data, np.float64) / 16.0
    labels = np.asarray(data.target, np.int32)
    x_train, x_test, l_train, l_test = train_test_split(
        pixels, labels, test_size=test_size, stratify=labels, random_state=random_state
    )
    eye = np.eye(10)
    return Digits(
        x_train=jnp.asarray(x_train, dtype),
        y_train=jnp.asarray(eye[l_train], dtype),
        x_test=jnp.asarray(x_test, dtype),
        y_test=jnp.asarray(eye[l_test], dtype),
        labels_train=jnp.asarray(l_train),
        labels_test=jnp.asarray(l_test),
    )
