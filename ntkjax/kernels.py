"""Exact infinite-width NNGP and NTK of a Flax module built from :mod:`ntkjax.nn` layers.

The same ``flax.linen`` module defines the finite network (``module.init`` / ``module.apply`` on
arrays) and its infinite-width limit: :func:`kernel_fn` feeds the module a :class:`Kernel` instead
of an array, and every :mod:`ntkjax.nn` layer and activation maps the kernel by the closed-form
rule it declares beside its finite computation. Residual sums of independent branches add
kernels. A Flax built-in layer that meets a :class:`Kernel` (``flax.linen.Dense``, ``Dropout``,
...) has no such rule and raises a ValueError naming it.

Per output: a readout with O outputs gives the kernel of one output, of shape (N1, N2); the
outputs are independent and identically distributed, so the full NNGP / NTK is
``kernel (x) I_O`` (Kronecker product with the O x O identity).

Images. Inputs of shape (N, *S, C) (NHWC for 2-D; any number of spatial axes) keep, per pair of
inputs, the kernel between pairs of positions. The input kernel is ``x_a[p] . x_b[p'] / C``;
:class:`ntkjax.nn.Conv` averages it over patches (:func:`ntkjax.nn.conv.patch_average`) and
applies the dense rule; activations act entrywise; :func:`ntkjax.nn.flatten` and the global
poolings remove the spatial axes (Novak et al. 2019; Arora et al. 2019). A dense layer on a
kernel with spatial axes acts per position, as ``flax.linen.Dense`` on the channel axis does.

Only the pairs of positions the readout needs are kept. Convolutions, dense layers and
activations map the kernel between positions ``(p, p)`` to kernels between positions
``(o, o)`` (a convolution averages ``k[o + delta, o + delta]`` over its window), and a flatten
readout reads only those: such a network needs the *same-position* kernel, of shape
(N1, N2, *S) (``Kernel.diagonal_spatial``). Pooling and anything else that mixes positions needs
*all pairs*, (N1, N2, *S, *S). :func:`kernel_fn` decides from the module itself, as
neural-tangents propagates its diagonal masks back from the readout: an output kernel's static
facts name every layer that mixes positions (``Kernel.all_pairs_layers``, noted by
:meth:`Kernel.require_all_pairs`) and every layer whose rule depends on x2 being the same batch
(``Kernel.same_batch_layers``). The module is traced once per call: the first call on inputs of
a shape evaluates it at once on same-position pairs and reads the facts off the result (they
are remembered by that kernel function, per input shape -- no state is shared between kernel
functions); only a module that turns out to need all pairs
(a layer raises :class:`AllPairsRequired`, so that trace stops there) is evaluated again, with
all pairs, on that first call.

Variances. Every :class:`Kernel` carries each input's covariance with itself (``var1``,
``var2``; across all pairs of positions for images), and every layer rule maps them with the
pairwise kernels, so a kernel of two different batches -- ``x2`` given, or one block of a
blocked evaluation -- holds everything that activations, LayerNorm and attention read, and
residual sums around them evaluate for any pair of batches. Nothing is read from ambient state:
a block's kernel is computed from its two blocks of inputs alone (for ``x2 = None``, the blocks
above the diagonal take each layer's variances of their inputs from the diagonal blocks, where
they were computed once, instead of computing them again: ``_replaying_pairs``).

Masks. Padded sequences and images carry boolean position masks beside the inputs (True =
masked; the inputs' shape without the channel axis): ``kernel_fn(module)(x1, x2, mask1=...,
mask2=...)`` and ``kernel_matrix(..., mask1=..., mask2=...)`` put them in the :class:`Kernel`
(``mask1``, ``mask2``), and the layers follow neural-tangents' rules (Hron et al. 2020; nt's
``mask_constant``, converted by :func:`mask_from_constant`): masked positions count as zeros in
the input kernel, take no part as attention keys and values, in pooling (the global average is
over the unmasked positions), convolutions and LayerNorm statistics; convolutions and windowed
pooling that change the positions map the masks (:func:`ntkjax.nn.window_mask`); and the
returned kernel's entries at masked positions are 0. The finite network takes the same masks as
a call argument, ``module.apply(params, x, mask=mask)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from jax.extend import core as jax_core

from ntkjax._checks import (
    check_choice,
    check_mask,
    check_pair,
    float_dtype,
    is_concrete,
    zero_masked,
)
from ntkjax._kernel import (
    NETWORK_INPUTS,
    AllPairsRequired,
    ForeignFunctionError,
    InputPair,
    Kernel,
    ScaledParts,
    batch_diagonal,
    describe_foreign_call,
    fusion_boundary,
    per_input,
    position_diagonal,
    pow2,
    traceback_frames,
)
from ntkjax._spectral import symmetrized
from ntkjax._store import describe_object
from ntkjax._tiling import pad_rows as _pad_rows
from ntkjax.blocking import evaluate_in_blocks

__all__ = [
    "POSITION_PAIRS",
    "AllPairsRequired",
    "ForeignFunctionError",
    "InputPair",
    "Kernel",
    "PositionPairs",
    "input_kernel",
    "kernel_fn",
    "kernel_matrix",
    "mask_from_constant",
    "position_diagonal",
]

PositionPairs = Literal["auto", "all", "same"]
POSITION_PAIRS: tuple[PositionPairs, ...] = ("auto", "all", "same")


def _float_inputs(x1: Any, x2: Any) -> tuple[jax.Array, jax.Array | None]:
    """Validated inputs in one floating dtype: (batch, features) or (batch, *spatial, channels)."""
    check_pair(x1, x2)
    dtype = float_dtype(x1, x2)
    return jnp.asarray(x1, dtype), (None if x2 is None else jnp.asarray(x2, dtype))


def mask_from_constant(x: Any, mask_constant: float) -> tuple[jax.Array, jax.Array]:
    """neural-tangents' ``mask_constant`` convention converted to ntkjax's boolean masks.

    ntkjax's convention: a mask travels beside the inputs, a boolean array of the inputs' shape
    without the channel axis, True where a position is masked (padding: it takes no part in
    attention, pooling, convolutions and LayerNorm statistics). neural-tangents instead marks
    masked entries by a constant value in the inputs; a position is masked when every one of its
    channels equals ``mask_constant`` (nt marks single entries, and its kernels refuse masks
    that differ between channels, so whole positions are what it supports). The masked
    positions' values are replaced by 0, as nt does before computing the input kernel.

    Args:
      x: inputs (N, *S, C) holding ``mask_constant`` in every channel of masked positions.
      mask_constant: the padding value (a finite number).

    Returns:
      ``(x, mask)``: the inputs with masked positions set to 0, and the boolean (N, *S) mask,
      ready for ``kernel_fn(module)(x, mask1=mask)`` and ``module.apply(params, x, mask=mask)``.

    Raises:
      ValueError: for inputs without positions, a non-finite constant, or a position where
        some but not all channels equal the constant (nt refuses these for kernels too).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 2.0], [9.0, 9.0]]])  # one sequence of length 2, padded at 1
    >>> x0, mask = mask_from_constant(x, 9.0)
    >>> mask.tolist(), x0[0, 1].tolist()
    ([[False, True]], [0.0, 0.0])
    """
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            "mask_from_constant: masks mark positions of sequences or images, inputs (batch, "
            f"*spatial, channels); got x.shape={tuple(x.shape)}."
        )
    if not np.isfinite(mask_constant):
        raise ValueError(f"mask_constant must be a finite number, got {mask_constant!r}.")
    hits = x == jnp.asarray(mask_constant, x.dtype)
    mask = jnp.all(hits, axis=-1)
    if is_concrete(hits) and bool(jnp.any(jnp.any(hits, axis=-1) & ~mask)):
        raise ValueError(
            f"mask_from_constant: some positions hold mask_constant={mask_constant!r} in some "
            "channels but not all; a mask marks whole positions (neural-tangents' kernels "
            "refuse channel-wise masks too)."
        )
    return jnp.where(mask[..., None], jnp.zeros((), x.dtype), x), mask


def _input_masks(
    x1: jax.Array, x2: jax.Array | None, mask1: Any, mask2: Any
) -> tuple[jax.Array | None, jax.Array | None]:
    """The checked position masks of x1 and x2 (mask2 is mask1 for ``x2 = None``; an input
    without a mask, when the other has one, is all unmasked); (None, None) without masks."""
    if x2 is None and mask2 is not None:
        raise ValueError("mask2 was given without x2; for x2 = None the mask of x1 (mask1) is "
                         "used for both.")
    m1 = check_mask(x1, mask1, "mask1", "x1")
    if x2 is None:
        return m1, m1
    m2 = check_mask(x2, mask2, "mask2", "x2")
    if m1 is None and m2 is None:
        return None, None
    if m1 is None:
        m1 = jnp.zeros(x1.shape[:-1], bool)
    if m2 is None:
        m2 = jnp.zeros(x2.shape[:-1], bool)
    return m1, m2


def input_kernel(
    x1: jax.Array, x2: jax.Array | None = None, *, diagonal_spatial: bool = False,
    mask1: jax.Array | None = None, mask2: jax.Array | None = None,
) -> Kernel:
    """The kernel of the inputs themselves: ``nngp = x1 x2^T / d``, ``ntk = 0``, ``width = d``,
    marked not Gaussian (:attr:`Kernel.non_gaussian`: an activation or LayerNorm right on the
    inputs is an error).

    With ``x2 = None`` the Gram matrix is symmetrized (``(G + G^T) / 2``: ``x @ x.T`` is not
    bitwise symmetric on every backend; jitted on the CPU from 256 inputs, it is the product
    as it is where a probe of this process's product of that shape finds it bitwise symmetric,
    ``_gram_is_symmetric``, and is formed in mirrored blocks otherwise, ``_mirrored_gram``) and
    the variances are its diagonal, so the kernel is exactly symmetric and its diagonal exactly
    consistent. Inputs of shape (N, d); integer inputs become the default float dtype. Images
    (N, *S, C):
    ``nngp[a, b, p, p'] = x1[a, p] . x2[b, p'] / C`` of shape (N1, N2, *S, *S),
    ``var1[a, p, p'] = x1[a, p] . x1[a, p'] / C``, ``width = C``; with ``diagonal_spatial``
    only ``p = p'``: (N1, N2, *S) and (N1, *S).

    Masks (images and sequences): ``mask1`` / ``mask2``, boolean (N, *S), True = masked; the
    masked positions' values count as 0 (neural-tangents' rule: the input kernel is still
    divided by the full channel count C) and the kernel carries the masks
    (:attr:`Kernel.mask1`).

    Args:
      x1: inputs (N1, d) or images (N1, *S, C).
      x2: inputs like x1, or None for the batch x1 with itself.
      diagonal_spatial: for images, keep only same-position pairs.
      mask1: None, or x1's boolean position mask (N1, *S).
      mask2: None, or x2's (only with ``x2``).

    Returns:
      The input :class:`Kernel`.

    >>> import jax.numpy as jnp
    >>> input_kernel(jnp.array([[1.0, 1.0], [2.0, 0.0]])).nngp.tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    """
    x1, x2 = _float_inputs(x1, x2)
    m1, m2 = _input_masks(x1, x2, mask1, mask2)
    if x1.ndim > 2:
        return _image_input_kernel(x1, x2, diagonal=diagonal_spatial, mask1=m1, mask2=m2)
    d = x1.shape[1]
    same = x2 is None
    x2 = x1 if same else x2
    (x1u, e1, s1), (x2u, e2, s2) = _scaled_rows(x1), _scaled_rows(x2)
    # each row at its stored scale (times 2^-s, exact): entries below 2^_UNSCALED_EXPONENT, so
    # no product (< 2^64) nor sum of the Gram matrix overflows, and it needs no per-entry
    # rescaling (two multiplications per entry in the loop that reads it, when it was formed
    # from the unit-scaled rows: powers of two commute with rounding, so it is bit for bit the
    # same wherever no partial product is subnormal)
    x1s = x1 * pow2(-s1, x1.dtype)[:, None]
    x2s = x1s if same else x2 * pow2(-s2, x2.dtype)[:, None]
    if same and _cpu_compiled_gram(x1s):
        gram = (jnp.matmul(x1s, x1s.T, precision=jax.lax.Precision.HIGHEST) / d
                if _gram_is_symmetric(*x1s.shape, x1s.dtype) else _mirrored_gram(x1s))
    else:
        gram = jnp.matmul(x1s, x2s.T, precision=jax.lax.Precision.HIGHEST)
        gram = _symmetric_gram(gram, d) if same else gram / d
    s1, s2 = _row_exponents(s1), _row_exponents(s2)
    if same:
        var1 = var2 = jnp.diagonal(gram)
    else:
        var1, var2 = _stored_variances(x1u, e1, s1), _stored_variances(x2u, e2, s2)
    # the stored value of a true 1 per input, computed once per input: formed from the
    # exponents, the first dense layer's bias term was a pow2 of s1_i + s2_j (five integer
    # operations) in every entry of the fused loop; now one product of the two (exact, or 0
    # where 2^-(s1 + s2) is below the normal range: ScaledParts.stored_ones)
    parts = ScaledParts(nngp=gram, ntk=jnp.zeros_like(gram), var1=var1, var2=var2,
                        log2_scale1=s1, log2_scale2=s2)
    ones1, ones2 = parts.input_ones(gram.dtype)
    ones1 = per_input(ones1)
    parts = parts.replace(ones1=ones1, ones2=ones1 if same else per_input(ones2))
    return Kernel.from_scaled(parts, width=d, same_inputs=same, non_gaussian=NETWORK_INPUTS)


# Inputs whose largest entry is below 2^_UNSCALED_EXPONENT are stored unscaled (log2 scale 0:
# their kernels are the plain ones, bit for bit); a larger one is stored divided by
# 2^(e - _UNSCALED_EXPONENT) (its largest entry 2^e), so stored input kernels stay below 2^64
# and the bounded activations' terms 2^-2s stay normal in float32 up to |x| ~ 2^94.
_UNSCALED_EXPONENT = 32


def _scaled_rows(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x_unit, e, s)`` for inputs (N, d): each row ``x_i`` times ``2^-e_i``, ``e_i`` the
    exponent that brings its largest entry into [0.5, 1) (exact: a power of two), and its
    stored scale ``s_i = max(e_i - _UNSCALED_EXPONENT, 0)`` (:class:`ScaledParts`)."""
    _, e = jnp.frexp(jnp.max(jnp.abs(x), axis=1))
    e = jnp.where(jnp.isfinite(jnp.max(jnp.abs(x), axis=1)), e, 0)
    return x * pow2(-e, x.dtype)[:, None], e, jnp.maximum(e - _UNSCALED_EXPONENT, 0)


def _row_exponents(s: jax.Array) -> jax.Array:
    """Integer exponents (one per input) computed once (``_kernel.per_input``, as floats: exact
    for exponents far beyond any float's range; eagerly ``s`` itself, without the casts)."""
    return s if is_concrete(s) else per_input(s.astype(jnp.float32)).astype(s.dtype)


def _stored_variances(x_unit: jax.Array, e: jax.Array, s: jax.Array) -> jax.Array:
    """Each row's ``x . x / d`` divided by ``2^(2 s)``, from its unit-scaled row."""
    v = jnp.sum(x_unit * x_unit, axis=-1) / x_unit.shape[-1]
    half = pow2(e - s, v.dtype)
    return (v * half) * half


def _cpu_compiled_gram(x: jax.Array) -> bool:
    """Whether the input Gram matrix of ``x`` with itself takes the compiled CPU route, without
    the symmetrizing pass: the product itself where :func:`_gram_is_symmetric`, else
    :func:`_mirrored_gram`."""
    return (jax.default_backend() == "cpu" and not is_concrete(x)
            and x.shape[0] >= _MIRROR_BLOCKS * 64)


@functools.cache
def _gram_is_symmetric(n: int, d: int, dtype: Any) -> bool:
    """Whether this process's compiled CPU product ``x @ x.T`` of shape (n, d) comes out
    bitwise symmetric: run once per shape and dtype, on fixed pseudo-random data (the order in
    which a matrix product sums does not depend on the values).

    XLA:CPU's products sum every entry over ``d`` in one order, so ``G[i, j]`` and ``G[j, i]``
    are the same sum of the same products, at the sizes measured (jitted, 256 to 4000 inputs,
    1 to 20,000 features, float32 and float64); eager products of few inputs and many features
    are not (33 x 784 in float64: the sum is split across threads). Where the probe finds one
    asymmetric entry, the Gram matrix is formed in mirrored blocks instead
    (``_mirrored_gram``), which costs a transposed copy of half the matrix: on the 2-core CPU,
    a jitted depth-3 ReLU MLP NTK of 4000 inputs 0.075 s with the product as it is, 0.11 s
    mirrored."""
    x = np.random.default_rng(n * 7919 + d).standard_normal((n, d)).astype(dtype)
    with jax.ensure_compile_time_eval():
        g = np.asarray(jax.jit(lambda a: jnp.matmul(
            a, a.T, precision=jax.lax.Precision.HIGHEST))(x))
    t = 256  # compared in tiles, each read across its rows once (the whole transpose: 6x slower)
    return all(np.array_equal(g[i:i + t, j:j + t], g[j:j + t, i:i + t].T)
               for i in range(0, n, t) for j in range(i, n, t))


# Row blocks of the mirrored Gram matrix (from _MIRROR_BLOCKS * 64 inputs). Measured, the
# jitted depth-3 / depth-10 ReLU MLP NTK of 4000 inputs (CPU-s, loaded machine): 0.278 /
# 0.621 with the whole matrix symmetrized (_symmetric_gram), 0.20 / 0.55 in 4 x 4 blocks
# joined by concatenation, 0.19 / 0.56 in 8 x 8; 0.176 / 0.512 in 4 x 4 written into place
# (before the symmetrization, session 6: 0.137-0.148 / 0.549).
_MIRROR_BLOCKS = 4


def _mirrored_gram(x: jax.Array) -> jax.Array:
    """``x x^T / d``, exactly symmetric by construction, in B x B blocks of rows: each block
    above the diagonal once (a product of two row blocks), the one below it its transpose,
    and each diagonal block symmetrized (``(G + G^T) / 2``), each written into place in one
    N x N array (a concatenation of the blocks copied it twice), divided by ``d`` once in
    the loop that reads it. Half the products of the whole matrix, and only the diagonal
    blocks are read transposed in full (XLA:CPU's transposes are slow: 0.07-0.22 CPU-s for a
    4000 x 4000 matrix, whose copy takes 0.03)."""
    n, d = x.shape
    b = _MIRROR_BLOCKS
    edges = [round(i * n / b) for i in range(b + 1)]
    rows = [x[edges[i]:edges[i + 1]] for i in range(b)]
    hi = jax.lax.Precision.HIGHEST
    out = jnp.zeros((n, n), x.dtype)
    for i in range(b):
        for j in range(i, b):
            g = jnp.matmul(rows[i], rows[j].T, precision=hi)
            if i == j:
                out = jax.lax.dynamic_update_slice(out, _symmetrized(g, False),
                                                   (edges[i], edges[i]))
            else:
                out = jax.lax.dynamic_update_slice(out, g, (edges[i], edges[j]))
                out = jax.lax.dynamic_update_slice(out, g.T, (edges[j], edges[i]))
    return out / d  # divided once, in the reader's loop


def _symmetric_gram(gram: jax.Array, d: int) -> jax.Array:
    """``(G + G^T) / 2 / d`` (the halving as in :func:`ntkjax._spectral.symmetrized`).

    On the CPU in two passes, each behind a conditional (a fusion boundary: both branches are
    the same, and the predicate is true for any value; a constant one would be folded away).
    Left to itself, XLA:CPU fuses ``G^T`` into every consumer as a read across the rows of
    ``G``: one memory page per entry, in the inner loop of each fused kernel chain of
    :func:`_two_graphs`. Here the first pass writes ``G^T`` in ``b x b`` tiles (``b`` the
    largest of 16, 8, 4, 2, 1 dividing N; as one flat array, whose single layout XLA cannot
    turn back into a strided read), reading ``b`` rows of ``G`` at a time; the second pass
    forms the sum from ``G`` and the tiles, both read ``b`` contiguous entries at a time.
    Measured on one core, a jitted depth-3 ReLU MLP NTK of 4000 inputs: 0.355 CPU-s with the
    sum formed in one pass (0.27-0.30 in two; 0.14 without any symmetrization)."""
    if jax.default_backend() != "cpu" or gram.shape[0] == 0 or is_concrete(gram):
        # eagerly nothing is fused; compiled, XLA would also fold the halving of
        # _spectral.symmetrized into (G + G^T) / 2, which overflows near the largest float
        return _symmetrized(gram, False) / d
    n = gram.shape[0]
    b = next(t for t in (16, 8, 4, 2, 1) if n % t == 0)
    m = n // b

    def transposed_tiles(g: jax.Array) -> jax.Array:  # [I, J, i, j] = G[J b + j, I b + i]
        return jnp.transpose(g.reshape(m, b, m, b), (2, 0, 3, 1)).reshape(-1)

    def symmetric(operands: tuple[jax.Array, jax.Array]) -> jax.Array:
        g, tiles = operands
        g_t = jnp.transpose(tiles.reshape(m, m, b, b), (0, 2, 1, 3)).reshape(n, n)
        return ((0.5 * g + 0.5 * g_t) / d).reshape(-1)

    corner = gram[0, 0]
    always = jnp.isfinite(corner) | ~jnp.isfinite(corner)
    tiles = jax.lax.cond(always, transposed_tiles, transposed_tiles, gram)
    return jax.lax.cond(always, symmetric, symmetric, (gram, tiles)).reshape(n, n)


def _unit_scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x * s, s)`` with ``s`` the power of two that brings ``max |x|`` into [0.5, 1).

    Gram matrices are formed from the scaled inputs and divided by ``s1 s2`` afterwards: the
    products are exact (powers of two), so the result is bit-identical to ``x1 x2^T / d``
    wherever that is representable, and nothing overflows (or underflows) in between --
    ``x . x'`` of inputs of size 1e18 overflows float32 long before ``x . x' / d`` does.
    """
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x)))
    scale = pow2(-exponent, x.dtype)
    return x * scale, scale


def _image_input_kernel(x1: jax.Array, x2: jax.Array | None, *, diagonal: bool,
                        mask1: jax.Array | None = None,
                        mask2: jax.Array | None = None) -> Kernel:
    """The input kernel of images, with each input's self-covariances (for ``x2 = None`` the
    symmetrized Gram's own diagonal); with (checked) masks, of the inputs with masked positions
    set to 0, carrying the masks."""
    if mask1 is not None:
        k = _image_input_kernel(zero_masked(x1, mask1),
                                None if x2 is None else zero_masked(x2, mask2),
                                diagonal=diagonal)
        return k.with_masks(mask1, mask2)
    c, spatial = x1.shape[-1], x1.shape[1:-1]
    x1s, s1 = _unit_scaled(x1)
    x2s, s2 = (x1s, s1) if x2 is None else _unit_scaled(x2)
    flat1 = x1s.reshape(x1.shape[0], -1, c)
    flat2 = x2s.reshape(x2s.shape[0], -1, c)
    hi = jax.lax.Precision.HIGHEST
    if diagonal:
        gram = jnp.einsum("apc,bpc->abp", flat1, flat2, precision=hi) / c / s1 / s2
        gram = gram.reshape(*gram.shape[:2], *spatial)
    else:
        gram = jnp.einsum("apc,bqc->abpq", flat1, flat2, precision=hi) / c / s1 / s2
        gram = gram.reshape(*gram.shape[:2], *spatial, *spatial)
    if x2 is None:
        gram = _symmetrized(gram, diagonal)
        var1 = var2 = batch_diagonal(gram)
    else:
        var1, var2 = _self_covariance(x1, diagonal), _self_covariance(x2, diagonal)
    return Kernel(nngp=gram, ntk=jnp.zeros_like(gram), var1=var1, var2=var2, width=c,
                  diagonal_spatial=diagonal, same_inputs=x2 is None, non_gaussian=NETWORK_INPUTS)


def _self_covariance(x: jax.Array, diagonal: bool = False) -> jax.Array:
    """Each input's kernel with itself: (N,) for (N, d); (N, *S, *S) for images (N, *S, C), or
    (N, *S) with ``diagonal``."""
    c = x.shape[-1]
    x, s = _unit_scaled(x)
    if x.ndim == 2 or diagonal:
        return jnp.sum(x * x, axis=-1) / c / s / s
    flat = x.reshape(x.shape[0], -1, c)
    hi = jax.lax.Precision.HIGHEST
    cov = jnp.einsum("apc,aqc->apq", flat, flat, precision=hi) / c / s / s
    return cov.reshape(x.shape[0], *x.shape[1:-1], *x.shape[1:-1])


def _contains_kernel(args, kwargs) -> bool:
    leaves = jax.tree_util.tree_leaves((args, kwargs), is_leaf=lambda a: isinstance(a, Kernel))
    return any(isinstance(leaf, Kernel) for leaf in leaves)


_CONTAINERS = (linen.Sequential,)


def _reject_flax_layers(next_fun, args, kwargs, context):
    """Interceptor: a Flax built-in layer (other than a container) must not receive a Kernel."""
    module = context.module
    cls = type(module)
    if (
        cls.__module__.startswith("flax.")
        and not isinstance(module, _CONTAINERS)
        and _contains_kernel(args, kwargs)
    ):
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} (module {module.name!r}) has no infinite-width "
            "kernel rule: ntkjax.kernel_fn needs layers from ntkjax.nn -- use ntkjax.nn.Dense "
            "instead of flax.linen.Dense and the ntkjax.nn activations (ntkjax.nn.elementwise "
            "for any other one), ntkjax.nn.LayerNorm, ntkjax.nn.Dropout and "
            "ntkjax.nn.SelfAttention instead of their flax counterparts."
        )
    return next_fun(*args, **kwargs)


class _VariancesWrittenOut:
    """Interceptor of one application of a module to a kernel: each layer's output variances
    behind a fusion boundary (traced only).

    The per-input variances are small ((N, *S) or (N, *S, *S)) and their maps are cheap (a ReLU
    halves them, a convolution sums shifted copies). XLA duplicates cheap producers into every
    consumer: each pair's fused kernel loop recomputed the variance recursion of its two inputs
    (N times the work at every layer: a 3x3 convolution's six shifted sums per pair entry),
    and every layer's fusion the whole recursion before it (a depth-L network compiled in
    O(L^2)). Measured on one core, the jitted ReLU CNN kernel (flatten readout) of 256 images
    of 8 x 8: 0.22 CPU-s with a sort as the boundary after each activation only, 0.13 with
    this after every layer (0.11 before the variances were carried on the Kernel).

    A kernel with a scaled form also gets the stored value of a true 1 per input
    (``ScaledParts.ones1`` / ``ones2``, read by dense layers' bias terms) as an array of its
    own every :data:`_ONES_LAYERS` layers (modules returning a kernel): shared by every layer
    of a deep network's fused loop, or formed from the integer exponents inside it, that term
    made XLA:CPU's fusion emitter compile the loop in far more than linear time in the depth
    (:meth:`ScaledParts.stored_ones`).

    Blocked evaluations (:func:`_blocked_pairwise`) also use it to compute each input's
    variances once: ``written`` lists every layer's output ``var1`` in order (the diagonal
    blocks, a batch with itself), and ``replay`` -- per layer, the variances of the pair's two
    blocks of inputs, ``(var1s, var2s)`` -- puts them in place of the ones each layer of an
    off-diagonal block computed (which XLA then drops as unused). A layer whose output does not
    match the replayed one (another count of layers, another shape, a scaled form) raises
    :class:`_ReplayMismatch`."""

    def __init__(self, replay: tuple[Sequence[jax.Array], Sequence[jax.Array]] | None = None,
                 ) -> None:
        self.layers = 0
        self.written: list[jax.Array] = []
        self._replay = replay

    def replayed_all(self) -> bool:
        """Whether every replayed layer met its variances (none left over)."""
        return self._replay is None or self.layers == len(self._replay[0])

    def _replayed(self, out: Kernel) -> Kernel:
        assert self._replay is not None
        var1s, var2s = self._replay
        i = self.layers
        if (i >= len(var1s) or out.scaled is not None
                or var1s[i].shape != out.var1.shape or var2s[i].shape != out.var2.shape):
            raise _ReplayMismatch(f"layer output {i} does not match the replayed variances")
        self.layers += 1
        return out.replace(var1=var1s[i].astype(out.var1.dtype),
                           var2=var2s[i].astype(out.var2.dtype))

    def __call__(self, next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if not isinstance(out, Kernel) or is_concrete(out.var1):
            return out
        if self._replay is not None:  # computed once, outside the pairwise loop
            return self._replayed(out)
        var1 = fusion_boundary(out.var1)
        var2 = var1 if out.same_inputs else fusion_boundary(out.var2)
        self.written.append(var1)
        scaled = out.scaled
        if scaled is not None:  # the scaled form's variances are what the next rules read
            stored1 = fusion_boundary(scaled.var1)
            stored2 = stored1 if out.same_inputs else fusion_boundary(scaled.var2)
            ones1, ones2 = scaled.ones1, scaled.ones2
            if ones1 is None or ones2 is None or self.layers % _ONES_LAYERS == 0:
                ones1, ones2 = scaled.input_ones(stored1.dtype)
                ones1 = fusion_boundary(ones1)
                ones2 = ones1 if out.same_inputs else fusion_boundary(ones2)
            scaled = scaled.replace(var1=stored1, var2=stored2, ones1=ones1, ones2=ones2)
        self.layers += 1
        return out.replace(var1=var1, var2=var2, scaled=scaled)


class _ReplayMismatch(ValueError):
    """A module whose layers' variances cannot be replayed from its diagonal blocks
    (:class:`_VariancesWrittenOut`): the blocked evaluation computes them in every block."""


# How many layers read one array of the stored ones (_VariancesWrittenOut). Compile CPU-s of
# a jitted depth-75 ReLU MLP (16 x 8 inputs, loaded machine): one array for all layers 19.6,
# a new one every layer 13.7, every 4 layers 12.3, every 16 layers 10.7, every 32 14.8 (no
# bias term at all: 8.1).
_ONES_LAYERS = 16


def _call_args(call_args: dict[str, Any], x1: jax.Array,
               x2: jax.Array | None) -> dict[str, InputPair]:
    """kernel_fn's keyword arguments as :class:`InputPair` s, checked against the inputs' batch
    sizes: a pair ``(a1, a2)`` with a row per input of x1 and x2, or, for ``x2 = None``, one
    array (or the pair ``(a1, a1)``)."""
    out = {}
    for name, value in call_args.items():
        if isinstance(value, InputPair):
            value = (value.first, value.second)
        if isinstance(value, tuple | list):
            if len(value) != 2:
                raise ValueError(f"kernel_fn: {name}= takes one array per batch, (for x1, for "
                                 f"x2); got {len(value)} items.")
            first, second = value
        elif x2 is None:
            first = second = value
        else:
            raise ValueError(f"kernel_fn: with x2 given, {name}= must be a pair (for x1, for "
                             f"x2), like neural-tangents' pattern=(P1, P2); got one array.")
        first, second = jnp.asarray(first), jnp.asarray(second)
        for label, a, x in (("x1", first, x1), ("x2", second, x1 if x2 is None else x2)):
            if a.ndim < 1 or a.shape[0] != x.shape[0]:
                raise ValueError(
                    f"kernel_fn: {name}= for {label} has shape {tuple(a.shape)}, but {label} "
                    f"has shape {tuple(x.shape)}: it needs one row per input ({x.shape[0]}).")
        out[name] = InputPair(first, second)
    return out


def _apply_to_kernel(module: linen.Module, kernel: Kernel,
                     call_args: dict[str, InputPair] | None = None,
                     variances: _VariancesWrittenOut | None = None) -> Kernel:
    """The module applied to ``kernel`` (``variances``: the interceptor that writes out, or
    replays, each layer's variances; a fresh one by default)."""
    extra: dict[str, Any] = dict(call_args or {})
    written = _VariancesWrittenOut() if variances is None else variances
    try:
        with linen.intercept_methods(_reject_flax_layers), \
                linen.intercept_methods(written):
            out = module.apply({}, kernel, **extra)
    except ForeignFunctionError:
        raise
    except (TypeError, ValueError) as err:
        # JAX functions that abstractify their arguments (lax ops, jitted jax.nn functions)
        # reject a Kernel before asking for __jax_array__: name the call from the traceback.
        text = str(err)
        if "__jax_array__" in text or "ntkjax.kernels.Kernel" in text:
            raise ForeignFunctionError(describe_foreign_call(traceback_frames(err))) from err
        raise
    if not isinstance(out, Kernel):
        raise ValueError(
            f"{type(module).__name__} returned {type(out).__name__} for a Kernel input; "
            "kernel_fn needs a module whose output is a single array built from ntkjax.nn layers."
        )
    return out


def kernel_fn(
    module: linen.Module, *, position_pairs: PositionPairs = "auto"
) -> Callable[..., Kernel]:
    """The infinite-width kernels of ``module``: ``kernel_fn(module)(x1, x2=None) -> Kernel``.

    ``module`` is any ``flax.linen`` module built from :mod:`ntkjax.nn` layers and activations
    (for example :class:`ntkjax.models.MLP`); it is applied to the input kernel
    ``x1 x2^T / d`` (:func:`input_kernel`) with no parameters. The result's ``.nngp`` and
    ``.ntk`` have shape (N1, N2) and are the kernels of ONE output: for a readout with O outputs
    the full NNGP / NTK is ``kernel (x) I_O``. ``x2 = None`` means ``x2 = x1``.

    The returned function is pure and jit-compatible (wrap it in ``jax.jit``; the module is
    closed over, i.e. static). It keeps the input dtype (float32 or float64). Inputs of shape
    (N, d), or images (N, *S, C) for convolutional networks (:class:`ntkjax.nn.Conv`,
    :class:`ntkjax.models.CNN`); a module whose output still has spatial axes gives kernels of
    shape (N1, N2, *S, *S) (see :class:`Kernel`). Image inputs are always evaluated as one
    compiled call (the function jits itself outside a trace; compilation is cached per input
    shape). So are vectors from 2^18 kernel entries (N1 N2), in one program shared by every
    ``kernel_fn`` of an equal module (flax modules compare by their fields); below that, an
    eager call runs op by op. For matrices larger than one compiled call should hold, use
    :func:`kernel_matrix`.

    Per-input call arguments: keyword arguments of the returned function are passed on to the
    module's ``__call__`` as :class:`InputPair` s -- e.g. the graph adjacency of
    :class:`ntkjax.nn.Aggregate`, ``fn(x1, x2, pattern=(P1, P2))`` (neural-tangents'
    convention) or ``fn(x1, pattern=P1)``. Each has one row per input and travels with the
    inputs' rows (also through the blocked evaluation); the finite network takes the array
    itself (``module.apply(params, x, pattern=P)``).

    Args:
      module: the network.
      position_pairs: for images, which pairs of positions the evaluation keeps (module
        docstring): ``"auto"`` -- only same-position pairs when the module allows it (no layer
        mixes positions and the output has no spatial axes), else all pairs; ``"all"`` --
        always all pairs; ``"same"`` -- only same-position pairs (a module whose output keeps
        spatial axes then gives (N1, N2, *S) kernels; a module that mixes positions is a
        ValueError). The kernels are the same either way.

    Masks: ``fn(x1, x2, mask1=m1, mask2=m2)`` with boolean position masks (N, *S), True where
    a position is padding (:func:`mask_from_constant` converts neural-tangents'
    ``mask_constant``). Masked positions take no part -- as attention keys and values, in
    pooling (global average pooling averages over the unmasked positions only), convolutions
    and LayerNorm statistics -- and the entries of masked positions of the output kernel are 0
    (neural-tangents' rules; Hron et al. 2020). The masks travel in the :class:`Kernel`
    (``mask1`` / ``mask2``); for ``x2 = None`` give ``mask1`` only.

    Returns:
      ``fn(x1, x2=None, *, mask1=None, mask2=None, **per_input)``, a pure function giving the
      :class:`Kernel` of the module's outputs.

    Raises:
      ValueError: for inputs without a feature axis or that disagree in their per-example
        shape, and when the module uses a layer without an infinite-width rule (e.g.
        ``flax.linen.Dense``).

    >>> import jax.numpy as jnp, ntkjax
    >>> cnn = ntkjax.models.CNN((8, 1), readout="flatten")
    >>> ntkjax.kernel_fn(cnn)(jnp.ones((3, 4, 4, 2))).ntk.shape
    (3, 3)
    """
    check_choice(position_pairs, POSITION_PAIRS, "position_pairs")
    known = _KnownFacts()

    def fn(x1: jax.Array, x2: jax.Array | None = None, mask1: Any = None,
           mask2: Any = None, **call_args: Any) -> Kernel:
        x1, x2 = _float_inputs(x1, x2)
        m1, m2 = _input_masks(x1, x2, mask1, mask2)
        args = _call_args(call_args, x1, x2)
        if x1.ndim == 2:
            return _vector_kernels(module, x1, x2, args)
        out = _image_call(module, x1, x2, position_pairs, known, args, m1, m2)
        out = out.masked()  # entries of masked output positions are 0 (nt's remasking)
        if x2 is None:
            # Dense layers and activations map symmetric kernels to exactly symmetric ones;
            # pooling sums positions in a different order for k[a, b] and k[b, a].
            out = out.replace(nngp=_symmetrized(out.nngp, out.diagonal_spatial),
                              ntk=_symmetrized(out.ntk, out.diagonal_spatial))
        return out

    jitted = jax.jit(fn)

    def dispatch(x1: jax.Array, x2: jax.Array | None = None, *, mask1: Any = None,
                 mask2: Any = None, **call_args: Any) -> Kernel:
        # Outside jit, one compiled call: op-by-op dispatch compiles every operation for each
        # new shape on its own (images: seconds for a small CNN; vectors: _vector_program).
        if is_concrete(x1) and (jnp.ndim(x1) > 2 or _compiles_vectors(module, x1, x2)):
            # inside the compiled program the values are not known: checked here
            a1, a2 = _float_inputs(x1, x2)
            _input_masks(a1, a2, mask1, mask2)
            _call_args(call_args, a1, a2)
            if a1.ndim > 2:
                return jitted(x1, x2, mask1, mask2, **call_args)
            return _vector_program(module, a1, a2, **call_args)
        return fn(x1, x2, mask1, mask2, **call_args)

    return dispatch


# From how many kernel entries (N1 N2) an eager kernel_fn call on vectors runs as one compiled
# program (_vector_program) instead of op by op. Measured on the 2-core machine (loaded, CPU-s,
# float64 ReLU MLP 512-512-10, 64 features): op by op, 2.1-2.5 s for each new shape (every
# operation compiled for it) and 0.014 / 0.10 / 0.31 s once compiled, N = 64 / 512 / 1024; one
# program, 0.6 / 0.9 / 1.1 s compiled for each new module and shape, then its run alone.
_COMPILED_ENTRIES = 2**18


def _compiles_vectors(module: linen.Module, x1: Any, x2: Any) -> bool:
    """Whether an eager call on vectors (N, d) runs as :func:`_vector_program`: from
    ``_COMPILED_ENTRIES`` entries, for a module that can key the compiled programs (hashable);
    inputs of another shape go on to kernel_fn's checks."""
    s1, s2 = np.shape(x1), np.shape(x1 if x2 is None else x2)
    return (len(s1) == 2 and len(s2) == 2 and s1[0] * s2[0] >= _COMPILED_ENTRIES
            and _is_hashable(module))


def _is_hashable(value: Any) -> bool:
    """True when ``value`` can key a compiled program (a static argument of ``jax.jit``)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.partial(jax.jit, static_argnums=0)
def _vector_program(module: linen.Module, x1: jax.Array, x2: jax.Array | None,
                    **call_args: Any) -> Kernel:
    """kernel_fn's evaluation on vectors as one compiled program, shared by every kernel_fn of
    an equal module (flax modules compare and hash by their fields) on the same shapes."""
    return _vector_kernels(module, x1, x2, _call_args(call_args, x1, x2))


def _symmetrized(k: jax.Array, diagonal_spatial: bool) -> jax.Array:
    """``(k + k^T) / 2`` (:func:`ntkjax._spectral.symmetrized`) for a kernel of shape
    (N, N, *S, *S) (x1 and x2 swapped, and with them the two position axes of each pair) or,
    same-position pairs, (N, N, *S)."""
    if diagonal_spatial:
        return symmetrized(k)
    nd = (k.ndim - 2) // 2
    return symmetrized(k, (1, 0, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)))


def _two_graphs(apply: Callable[[Kernel], Kernel], k: Kernel) -> Kernel:
    """``apply(k)`` with the NNGP taken from a second, structurally distinct copy of the graph.

    XLA fuses an elementwise chain into one loop only when all its users are in that loop; with
    both outputs drawn from one graph it materializes every layer (4-10x slower). Two
    independent chains -- the NTK one also computes the NNGP internally -- each fuse into a
    single loop over the (N1, N2) entries. The module is traced once (to a jaxpr), and the
    jaxpr is replayed on the original and on the copied input. Outside a trace, one
    application."""
    if is_concrete(k.nngp):
        return apply(k)
    leaves, in_tree = jax.tree_util.tree_flatten(k)
    closed, shapes = jax.make_jaxpr(
        lambda *ls: apply(jax.tree_util.tree_unflatten(in_tree, ls)), return_shape=True
    )(*leaves)
    out_tree = jax.tree_util.tree_structure(shapes)
    replay = jax_core.jaxpr_as_fun(closed)
    out = jax.tree_util.tree_unflatten(out_tree, replay(*leaves))
    zero = _opaque_zero(k.nngp if k.scaled is None else k.scaled.nngp)
    copy = k.replace(nngp=k.nngp + zero, scaled=None if k.scaled is None else
                     k.scaled.replace(nngp=k.scaled.nngp + zero))
    again = jax.tree_util.tree_unflatten(out_tree, replay(*jax.tree_util.tree_leaves(copy)))
    return out.replace(nngp=again.nngp)


def _vector_kernels(module: linen.Module, x1: jax.Array, x2: jax.Array | None,
                    args: dict[str, InputPair] | None = None) -> Kernel:
    # the result's true kernels only: its scaled form never leaves kernel_fn
    return _two_graphs(lambda k: _apply_to_kernel(module, k, args),
                       input_kernel(x1, x2)).replace()


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What evaluating a module on image kernels depends on, read off one evaluation (or one
    shape-only trace) of the module: the static facts of its output kernel and its shape."""

    all_pairs_layers: tuple[str, ...]
    same_batch_layers: tuple[str, ...]
    spatial_shape: tuple[int, ...]
    width: int

    @property
    def spatial_ndim(self) -> int:
        return len(self.spatial_shape)


class _KnownFacts:
    """The facts of the inputs' shapes met so far by ONE kernel function (or one
    :func:`kernel_matrix` call): a later call on inputs of a known per-example shape and dtype
    (x2 given, another batch size) evaluates the module once, with no shape-only trace. Owned
    by the function that created it -- no state is shared between kernel functions."""

    _LIMIT = 64

    def __init__(self) -> None:
        self._facts: dict[Any, _Facts] = {}

    @staticmethod
    def _key(x: jax.Array) -> Any:
        return (tuple(x.shape[1:]), str(x.dtype))

    def get(self, x: jax.Array) -> _Facts | None:
        return self._facts.get(self._key(x))

    def remember(self, x: jax.Array, out: Kernel) -> _Facts:
        facts = _Facts(out.all_pairs_layers, out.same_batch_layers, out.spatial_shape,
                       out.width)
        if len(self._facts) >= self._LIMIT:
            self._facts.clear()
        self._facts[self._key(x)] = facts
        return facts


def _module_facts(module: linen.Module, x: jax.Array, known: _KnownFacts,
                  args: dict[str, InputPair] | None = None) -> _Facts:
    """The module's facts on inputs like ``x``: known, or read off one shape-only trace on
    the all-pairs input kernel of one input (:func:`_output_kernel_shape`; ``args``: the
    inputs' per-input call arguments)."""
    facts = known.get(x)
    if facts is not None:
        return facts
    return known.remember(x, _output_kernel_shape(module, x, args))


def _image_call(
    module: linen.Module, x1: jax.Array, x2: jax.Array | None, position_pairs: PositionPairs,
    known: _KnownFacts, args: dict[str, InputPair] | None = None, mask1: Any = None,
    mask2: Any = None,
) -> Kernel:
    """The module on the image kernel of x1 and x2, tracing it once.

    With the module's facts known (an earlier call on inputs of this shape): one evaluation in
    the pairs of positions they allow. Else the module is evaluated at once on same-position
    pairs (unless ``position_pairs="all"``) and its facts read off the result; only a module
    that turns out to need all pairs (a layer raised :class:`AllPairsRequired`, or, for
    ``"auto"``, the output keeps spatial axes) or the whole batch (a rule depending on x2
    being x1, met in blocks) is evaluated again, once -- the facts are remembered in ``known``
    (the kernel function's own), so the next call on such inputs evaluates it once."""
    facts = known.get(x1)
    if facts is not None:
        diagonal = _use_diagonal(position_pairs, facts)
        return _image_kernels(module, x1, x2, diagonal, facts.same_batch_layers, args, mask1,
                              mask2)
    out = None
    if position_pairs != "all":
        try:
            out = _whole_if_needed(module, x1, x2, True, args, mask1, mask2)
        except AllPairsRequired as err:
            if position_pairs == "same":
                raise ValueError(
                    f"position_pairs='same' is not possible for this module: {err}") from err
        else:
            known.remember(x1, out)
            if not (position_pairs == "auto" and out.spatial_ndim):
                return out
    out = _whole_if_needed(module, x1, x2, False, args, mask1, mask2)
    known.remember(x1, out)
    return out


def _whole_if_needed(
    module: linen.Module, x1: jax.Array, x2: jax.Array | None, diagonal: bool,
    args: dict[str, InputPair] | None = None, mask1: Any = None, mask2: Any = None,
) -> Kernel:
    """:func:`_image_kernels` with no facts known: x1 with itself evaluated in blocks when
    large, and again whole if a layer turned out to depend on x2 being the same batch."""
    out = _image_kernels(module, x1, x2, diagonal, (), args, mask1, mask2)
    if (x2 is None and out.same_batch_layers
            and _block_rows(x1, diagonal) < x1.shape[0]):
        out = _image_kernels(module, x1, x2, diagonal, out.same_batch_layers, args, mask1,
                             mask2)
    return out


def _use_diagonal(position_pairs: PositionPairs, facts: _Facts) -> bool:
    """Whether a module with these facts (:func:`_module_facts`) has kernels computable from
    same-position pairs only: no layer mixes positions (``all_pairs_layers``) and, for
    ``"auto"``, the output has no spatial axes."""
    if position_pairs == "all":
        return False
    if facts.all_pairs_layers:
        if position_pairs == "same":
            raise ValueError(
                "position_pairs='same' is not possible for this module: "
                f"{facts.all_pairs_layers[0]} needs the kernel between all pairs of positions."
            )
        return False
    return not (position_pairs == "auto" and facts.spatial_ndim)


def _image_kernels(
    module: linen.Module, x1: jax.Array, x2: jax.Array | None, diagonal: bool,
    same_batch_layers: tuple[str, ...], args: dict[str, InputPair] | None = None,
    mask1: jax.Array | None = None, mask2: jax.Array | None = None,
) -> Kernel:
    """The module on the image kernel of x1 and x2: one evaluation, or, when the kernel is
    large, blocks of rows (:func:`_blocked_pairwise`). ``x2 = None`` is evaluated whole when a
    layer's rule depends on x2 being the same batch (``same_batch_layers``): blocks are pairs
    of batches."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    block = _block_rows(x1, diagonal)
    if x2 is None and (block >= n1 or same_batch_layers):
        return _apply_to_kernel(module, _image_input_kernel(x1, None, diagonal=diagonal,
                                                            mask1=mask1, mask2=mask1), args)
    return _blocked_pairwise(module, x1, x2, diagonal, block if x2 is None
                             else min(block, max(n1, n2)), args, mask1, mask2)


# Pairwise evaluation in blocks of rows whose kernels hold about this many entries per array
# (64 KiB in float32): blocks whose whole layer-by-layer computation stays in the processor's
# caches (measured on the 2-core machine: a depth-3 flatten CNN on 256 8x8 images takes 0.18 s
# in blocks of 2^14 entries, 0.35 s in blocks of 2^20 and 0.48 s in one block); and for
# x2 = None only the blocks on and above the diagonal (the others are their mirror images).
_BLOCK_ENTRIES = 2**14
# Blocks evaluated together (vmapped inside each step of the ``lax.map`` over blocks) until they
# hold about this many entries per array: fewer loop steps, each with larger fused operations.
# Measured on the 2-core machine (depth-3 flatten CNN, x2 = None): 256 8x8 images 0.158 s one
# block per step, 0.089 s sixteen; 128 16x16 images 0.130 s and 0.028 s (2 to 64 blocks per step
# tried; 2^17 to 2^19 entries per step were within 15% of the best).
_STEP_ENTRIES = 2**18
# A batch with itself in blocks whose kernels hold at least this many entries in all (the
# blocks on and above the diagonal) computes each input's variances once
# (:func:`_replaying_pairs`): the module is traced twice (diagonal blocks, then the others), so
# a small evaluation, whose time is mostly tracing and compiling, computes them in every block.
# Measured on the 2-core machine (loaded, CPU-s per call, 64 8x8 images, all pairs, 2^23 entries),
# ReLU CNN with global average pooling: depth 3 0.61-0.66 -> 0.53-0.56, depth 5 1.08-1.19 ->
# 0.94-0.96; the flatten CNN of 256 8x8 images (same-position pairs, 2^21 entries) measured
# alike both ways.
_REPLAY_ENTRIES = 2**22


def _entries_per_pair(x: jax.Array, diagonal: bool) -> int:
    """Kernel entries per pair of inputs: positions (same-position pairs) or their square."""
    positions = math.prod(x.shape[1:-1])
    return positions if diagonal else positions * positions


def _block_rows(x: jax.Array, diagonal: bool) -> int:
    """Rows of x1 (and x2) per block of the pairwise evaluation (a power of two)."""
    per_pair = _entries_per_pair(x, diagonal)
    # each block of two batches (x2 given) also maps its inputs' own variances, 2 * rows beside
    # the rows^2 pairs: at least 4 rows while 16 pairs stay within 4 x _BLOCK_ENTRIES (8x8
    # images, all pairs; for x2 = None, where they are replayed, 2 and 4 rows measured alike)
    least = 4 if 4 * per_pair <= _BLOCK_ENTRIES else 1
    rows = 1
    while rows * 2 <= x.shape[0] and ((rows * 2) ** 2 * per_pair <= _BLOCK_ENTRIES
                                      or rows < least):
        rows *= 2
    return rows


def _blocked_pairwise(
    module: linen.Module, x1: jax.Array, x2: jax.Array | None, diagonal: bool, block: int,
    args: dict[str, InputPair] | None = None,
    mask1: jax.Array | None = None, mask2: jax.Array | None = None,
) -> Kernel:
    """The module on the kernel of x1 and x2 over blocks of ``block`` rows of x1 and x2
    (``lax.map``, several blocks per step: ``_STEP_ENTRIES``), assembled into the (N1, N2, ...)
    kernel. Each block's kernel is that of its two blocks of inputs, variances included; with
    ``x2 = None`` only the blocks (i, j), i <= j, are computed, and block (j, i) is block (i, j)
    with its two inputs (and their positions) swapped; without masks or per-input call
    arguments, and from ``_REPLAY_ENTRIES`` entries, each layer's variances are then computed
    once, in the diagonal blocks, and replayed in the others (:func:`_replaying_pairs`)."""
    symmetric = x2 is None
    x2v = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], x2v.shape[0]
    r1, r2 = -(-n1 // block), -(-n2 // block)
    mask2v = mask1 if x2 is None else mask2

    args = args or {}

    def pair(a: jax.Array, b: jax.Array, pair_args: dict[str, InputPair], ma: Any = None,
             mb: Any = None) -> Kernel:
        return _apply_to_kernel(module, _image_input_kernel(a, b, diagonal=diagonal, mask1=ma,
                                                            mask2=mb), pair_args)

    if r1 * r2 == 1:
        out = pair(x1, x2v, args, mask1, mask2v)
        return out.replace(var2=out.var1, mask2=out.mask1,
                           same_inputs=True) if symmetric else out

    def rows(a: jax.Array, r: int) -> jax.Array:
        return jnp.asarray(_pad_rows(a, r * block)).reshape(r, block, *a.shape[1:])

    xb1, xb2 = rows(x1, r1), rows(x2v, r2)
    ab = {name: InputPair(rows(a.first, r1), rows(a.second, r2)) for name, a in args.items()}
    mb1 = None if mask1 is None else rows(mask1, r1)
    mb2 = None if mask2v is None else rows(mask2v, r2)
    pairs = [(i, j) for i in range(r1) for j in range(r2) if not symmetric or j >= i]
    index1 = jnp.asarray([i for i, _ in pairs], jnp.int32)
    index2 = jnp.asarray([j for _, j in pairs], jnp.int32)

    def one(ij):
        i, j = ij
        block_args = {name: a.rows(i, j) for name, a in ab.items()}
        if mb1 is not None and mb2 is not None:
            return pair(xb1[i], xb2[j], block_args, mb1[i], mb2[j])
        return pair(xb1[i], xb2[j], block_args)

    per_block = block * block * _entries_per_pair(x1, diagonal)
    per_step = max(1, min(len(pairs), _STEP_ENTRIES // per_block))
    blocks = None
    if (symmetric and not ab and mb1 is None and r1 > 1
            and len(pairs) * per_block >= _REPLAY_ENTRIES):
        try:
            blocks, pairs = _replaying_pairs(module, xb1, diagonal, per_step)
        except _ReplayMismatch:
            pass
        else:
            index1 = jnp.asarray([i for i, _ in pairs], jnp.int32)
            index2 = jnp.asarray([j for _, j in pairs], jnp.int32)
    if blocks is None:
        blocks = jax.lax.map(one, (index1, index2), batch_size=per_step)

    def assemble(a: jax.Array) -> jax.Array:
        trailing = a.shape[3:]
        grid = jnp.zeros((r1, r2, block, block, *trailing), a.dtype)
        grid = grid.at[index1, index2].set(a)
        if symmetric:
            grid = grid.at[index2, index1].set(_swap_inputs(a, blocks, batch_ndim=1))
        grid = jnp.moveaxis(grid, 2, 1).reshape(r1 * block, r2 * block, *trailing)
        return grid[:n1, :n2]

    def gather(v: jax.Array, which: list[int], n: int) -> jax.Array:
        """Each input's variances from one block per block of rows (``which``: its pair)."""
        return v[jnp.asarray(which, jnp.int32)].reshape(-1, *v.shape[2:])[:n]

    var1 = gather(blocks.var1, [pairs.index((i, i if symmetric else 0)) for i in range(r1)], n1)
    var2 = var1 if symmetric else gather(blocks.var2,
                                         [pairs.index((0, j)) for j in range(r2)], n2)
    out_mask1 = out_mask2 = None
    if blocks.mask1 is not None and blocks.mask2 is not None:  # the masks after the module
        out_mask1 = gather(blocks.mask1,
                           [pairs.index((i, i if symmetric else 0)) for i in range(r1)], n1)
        out_mask2 = out_mask1 if symmetric else gather(
            blocks.mask2, [pairs.index((0, j)) for j in range(r2)], n2)
    return blocks.replace(nngp=assemble(blocks.nngp), ntk=assemble(blocks.ntk), var1=var1,
                          var2=var2, same_inputs=symmetric, mask1=out_mask1, mask2=out_mask2)


def _replaying_pairs(module: linen.Module, xb: jax.Array, diagonal: bool,
                     per_step: int) -> tuple[Kernel, list[tuple[int, int]]]:
    """The kernels of the blocks (i, j), i <= j, of ``xb`` (r blocks of rows) with itself,
    stacked, and their pairs: first each diagonal block (i, i) as a batch with itself, whose
    layers' variances are written out (:class:`_VariancesWrittenOut`), then each block above
    the diagonal, whose layers read those of its two blocks of inputs instead of computing
    them again (every block of a row or column computed them for the same inputs: at all pairs
    of positions, a block's variances are about a fifth of its work). Raises
    :class:`_ReplayMismatch` for a module whose layers cannot replay them."""
    r = xb.shape[0]

    def diagonal_block(i: jax.Array) -> tuple[Kernel, list[jax.Array]]:
        written = _VariancesWrittenOut()
        out = _apply_to_kernel(module, _image_input_kernel(xb[i], None, diagonal=diagonal),
                               variances=written)
        return out.replace(var2=out.var1, same_inputs=False), written.written

    on_diagonal, tables = jax.lax.map(diagonal_block, jnp.arange(r, dtype=jnp.int32),
                                      batch_size=max(1, min(r, per_step)))
    above = [(i, j) for i in range(r) for j in range(i + 1, r)]
    index1 = jnp.asarray([i for i, _ in above], jnp.int32)
    index2 = jnp.asarray([j for _, j in above], jnp.int32)

    def off_diagonal(ij: tuple[jax.Array, jax.Array]) -> Kernel:
        i, j = ij
        replay = _VariancesWrittenOut(([t[i] for t in tables], [t[j] for t in tables]))
        out = _apply_to_kernel(module, _image_input_kernel(xb[i], xb[j], diagonal=diagonal),
                               variances=replay)
        if not replay.replayed_all():
            raise _ReplayMismatch("the module's layers returned fewer kernels than replayed")
        return out

    off = jax.lax.map(off_diagonal, (index1, index2),
                      batch_size=max(1, min(len(above), per_step)))
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), on_diagonal, off)
    return stacked, [(i, i) for i in range(r)] + above


def _swap_inputs(a: jax.Array, k: Kernel, *, batch_ndim: int = 0) -> jax.Array:
    """The kernel array of (x2, x1) from that of (x1, x2): the two input axes transposed, and,
    with all pairs of positions, the two groups of position axes too."""
    lead = tuple(range(batch_ndim))
    b = batch_ndim
    nd = (a.ndim - b - 2) // 2
    if nd == 0 or k.diagonal_spatial:
        rest = tuple(range(b + 2, a.ndim))
    else:
        rest = (*range(b + 2 + nd, b + 2 + 2 * nd), *range(b + 2, b + 2 + nd))
    return jnp.transpose(a, (*lead, b + 1, b, *rest))


def _opaque_zero(a: jax.Array) -> jax.Array:
    """An exact 0 that XLA cannot constant-fold (so the copy is not merged back by CSE)."""
    s = jnp.sum(a[:1, :1])
    return jnp.where(jnp.isnan(s), 0, 0 * jnp.sign(s)).astype(a.dtype)


def kernel_matrix(
    module: linen.Module,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    memory_bytes: int | None = None,
    block_size: int | None = None,
    devices: Sequence[Any] | None = None,
    out: str | os.PathLike | None = None,
    show_progress: bool = False,
    mask1: Any = None,
    mask2: Any = None,
    **per_input: Any,
) -> Kernel:
    """The kernels of ``module`` for large N, computed in blocks into host (numpy) arrays.

    Same result as ``kernel_fn(module)(x1, x2)`` but evaluated block by block with
    :func:`ntkjax.blocking.evaluate_in_blocks`: each block is one compiled call whose memory
    (arguments, outputs, temporaries) fits ``memory_bytes`` (default: half of the free memory
    after the result is allocated), so the result is limited only by host RAM -- e.g. the
    40,000 x 40,000 float32 NNGP and NTK of a depth-3 ReLU MLP (2 x 6.4 GB). With
    ``x2 = None`` only the blocks on and above the diagonal are computed and mirrored.

    Images: whichever readout (flatten, global pooling, ...), the pairs of positions are chosen
    as in :func:`kernel_fn`; every block is the kernel of its two blocks of inputs, each
    input's variances included (module docstring), so residual sums around attention and
    LayerNorm evaluate in blocks exactly.

    Devices and out of core (:func:`ntkjax.blocking.evaluate_in_blocks`): the blocks are
    spread over ``devices`` (default: all devices of all processes); with ``out`` (a directory
    path) the kernels go to a resumable zarr store, arrays ``nngp`` and ``ntk``, recorded with
    the inputs and ``repr(module)``.

    Returns:
      A :class:`Kernel` whose ``nngp`` and ``ntk`` are numpy arrays of shape (N1, N2) (with
      ``out``: read-only ``zarr.Array`` of the store, ``k.ntk[i:j]`` reads rows as numpy) and
      ``var1``, ``var2`` the NNGP variances (numpy).

    Raises:
      ValueError: when the module's output kernel still has spatial axes (end a convolutional
        network with :func:`ntkjax.nn.flatten` or a global pooling and a Dense readout).

    Args:
      module: a flax module built from :mod:`ntkjax.nn` layers, as in :func:`kernel_fn`.
      x1: inputs ``(N1, *features)``.
      x2: inputs ``(N2, *features)``, or None for ``x2 = x1``.
      memory_bytes: budget for one block call; None for half of the free memory.
      block_size: rows per block (overrides ``memory_bytes``).
      devices: devices to spread the blocks over (default: all, of all processes).
      out: path of a resumable zarr store (arrays ``nngp`` and ``ntk``) to write to instead
        of RAM; None keeps the result in host memory.
      show_progress: progress bar on stderr.
      mask1: None, or x1's boolean position mask (N1, *S), True = masked (as in
        :func:`kernel_fn`; every block reads its rows of the masks).
      mask2: None, or x2's (only with ``x2``).
      **per_input: per-input call arguments of the module, as in :func:`kernel_fn` (e.g. the
        graphs' ``pattern=(P1, P2)`` of :class:`ntkjax.nn.Aggregate`, or ``pattern=P1`` for
        ``x2 = None``): each block gets the rows of its own inputs.

    >>> import jax.numpy as jnp, ntkjax
    >>> dense = ntkjax.nn.Dense(1, w_std=1.0, b_std=0.0)  # NNGP = NTK = x1 x2^T / d
    >>> print(ntkjax.kernel_matrix(dense, jnp.eye(3) * 3.0, block_size=2).ntk)
    [[3. 0. 0.]
     [0. 3. 0.]
     [0. 0. 3.]]
    """
    x1, x2 = _float_inputs(x1, x2)
    m1, m2 = _input_masks(x1, x2, mask1, mask2)
    args = _call_args(per_input, x1, x2)
    if args and x1.ndim == 2:
        raise ValueError("kernel_matrix: per-input call arguments "
                         f"({', '.join(args)}) need inputs with spatial axes, (N, *S, C).")
    # The output variances come first: their evaluation also reads off the module's facts
    # (images: on same-position pairs unless a layer needs all pairs), so the module is traced
    # once for them and once for the compiled block.
    known = _KnownFacts()
    diagonal = False
    if x1.ndim == 2:
        variances = _both_variances(module, x1, x2, False, known)
    else:
        try:
            diagonal = True
            variances = _both_variances(module, x1, x2, True, known, args, (m1, m2))
        except AllPairsRequired:
            diagonal = False
            variances = _both_variances(module, x1, x2, False, known, args, (m1, m2))
    shape = _module_facts(module, x1, known, args)
    same_batch_rules = shape.same_batch_layers
    if x2 is None and same_batch_rules:
        raise ValueError(
            f"kernel_matrix(module, x1) cannot evaluate a module with {same_batch_rules[0]}: "
            "its kernel of a batch with itself differs from that of two batches, and the "
            "blocks are evaluated as pairs of batches. Use kernel_fn(module)(x1), or pass "
            "x2=x1 for the kernel between two independent batches."
        )
    if shape.spatial_ndim:
        raise ValueError(
            "kernel_matrix needs a module whose output has no spatial axes; this one's output "
            f"kernel has spatial shape {shape.spatial_shape}. End the network with "
            "ntkjax.nn.flatten or ntkjax.nn.global_average_pool and a Dense readout."
        )
    if x1.ndim > 2:
        return _image_kernel_matrix(module, x1, x2, shape, diagonal, variances,
                                    memory_bytes=memory_bytes, block_size=block_size,
                                    show_progress=show_progress, devices=devices, out=out,
                                    args=args, masks=(m1, m2))
    if args:
        raise ValueError("kernel_matrix: per-input call arguments "
                         f"({', '.join(args)}) need inputs with spatial axes, (N, *S, C).")
    compute = kernel_fn(module)

    def block_fn(a, b):
        k = compute(a, b)
        return {"nngp": k.nngp, "ntk": k.ntk}

    blocks = evaluate_in_blocks(
        block_fn, x1, x2, block_size=block_size, memory_bytes=memory_bytes,
        show_progress=show_progress, description="kernel blocks", devices=devices, out=out,
        fingerprint=f"kernel_matrix {describe_object(module)}",
    )
    nngp, ntk = blocks["nngp"], blocks["ntk"]
    var1, var2 = variances
    return Kernel(nngp=nngp, ntk=ntk, var1=var1, var2=var2, width=shape.width,  # type: ignore
                  same_inputs=x2 is None)


def _image_kernel_matrix(module, x1, x2, shape: _Facts, diagonal: bool,
                         variances: tuple[np.ndarray, np.ndarray], *, memory_bytes,
                         block_size, show_progress, devices, out,
                         args: dict[str, InputPair] | None = None,
                         masks=(None, None)) -> Kernel:
    args = args or {}
    names = sorted(args)
    m1, m2 = masks
    with_masks = m1 is not None

    def block_fn(i1, i2, a1, a2, *rest):
        r1, r2 = i1[:, 0], i2[:, 0]
        block_masks, pairs = (rest[:2], rest[2:]) if with_masks else ((), rest)
        ma, mb = (block_masks[0][r1], block_masks[1][r2]) if block_masks else (None, None)
        block_args = {n: p.rows(r1, r2) for n, p in zip(names, pairs, strict=True)}
        k = _apply_to_kernel(module, _image_input_kernel(a1[r1], a2[r2], diagonal=diagonal,
                                                         mask1=ma, mask2=mb), block_args)
        k = k.masked()
        return {"nngp": k.nngp, "ntk": k.ntk}

    index1 = jnp.arange(x1.shape[0])[:, None]
    index2 = None if x2 is None else jnp.arange(x2.shape[0])[:, None]
    mask_args = () if m1 is None else (m1, m1 if x2 is None else m2)
    blocks = evaluate_in_blocks(
        block_fn, index1, index2,
        fn_args=(x1, x1 if x2 is None else x2, *mask_args, *(args[n] for n in names)),
        block_size=block_size, memory_bytes=memory_bytes, show_progress=show_progress,
        description="kernel blocks", devices=devices, out=out,
        fingerprint=f"kernel_matrix(images) {describe_object(module)}",
    )
    var1, var2 = variances
    return Kernel(nngp=blocks["nngp"], ntk=blocks["ntk"], var1=var1, var2=var2,  # type: ignore
                  width=shape.width, same_inputs=x2 is None)


# Output variances: inputs evaluated together (vmap) in chunks of at most this many entries.
_PER_INPUT_ENTRIES = 2**24


def _both_variances(
    module: linen.Module, x1: jax.Array, x2: jax.Array | None, diagonal: bool,
    known: _KnownFacts, args: dict[str, InputPair] | None = None,
    masks: tuple[Any, Any] = (None, None),
) -> tuple[np.ndarray, np.ndarray]:
    """The output variances of x1 and of x2 (x1's for ``x2 = None``): one evaluation of the
    module on both batches together (two when their per-input arguments differ in shape),
    which also notes the module's facts in ``known``."""
    args = args or {}
    m1, m2 = masks
    firsts = {n: a.first for n, a in args.items()}
    if x2 is None:
        var = _output_variances(module, x1, diagonal, known, firsts, m1)
        return var, var
    seconds = {n: a.second for n, a in args.items()}
    if any(firsts[n].shape[1:] != seconds[n].shape[1:] for n in args):
        return (_output_variances(module, x1, diagonal, known, firsts, m1),
                _output_variances(module, x2, diagonal, known, seconds, m2))
    both = {n: jnp.concatenate([firsts[n], seconds[n]]) for n in args}
    mask = None if m1 is None else jnp.concatenate([m1, m2])
    var = _output_variances(module, jnp.concatenate([x1, x2]), diagonal, known, both, mask)
    return var[: x1.shape[0]], var[x1.shape[0]:]


def _output_variances(module: linen.Module, x: jax.Array, diagonal: bool, known: _KnownFacts,
                      per_input: dict[str, jax.Array] | None = None,
                      mask: jax.Array | None = None) -> np.ndarray:
    """Each input's NNGP variance at the module's output (numpy, (N,) for an output without
    spatial axes): the module on a kernel of one column per input (:func:`_row_kernel`) whose
    variances are exact, in chunks of inputs (``_PER_INPUT_ENTRIES``). ``per_input``: the
    inputs' call arguments (the column's second batch gets the first row's: only ``var1`` is
    read); with the inputs' position ``mask``, of the masked inputs."""

    def chunk_variances(xc: jax.Array, ac: dict[str, jax.Array], mc: Any) -> jax.Array:
        pairs = {n: InputPair(a, a[:1]) for n, a in ac.items()}
        out = _apply_to_kernel(module, _row_kernel(xc, diagonal, mc), pairs)
        known.remember(xc, out)
        return out.masked().var1

    chunk = max(1, min(x.shape[0], _PER_INPUT_ENTRIES // max(_entries_per_pair(x, diagonal), 1)))
    rows = -(-x.shape[0] // chunk)

    def padded(a: jax.Array) -> jax.Array:
        return jnp.asarray(_pad_rows(a, rows * chunk)).reshape(rows, chunk, *a.shape[1:])

    args = {n: padded(a) for n, a in (per_input or {}).items()}
    padded_mask = None if mask is None else padded(mask)
    var = jax.jit(lambda a, b, m: jax.lax.map(lambda abm: chunk_variances(*abm), (a, b, m)))(
        padded(x), args, padded_mask)
    return np.asarray(jax.device_get(var)).reshape(rows * chunk, *var.shape[2:])[: x.shape[0]]


def _row_kernel(x: jax.Array, diagonal: bool = False, mask: jax.Array | None = None) -> Kernel:
    """A kernel of each input against a placeholder: ``nngp`` (N, 1, ...) is each input's own
    kernel (a column of the right shape), and ``var1`` carries every input's exact
    self-covariances through the network (``var2`` that of the first input); with a position
    ``mask``, of the masked inputs (the placeholder takes the first input's mask)."""
    if x.ndim == 2:  # feature vectors: with each input's scaled form (ScaledParts)
        xs, e, s = _scaled_rows(x)
        var = _stored_variances(xs, e, s)
        parts = ScaledParts(nngp=var[:, None], ntk=jnp.zeros_like(var)[:, None], var1=var,
                            var2=var[:1], log2_scale1=s, log2_scale2=s[:1])
        return Kernel.from_scaled(parts, width=x.shape[-1], non_gaussian=NETWORK_INPUTS)
    var = _self_covariance(zero_masked(x, mask), diagonal)
    k = Kernel(nngp=var[:, None], ntk=jnp.zeros_like(var)[:, None], var1=var,
               var2=var[:1], width=x.shape[-1], diagonal_spatial=diagonal and x.ndim > 2,
               non_gaussian=NETWORK_INPUTS)
    return k if mask is None else k.with_masks(mask, mask[:1])


def _output_kernel_shape(module: linen.Module, x: jax.Array,
                         args: dict[str, InputPair] | None = None) -> Kernel:
    """The shapes (``jax.ShapeDtypeStruct`` leaves), width and static facts of the module's
    output kernel, traced on the all-pairs input kernel of one input (and the first row of
    each per-input argument)."""
    one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    firsts = {name: a.first[:1] for name, a in (args or {}).items()}
    return jax.eval_shape(
        lambda a, f: _apply_to_kernel(module, input_kernel(a),
                                      {n: InputPair(v, v) for n, v in f.items()}), one, firsts)
