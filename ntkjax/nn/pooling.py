"""Readouts and pooling of convolutional features, with their infinite-width rules.

* :func:`flatten`: ``(N, *S, C) -> (N, prod(S) C)``. A dense layer on flattened features has
  independent weights per position, so only matching positions survive:
  ``Sigma[a, b] = mean_p Sigma[a, b, p, p]`` (likewise Theta and the variances). It reads only
  same-position pairs.
* :func:`global_average_pool` / :func:`global_sum_pool`: ``(N, *S, C) -> (N, C)``, the mean
  (sum) over positions: ``Sigma[a, b] = mean_{p, p'} Sigma[a, b, p, p']`` (the sum, for the sum
  pool; likewise Theta and the variances).
* :func:`avg_pool` / :func:`sum_pool`: windowed means (sums) with ``flax.linen.avg_pool``'s
  signature: ``y[o] = (1/|W_o|) sum_{p in W_o} x[p]``, so
  ``Sigma'[o, o'] = (1 / (|W_o| |W_o'|)) sum_{p in W_o, p' in W_o'} Sigma[p, p']``: the window
  sum applied to each position index separately (unlike a convolution, whose two offsets move
  together).

Every pooling mixes positions, so it needs the kernel between all pairs of positions
(:meth:`ntkjax.Kernel.require_all_pairs`). Pooling has no parameters: its finite layer is the
same function on arrays.

(Novak et al. 2019, "Bayesian Deep Convolutional Networks with Many Channels are Gaussian
Processes", section 3; Arora et al. 2019, CNTK-GAP; neural-tangents' ``AvgPool``, ``SumPool``,
``GlobalSumPool`` for the conventions, ``normalize_edges=True`` being
``count_include_pad=False`` here.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from ntkjax._checks import check_choice, check_mask
from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, UnsupportedMeaning, declare
from ntkjax.nn.conv import CONV_PADDINGS, conv_padding, window_mask, window_sum

__all__ = [
    "POOL_PADDINGS",
    "PoolPadding",
    "avg_pool",
    "flatten",
    "global_average_pool",
    "global_sum_pool",
    "sum_pool",
]

PoolPadding = Literal["SAME", "VALID", "CIRCULAR"]
POOL_PADDINGS: tuple[PoolPadding, ...] = CONV_PADDINGS


def _spatial_mean(v: jax.Array, lead: int, nd: int, diagonal: bool) -> jax.Array:
    """The mean over positions of same-position entries: ``mean_p v[..., p, p]`` (``v`` has
    ``lead`` leading axes, then ``*S, *S``, or ``*S`` when ``diagonal``)."""
    shape = v.shape[:lead]
    positions = math.prod(v.shape[lead : lead + nd])
    if diagonal:
        return jnp.mean(v.reshape(*shape, positions), axis=-1)
    flat = v.reshape(*shape, positions, positions)
    return jnp.mean(jnp.diagonal(flat, axis1=-2, axis2=-1), axis=-1)


_NO_MASKED_FEATURES = ("random features carry no masks; for masked inputs use "
                       "ntkjax.kernel_fn(module)(x1, x2, mask1=..., mask2=...).")


def _zero_masked(x: Any, mask: Any, name: str) -> jax.Array:
    """Arrays (N, *S, C) with the positions ``mask`` marks (True = masked) set to 0; the
    array unchanged for ``mask=None``."""
    x = jnp.asarray(x)
    if mask is None:
        return x
    mask = check_mask(x, mask, x_name=f"{name}'s input")
    return jnp.where(mask[..., None], jnp.zeros((), x.dtype), x)


def _no_mask_argument(x: Any, mask: Any, name: str) -> None:
    if mask is not None and isinstance(x, FeatureStandIn):
        raise UnsupportedMeaning(f"ntkjax.nn.{name}", "features", _NO_MASKED_FEATURES)
    if mask is not None and isinstance(x, Kernel):
        raise ValueError(
            f"{name}: a Kernel carries its own masks (kernel_fn's mask1 / mask2); the mask "
            "argument is for arrays."
        )


def _flatten_kernel(k: Kernel) -> Kernel:
    nd = k.spatial_ndim
    if nd == 0:
        return k
    k = k.without_masks()  # masked positions count as zeros in the mean (nt's Flatten)
    diag = k.diagonal_spatial

    def read(a: jax.Array, lead: int) -> jax.Array:
        return _spatial_mean(a, lead, nd, diag)

    var1, var2 = k.map_variances(lambda v: read(v, 1))
    positions = math.prod(k.spatial_shape)
    return k.replace(nngp=read(k.nngp, 2), ntk=read(k.ntk, 2), var1=var1, var2=var2,
                     width=positions * k.width, diagonal_spatial=False)


def flatten(x: Any, mask: Any = None) -> Any:
    """Readout ``(N, *S, C) -> (N, prod(S) C)``.

    On a :class:`~ntkjax.Kernel`: ``Sigma[a, b] = mean_p Sigma[a, b, p, p]`` (likewise Theta),
    ``width = prod(S) C`` (the next layer's fan_in; module docstring). It reads only
    same-position pairs. A kernel without spatial axes is returned unchanged.

    Masks: masked positions are set to 0 and still count in the mean over all positions
    (neural-tangents' ``Flatten``; the kernel's own masks, or ``mask`` on arrays).

    Args:
      x: inputs (N, *S, C), or their Kernel.
      mask: for arrays, None or a boolean (N, *S) position mask (True = masked).

    Returns:
      The flattened array, or its Kernel.

    >>> import jax.numpy as jnp
    >>> flatten(jnp.ones((2, 3, 3, 4))).shape
    (2, 36)
    """
    _no_mask_argument(x, mask, "flatten")
    if isinstance(x, FeatureStandIn):
        return _FLATTEN.on_features(x, flatten)
    if isinstance(x, Kernel):
        return _flatten_kernel(x)
    x = _zero_masked(x, mask, "flatten")
    if x.ndim < 2:
        raise ValueError(f"flatten needs inputs with a batch axis, got shape {x.shape}.")
    return x.reshape(x.shape[0], -1)


def _global_pool_kernel(k: Kernel, name: str, average: bool) -> Kernel:
    if k.spatial_ndim == 0:
        raise ValueError(
            f"{name} needs a kernel with spatial axes (inputs of shape (batch, *spatial, "
            "channels)); this one has none."
        )
    k = k.require_all_pairs(name)
    if not k.has_masks:
        reduce = jnp.mean if average else jnp.sum

        def pool(a: jax.Array, lead: int) -> jax.Array:
            return reduce(a, axis=tuple(range(lead, a.ndim)))

        var1, var2 = k.map_variances(lambda v: pool(v, 1))
        return k.replace(nngp=pool(k.nngp, 2), ntk=pool(k.ntk, 2), var1=var1, var2=var2,
                         diagonal_spatial=False)
    # masks (nt's rule): the sum over unmasked position pairs, divided by n1 n2 (the numbers
    # of unmasked positions of the two inputs) for the average; an input with every position
    # masked pools to 0
    c1, c2 = k.unmasked_counts()
    k = k.without_masks()

    def total(a: jax.Array, lead: int) -> jax.Array:
        return jnp.sum(a, axis=tuple(range(lead, a.ndim)))

    nngp, ntk = total(k.nngp, 2), total(k.ntk, 2)
    var1, var2 = k.map_variances(lambda v: total(v, 1))
    if average:
        d1, d2 = jnp.maximum(c1, 1), jnp.maximum(c2, 1)
        pair = d1[:, None] * d2[None, :]
        nngp, ntk = nngp / pair, ntk / pair
        var1 = var1 / (d1 * d1)
        var2 = var1 if k.same_inputs else var2 / (d2 * d2)
    return k.replace(nngp=nngp, ntk=ntk, var1=var1, var2=var2, diagonal_spatial=False)


def _global_average_pool_kernel(k: Kernel) -> Kernel:
    """The rule of :func:`global_average_pool`."""
    return _global_pool_kernel(k, "global_average_pool", average=True)


def _check_spatial_input(x: jax.Array, name: str) -> None:
    if x.ndim < 3:
        raise ValueError(
            f"{name} needs inputs of shape (batch, *spatial, channels), got shape {x.shape}."
        )


def global_average_pool(x: Any, mask: Any = None) -> Any:
    """Readout ``(N, *S, C) -> (N, C)``, the mean over all spatial positions.

    On a :class:`~ntkjax.Kernel`: ``Sigma[a, b] = mean_{p, p'} Sigma[a, b, p, p']`` (likewise
    Theta), ``width = C`` (module docstring).

    Masks: the mean is over the unmasked positions only, ``y_a = sum_{p unmasked} x_a[p] /
    n_a``; on kernels ``Sigma[a, b] = sum_{p, p' unmasked} Sigma[a, b, p, p'] / (n_a n_b)``
    (neural-tangents' ``GlobalAvgPool`` rule; Hron et al. 2020). A sequence padded to any
    length pools to the same value. An input with every position masked pools to 0.

    Args:
      x: inputs (N, *S, C), or their Kernel (which carries its own masks).
      mask: for arrays, None or a boolean (N, *S) position mask (True = masked).

    Returns:
      The pooled array (N, C), or its Kernel.

    >>> import jax.numpy as jnp
    >>> global_average_pool(jnp.ones((2, 3, 3, 4))).shape
    (2, 4)
    """
    _no_mask_argument(x, mask, "global_average_pool")
    if isinstance(x, FeatureStandIn):
        return _GLOBAL_AVERAGE_POOL.on_features(x, global_average_pool, average=True)
    if isinstance(x, Kernel):
        return _global_average_pool_kernel(x)
    x = jnp.asarray(x)
    _check_spatial_input(x, "global_average_pool")
    axes = tuple(range(1, x.ndim - 1))
    if mask is None:
        return jnp.mean(x, axis=axes)
    x = _zero_masked(x, mask, "global_average_pool")
    count = jnp.sum(~jnp.asarray(mask), axis=axes).astype(x.dtype)
    return jnp.sum(x, axis=axes) / jnp.maximum(count, 1)[:, None]


def global_sum_pool(x: Any, mask: Any = None) -> Any:
    """Readout ``(N, *S, C) -> (N, C)``, the sum over all spatial positions.

    On a :class:`~ntkjax.Kernel`: ``Sigma[a, b] = sum_{p, p'} Sigma[a, b, p, p']`` (likewise
    Theta and the variances), ``width = C`` (neural-tangents' ``GlobalSumPool``). Masks: the
    sum over the unmasked positions only.

    Args:
      x: inputs (N, *S, C), or their Kernel (which carries its own masks).
      mask: for arrays, None or a boolean (N, *S) position mask (True = masked).

    Returns:
      The pooled array (N, C), or its Kernel.

    >>> import jax.numpy as jnp
    >>> print(global_sum_pool(jnp.ones((2, 3, 3, 4)))[0, 0])
    9.0
    """
    _no_mask_argument(x, mask, "global_sum_pool")
    if isinstance(x, FeatureStandIn):
        return _GLOBAL_SUM_POOL.on_features(x, global_sum_pool, average=False)
    if isinstance(x, Kernel):
        return _global_pool_kernel(x, "global_sum_pool", average=False)
    x = jnp.asarray(x)
    _check_spatial_input(x, "global_sum_pool")
    x = _zero_masked(x, mask, "global_sum_pool")
    return jnp.sum(x, axis=tuple(range(1, x.ndim - 1)))


def _pool_config(
    spatial: Sequence[int],
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: str | Sequence[tuple[int, int]],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...], str]:
    """(window, strides, pads, pad mode) of a pooling over ``spatial``, validated."""
    nd = len(spatial)

    def ints(value: Any, name: str) -> tuple[int, ...]:
        values = (value,) * nd if isinstance(value, int) else tuple(value)
        if len(values) != nd or any(int(v) != v or v < 1 for v in values):
            raise ValueError(
                f"{name} must be {nd} positive ints (one per spatial axis of the input); got "
                f"{value!r}."
            )
        return tuple(int(v) for v in values)

    window = ints(window_shape, "window_shape")
    step = (1,) * nd if strides is None else ints(strides, "strides")
    if isinstance(padding, str):
        check_choice(padding, POOL_PADDINGS, "padding")
        pads, mode = conv_padding(spatial, window, step, padding)  # type: ignore[arg-type]
    else:
        pads = tuple(tuple(int(v) for v in pair) for pair in padding)  # type: ignore[misc]
        if len(pads) != nd or any(len(p) != 2 or min(p) < 0 for p in pads):
            raise ValueError(
                f"padding must be 'SAME', 'VALID', 'CIRCULAR' or {nd} (low, high) pairs of "
                f"non-negative ints; got {padding!r}."
            )
        mode = "constant"
    for i, (n, k, (lo, hi)) in enumerate(zip(spatial, window, pads, strict=True)):
        if n + lo + hi < k:
            raise ValueError(
                f"pooling window {k} is larger than spatial axis {i} of the input (size {n}, "
                f"padded to {n + lo + hi})."
            )
    return window, step, pads, mode  # type: ignore[return-value]


def _divisors(
    spatial: Sequence[int],
    window: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    mode: str,
    count_include_pad: bool,
    dtype: Any,
) -> list[jax.Array] | None:
    """Per spatial axis, the number of in-input positions in each window (None when every
    window counts ``prod(window)``: padded zeros included, periodic or no padding)."""
    if count_include_pad or mode == "wrap" or not any(lo or hi for lo, hi in pads):
        return None
    return [
        window_sum(jnp.ones((n,), dtype), [(0,)], window=(k,), strides=(s,), pads=(p,))
        for n, k, s, p in zip(spatial, window, strides, pads, strict=True)
    ]


def _pool(
    x: Any,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: str | Sequence[tuple[int, int]],
    *,
    average: bool,
    count_include_pad: bool,
    name: str,
) -> Any:
    if isinstance(x, Kernel):
        return _pool_kernel(x, window_shape, strides, padding, average=average,
                            count_include_pad=count_include_pad, name=name)
    x = jnp.asarray(x)
    nd = 1 if isinstance(window_shape, int) else len(window_shape)
    if x.ndim < nd + 1:
        raise ValueError(
            f"{name} with a {nd}-D window needs inputs of shape (batch, *spatial, channels) with "
            f"{nd} spatial axes; got shape {x.shape}."
        )
    first = x.ndim - 1 - nd
    spatial = x.shape[first : first + nd]
    window, step, pads, mode = _pool_config(spatial, window_shape, strides, padding)
    axes = list(range(first, first + nd))
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.result_type(float)
    y = window_sum(x.astype(dtype), [(a,) for a in axes], window=window, strides=step,
                   pads=pads, mode=mode)
    if not average:
        return y
    divisors = _divisors(spatial, window, step, pads, mode, count_include_pad, dtype)
    if divisors is None:
        return y * (1.0 / math.prod(window))
    for a, d in zip(axes, divisors, strict=True):
        shape = [1] * y.ndim
        shape[a] = d.shape[0]
        y = y / d.reshape(shape)
    return y


def _pool_kernel(
    k: Kernel,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: str | Sequence[tuple[int, int]],
    *,
    average: bool,
    count_include_pad: bool,
    name: str,
) -> Kernel:
    nd = k.spatial_ndim
    n_window = 1 if isinstance(window_shape, int) else len(window_shape)
    if nd == 0 or (not isinstance(window_shape, int) and n_window != nd):
        raise ValueError(
            f"{name} with window {window_shape!r} needs a kernel with {n_window} spatial axes; "
            f"got one with spatial shape {k.spatial_shape}."
        )
    k = k.require_all_pairs(name).masked()  # masked positions take no part (zeros)
    spatial = k.spatial_shape
    window, step, pads, mode = _pool_config(spatial, window_shape, strides, padding)
    divisors = (_divisors(spatial, window, step, pads, mode, count_include_pad, k.dtype)
                if average else None)

    def pool(a: jax.Array, lead: int) -> jax.Array:
        for first in (lead, lead + nd):
            a = window_sum(a, [(first + i,) for i in range(nd)], window=window, strides=step,
                           pads=pads, mode=mode)
        if not average:
            return a
        if divisors is None:
            return a * (1.0 / math.prod(window) ** 2)
        for first in (lead, lead + nd):
            for i, d in enumerate(divisors):
                shape = [1] * a.ndim
                shape[first + i] = d.shape[0]
                a = a / d.reshape(shape)
        return a

    var1, var2 = k.map_variances(lambda v: pool(v, 1))
    out = k.replace(nngp=pool(k.nngp, 2), ntk=pool(k.ntk, 2), var1=var1, var2=var2)
    return out.map_masks(lambda m: window_mask(m, window, step, pads))


def avg_pool(
    x: Any,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PoolPadding | Sequence[tuple[int, int]] = "VALID",
    count_include_pad: bool = True,
    mask: Any = None,
) -> Any:
    """Average pooling with ``flax.linen.avg_pool``'s signature, on arrays and Kernels.

    ``y[o] = (1/|W_o|) sum_{p in W_o} x[p]`` over windows ``W_o`` of ``window_shape`` at
    ``strides`` (default 1) on inputs (N, *S, C) (any number of leading batch axes on arrays).
    ``padding``: ``"VALID"``, ``"SAME"`` (zeros, as ``lax.padtype_to_pads``), ``"CIRCULAR"``
    (the ``"SAME"`` amounts filled periodically, neural-tangents' convention) or one
    ``(low, high)`` pair of zeros per spatial axis. ``|W_o| = prod(window_shape)`` when
    ``count_include_pad`` (padded zeros count), else the number of in-input positions in the
    window (neural-tangents' ``normalize_edges=True``).

    On a :class:`~ntkjax.Kernel` (all pairs of positions needed):
    ``Sigma'[o, o'] = sum_{p in W_o, p' in W_o'} Sigma[p, p'] / (|W_o| |W_o'|)``, likewise Theta
    and each input's covariance; ``width`` unchanged.

    Args:
      x: inputs (N, *S, C), or their Kernel.
      window_shape: the window, one size per spatial axis (or one int for all).
      strides: the strides (default 1).
      padding: ``"VALID"``, ``"SAME"``, ``"CIRCULAR"`` or ``(low, high)`` pairs.
      count_include_pad: whether padded zeros count in the average.
      mask: for arrays (N, *S, C), None or a boolean (N, *S) position mask (True = masked):
        masked positions enter as zeros (neural-tangents' rule; the kernel's own masks on a
        Kernel). The outputs' mask is :func:`ntkjax.nn.window_mask` of it.

    Returns:
      The pooled array, or its Kernel.

    >>> import jax.numpy as jnp
    >>> print(avg_pool(jnp.arange(4.0).reshape(1, 4, 1), (2,), strides=(2,))[0, :, 0])
    [0.5 2.5]
    """
    if isinstance(x, FeatureStandIn):
        return _AVG_POOL.on_features(
            x, lambda k: avg_pool(k, window_shape, strides, padding, count_include_pad),
            window_shape, strides, padding, average=True, count_include_pad=count_include_pad,
            name="avg_pool")
    _no_mask_argument(x, mask, "avg_pool")
    if mask is not None:
        x = _zero_masked(x, mask, "avg_pool")
    return _pool(x, window_shape, strides, padding, average=True,
                 count_include_pad=count_include_pad, name="avg_pool")


def sum_pool(
    x: Any,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PoolPadding | Sequence[tuple[int, int]] = "VALID",
    mask: Any = None,
) -> Any:
    """Sum pooling, ``y[o] = sum_{p in W_o} x[p]``, with :func:`avg_pool`'s arguments (and
    ``flax.linen.pooling.pool``'s with ``lax.add``).

    On a :class:`~ntkjax.Kernel`: ``Sigma'[o, o'] = sum_{p in W_o, p' in W_o'} Sigma[p, p']``
    (likewise Theta and the covariances; neural-tangents' ``SumPool``).

    Args:
      x: inputs (N, *S, C), or their Kernel.
      window_shape: the window, one size per spatial axis (or one int for all).
      strides: the strides (default 1).
      padding: ``"VALID"``, ``"SAME"``, ``"CIRCULAR"`` or ``(low, high)`` pairs.
      mask: for arrays, None or a boolean (N, *S) position mask: masked positions enter as
        zeros (as in :func:`avg_pool`).

    Returns:
      The pooled array, or its Kernel.

    >>> import jax.numpy as jnp
    >>> sum_pool(jnp.ones((1, 4, 4, 1)), (2, 2), strides=(2, 2)).shape
    (1, 2, 2, 1)
    """
    if isinstance(x, FeatureStandIn):
        return _SUM_POOL.on_features(
            x, lambda k: sum_pool(k, window_shape, strides, padding),
            window_shape, strides, padding, average=False, count_include_pad=True,
            name="sum_pool")
    _no_mask_argument(x, mask, "sum_pool")
    if mask is not None:
        x = _zero_masked(x, mask, "sum_pool")
    return _pool(x, window_shape, strides, padding, average=False, count_include_pad=True,
                 name="sum_pool")


# Random-feature rules (ntkjax.features; features per position, shape (N, *S, D)). Every
# pooling is linear in the per-position values, and a kernel is the inner product of features,
# so pooling the features by the finite layer itself gives exactly the pooled kernel:
# ``phi'[o] = sum_{p in W_o} phi[p] / |W_o|`` has ``phi'[o] . phi'[o'] = sum_{p, p'}
# Sigma[p, p'] / (|W_o| |W_o'|)`` (likewise psi and Theta; the global pools are one window).
# flatten keeps every position in its own coordinates: ``phi.reshape(N, P D) / sqrt(P)`` has
# inner products ``mean_p Sigma[p, p]`` (Novak et al. 2019 readouts).


def _flatten_features(x: FeatureStandIn, exact: Kernel):
    nd = x.exact.spatial_ndim
    if nd == 0:
        return x.phi, x.psi
    scale = 1.0 / math.sqrt(math.prod(x.exact.spatial_shape))
    n = x.phi.shape[0]
    return x.phi.reshape(n, -1) * scale, x.psi.reshape(n, -1) * scale


def _global_pool_features(x: FeatureStandIn, exact: Kernel, *, average: bool):
    axes = tuple(range(1, 1 + x.exact.spatial_ndim))
    reduce = jnp.mean if average else jnp.sum
    return reduce(x.phi, axis=axes), reduce(x.psi, axis=axes)


def _window_pool_features(x: FeatureStandIn, exact: Kernel, window_shape: Any, strides: Any,
                          padding: Any, *, average: bool, count_include_pad: bool, name: str):
    nd = x.exact.spatial_ndim  # an int window or stride applies to every axis, as the kernel
    window = (window_shape,) * nd if isinstance(window_shape, int) else tuple(window_shape)
    step = (strides,) * nd if isinstance(strides, int) else strides

    def pool(a: jax.Array) -> jax.Array:
        return _pool(a, window, step, padding, average=average,
                     count_include_pad=count_include_pad, name=name)

    return pool(x.phi), pool(x.psi)


_FLATTEN = declare(flatten, kernel=_flatten_kernel, features=_flatten_features,
                   structured="parameter-free")
_GLOBAL_AVERAGE_POOL = declare(global_average_pool, kernel=_global_average_pool_kernel,
                               features=_global_pool_features, structured="parameter-free",
                               all_pairs=True)
_GLOBAL_SUM_POOL = declare(global_sum_pool, kernel=_global_pool_kernel,
                           features=_global_pool_features, structured="parameter-free",
                           all_pairs=True)
_AVG_POOL = declare(avg_pool, kernel=_pool_kernel, features=_window_pool_features,
                    structured="parameter-free", all_pairs=True)
_SUM_POOL = declare(sum_pool, kernel=_pool_kernel, features=_window_pool_features,
                    structured="parameter-free", all_pairs=True)
