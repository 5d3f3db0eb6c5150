"""Real data for the study: scikit-learn's digits (the synthetic tasks are :mod:`ntkjax.tasks`).

``load_digits`` needs scikit-learn, an optional dependency (``pip install ntkjax[examples]``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import requested_dtype

__all__ = ["Digits", "load_digits"]


class Digits(NamedTuple):
    """Digits split: pixels in [0, 1] ``(n, 64)``, one-hot targets ``(n, 10)``, integer labels."""

    x_train: jax.Array | np.ndarray
    y_train: jax.Array | np.ndarray
    x_test: jax.Array | np.ndarray
    y_test: jax.Array | np.ndarray
    labels_train: jax.Array | np.ndarray
    labels_test: jax.Array | np.ndarray


def load_digits(*, test_size: float = 0.3, random_state: int = 0, dtype: Any = None) -> Digits:
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
            "ntkjax.study.datasets.load_digits needs scikit-learn: pip install ntkjax[examples]"
        ) from err
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1); got {test_size}.")
    dtype = requested_dtype(dtype)
    data: Any = sk_load_digits()
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
