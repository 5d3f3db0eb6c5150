"""Input validation shared by every public function: clear errors instead of NaN or wrong shapes.

The checks run on shapes, which are static under ``jax.jit``, so they work on tracers too.
Value checks (:func:`check_finite`) only run on concrete arrays; under ``jit`` they are skipped
and the caller documents that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


def check_batched(x, name: str, *, min_ndim: int = 2) -> None:
    """Raises ValueError unless ``x`` has a leading batch axis and at least ``min_ndim`` axes."""
    shape = np.shape(x)
    if len(shape) < min_ndim:
        raise ValueError(
            f"{name} must have a leading batch axis: expected at least {min_ndim} dimensions "
            f"(batch, features...), got shape {tuple(shape)}. Add a batch axis, e.g. x[None]."
        )


def check_same_features(x1, x2, names: tuple[str, str] = ("x1", "x2")) -> None:
    """Raises ValueError when two batches disagree in their per-example (feature) shape."""
    s1, s2 = np.shape(x1)[1:], np.shape(x2)[1:]
    if tuple(s1) != tuple(s2):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same per-example shape; got "
            f"{names[0]}.shape={tuple(np.shape(x1))} and {names[1]}.shape={tuple(np.shape(x2))}."
        )


def check_pair(x1: Any, x2: Any, *, min_ndim: int = 2) -> None:
    """The x1 / x2 preamble of every kernel function: both batched (at least ``min_ndim`` axes),
    not empty, with at least one feature, and, when ``x2`` is given, of the same per-example
    shape; and finite, when their values are concrete (:func:`check_values`; under ``jit`` the
    values are not known and only shapes are checked). ``x2 = None`` means ``x2 = x1``."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        check_batched(x, name, min_ndim=min_ndim)
        shape = tuple(np.shape(x))
        if shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {shape}): pass at least one example.")
        if 0 in shape[1:]:
            raise ValueError(
                f"{name} has no features (shape {shape}): every example needs at least one."
            )
    if x2 is not None:
        check_same_features(x1, x2)
    check_values(x1, x2)


def zero_masked(x: Any, mask: Any) -> Any:
    """``x`` (batch, *positions, channels) with the positions where the boolean ``mask``
    (batch, *positions) is True set to 0 -- how masked positions take no part in a layer's
    sums; ``mask=None`` returns ``x``. The mask is assumed checked (:func:`check_mask`)."""
    if mask is None:
        return x
    x = jnp.asarray(x)
    return jnp.where(mask[..., None], jnp.zeros((), x.dtype), x)


def check_mask(x: Any, mask: Any, name: str = "mask", x_name: str = "x") -> Any:
    """``mask`` as a boolean array after checking its shape: the input shape without the
    channel axis (``x.shape[:-1]``); None passes. A ValueError names both shapes otherwise, and
    for inputs without positions (a mask marks positions of sequences or images)."""
    if mask is None:
        return None
    x_shape, m_shape = tuple(np.shape(x)), tuple(np.shape(mask))
    if len(x_shape) < 3:
        raise ValueError(
            f"{name} marks positions of sequences or images, inputs (batch, *spatial, "
            f"channels); {x_name} has shape {x_shape} (no positions) and {name} shape "
            f"{m_shape}."
        )
    if m_shape != x_shape[:-1]:
        raise ValueError(
            f"{name} must have the shape of {x_name} without its channel axis, "
            f"{x_shape[:-1]}; got {name}.shape={m_shape} for {x_name}.shape={x_shape}."
        )
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"{name} must be a boolean array (True = masked position); got dtype {mask.dtype}. "
            "For neural-tangents' mask_constant convention use ntkjax.mask_from_constant."
        )
    return mask


def check_values(x1: Any, x2: Any = None) -> None:
    """Raises ValueError when concrete inputs hold NaN or Inf (a no-op on tracers)."""
    check_finite(x1, "x1")
    if x2 is not None:
        check_finite(x2, "x2")


def check_scale(value: Any, name: str) -> None:
    """Raises ValueError unless a concrete ``value`` (a standard deviation) is finite and >= 0
    (a no-op on tracers, e.g. when differentiating with respect to it)."""
    if is_concrete(value) and not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def float_dtype(*arrays: Any) -> np.dtype:
    """The floating dtype computations on ``arrays`` run in: their promoted dtype when it is
    floating, else JAX's default float (float32, or float64 under ``jax.enable_x64``). ``None``
    entries are ignored; with no arrays, the default float."""
    present = [a for a in arrays if a is not None]
    dtype = jnp.result_type(*present) if present else jnp.result_type(float)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def requested_dtype(dtype: Any) -> np.dtype:
    """``dtype`` when given, else JAX's default float (float32, or float64 under x64)."""
    return jnp.dtype(dtype) if dtype is not None else float_dtype()


def check_choice(value, allowed: Sequence, name: str) -> None:
    """Raises ValueError naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}.")


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, Tracer)


def check_finite(x, name: str) -> None:
    """Raises ValueError when a concrete array holds NaN or Inf (no-op on tracers)."""
    if not is_concrete(x):
        return
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or Inf) of {arr.size}.")


def check_positive(value, name: str) -> None:
    """Raises ValueError unless a concrete ``value`` is a positive finite scalar."""
    if is_concrete(value):
        v = np.asarray(value)
        if v.shape != () or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite scalar; got {value!r}.")


def check_diag_reg(diag_reg) -> None:
    """Raises ValueError unless a concrete ``diag_reg`` is a finite scalar >= 0."""
    if is_concrete(diag_reg):
        v = np.asarray(diag_reg)
        if v.shape != () or not np.isfinite(v) or v < 0:
            raise ValueError(f"diag_reg must be a finite scalar >= 0; got {diag_reg!r}.")


def check_times(t, name: str, *, integer: bool) -> None:
    """Raises ValueError unless ``t`` is a scalar or 1-D array of times >= 0 (inf allowed),
    whole numbers with ``integer``."""
    if np.ndim(t) > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array; got shape {np.shape(t)}.")
    if not is_concrete(t):
        return
    v = np.asarray(t, dtype=np.float64)
    if np.any(np.isnan(v)) or np.any(v < 0):
        raise ValueError(f"{name} must be >= 0 (jnp.inf allowed); got {t!r}.")
    if integer and np.any(np.isfinite(v) & (v != np.round(v))):
        raise ValueError(f"{name} must be whole numbers of steps (or jnp.inf); got {t!r}.")
