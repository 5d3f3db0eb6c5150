"""Convolutions and their infinite-width rule.

A convolution is a dense layer on patches: its NNGP, NTK and variances are averaged over the
window (:func:`patch_average`), then mapped by the dense rule with
``fan_in = prod(window) * channels`` (:func:`ntkjax.nn.dense.dense_kernel`)::

    T(k)[o, o'] = (1/|K|) sum_delta k[s o + delta, s o' + delta]
    Sigma' = w_std^2 T(Sigma) + b_std^2
    Theta' = Sigma' + w_std^2 T(Theta)                       (NTK parameterization)
    Theta' = fan_in T(Sigma) + w_std^2 T(Theta) (+ 1)        (standard)

(Novak et al. 2019, "Bayesian Deep Convolutional Networks with Many Channels are Gaussian
Processes"; Arora et al. 2019, "On Exact Computation with an Infinitely Wide Neural Net").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._checks import check_choice
from ntkjax.kernels import Kernel
from ntkjax.nn.dense import Parameterization, _Affine, dense_kernel

__all__ = ["CONV_PADDINGS", "Conv", "ConvPadding", "conv_kernel", "conv_padding", "patch_average"]

ConvPadding = Literal["SAME", "VALID", "CIRCULAR"]
CONV_PADDINGS: tuple[ConvPadding, ...] = ("SAME", "VALID", "CIRCULAR")


def conv_padding(
    spatial_shape: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    padding: ConvPadding,
) -> tuple[tuple[tuple[int, int], ...], str]:
    """``(pads, mode)``: the ``(low, high)`` padding per spatial axis that ``flax.linen.Conv``
    (i.e. ``lax.conv_general_dilated``) applies, and the ``jnp.pad`` mode -- ``"constant"``
    (zeros) for ``"SAME"`` / ``"VALID"``, ``"wrap"`` for ``"CIRCULAR"``.

    ``"SAME"``: ``out = ceil(n / s)`` positions and ``(out - 1) s + k - n`` zeros in total, the
    smaller half in front (``lax.padtype_to_pads``); ``"VALID"``: none; ``"CIRCULAR"``:
    ``((k - 1) // 2, k // 2)`` periodic copies (flax's convention, independent of the stride).

    >>> conv_padding((8,), (3,), (1,), "SAME")
    (((1, 1),), 'constant')
    """
    if padding not in CONV_PADDINGS:
        raise ValueError(
            f"unknown padding {padding!r}; allowed: {', '.join(map(repr, CONV_PADDINGS))}."
        )
    if padding == "CIRCULAR":
        return tuple(((k - 1) // 2, k // 2) for k in window), "wrap"
    pads = jax.lax.padtype_to_pads(tuple(spatial_shape), tuple(window), tuple(strides), padding)
    return tuple((int(lo), int(hi)) for lo, hi in pads), "constant"


def patch_average(
    k: jax.Array,
    *,
    batch_ndim: int,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: ConvPadding = "SAME",
) -> jax.Array:
    """The covariance of a convolution's input patches, from the covariance of its inputs.

    ``k`` has shape ``(*batch, *S, *S)``: ``k[..., p, p']`` is the kernel between position ``p``
    of one input and ``p'`` of the other (``len(S) = len(window)`` spatial axes, ``batch_ndim``
    leading axes: 2 for an (N1, N2) kernel, 1 for per-input self-covariances). Returns

    ``T[o, o'] = (1 / |K|) sum_{delta in K} k[s o + delta, s o' + delta]``

    over the window's offsets ``delta`` (``|K| = prod(window)``) with strides ``s``, indices
    into the padded input: zero padding for ``"SAME"`` (positions outside contribute 0), none for
    ``"VALID"``, periodic for ``"CIRCULAR"`` (see :func:`conv_padding`); output positions as
    ``flax.linen.Conv``. A convolution is a dense layer on patches of ``|K| C`` features, so the
    dense rule with ``fan_in = |K| C`` applied to ``T`` (for the NNGP, the NTK and the variances
    alike) gives the kernels after the convolution, in either parameterization (Novak et al.
    2019; Arora et al. 2019).

    The window factorizes over axes, so the average is taken one spatial axis at a time
    (``sum_i k_i`` shifted slices instead of ``prod_i k_i``). Keeps ``k``'s dtype.

    >>> patch_average(jnp.eye(3)[None], batch_ndim=1, window=(3,), padding="VALID").shape
    (1, 1, 1)
    """
    nd = len(window)
    strides = (1,) * nd if strides is None else tuple(strides)
    spatial = tuple(k.shape[batch_ndim : batch_ndim + nd])
    if k.ndim != batch_ndim + 2 * nd or tuple(k.shape[batch_ndim + nd :]) != spatial:
        raise ValueError(
            f"patch_average needs a kernel of shape (*batch, *S, *S) with {batch_ndim} batch "
            f"axes and {nd} spatial axes (window {tuple(window)}); got shape {k.shape}."
        )
    if len(strides) != nd:
        raise ValueError(f"strides {strides} and window {tuple(window)} differ in length.")
    pads, mode = conv_padding(spatial, window, strides, padding)
    for i, (n, size, step, (lo, hi)) in enumerate(zip(spatial, window, strides, pads, strict=True)):
        a, b = batch_ndim + i, batch_ndim + nd + i
        out = (n + lo + hi - size) // step + 1
        if out < 1:
            raise ValueError(
                f"window {size} does not fit spatial axis {i} of size {n} with padding "
                f"{padding!r}."
            )
        if lo or hi:
            width = [(0, 0)] * k.ndim
            width[a] = width[b] = (lo, hi)
            k = jnp.pad(k, width, mode=mode)
        total = None
        for j in range(size):
            index: list[Any] = [slice(None)] * k.ndim
            index[a] = index[b] = slice(j, j + (out - 1) * step + 1, step)
            term = k[tuple(index)]
            total = term if total is None else total + term
        assert total is not None
        k = total * (1.0 / size)
    return k


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
) -> Kernel:
    """The :class:`~ntkjax.Kernel` after a convolution with ``features`` output channels:
    :func:`patch_average`, then the dense rule with ``fan_in = prod(window) * width`` (module
    docstring)."""
    nd = k.spatial_ndim
    if nd != len(window):
        raise ValueError(
            f"a {len(window)}-D convolution (window {tuple(window)}) needs a kernel with "
            f"{len(window)} spatial axes; got one with spatial shape {k.spatial_shape}"
            + (" -- inputs of shape (batch, *spatial, channels)." if nd == 0 else ".")
        )
    avg = functools.partial(patch_average, window=tuple(window), strides=strides,
                            padding=padding)
    var1, var2 = k.map_variances(lambda v: avg(v, batch_ndim=1))
    patches = Kernel(nngp=avg(k.nngp, batch_ndim=2), ntk=avg(k.ntk, batch_ndim=2),
                     var1=var1, var2=var2, width=math.prod(window) * k.width)
    return dense_kernel(patches, features, w_std=w_std, b_std=b_std, use_bias=use_bias,
                        parameterization=parameterization)


def _per_axis(value: int | Sequence[int], nd: int, name: str) -> tuple[int, ...]:
    """An int (the same for every spatial axis) or one positive int per axis, as a tuple."""
    values = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(values) != nd or any(int(v) != v or v < 1 for v in values):
        raise ValueError(
            f"{name} must be a positive int or {nd} positive ints (one per spatial axis of the "
            f"input); got {value!r}."
        )
    return tuple(int(v) for v in values)


class Conv(_Affine):
    """A convolution in the NTK or the standard parameterization, on arrays (N, *S, C_in).

    * ``parameterization="ntk"``: ``y = w_std / sqrt(fan_in) * conv(x, W) + b_std * b`` with
      ``W, b ~ N(0, 1)`` and ``fan_in = prod(kernel_size) * C_in``.
    * ``parameterization="standard"``: ``y = conv(x, W) + b`` with
      ``W ~ N(0, w_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``.

    ``conv`` is ``flax.linen.Conv`` (cross-correlation; ``padding`` ``"SAME"`` (zeros),
    ``"VALID"`` or ``"CIRCULAR"``; ``strides``), held as the submodule ``"conv"`` with parameters
    ``kernel`` (*kernel_size, C_in, features) and ``bias`` (features,). The NTK
    parameterization computes it as ``b_std * flax.linen.Conv((w_std / (sqrt(fan_in) b_std)) x)``
    -- the same function and gradients -- so the whole layer is one ``flax.linen.Conv`` whose
    per-layer factorization the structured empirical NTK (:mod:`ntkjax.structured`) recognises.
    With ``b_std = 0`` in the NTK parameterization there is no bias parameter (it would have
    neither an effect nor a gradient; the same rule as :class:`~ntkjax.nn.Dense`), and
    ``b_std=None`` means no bias. Inputs (N, *S, C) with ``len(kernel_size)`` spatial axes
    (an int ``kernel_size`` / ``strides`` applies to every spatial axis of the input).

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

    Configuration after ``features`` is keyword-only (``Conv(8, kernel_size=(3, 3))``).

    >>> import jax, ntkjax
    >>> conv = Conv(4, kernel_size=3)
    >>> images = jnp.ones((2, 5, 5, 3))
    >>> conv.apply(conv.init(jax.random.key(0), images), images).shape
    (2, 5, 5, 4)
    >>> ntkjax.kernel_fn(conv)(images).nngp.shape
    (2, 2, 5, 5, 5, 5)
    """

    _: dataclasses.KW_ONLY
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: ConvPadding = "SAME"

    @linen.compact
    def __call__(self, x: Any) -> Any:
        self._check()
        check_choice(self.padding, CONV_PADDINGS, "padding")
        if isinstance(x, Kernel):
            nd = x.spatial_ndim
            if nd == 0:
                raise ValueError(
                    "Conv needs a kernel with spatial axes, i.e. inputs of shape (batch, "
                    "*spatial, channels); got a kernel of feature vectors (inputs (batch, d) or "
                    "after flatten / global_average_pool)."
                )
            window = _per_axis(self.kernel_size, nd, "kernel_size")
            return conv_kernel(
                x, self.features, window=window,
                strides=_per_axis(self.strides, len(window), "strides"),
                padding=self.padding, w_std=self.w_std, b_std=self._bias_std,
                use_bias=self._with_bias, parameterization=self.parameterization,
            )
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(
                f"Conv needs inputs of shape (batch, *spatial, channels), got shape {x.shape}."
            )
        nd = x.ndim - 2
        window = _per_axis(self.kernel_size, nd, "kernel_size")
        strides = _per_axis(self.strides, nd, "strides")
        dtype = self._param_dtype(x)
        x = x.astype(dtype)
        fan_in = math.prod(window) * x.shape[-1]
        self._check_fan_in(fan_in, x.shape)
        conv = functools.partial(
            linen.Conv, self.features, window, strides=strides, padding=self.padding,
            param_dtype=dtype, name="conv",
        )
        if self.parameterization == "standard":
            return conv(
                use_bias=self._bias_parameter,
                kernel_init=linen.initializers.normal(self.w_std / math.sqrt(fan_in)),
                bias_init=linen.initializers.normal(self._bias_std),
            )(x)
        scale = float(self.w_std) / math.sqrt(fan_in)  # Python floats keep x's dtype
        b_std = float(self._bias_std)
        unit = linen.initializers.normal(1.0)
        if self._bias_parameter:
            return b_std * conv(use_bias=True, kernel_init=unit, bias_init=unit)(
                (scale / b_std) * x
            )
        return conv(use_bias=False, kernel_init=unit)(scale * x)
