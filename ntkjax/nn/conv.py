"""Convolutions (and transposed convolutions) and their infinite-width rule.

A convolution is a dense layer on patches: its NNGP, NTK and variances are averaged over the
window (:func:`patch_average`), then mapped by the dense rule with
``fan_in = prod(window) * channels`` (:func:`ntkjax.nn.dense.dense_kernel`)::

    T(k)[o, o'] = (1/|K|) sum_delta k[s o + delta, s o' + delta]
    Sigma' = w_std^2 T(Sigma) + b_std^2
    Theta' = Sigma' + w_std^2 T(Theta)                       (NTK parameterization)
    Theta' = fan_in T(Sigma) + w_std^2 T(Theta) (+ 1)        (standard)

(Novak et al. 2019, "Bayesian Deep Convolutional Networks with Many Channels are Gaussian
Processes"; Arora et al. 2019, "On Exact Computation with an Infinitely Wide Neural Net").

A transposed convolution (``lax.conv_transpose``) is a stride-1 convolution of the input dilated
by the strides (``s - 1`` zeros between neighbours) and padded as ``lax.conv_transpose`` pads it,
so its rule is the same average taken over the dilated kernel, where the inserted zeros count in
``|K|`` (:func:`transpose_patch_average`; neural-tangents' ``ConvTranspose`` convention).

Only same-position pairs: on a kernel with ``diagonal_spatial`` (shape (*batch, *S)) the average
is ``T[o, o] = (1/|K|) sum_delta k[s o + delta, s o + delta]``, which again reads only
same-position entries.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._checks import check_choice, check_mask, zero_masked
from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, UnsupportedMeaning, declaration_of, declare
from ntkjax.nn.dense import Affine, Parameterization, dense_features, dense_kernel

__all__ = [
    "CONV_PADDINGS",
    "TRANSPOSE_PADDINGS",
    "Conv",
    "ConvLocal",
    "ConvPadding",
    "ConvTranspose",
    "TransposePadding",
    "conv_kernel",
    "conv_padding",
    "fold_periodic",
    "local_kernel",
    "patch_average",
    "transpose_padding",
    "transpose_patch_average",
    "window_mask",
    "window_sum",
]

ConvPadding = Literal["SAME", "VALID", "CIRCULAR"]
CONV_PADDINGS: tuple[ConvPadding, ...] = ("SAME", "VALID", "CIRCULAR")
TransposePadding = Literal["SAME", "VALID", "CIRCULAR"]
TRANSPOSE_PADDINGS: tuple[TransposePadding, ...] = ("SAME", "VALID", "CIRCULAR")


def conv_padding(
    spatial_shape: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    padding: ConvPadding,
) -> tuple[tuple[tuple[int, int], ...], str]:
    """``(pads, mode)``: the ``(low, high)`` padding per spatial axis and the ``jnp.pad`` mode --
    ``"constant"`` (zeros) for ``"SAME"`` / ``"VALID"``, ``"wrap"`` for ``"CIRCULAR"``.

    ``"SAME"``: ``out = ceil(n / s)`` positions and ``max((out - 1) s + k - n, 0)`` zeros in
    total, the smaller half in front (``lax.padtype_to_pads``); ``"VALID"``: none;
    ``"CIRCULAR"``: the same amounts as ``"SAME"``, filled periodically (neural-tangents'
    convention: the input is a torus and the outputs sit where ``"SAME"`` puts them; for
    stride 1 this is also ``flax.linen.Conv``'s ``((k - 1) // 2, k // 2)``).

    >>> conv_padding((8,), (3,), (1,), "SAME")
    (((1, 1),), 'constant')
    """
    check_choice(padding, CONV_PADDINGS, "padding")
    kind = "SAME" if padding == "CIRCULAR" else padding
    pads = jax.lax.padtype_to_pads(tuple(spatial_shape), tuple(window), tuple(strides), kind)
    return tuple((int(lo), int(hi)) for lo, hi in pads), (
        "wrap" if padding == "CIRCULAR" else "constant")


def window_mask(
    mask: jax.Array,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: ConvPadding | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """The position mask after a convolution or windowed pooling (neural-tangents' rule): with
    the same spatial size the mask is unchanged; otherwise output position ``o`` (per spatial
    axis) takes the mask of input position ``o * stride - pad_low + (window - 1) // 2``, the
    centre of its window (``pad_low`` from :func:`conv_padding`; explicit ``(low, high)`` pairs
    as given).

    Args:
      mask: boolean (N, *S), True = masked (the inputs' shape without the channel axis).
      window_shape: the window (an int for every axis, or one per axis).
      strides: the strides (None: 1).
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"`` or ``(low, high)`` pairs.

    Returns:
      The boolean mask (N, *S_out) of the layer's outputs.

    >>> import jax.numpy as jnp
    >>> window_mask(jnp.array([[False, False, True, True]]), 2, 2, "VALID").tolist()
    [[False, True]]
    """
    mask = jnp.asarray(mask)
    nd = mask.ndim - 1
    window = (window_shape,) * nd if isinstance(window_shape, int) else tuple(window_shape)
    step = (1,) * nd if strides is None else (
        (strides,) * nd if isinstance(strides, int) else tuple(strides))
    if len(window) != nd or len(step) != nd:
        raise ValueError(
            f"window_mask: a mask of shape {mask.shape} has {nd} spatial axes; got window "
            f"{window_shape!r} and strides {strides!r}."
        )
    spatial = mask.shape[1:]
    if isinstance(padding, str):
        pads, _ = conv_padding(spatial, window, step, padding)  # type: ignore[arg-type]
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    for i, (n, k, s, (lo, hi)) in enumerate(zip(spatial, window, step, pads, strict=True)):
        out = (n + lo + hi - k) // s + 1
        if out == n:
            continue
        centres = jnp.arange(out) * s - lo + (k - 1) // 2
        mask = jnp.take(mask, jnp.clip(centres, 0, n - 1), axis=1 + i)
    return mask


def transpose_padding(
    window: Sequence[int], strides: Sequence[int], padding: TransposePadding
) -> tuple[tuple[int, int], ...]:
    """The ``(low, high)`` zeros that ``lax.conv_transpose`` (and ``flax.linen.ConvTranspose``)
    adds around the stride-dilated input before its stride-1 convolution, per spatial axis:
    ``"SAME"``: ``k + s - 2`` in total, ``k - 1`` in front when ``s > k - 1`` else
    ``ceil((k + s - 2) / 2)`` (output ``n s``); ``"VALID"``: ``k + s - 2 + max(k - s, 0)`` in
    total, ``k - 1`` in front (output ``n s + max(k - s, 0)``). ``"CIRCULAR"`` is computed as
    ``"VALID"`` and then folded (:func:`fold_periodic`), so it gets the ``"VALID"`` amounts.

    >>> transpose_padding((3,), (2,), "SAME")
    ((2, 1),)
    """
    check_choice(padding, TRANSPOSE_PADDINGS, "padding")
    pads = []
    for k, s in zip(window, strides, strict=True):
        if padding == "SAME":
            total = k + s - 2
            lo = k - 1 if s > k - 1 else -(-total // 2)
        else:  # "VALID", and "CIRCULAR" before its fold
            total = k + s - 2 + max(k - s, 0)
            lo = k - 1
        pads.append((lo, total - lo))
    return tuple(pads)


def fold_periodic(
    a: jax.Array, groups: Sequence[Sequence[int]], sizes: Sequence[int]
) -> jax.Array:
    """Wraps axes onto a torus: for spatial dimension ``i`` each axis in ``groups[i]`` (length
    ``m``) becomes length ``n = sizes[i]`` with

    ``out[j] = sum_{p : (p - lo) mod n = j} a[p]``,   ``lo = (m - n) // 2``,

    the adjoint of the periodic ``"SAME"`` padding of a length-``n`` axis to length ``m``
    (``lo`` in front, as ``lax.padtype_to_pads``). A transposed convolution with ``"CIRCULAR"``
    padding is the ``"VALID"`` one folded to ``n s`` positions this way (neural-tangents'
    convention: the transpose of the circular convolution); applied to both position indices of
    a covariance, it gives the covariance of the folded outputs.

    >>> fold_periodic(jnp.arange(5.0), [(0,)], (3,))  # lo = 1: a[1] + a[4], a[2], a[3] + a[0]
    Array([5., 2., 3.], dtype=float32)
    """
    for axes, n in zip(groups, sizes, strict=True):
        for ax in axes:
            m = a.shape[ax]
            front = (-((m - n) // 2)) % n
            back = -(-(front + m) // n) * n - front - m
            pads = [(0, 0)] * a.ndim
            pads[ax] = (front, back)
            a = jnp.pad(a, pads)
            shape = (*a.shape[:ax], (front + m + back) // n, n, *a.shape[ax + 1 :])
            a = a.reshape(shape).sum(axis=ax)
    return a


def window_sum(
    a: jax.Array,
    groups: Sequence[Sequence[int]],
    *,
    window: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    mode: str = "constant",
    dilation: Sequence[int] | None = None,
) -> jax.Array:
    """Sums of ``a`` over sliding windows, one spatial dimension at a time.

    For spatial dimension ``i``, the axes ``groups[i]`` of ``a`` (one axis, or several that move
    together -- a convolution shifts both position indices of a kernel by the same offset) are
    dilated by ``dilation[i]`` (``dilation - 1`` zeros between neighbours), padded by
    ``pads[i]`` (zeros, or periodically with ``mode="wrap"``) and replaced by
    ``out[o] = sum_{j < window[i]} a[strides[i] o + j]`` (the same ``j`` on every axis of the
    group). Each dimension costs ``window[i]`` shifted strided slices.

    All padding is applied first, in one pass (on the CPU a padding fused into the slices that
    read it is several times slower than the two apart), then the windows are summed with
    unpadded slices.

    >>> window_sum(jnp.arange(4.0), [(0,)], window=(2,), strides=(2,), pads=((0, 0),))
    Array([1., 5.], dtype=float32)
    """
    outs = []
    config = [(0, 0, 0)] * a.ndim
    for i, axes in enumerate(groups):
        size, step, (lo, hi) = window[i], strides[i], pads[i]
        dil = 1 if dilation is None else dilation[i]
        n = a.shape[axes[0]]
        out = ((n - 1) * dil + 1 + lo + hi - size) // step + 1
        if out < 1:
            raise ValueError(
                f"window {size} does not fit spatial axis {i} of size {n} with padding "
                f"({lo}, {hi}); the window is larger than the padded input."
            )
        outs.append(out)
        for ax in axes:
            config[ax] = (lo, hi, dil - 1)
    if mode == "wrap":
        if any(interior for _, _, interior in config):
            raise ValueError("periodic padding of a dilated input is not supported.")
        if any(lo or hi for lo, hi, _ in config):
            a = jnp.pad(a, [(lo, hi) for lo, hi, _ in config], mode="wrap")
    elif any(lo or hi or interior for lo, hi, interior in config):
        a = jax.lax.pad(a, jnp.zeros((), a.dtype), config)
    for i, axes in enumerate(groups):
        size, step, out = window[i], strides[i], outs[i]
        total = None
        for j in range(size):
            index: list[Any] = [slice(None)] * a.ndim
            for ax in axes:
                index[ax] = slice(j, j + (out - 1) * step + 1, step)
            term = a[tuple(index)]
            total = term if total is None else total + term
        assert total is not None
        a = total
    return a


def _kernel_groups(
    k: jax.Array, batch_ndim: int, nd: int, diagonal_spatial: bool, name: str, window
) -> list[tuple[int, ...]]:
    """The axis groups of a kernel array for :func:`window_sum`, after checking its shape."""
    spatial = tuple(k.shape[batch_ndim : batch_ndim + nd])
    want_ndim = batch_ndim + (nd if diagonal_spatial else 2 * nd)
    if k.ndim != want_ndim or (not diagonal_spatial and tuple(k.shape[batch_ndim + nd :])
                               != spatial):
        layout = "(*batch, *S)" if diagonal_spatial else "(*batch, *S, *S)"
        raise ValueError(
            f"{name} needs a kernel of shape {layout} with {batch_ndim} batch axes and {nd} "
            f"spatial axes (window {tuple(window)}); got shape {k.shape}."
        )
    if diagonal_spatial:
        return [(batch_ndim + i,) for i in range(nd)]
    return [(batch_ndim + i, batch_ndim + nd + i) for i in range(nd)]


def patch_average(
    k: jax.Array,
    *,
    batch_ndim: int,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: ConvPadding = "SAME",
    diagonal_spatial: bool = False,
) -> jax.Array:
    """The covariance of a convolution's input patches, from the covariance of its inputs.

    ``k`` has shape ``(*batch, *S, *S)``: ``k[..., p, p']`` is the kernel between position ``p``
    of one input and ``p'`` of the other (``len(S) = len(window)`` spatial axes, ``batch_ndim``
    leading axes: 2 for an (N1, N2) kernel, 1 for per-input self-covariances). Returns

    ``T[o, o'] = (1 / |K|) sum_{delta in K} k[s o + delta, s o' + delta]``

    over the window's offsets ``delta`` (``|K| = prod(window)``) with strides ``s``, indices
    into the padded input: zero padding for ``"SAME"`` (positions outside contribute 0), none for
    ``"VALID"``, periodic for ``"CIRCULAR"`` (see :func:`conv_padding`). A convolution is a dense
    layer on patches of ``|K| C`` features, so the dense rule with ``fan_in = |K| C`` applied to
    ``T`` (for the NNGP, the NTK and the variances alike) gives the kernels after the
    convolution, in either parameterization (Novak et al. 2019; Arora et al. 2019).

    With ``diagonal_spatial``, ``k`` holds only same-position entries, shape ``(*batch, *S)``,
    and so does the result: ``T[o, o] = (1 / |K|) sum_delta k[s o + delta, s o + delta]``.

    The window factorizes over axes, so the average is taken one spatial axis at a time
    (``sum_i k_i`` shifted slices instead of ``prod_i k_i``; :func:`window_sum`). Keeps ``k``'s
    dtype.

    >>> patch_average(jnp.eye(3)[None], batch_ndim=1, window=(3,), padding="VALID").shape
    (1, 1, 1)
    """
    nd = len(window)
    strides = (1,) * nd if strides is None else tuple(strides)
    if len(strides) != nd:
        raise ValueError(f"strides {strides} and window {tuple(window)} differ in length.")
    groups = _kernel_groups(k, batch_ndim, nd, diagonal_spatial, "patch_average", window)
    spatial = tuple(k.shape[batch_ndim : batch_ndim + nd])
    pads, mode = conv_padding(spatial, window, strides, padding)
    total = window_sum(k, groups, window=window, strides=strides, pads=pads, mode=mode)
    return total * (1.0 / math.prod(window))


def transpose_patch_average(
    k: jax.Array,
    *,
    batch_ndim: int,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: TransposePadding = "SAME",
    diagonal_spatial: bool = False,
) -> jax.Array:
    """:func:`patch_average` for a transposed convolution: the input kernel dilated by the
    strides on both position indices (zeros between neighbours), padded by
    :func:`transpose_padding`, then averaged over stride-1 windows,

    ``T[o, o'] = (1 / |K|) sum_delta k_dil[o + delta, o' + delta]``,

    where the zeros count in ``|K| = prod(window)``: an output position that receives fewer than
    ``|K|`` inputs has a smaller variance (neural-tangents' ``ConvTranspose``; the layer is
    normalized by ``fan_in = |K| C`` like a convolution). Output size ``n s`` for ``"SAME"``
    and ``"CIRCULAR"`` (the ``"VALID"`` result folded by :func:`fold_periodic` on every position
    index), ``n s + max(k - s, 0)`` for ``"VALID"``.

    >>> transpose_patch_average(jnp.ones((1, 2, 2)), batch_ndim=1, window=(2,), strides=(2,),
    ...                         padding="VALID").shape
    (1, 4, 4)
    """
    nd = len(window)
    strides = (1,) * nd if strides is None else tuple(strides)
    if len(strides) != nd:
        raise ValueError(f"strides {strides} and window {tuple(window)} differ in length.")
    groups = _kernel_groups(k, batch_ndim, nd, diagonal_spatial, "transpose_patch_average",
                            window)
    pads = transpose_padding(window, strides, padding)
    total = window_sum(k, groups, window=window, strides=(1,) * nd, pads=pads,
                       dilation=strides)
    if padding == "CIRCULAR":
        spatial = k.shape[batch_ndim : batch_ndim + nd]
        total = fold_periodic(total, groups, [n * s for n, s in zip(spatial, strides,
                                                                    strict=True)])
    return total * (1.0 / math.prod(window))


def conv_kernel(
    k: Kernel,
    features: int,
    *,
    window: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    padding: ConvPadding = "SAME",
    w_std: float,
    b_std: float,
    use_bias: bool = True,
    parameterization: Parameterization = "ntk",
    transpose: bool = False,
) -> Kernel:
    """The :class:`~ntkjax.Kernel` after a convolution with ``features`` output channels:
    :func:`patch_average` (:func:`transpose_patch_average` with ``transpose``), then the dense
    rule with ``fan_in = prod(window) * width`` (module docstring)."""
    nd = k.spatial_ndim
    if nd != len(window):
        raise ValueError(
            f"a {len(window)}-D convolution (window {tuple(window)}) needs a kernel with "
            f"{len(window)} spatial axes; got one with spatial shape {k.spatial_shape}"
            + (" -- inputs of shape (batch, *spatial, channels)." if nd == 0 else ".")
        )
    if k.has_masks:
        if transpose:
            raise ValueError(
                "ConvTranspose has no rule for masked inputs (neural-tangents defines none); "
                "kernel_fn was given mask1 / mask2. Remove the masks or the transposed "
                "convolution."
            )
        # masked positions take no part: their entries are 0 before the patches are averaged
        k = k.masked()
    average = transpose_patch_average if transpose else patch_average
    avg = functools.partial(average, window=tuple(window), strides=strides,
                            padding=padding, diagonal_spatial=k.diagonal_spatial)
    var1, var2 = k.map_variances(lambda v: avg(v, batch_ndim=1))
    patches = k.replace(nngp=avg(k.nngp, batch_ndim=2), ntk=avg(k.ntk, batch_ndim=2),
                        var1=var1, var2=var2, width=math.prod(window) * k.width)
    out = dense_kernel(patches, features, w_std=w_std, b_std=b_std, use_bias=use_bias,
                       parameterization=parameterization)
    if not k.has_masks:
        return out
    return out.map_masks(lambda m: window_mask(m, tuple(window), strides, padding))


def _per_axis(value: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
    """An int (the same for every spatial axis) or one positive int per axis, as a tuple."""
    values = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(values) != nd or any(int(v) != v or v < 1 for v in values):
        raise ValueError(
            f"{name} must be a positive int or {nd} positive ints (one per spatial axis of the "
            f"input); got {value!r}."
        )
    return tuple(int(v) for v in values)


class _ConvLayer(Affine):
    """What :class:`Conv` and :class:`ConvTranspose` share: configuration, validation, the
    finite layer as one ``flax.linen.Conv`` (submodule ``"conv"``) and the kernel rule."""

    _: dataclasses.KW_ONLY
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"  # narrowed by Conv and ConvTranspose

    _transpose = False

    def _paddings(self) -> tuple[str, ...]:
        return TRANSPOSE_PADDINGS if self._transpose else CONV_PADDINGS

    @linen.compact
    def __call__(self, x: Any, mask: Any = None) -> Any:
        self._check()
        check_choice(self.padding, self._paddings(), "padding")
        if mask is not None and self._transpose and not isinstance(x, Kernel | FeatureStandIn):
            raise ValueError("ConvTranspose has no rule for masked inputs; got a mask.")
        x = _zero_masked_positions(type(self).__name__, x, mask)
        name = type(self).__name__
        if isinstance(x, FeatureStandIn):
            meanings = declaration_of(type(self))
            assert meanings is not None
            return meanings.on_features(x, self.__call__, self)
        if isinstance(x, Kernel):
            nd = x.spatial_ndim
            if nd == 0:
                raise ValueError(
                    f"{name} needs a kernel with spatial axes, i.e. inputs of shape (batch, "
                    "*spatial, channels); got a kernel of feature vectors (inputs (batch, d) or "
                    "after flatten / a global pooling)."
                )
            window = _per_axis(self.kernel_size, nd, "kernel_size")
            return conv_kernel(
                x, self.features, window=window,
                strides=_per_axis(self.strides, len(window), "strides"),
                padding=self.padding,  # type: ignore[arg-type]
                w_std=self.w_std, b_std=self._bias_std, use_bias=self._with_bias,
                parameterization=self.parameterization, transpose=self._transpose,
            )
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(
                f"{name} needs inputs of shape (batch, *spatial, channels), got shape {x.shape}."
            )
        nd = x.ndim - 2
        window = _per_axis(self.kernel_size, nd, "kernel_size")
        strides = _per_axis(self.strides, nd, "strides")
        dtype = self._param_dtype(x)
        x = x.astype(dtype)
        spatial = x.shape[1:-1]
        if self._transpose:
            pads = transpose_padding(window, strides, self.padding)  # type: ignore[arg-type]
            conv_strides, dilation = (1,) * nd, strides
        else:
            pads, mode = conv_padding(spatial, window, strides, self.padding)  # type: ignore
            conv_strides, dilation = strides, (1,) * nd
            for i, (n, k, (lo, hi)) in enumerate(zip(spatial, window, pads, strict=True)):
                if n + lo + hi < k:
                    raise ValueError(
                        f"Conv window {k} is larger than spatial axis {i} of the input (size "
                        f"{n}, padded to {n + lo + hi} with padding {self.padding!r})."
                    )
            if mode == "wrap":
                x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode="wrap")
                pads = ((0, 0),) * nd
        fan_in = math.prod(window) * x.shape[-1]
        self._check_fan_in(fan_in, x.shape)
        conv = functools.partial(
            linen.Conv, self.features, window, strides=conv_strides, padding=pads,
            input_dilation=dilation, param_dtype=dtype, name="conv",
        )
        fold = None
        if self._transpose and self.padding == "CIRCULAR":
            sizes = [n * s for n, s in zip(spatial, strides, strict=True)]
            groups = [(1 + i,) for i in range(nd)]
            fold = functools.partial(fold_periodic, groups=groups, sizes=sizes)
        if self.parameterization == "standard":
            if fold:
                weights = linen.initializers.normal(self.w_std / math.sqrt(fan_in))
                return self._circular_conv(conv(use_bias=False, kernel_init=weights), x, fold,
                                           1.0)
            return conv(
                use_bias=self._bias_parameter,
                kernel_init=linen.initializers.normal(self.w_std / math.sqrt(fan_in)),
                bias_init=linen.initializers.normal(self._bias_std),
            )(x)
        scale = float(self.w_std) / math.sqrt(fan_in)  # Python floats keep x's dtype
        b_std = float(self._bias_std)
        unit = linen.initializers.normal(1.0)
        if fold:
            return self._circular_conv(conv(use_bias=False, kernel_init=unit), x * scale, fold,
                                       b_std)
        if self._bias_parameter:
            return b_std * conv(use_bias=True, kernel_init=unit, bias_init=unit)(
                (scale / b_std) * x
            )
        return conv(use_bias=False, kernel_init=unit)(scale * x)

    def _circular_conv(self, conv: Any, x: Any, fold: Callable, b_scale: float) -> Any:
        """A ``"CIRCULAR"`` transposed convolution: the bias-free ``"VALID"`` one folded onto
        the torus (:func:`fold_periodic`), then its bias (scaled by ``b_scale``) -- added after
        the fold, so once per output position."""
        y = fold(conv(x))
        if not self._bias_parameter:
            return y
        init = (linen.initializers.normal(self._bias_std) if self.parameterization ==
                "standard" else linen.initializers.normal(1.0))
        bias = self.param("bias", init, (self.features,), y.dtype)
        return y + b_scale * bias


class Conv(_ConvLayer):
    """A convolution in the NTK or the standard parameterization, on arrays (N, *S, C_in).

    * ``parameterization="ntk"``: ``y = w_std / sqrt(fan_in) * conv(x, W) + b_std * b`` with
      ``W, b ~ N(0, 1)`` and ``fan_in = prod(kernel_size) * C_in``.
    * ``parameterization="standard"``: ``y = conv(x, W) + b`` with
      ``W ~ N(0, w_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``.

    ``conv`` is ``flax.linen.Conv`` (cross-correlation; ``padding`` ``"SAME"`` (zeros),
    ``"VALID"`` or ``"CIRCULAR"``; ``strides``), held as the submodule ``"conv"`` with parameters
    ``kernel`` (*kernel_size, C_in, features) and ``bias`` (features,). ``"CIRCULAR"`` pads
    periodically by :func:`conv_padding` (neural-tangents' convention), then convolves without
    padding; for stride 1 that is exactly ``flax.linen.Conv(padding="CIRCULAR")``, for larger
    strides flax centres the windows differently. The NTK parameterization computes the layer
    as ``b_std * flax.linen.Conv((w_std / (sqrt(fan_in) b_std)) x)`` -- the same function and
    gradients -- so the whole layer is one ``flax.linen.Conv`` whose per-layer factorization the
    structured empirical NTK (:mod:`ntkjax.structured`) recognises. With ``b_std = 0`` in the
    NTK parameterization there is no bias parameter (it would have neither an effect nor a
    gradient; the same rule as :class:`~ntkjax.nn.Dense`), and ``b_std=None`` means no bias.
    Inputs (N, *S, C) with ``len(kernel_size)`` spatial axes (an int
    ``kernel_size`` / ``strides`` applies to every spatial axis of the input).

    On a :class:`~ntkjax.Kernel` (with the same number of spatial axes) it applies the exact
    infinite-width rule :func:`conv_kernel` (module docstring).

    Attributes:
      features: number of output channels.
      kernel_size: window size, an int (every spatial axis) or one int per spatial axis.
      strides: an int or one int per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"``.
      w_std, b_std: weight and bias standard deviations (>= 0).
      use_bias: whether the layer has a bias.
      parameterization: ``"ntk"`` or ``"standard"``.
      param_dtype: dtype of the parameters; None uses the input's floating dtype.

    Raises:
      ValueError: for a window larger than the (padded) input.

    Configuration after ``features`` is keyword-only (``Conv(8, kernel_size=(3, 3))``).

    Masks: ``conv.apply(params, x, mask)`` with a boolean (N, *S) position mask (True =
    masked) reads the masked positions as zeros; the outputs' mask is
    :func:`window_mask` of it (neural-tangents' rule: the window centres). On a Kernel the
    kernel's own masks are used and mapped the same way.

    >>> import jax, ntkjax
    >>> conv = Conv(4, kernel_size=3)
    >>> images = jnp.ones((2, 5, 5, 3))
    >>> conv.apply(conv.init(jax.random.key(0), images), images).shape
    (2, 5, 5, 4)
    >>> ntkjax.kernel_fn(conv)(images).nngp.shape
    (2, 2, 5, 5, 5, 5)
    """

    _: dataclasses.KW_ONLY
    padding: ConvPadding = "SAME"


class ConvTranspose(_ConvLayer):
    """A transposed convolution in the NTK or the standard parameterization, on arrays
    (N, *S, C_in) -- ``flax.linen.ConvTranspose`` (``lax.conv_transpose``, kernel not flipped).

    * ``parameterization="ntk"``: ``y = w_std / sqrt(fan_in) * conv_transpose(x, W) + b_std b``
      with ``W, b ~ N(0, 1)``;
    * ``parameterization="standard"``: ``y = conv_transpose(x, W) + b`` with
      ``W ~ N(0, w_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``;

    both with ``fan_in = prod(kernel_size) * C_in``, as a convolution (neural-tangents'
    convention). ``conv_transpose`` dilates the input by ``strides`` (``s - 1`` zeros between
    neighbours), pads it by :func:`transpose_padding` and convolves with stride 1: output size
    ``n s`` for ``"SAME"``, ``n s + max(k - s, 0)`` for ``"VALID"``. The layer is computed as
    that stride-1 ``flax.linen.Conv`` with ``input_dilation=strides`` (submodule ``"conv"``,
    parameters ``kernel`` (*kernel_size, C_in, features) and ``bias``), the same function as
    ``flax.linen.ConvTranspose`` with the same kernel, and a dense layer on patches of the
    dilated input, which the structured empirical NTK factorizes.

    On a :class:`~ntkjax.Kernel`: :func:`conv_kernel` with ``transpose=True``
    (:func:`transpose_patch_average`, then the dense rule).

    Attributes:
      features, kernel_size, strides, w_std, b_std, use_bias, parameterization, param_dtype:
        as :class:`Conv`.
      padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"`` (neural-tangents' circular
        transposed convolution: the ``"VALID"`` output folded onto ``n s`` positions by
        :func:`fold_periodic`, the adjoint of a circular convolution's periodic padding; the
        bias, a parameter ``bias`` of this module, is added after the fold).

    >>> import jax, ntkjax
    >>> up = ConvTranspose(4, kernel_size=3, strides=2)
    >>> images = jnp.ones((2, 5, 5, 3))
    >>> up.apply(up.init(jax.random.key(0), images), images).shape
    (2, 10, 10, 4)
    >>> ntkjax.kernel_fn(up, position_pairs="same")(images).nngp.shape
    (2, 2, 10, 10)
    """

    _: dataclasses.KW_ONLY
    padding: TransposePadding = "SAME"

    _transpose = True


def _patches(phi: jax.Array, window: tuple[int, ...], strides: tuple[int, ...],
             padding: str) -> jax.Array:
    """``concat_delta phi[s o + delta] / sqrt(|K|)`` over the window offsets delta (zero
    padding for SAME, periodic for CIRCULAR, as :func:`conv_padding`): the inner products of
    patches are the patch average of the inner products (:func:`patch_average`)."""
    nd = len(window)
    spatial = phi.shape[1 : 1 + nd]
    pads, mode = conv_padding(spatial, window, strides, padding)  # type: ignore[arg-type]
    phi = jnp.pad(phi, [(0, 0), *pads, (0, 0)], mode=mode)
    outs = [(n + lo + hi - k) // s + 1
            for n, (lo, hi), k, s in zip(spatial, pads, window, strides, strict=True)]
    pieces = []
    for delta in itertools.product(*(range(k) for k in window)):
        index = (slice(None), *(slice(d, d + (o - 1) * s + 1, s)
                                for d, o, s in zip(delta, outs, strides, strict=True)),
                 slice(None))
        pieces.append(phi[index])
    return jnp.concatenate(pieces, axis=-1) * (1.0 / math.sqrt(math.prod(window)))


def _conv_features(x: FeatureStandIn, exact: Kernel, module: Conv):
    """A convolution is a dense layer on patches (CNTK features, Zandieh et al. 2021,
    section 5): :func:`_patches` of phi and psi, then
    :func:`~ntkjax.nn.dense.dense_features` with ``fan_in = |K| C`` -- exact."""
    nd = x.exact.spatial_ndim
    window = _per_axis(module.kernel_size, nd, "kernel_size")
    strides = _per_axis(module.strides, nd, "strides")
    phi = _patches(x.phi, window, strides, module.padding)
    psi = _patches(x.psi, window, strides, module.padding)
    return dense_features(phi, psi, w_std=module.w_std, b_std=module._bias_std,
                          use_bias=module._with_bias, parameterization=module.parameterization,
                          fan_in=math.prod(window) * x.exact.width)


_MEANINGS = declare(Conv, kernel=conv_kernel, features=_conv_features,
                    structured="via its flax.linen.Conv")
_TRANSPOSE_MEANINGS = declare(
    ConvTranspose, kernel=conv_kernel, features=None, structured="via its flax.linen.Conv",
    instead={"features": "a transposed convolution has no random-feature rule yet; use "
             "ntkjax.kernel_fn (exact) or the empirical NTK of a finite network."},
)


def local_kernel(
    k: Kernel,
    features: int,
    *,
    window: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    padding: ConvPadding = "SAME",
    w_std: float,
    b_std: float,
    use_bias: bool = True,
    parameterization: Parameterization = "ntk",
) -> Kernel:
    """The :class:`~ntkjax.Kernel` after a locally connected layer (:class:`ConvLocal`): the
    convolution's rule (:func:`conv_kernel`) on same-position pairs, and 0 between different
    output positions -- their weights (and biases) are independent, so
    ``Sigma'[o, o'] = delta_{o o'} (w_std^2 T(Sigma)[o, o] + b_std^2)`` and
    ``Theta'[o, o'] = delta_{o o'} (Sigma'[o, o] + w_std^2 T(Theta)[o, o])`` (NTK
    parameterization; Novak et al. 2019, section 5.1 and appendix; neural-tangents'
    ``ConvLocal``). The variances are diagonal in the positions likewise.

    >>> import jax.numpy as jnp, ntkjax
    >>> k = ntkjax.kernels.input_kernel(jnp.ones((1, 3, 1)))
    >>> local_kernel(k, 2, window=(1,), w_std=1.0, b_std=0.0).nngp[0, 0].tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    out = conv_kernel(k, features, window=window, strides=strides, padding=padding,
                      w_std=w_std, b_std=b_std, use_bias=use_bias,
                      parameterization=parameterization)
    if out.diagonal_spatial:
        return out
    spatial = out.spatial_shape
    positions = math.prod(spatial)
    eye = jnp.eye(positions, dtype=out.dtype).reshape(*spatial, *spatial)
    var1, var2 = out.map_variances(lambda v: v * eye)
    return out.replace(nngp=out.nngp * eye, ntk=out.ntk * eye, var1=var1, var2=var2)



def _zero_masked_positions(name: str, x: Any, mask: Any) -> Any:
    """A convolution's array input with its masked positions read as zeros (the window then
    leaves them out, as the kernel does); a mask beside a Kernel (which carries its own) is a
    ValueError, beside random features UnsupportedMeaning."""
    if mask is None:
        return x
    if isinstance(x, FeatureStandIn):
        raise UnsupportedMeaning(
            f"ntkjax.nn.{name}", "features",
            "random features carry no masks; for masked inputs use "
            "ntkjax.kernel_fn(module)(x1, x2, mask1=..., mask2=...).")
    if isinstance(x, Kernel):
        raise ValueError(
            f"{name}: on a Kernel the masks are the kernel's own (kernel_fn's mask1 / mask2); "
            "got a mask argument as well.")
    return zero_masked(x, check_mask(x, mask))


class ConvLocal(Affine):
    """A locally connected layer: a convolution whose weights are not shared between output
    positions, with one bias per output position (neural-tangents' ``stax.ConvLocal``).

    * ``parameterization="ntk"``: ``y[o] = w_std / sqrt(fan_in) * W[o] . patch(x)[o] +
      b_std * b[o]`` with ``W, b ~ N(0, 1)`` and ``fan_in = prod(kernel_size) * C_in``;
    * ``parameterization="standard"``: ``y[o] = W[o] . patch(x)[o] + b[o]`` with
      ``W ~ N(0, w_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``.

    Patches as :class:`Conv` (``padding`` ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``; ``strides``),
    for 1-D and 2-D inputs (any number of spatial axes). Parameters ``kernel``
    (*out_spatial, prod(kernel_size) * C_in, features) and ``bias`` (*out_spatial, features)
    (the bias exists under the same rule as :class:`Conv`'s). On a :class:`~ntkjax.Kernel`:
    :func:`local_kernel` -- the kernel is diagonal in the positions, so with a
    :func:`~ntkjax.nn.flatten` readout a locally connected network has the same kernel as its
    convolutional twin, while pooling tells them apart (Novak et al. 2019). Masks as
    :class:`Conv`: ``apply(..., mask=)`` reads masked positions as zeros, and a kernel's masks
    follow the window centres (:func:`window_mask`; neural-tangents' rule). Random features
    (:func:`ntkjax.feature_map`): the convolution's features projected independently at each
    output position (unbiased; ``hidden_features`` coordinates per position).

    Attributes:
      features: number of output channels.
      kernel_size: window size, an int (every spatial axis) or one int per spatial axis.
      strides: an int or one int per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"``.
      w_std, b_std: weight and bias standard deviations (>= 0).
      use_bias: whether the layer has a bias.
      parameterization: ``"ntk"`` or ``"standard"``.
      param_dtype: dtype of the parameters; None uses the input's floating dtype.

    Raises:
      ValueError: for inputs without spatial axes or a window larger than the padded input.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> lc = ConvLocal(4, kernel_size=3)
    >>> x = jnp.ones((2, 5, 3))
    >>> params = lc.init(jax.random.key(0), x)
    >>> params["params"]["kernel"].shape, lc.apply(params, x).shape
    ((5, 9, 4), (2, 5, 4))
    >>> ntkjax.kernel_fn(lc)(x).nngp.shape
    (2, 2, 5, 5)
    """

    _: dataclasses.KW_ONLY
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: ConvPadding = "SAME"

    @linen.compact
    def __call__(self, x: Any, mask: Any = None) -> Any:
        self._check()
        check_choice(self.padding, CONV_PADDINGS, "padding")
        x = _zero_masked_positions("ConvLocal", x, mask)
        if isinstance(x, FeatureStandIn):
            return _LOCAL_MEANINGS.on_features(x, self.__call__, self)
        if isinstance(x, Kernel):
            nd = x.spatial_ndim
            if nd == 0:
                raise ValueError(
                    "ConvLocal needs a kernel with spatial axes, i.e. inputs of shape (batch, "
                    "*spatial, channels); got a kernel of feature vectors.")
            window = _per_axis(self.kernel_size, nd, "kernel_size")
            return local_kernel(
                x, self.features, window=window,
                strides=_per_axis(self.strides, nd, "strides"), padding=self.padding,
                w_std=self.w_std, b_std=self._bias_std, use_bias=self._with_bias,
                parameterization=self.parameterization)
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(
                f"ConvLocal needs inputs of shape (batch, *spatial, channels), got shape "
                f"{x.shape}.")
        nd = x.ndim - 2
        window = _per_axis(self.kernel_size, nd, "kernel_size")
        strides = _per_axis(self.strides, nd, "strides")
        dtype = self._param_dtype(x)
        x = x.astype(dtype)
        pads, _ = conv_padding(x.shape[1:-1], window, strides, self.padding)
        for i, (n, k, (lo, hi)) in enumerate(zip(x.shape[1:-1], window, pads, strict=True)):
            if n + lo + hi < k:
                raise ValueError(
                    f"ConvLocal window {k} is larger than spatial axis {i} of the input (size "
                    f"{n}, padded to {n + lo + hi} with padding {self.padding!r}).")
        fan_in = math.prod(window) * x.shape[-1]
        self._check_fan_in(fan_in, x.shape)
        # _patches scales by 1/sqrt(|K|): undo it, the layer normalizes by fan_in itself
        patches = _patches(x, window, strides, self.padding) * math.sqrt(math.prod(window))
        out_spatial = patches.shape[1:-1]
        shape = (*out_spatial, fan_in, self.features)
        hi = jax.lax.Precision.HIGHEST
        if self.parameterization == "ntk":
            w = self.param("kernel", linen.initializers.normal(1.0), shape, dtype)
            y = jnp.einsum("n...i,...io->n...o", patches, w, precision=hi)
            y = (float(self.w_std) / math.sqrt(fan_in)) * y
            if self._bias_parameter:
                b = self.param("bias", linen.initializers.normal(1.0),
                               (*out_spatial, self.features), dtype)
                y = y + float(self._bias_std) * b
            return y
        w = self.param("kernel", linen.initializers.normal(self.w_std / math.sqrt(fan_in)),
                       shape, dtype)
        y = jnp.einsum("n...i,...io->n...o", patches, w, precision=hi)
        if self._bias_parameter:
            b = self.param("bias", linen.initializers.normal(self._bias_std),
                           (*out_spatial, self.features), dtype)
            y = y + b
        return y


def _local_features(x: FeatureStandIn, exact: Kernel, module: ConvLocal):
    """Random features after a locally connected layer: the convolution's exact features
    (:func:`_patches`, then :func:`~ntkjax.nn.dense.dense_features` with ``fan_in = |K| C``),
    whose products give :func:`conv_kernel` at every pair of output positions, then an
    independent random projection per output position
    (:meth:`~ntkjax.nn.FeatureStandIn.local_projection`) -- its unshared weights -- which keeps
    the same-position products and makes the cross-position ones vanish in expectation:
    unbiased features of :func:`local_kernel`, ``delta_{oo'}`` times the convolution's kernel.
    One projection for the NNGP features, an independent one for the NTK's."""
    nd = x.exact.spatial_ndim
    window = _per_axis(module.kernel_size, nd, "kernel_size")
    strides = _per_axis(module.strides, nd, "strides")
    phi, psi = dense_features(
        _patches(x.phi, window, strides, module.padding),
        _patches(x.psi, window, strides, module.padding),
        w_std=module.w_std, b_std=module._bias_std, use_bias=module._with_bias,
        parameterization=module.parameterization, fan_in=math.prod(window) * x.exact.width)
    return x.local_projection(phi), x.local_projection(psi)


_LOCAL_MEANINGS = declare(
    ConvLocal, kernel=local_kernel, features=_local_features, structured=None,
    instead={"structured": "its unshared weights are contracted by the Jacobian fallback."},
)
