"""Flax layers and activations with both a finite-network and an infinite-width meaning.

Every layer and activation here works on arrays (the finite network) and on a
:class:`ntkjax.Kernel` (its infinite-width limit), so one ``flax.linen`` module that calls them --
:class:`ntkjax.models.MLP` or your own ``nn.compact`` module, residual sums included -- gives
``module.init`` / ``module.apply`` for the network and :func:`ntkjax.kernel_fn` for its NNGP and
NTK. On a Kernel a layer creates no parameters.

Layers: :class:`Dense`, :class:`Conv` (1-D, 2-D, N-D convolutions on (N, *spatial, C) inputs)
and the readouts :func:`flatten` and :func:`global_average_pool`, which turn a convolutional
network's (N, *spatial, C) features into (N, features).

Activations (plain functions, usable inside any linen module; parameters via
``functools.partial``): :func:`relu`, :func:`leaky_relu`, :func:`ab_relu`, :func:`abs`,
:func:`erf`, :func:`gelu`, :func:`sin`, :func:`cos`, :func:`rbf`, :func:`sign`,
:func:`identity`, and :func:`elementwise` for any other elementwise function (kernel by
Gauss-Hermite quadrature).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax import analytic
from ntkjax._checks import check_choice
from ntkjax.kernels import Kernel

__all__ = [
    "Conv",
    "Dense",
    "ab_relu",
    "abs",
    "cos",
    "elementwise",
    "erf",
    "flatten",
    "gelu",
    "global_average_pool",
    "identity",
    "is_activation",
    "leaky_relu",
    "rbf",
    "relu",
    "sign",
    "sin",
]

PARAMETERIZATIONS = ("ntk", "standard")


class _Affine(linen.Module):
    """The configuration shared by :class:`Dense` and :class:`Conv` (fields and validation)."""

    features: int
    w_std: float = 1.0
    b_std: float = 0.0
    use_bias: bool = True
    parameterization: str = "ntk"
    param_dtype: Any = None

    def _check(self) -> None:
        check_choice(self.parameterization, PARAMETERIZATIONS, "parameterization")
        if int(self.features) != self.features or self.features < 1:
            raise ValueError(f"features must be a positive integer, got {self.features!r}.")
        if not (self.w_std >= 0 and self.b_std >= 0):
            raise ValueError(
                f"w_std and b_std must be >= 0, got w_std={self.w_std}, b_std={self.b_std}."
            )


def _param_dtype(param_dtype: Any, x: jax.Array):
    """``param_dtype``, or the input's floating dtype (the default float dtype for integers)."""
    if param_dtype is not None:
        return param_dtype
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)


class Dense(_Affine):
    """A dense layer in the NTK or the standard parameterization.

    * ``parameterization="ntk"``: ``y = w_std / sqrt(fan_in) * x @ W + b_std * b`` with
      ``W, b ~ N(0, 1)`` (Jacot et al. 2018).
    * ``parameterization="standard"``: ``y = x @ W + b`` with ``W ~ N(0, w_std^2 / fan_in)``,
      ``b ~ N(0, b_std^2)`` (b starts at 0 when b_std = 0 but is still trained).

    Both give the same function distribution at initialisation and the same NNGP
    (``Sigma <- w_std^2 Sigma + b_std^2``); their NTKs differ (see :func:`ntkjax.analytic.dense`).
    Parameters ``kernel`` (fan_in, features) and ``bias`` (features,), in ``param_dtype``
    (default: the input's floating dtype). On a :class:`Kernel` the layer applies its kernel rule
    and creates no parameters.

    Attributes:
      features: number of outputs.
      w_std: weight standard deviation (>= 0).
      b_std: bias standard deviation (>= 0).
      use_bias: whether the layer has a bias.
      parameterization: ``"ntk"`` or ``"standard"``.
      param_dtype: dtype of the parameters; None uses the input's floating dtype.
    """

    @linen.compact
    def __call__(self, x):
        self._check()
        if isinstance(x, Kernel):
            return x.dense(
                self.features, w_std=self.w_std, b_std=self.b_std, use_bias=self.use_bias,
                parameterization=self.parameterization,
            )
        x = jnp.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Dense needs inputs with a feature axis, got shape {x.shape}.")
        dtype = _param_dtype(self.param_dtype, x)
        fan_in = x.shape[-1]
        shape = (fan_in, self.features)
        if self.parameterization == "ntk":
            w = self.param("kernel", linen.initializers.normal(1.0), shape, dtype)
            y = (float(self.w_std) / math.sqrt(fan_in)) * jnp.matmul(x.astype(dtype), w)
            if self.use_bias:
                b = self.param("bias", linen.initializers.normal(1.0), (self.features,), dtype)
                y = y + float(self.b_std) * b
            return y
        w_init = linen.initializers.normal(self.w_std / math.sqrt(fan_in))
        w = self.param("kernel", w_init, shape, dtype)
        y = jnp.matmul(x.astype(dtype), w)
        if self.use_bias:
            b = self.param("bias", linen.initializers.normal(self.b_std), (self.features,), dtype)
            y = y + b
        return y


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
    per-layer factorisation the structured empirical NTK (:mod:`ntkjax.structured`) recognises.
    With ``b_std = 0`` in the NTK parameterization there is no bias parameter (it would have
    neither an effect nor a gradient). Inputs (N, *S, C) with ``len(kernel_size)`` spatial axes
    (an int ``kernel_size`` / ``strides`` applies to every spatial axis of the input).

    On a :class:`Kernel` (with the same number of spatial axes) it applies the exact
    infinite-width rule :meth:`Kernel.conv`: patch-average the kernels, then the dense rule with
    ``fan_in = prod(kernel_size) * width`` (Novak et al. 2019; Arora et al. 2019).

    Attributes:
      features: number of output channels.
      kernel_size: window size, an int (every spatial axis) or one int per spatial axis.
      strides: an int or one int per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"``.
      w_std, b_std: weight and bias standard deviations (>= 0).
      use_bias: whether the layer has a bias.
      parameterization: ``"ntk"`` or ``"standard"``.
      param_dtype: dtype of the parameters; None uses the input's floating dtype.

    Configure by keyword (positionally after ``features`` come Dense's fields, then
    ``kernel_size``, ``strides``, ``padding``).
    """

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: str = "SAME"

    @linen.compact
    def __call__(self, x):
        self._check()
        check_choice(self.padding, analytic.CONV_PADDINGS, "padding")
        if isinstance(x, Kernel):
            nd = x.spatial_ndim
            if nd == 0:
                raise ValueError(
                    "Conv needs a kernel with spatial axes, i.e. inputs of shape (batch, "
                    "*spatial, channels); got a kernel of feature vectors (inputs (batch, d) or "
                    "after flatten / global_average_pool)."
                )
            window = _per_axis(self.kernel_size, nd, "kernel_size")
            return x.conv(
                self.features, window=window, strides=_per_axis(self.strides, len(window),
                                                                "strides"),
                padding=self.padding, w_std=self.w_std, b_std=self.b_std,
                use_bias=self.use_bias, parameterization=self.parameterization,
            )
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(
                f"Conv needs inputs of shape (batch, *spatial, channels), got shape {x.shape}."
            )
        nd = x.ndim - 2
        window = _per_axis(self.kernel_size, nd, "kernel_size")
        strides = _per_axis(self.strides, nd, "strides")
        dtype = _param_dtype(self.param_dtype, x)
        x = x.astype(dtype)
        fan_in = math.prod(window) * x.shape[-1]
        conv = functools.partial(
            linen.Conv, self.features, window, strides=strides, padding=self.padding,
            param_dtype=dtype, name="conv",
        )
        if self.parameterization == "standard":
            return conv(
                use_bias=self.use_bias,
                kernel_init=linen.initializers.normal(self.w_std / math.sqrt(fan_in)),
                bias_init=linen.initializers.normal(self.b_std),
            )(x)
        scale = float(self.w_std) / math.sqrt(fan_in)  # Python floats keep x's dtype
        b_std = float(self.b_std)
        unit = linen.initializers.normal(1.0)
        if self.use_bias and b_std > 0:
            return b_std * conv(use_bias=True, kernel_init=unit, bias_init=unit)(
                (scale / b_std) * x
            )
        return conv(use_bias=False, kernel_init=unit)(scale * x)


def flatten(x):
    """Readout ``(N, *S, C) -> (N, prod(S) C)``.

    On a :class:`Kernel`: only matching positions survive a dense layer with independent
    weights per position, ``Sigma[a, b] = mean_p Sigma[a, b, p, p]`` (likewise Theta),
    ``width = prod(S) C`` (:meth:`Kernel.flatten`; Novak et al. 2019)."""
    if isinstance(x, Kernel):
        return x.flatten()
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"flatten needs inputs with a batch axis, got shape {x.shape}.")
    return x.reshape(x.shape[0], -1)


def global_average_pool(x):
    """Readout ``(N, *S, C) -> (N, C)``, the mean over all spatial positions.

    On a :class:`Kernel`: ``Sigma[a, b] = mean_{p, p'} Sigma[a, b, p, p']`` (likewise Theta),
    ``width = C`` (:meth:`Kernel.global_average_pool`; Novak et al. 2019)."""
    if isinstance(x, Kernel):
        return x.global_average_pool()
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            "global_average_pool needs inputs of shape (batch, *spatial, channels), got shape "
            f"{x.shape}."
        )
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def _mark(fn: Callable) -> Callable:
    fn._ntkjax_activation = True
    return fn


def is_activation(fn: Any) -> bool:
    """True for an :mod:`ntkjax.nn` activation (or a ``functools.partial`` of one): a function
    with an infinite-width kernel rule."""
    while hasattr(fn, "func"):
        fn = fn.func
    return bool(getattr(fn, "_ntkjax_activation", False))


@_mark
def relu(x):
    """``max(x, 0)``; kernel: arc-cosine kernel of degree 1 (:func:`ntkjax.analytic.relu`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.relu, analytic.relu_variance)
    return jax.nn.relu(x)


@_mark
def leaky_relu(x, negative_slope: float = 0.01):
    """``x if x > 0 else negative_slope * x`` (:func:`ntkjax.analytic.leaky_relu`)."""
    if isinstance(x, Kernel):
        return x.activation(
            lambda *q: analytic.leaky_relu(*q, negative_slope),
            lambda q: analytic.leaky_relu_variance(q, negative_slope),
        )
    return jnp.where(x > 0, x, negative_slope * x)


@_mark
def ab_relu(x, a: float, b: float):
    """``a * min(x, 0) + b * max(x, 0)`` (:func:`ntkjax.analytic.ab_relu`)."""
    if isinstance(x, Kernel):
        return x.activation(
            lambda *q: analytic.ab_relu(*q, a, b), lambda q: analytic.ab_relu_variance(q, a, b)
        )
    return a * jnp.minimum(x, 0) + b * jnp.maximum(x, 0)


@_mark
def abs(x):
    """``|x|`` (:func:`ntkjax.analytic.abs`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.abs, analytic.abs_variance)
    return jnp.abs(x)


@_mark
def erf(x):
    """``erf(x)`` (:func:`ntkjax.analytic.erf`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.erf, analytic.erf_variance)
    return jax.lax.erf(x)


@_mark
def gelu(x):
    """Exact GELU ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2`` (:func:`ntkjax.analytic.gelu`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.gelu, analytic.gelu_variance)
    return jax.nn.gelu(x, approximate=False)


@_mark
def sin(x):
    """``sin(x)`` (:func:`ntkjax.analytic.sin`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.sin, analytic.sin_variance)
    return jnp.sin(x)


@_mark
def cos(x):
    """``cos(x)`` (:func:`ntkjax.analytic.cos`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.cos, analytic.cos_variance)
    return jnp.cos(x)


@_mark
def rbf(x, gamma: float = 1.0):
    """``sqrt(2) sin(sqrt(2 gamma) x + pi/4)``, whose NNGP map is the RBF kernel
    ``exp(-gamma (q11 + q22 - 2 q12))`` of the pre-activations (:func:`ntkjax.analytic.rbf`)."""
    if isinstance(x, Kernel):
        return x.activation(
            lambda *q: analytic.rbf(*q, gamma), lambda q: analytic.rbf_variance(q, gamma)
        )
    return math.sqrt(2) * jnp.sin(math.sqrt(2 * gamma) * x + math.pi / 4)


@_mark
def sign(x):
    """``sign(x)``; its derivative is 0 almost everywhere, so it stops the NTK
    (:func:`ntkjax.analytic.sign`)."""
    if isinstance(x, Kernel):
        return x.activation(analytic.sign, analytic.sign_variance)
    return jnp.sign(x)


@_mark
def identity(x):
    """``x``."""
    return x


def elementwise(fn: Callable[[jax.Array], jax.Array], *, n_quadrature: int = 64) -> Callable:
    """An activation from any elementwise jnp function ``fn``.

    On arrays it is ``fn``; on a Kernel its maps come from Gauss-Hermite quadrature with
    ``n_quadrature`` nodes per dimension (:func:`ntkjax.analytic.elementwise`, which states the
    accuracy at the default 64 nodes: 1e-11 for GELU, 5e-7 for erf, 1e-3 / 3e-2 (sigma /
    sigma_dot) for ReLU-like kinks).
    ``fn``'s derivative is taken by autodiff. Cost: ``n_quadrature^2`` evaluations per entry.
    """
    if not callable(fn):
        raise ValueError(f"elementwise needs a callable, got {type(fn).__name__}.")
    if int(n_quadrature) != n_quadrature or n_quadrature < 2:
        raise ValueError(f"n_quadrature must be an integer >= 2, got {n_quadrature!r}.")

    def activation(x):
        if isinstance(x, Kernel):
            n = int(n_quadrature)
            return x.activation(
                lambda *q: analytic.elementwise(*q, fn, n),
                lambda q: analytic.elementwise_variance(q, fn, n),
            )
        return fn(x)

    activation.__name__ = f"elementwise({getattr(fn, '__name__', repr(fn))})"
    activation.__doc__ = f"Activation {activation.__name__} with a Gauss-Hermite kernel rule."
    return _mark(activation)
