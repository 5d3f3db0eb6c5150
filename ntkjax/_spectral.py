"""Eigendecompositions of kernel matrices shared by the closed-form predictors
(:mod:`ntkjax.predict`, :mod:`ntkjax.ensemble`): the symmetrized kernel's spectrum with
round-off negatives clipped, the relative diagonal regularizer, and the tolerance below which an
eigenvalue counts as a round-off zero; the symmetrization of kernels that every reader of a
kernel (predictors, dynamics, ``kernel_fn``) shares; and the check that a kernel matrix is
symmetric and positive semi-definite."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import is_concrete

__all__ = ["Eigen", "check_kernel_psd", "eigh_psd", "null_tolerance", "regularizer",
           "symmetrized"]


class Eigen(NamedTuple):
    """A clipped eigendecomposition of a kernel matrix and its regularizer."""

    values: jax.Array  # clipped eigenvalues of the (unregularized) kernel, ascending
    vectors: jax.Array
    reg: jax.Array  # absolute diagonal regularizer lambda
    null: jax.Array  # True where values + reg is numerically zero


def symmetrized(k: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    """``(k + k^T) / 2``, halves first (``k / 2 + k^T / 2``: no overflow for entries near the
    largest float). ``k^T`` is ``jnp.transpose(k, axes)``; by default the two leading axes
    swapped (e.g. ``(1, 0, 3, 2)`` for (N, N, O, O) kernels swaps the output axes too).

    >>> import jax.numpy as jnp
    >>> symmetrized(jnp.array([[1.0, 2.0], [0.0, 1.0]])).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    >>> float(symmetrized(jnp.full((2, 2), 3e38, jnp.float32))[0, 1])
    3e+38
    """
    if axes is None:
        axes = (1, 0, *range(2, jnp.ndim(k)))
    return 0.5 * k + 0.5 * jnp.transpose(k, axes)


@jax.jit
def _symmetric_part_eigenvalues(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(values, e)``: the ascending eigenvalues of ``(a + a^T) / 2`` (:func:`symmetrized`)
    are ``values 2^e``, with ``2^e`` the power of two that brings ``max |a|`` into [0.5, 1)
    (exact; ``eigvalsh`` of a float32 matrix with entries near 3e38 returns NaN). One compiled
    program per shape and dtype (eagerly, each of its operations compiles a program of its
    own)."""
    _, e = jnp.frexp(jnp.max(jnp.abs(a)))
    return jnp.linalg.eigvalsh(symmetrized(jnp.ldexp(a, -e))), e


def check_kernel_psd(k: Any, name: str, eigenvalues: Any = None) -> None:
    """Raises ValueError unless a concrete square kernel matrix ``k`` is symmetric and positive
    semi-definite up to round-off (a no-op on tracers).

    Tolerances, with ``n`` the size, ``eps`` the dtype's machine epsilon: symmetric when
    ``max |k - k^T| <= 100 max(n, 10) eps max |k|``; positive semi-definite when the smallest
    eigenvalue of ``(k + k^T) / 2`` is ``>= -100 n eps`` times the largest in magnitude.
    ``eigenvalues`` (ascending) may be passed when the caller has them already; otherwise they
    are computed here (``eigvalsh``, O(n^3)). Callers then read the kernel as ``(k + k^T) / 2``.
    """
    if not is_concrete(k) or (eigenvalues is not None and not is_concrete(eigenvalues)):
        return
    arr = np.asarray(k)
    n = arr.shape[0]
    eps = float(np.finfo(arr.dtype).eps)
    top = float(np.max(np.abs(arr))) if arr.size else 0.0
    gap = float(np.max(np.abs(arr - arr.T))) if arr.size else 0.0
    if gap > 100.0 * max(n, 10) * eps * top:
        raise ValueError(
            f"{name} is not symmetric: max |K - K^T| = {gap:.3e} against max |K| = {top:.3e} "
            "(beyond round-off). Pass a kernel matrix (a kernel of the training inputs with "
            "themselves is symmetric)."
        )
    values, e = None if eigenvalues is None else np.asarray(eigenvalues), 0
    if values is None or not np.all(np.isfinite(values)):  # NaN: an overflow inside eigh
        values, e = (np.asarray(v) for v in _symmetric_part_eigenvalues(jnp.asarray(arr)))
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} has eigenvalues that are not finite: are its entries finite?")
    largest = max(float(np.max(np.abs(values))), float(np.finfo(arr.dtype).tiny))
    smallest = float(values[0])
    if smallest < -100.0 * n * eps * largest:  # relative: the same at any power-of-two scale
        raise ValueError(
            f"{name} is not positive semi-definite: smallest eigenvalue "
            f"{np.ldexp(smallest, int(e)):.3e} against largest {np.ldexp(largest, int(e)):.3e} "
            "(beyond round-off). Pass a kernel matrix."
        )


def regularizer(k: jax.Array, diag_reg) -> jax.Array:
    """``diag_reg * trace(k) / n``: diag_reg is relative to the mean diagonal entry."""
    return jnp.asarray(diag_reg, k.dtype) * jnp.trace(k) / k.shape[0]


def null_tolerance(n: int, eps, largest):
    """Eigenvalues at or below ``sqrt(n) eps lambda_max`` count as round-off zeros.

    Computed eigenvalues of exactly singular kernels land within about ``eps lambda_max`` of
    zero; the ``sqrt(n)`` margin covers that while keeping real but small eigenvalues, which the
    stricter rank tolerance ``n eps lambda_max`` would drop (in float32 it discards informative
    directions of well-posed kernels with condition numbers of only ~1e4).
    """
    return np.sqrt(n) * eps * largest


@jax.jit
def _clipped_eigh(k: jax.Array, diag_reg) -> tuple[jax.Array, Eigen]:
    """The computation of :func:`eigh_psd` as one compiled program (eagerly, each of its dozen
    operations would compile a program of its own for every new shape): the raw eigenvalues of
    the symmetrized kernel (for the PSD check) and the clipped :class:`Eigen`."""
    k_sym = symmetrized(k)
    values, vectors = jnp.linalg.eigh(k_sym)
    n = k.shape[0]
    eps = jnp.finfo(k.dtype).eps
    scale = jnp.maximum(jnp.max(jnp.abs(values)), jnp.finfo(k.dtype).tiny)
    clipped = jnp.maximum(values, 0.0)
    reg = regularizer(k_sym, diag_reg)
    null = clipped + reg <= null_tolerance(n, eps, scale)
    return values, Eigen(clipped, vectors, reg, null)


def eigh_psd(k: jax.Array, diag_reg, name: str) -> Eigen:
    """Eigendecomposition of the symmetrized kernel, round-off negatives clipped to zero.

    A concrete kernel that passes :func:`check_kernel_psd` but whose decomposition is not
    finite in its dtype (``eigh`` of float32 entries near 3e38 gives NaN; a trace beyond the
    largest float makes the regularizer inf) raises ValueError naming it: every prediction
    from it would be NaN."""
    values, eig = _clipped_eigh(k, diag_reg)
    check_kernel_psd(k, name, values)  # the same checks as ntkjax.gradient_flow's
    if is_concrete(values) and not (np.all(np.isfinite(np.asarray(values)))
                                    and np.isfinite(np.asarray(eig.reg))):
        raise ValueError(
            f"{name}'s eigendecomposition is not finite in {np.dtype(k.dtype).name} (entries "
            f"up to {float(np.max(np.abs(np.asarray(k)))):.3e}): scale the kernel down, or "
            "use float64.")
    return eig
