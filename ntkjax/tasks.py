"""Synthetic regression tasks for training runs and width sweeps (pure functions of a PRNG key).

* :func:`sin_regression`: ``y = sin(x) + noise``, x uniform on an interval, a test grid beyond it;
* :func:`gaussian_regression`: ``x ~ N(0, I_d)``, ``y = sin(x . u)`` for a random unit vector u.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ntkjax._checks import requested_dtype

__all__ = ["RegressionData", "gaussian_regression", "sin_regression"]


class RegressionData(NamedTuple):
    """Inputs ``(n, d)`` and targets ``(n, 1)`` for training and testing."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def sin_regression(
    key: jax.Array,
    *,
    num_train: int = 50,
    num_test: int = 100,
    noise: float = 0.1,
    x_range: tuple[float, float] = (-3.0, 3.0),
    test_range: tuple[float, float] = (-4.0, 4.0),
    dtype: Any = None,
) -> RegressionData:
    """One-dimensional regression: ``y = sin(x) + noise * N(0, 1)``.

    Training inputs are uniform on ``x_range``; test inputs are an evenly spaced grid of
    ``num_test`` points over ``test_range`` with noiseless targets ``sin(x)``.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1; got {num_train} and {num_test}.")
    if noise < 0:
        raise ValueError(f"noise must be >= 0; got {noise}.")
    for name, (lo, hi) in (("x_range", x_range), ("test_range", test_range)):
        if not lo < hi:
            raise ValueError(f"{name} must be (low, high) with low < high; got {(lo, hi)}.")
    dtype = requested_dtype(dtype)
    k_x, k_noise = jax.random.split(key)
    x_train = jax.random.uniform(
        k_x, (num_train, 1), dtype, minval=x_range[0], maxval=x_range[1]
    )
    y_train = jnp.sin(x_train) + noise * jax.random.normal(k_noise, (num_train, 1), dtype)
    x_test = jnp.linspace(test_range[0], test_range[1], num_test, dtype=dtype)[:, None]
    return RegressionData(x_train, y_train, x_test, jnp.sin(x_test))


def gaussian_regression(
    key: jax.Array, *, num_train: int, num_test: int, input_dim: int, dtype: Any = None
) -> RegressionData:
    """Inputs ``x ~ N(0, I_d)``, noiseless targets ``y = sin(x . u)`` with a unit vector ``u``
    drawn from ``key`` (its direction uniform on the sphere).

    >>> data = gaussian_regression(jax.random.key(0), num_train=8, num_test=4, input_dim=3)
    >>> data.x_train.shape, data.y_test.shape
    ((8, 3), (4, 1))
    """
    if min(num_train, num_test, input_dim) < 1:
        raise ValueError(
            "num_train, num_test and input_dim must be >= 1; got "
            f"{num_train}, {num_test}, {input_dim}."
        )
    dtype = requested_dtype(dtype)
    k_x, k_u, k_t = jax.random.split(key, 3)
    u = jax.random.normal(k_u, (input_dim,), dtype)
    u = u / jnp.linalg.norm(u)
    x_train = jax.random.normal(k_x, (num_train, input_dim), dtype)
    x_test = jax.random.normal(k_t, (num_test, input_dim), dtype)
    return RegressionData(x_train, jnp.sin(x_train @ u)[:, None], x_test,
                          jnp.sin(x_test @ u)[:, None])
