"""Normalization layers and their infinite-width rules.

:class:`LayerNorm` without parameters (neural-tangents' ``LayerNorm``): each example is
centred and scaled over ``axis``, ``y = (x - mean(x)) / sqrt(var(x) + epsilon)``. With
infinitely many channels of a zero-mean Gaussian layer (i.i.d. across channels) the channel mean
vanishes and the channel variance becomes the NNGP variance, so the normalization is a
deterministic rescaling of every example (and position): with ``v_a(p)`` the variance of example
``a`` at position ``p``, averaged over the normalized spatial axes,

    Sigma'[a, b, p, p'] = Sigma[a, b, p, p'] / sqrt((v_a(p) + epsilon) (v_b(p') + epsilon)),
    Theta'[a, b, p, p'] = Theta[a, b, p, p'] / sqrt((v_a(p) + epsilon) (v_b(p') + epsilon)),

(likewise each example's covariance across positions). ``axis=-1`` normalizes each position over
its channels (``v_a(p) = Sigma[a, a, p, p]``); including spatial axes averages over them too
(``v_a = mean_p Sigma[a, a, p, p]`` over those axes). The normalized axes must include the
channel axis -- over positions alone the statistics stay random and there is no limiting kernel
-- and must not include the batch axis. The NTK scales like the NNGP because the statistics'
own dependence on the weights vanishes in the limit (neural-tangents' rule; Yang 2019, "Tensor
Programs I", for the scaling limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._checks import check_mask, is_concrete
from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, UnsupportedMeaning, declare

__all__ = ["LayerNorm", "layer_norm_kernel"]


def _normalized_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """``axis`` as sorted non-negative axes of an ``ndim``-axis array; a ValueError for the
    batch axis, repeats or axes out of range."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(isinstance(a, bool) or int(a) != a for a in axes):
        raise ValueError(f"LayerNorm axis must be an int or a sequence of ints, got {axis!r}.")
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"LayerNorm axis {axis!r} is out of range for inputs with {ndim} axes.")
    out = tuple(sorted({int(a) % ndim for a in axes}))
    if len(out) != len(axes):
        raise ValueError(f"LayerNorm axis {axis!r} repeats an axis.")
    if 0 in out:
        raise ValueError(
            f"LayerNorm axis {axis!r} includes the batch axis 0: examples must be normalized "
            "independently."
        )
    return out


def _inverse_scales(d: jax.Array, axes: tuple[int, ...], epsilon: float,
                    mask: jax.Array | None = None) -> jax.Array:
    """``1 / sqrt(v + eps)``, shaped (N, *S), from position variances ``d`` (N, *S), ``v``
    averaged over the normalized spatial axes (``axes`` of the activations (N, *S, C)); with
    a position ``mask`` (N, *S), over the unmasked positions only."""
    nd = d.ndim - 1
    spatial = tuple(a for a in axes if a != nd + 1)  # 1-based spatial axes averaged
    if spatial and mask is not None:
        keep = (~mask).astype(d.dtype)
        total = jnp.sum(jnp.where(mask, 0, d), axis=spatial, keepdims=True)
        count = jnp.maximum(jnp.sum(keep, axis=spatial, keepdims=True), 1)
        d = jnp.broadcast_to(total / count, d.shape)
    elif spatial:
        d = jnp.broadcast_to(jnp.mean(d, axis=spatial, keepdims=True), d.shape)
    v = d + float(epsilon)
    # a zero-variance example with eps = 0 (all-zero pre-activations): a zero row, not
    # 0 * inf = NaN
    return jnp.where(v > 0, jax.lax.rsqrt(jnp.where(v > 0, v, 1)), 0)


def layer_norm_kernel(k: Kernel, axis: int | Sequence[int] = -1, *,
                      epsilon: float = 1e-6) -> Kernel:
    """The :class:`~ntkjax.Kernel` after :class:`LayerNorm` over ``axis`` (module docstring):
    NNGP, NTK and variances divided by ``sqrt((v1 + epsilon)(v2 + epsilon))``.

    An example (or position) of zero variance with ``epsilon = 0`` -- e.g. an all-zero
    pre-activation, which the finite layer maps to 0 -- gets a zero kernel row, never NaN.

    Raises:
      ValueError: when ``axis`` lacks the channel axis or includes the batch axis, or the input
        kernel is not that of a Gaussian layer: right after an activation, or the kernel of the
        inputs themselves (a concrete kernel with an NTK of exactly zero: no trainable layer
        before the LayerNorm). Raw inputs have a channel mean that LayerNorm subtracts and the
        kernel does not hold (``[[1, 0.997], ...]`` would come out where ``[[1, -0.5], ...]``
        is right); put a Dense (or Conv) layer first. Under ``jit`` that value check is skipped.
    """
    nd = k.spatial_ndim
    axes = _normalized_axes(axis, nd + 2)
    if nd + 1 not in axes:
        raise ValueError(
            f"LayerNorm over axis {axis!r} does not include the channel axis {nd + 1} (-1): "
            "normalizing over positions alone has no infinite-width limit (neural-tangents "
            "requires the channel axis too)."
        )
    if k.non_gaussian:
        raise ValueError(
            f"LayerNorm's infinite-width rule needs the outputs of a Gaussian layer (zero "
            f"channel mean); its input comes from {k.non_gaussian}. Put the LayerNorm right "
            "after a Dense, Conv or SelfAttention layer (or a sum of them)."
        )
    if is_concrete(k.ntk) and is_concrete(k.nngp) and not jnp.any(k.ntk) and jnp.any(k.nngp):
        raise ValueError(
            "LayerNorm's infinite-width rule needs zero-mean Gaussian pre-activations, but its "
            "input kernel has a zero NTK: it is the kernel of the inputs themselves (no "
            "trainable layer before it). LayerNorm subtracts each input's channel mean, which "
            "that kernel does not hold. Put a Dense (or Conv) layer before the LayerNorm."
        )
    ones = (1,) * nd

    def scales(d: jax.Array, mask: jax.Array | None) -> jax.Array:
        return _inverse_scales(d, axes, epsilon, mask)

    d1, d2 = k.position_variances()
    # masks: the statistics over normalized positions read the unmasked ones only
    r1 = scales(d1, k.mask1)
    r2 = r1 if k.same_inputs else scales(d2, k.mask2)
    if nd == 0 or k.diagonal_spatial:  # entries [a, b] or [a, b, p] (same positions)
        outer = r1[:, None] * r2[None, :]
        var1 = k.var1 * (r1 * r1)
        var2 = var1 if k.same_inputs else k.var2 * (r2 * r2)
    else:
        outer = (r1.reshape(r1.shape[0], 1, *r1.shape[1:], *ones)
                 * r2.reshape(1, r2.shape[0], *ones, *r2.shape[1:]))

        def self_outer(r: jax.Array) -> jax.Array:
            return r.reshape(*r.shape, *ones) * r.reshape(r.shape[0], *ones, *r.shape[1:])

        var1 = k.var1 * self_outer(r1)
        var2 = var1 if k.same_inputs else k.var2 * self_outer(r2)
    return k.replace(nngp=k.nngp * outer, ntk=k.ntk * outer, var1=var1, var2=var2)


class LayerNorm(linen.Module):
    """Layer normalization without parameters (neural-tangents' ``LayerNorm``):
    ``y = (x - mean(x)) / sqrt(var(x) + epsilon)``, mean and (biased) variance over ``axis`` of
    each example.

    Same computation as ``flax.linen.LayerNorm(reduction_axes=axis, use_scale=False,
    use_bias=False, epsilon=epsilon)`` (the default ``epsilon = 1e-6`` is flax's;
    neural-tangents' is 1e-12). ``axis=-1`` normalizes each position over its channels; on
    images, ``axis=(1, 2, 3)`` (or ``(-3, -2, -1)``) normalizes over channels and positions.

    On a :class:`~ntkjax.Kernel` the infinite-width rule :func:`layer_norm_kernel` (module
    docstring): ``Sigma'[a, b, p, p'] = Sigma[a, b, p, p'] / sqrt((v_a(p) + eps)(v_b(p') +
    eps))``, the same for Theta, with ``v`` the examples' variances averaged over the normalized
    spatial axes. The axes must include the channel axis (a ValueError otherwise) and the input
    must be the output of a Gaussian layer (Dense, Conv, SelfAttention, or a sum of them).

    Attributes:
      axis: the normalized axes (an int or a sequence of ints; never the batch axis 0).
      epsilon: added to the variance.

    With ``epsilon = 0`` an all-zero (constant) example is mapped to 0, and so is its kernel.

    Masks: ``apply(..., x, mask=mask)`` with a boolean (N, *S) position mask (True = masked)
    takes the statistics over the unmasked positions only (when ``axis`` includes spatial
    axes) and sets the outputs at masked positions to 0; on kernels the variances are averaged
    over the unmasked positions of the kernel's own masks (neural-tangents' rule).

    >>> import ntkjax
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> [round(v, 3) for v in LayerNorm().apply({}, x)[0].tolist()]
    [-1.225, 0.0, 1.225]
    >>> model = linen.Sequential([ntkjax.nn.Dense(8), LayerNorm()])  # Gaussian inputs first
    >>> k = ntkjax.kernel_fn(model)(x)  # the Dense layer's kernel, normalized
    >>> [round(v, 4) for v in k.var1.tolist()]
    [1.0, 1.0]
    """

    axis: int | Sequence[int] = -1
    epsilon: float = 1e-6

    @linen.compact
    def __call__(self, x: Any, mask: Any = None) -> Any:
        if not self.epsilon >= 0:
            raise ValueError(f"LayerNorm epsilon must be >= 0, got {self.epsilon!r}.")
        if mask is not None and isinstance(x, FeatureStandIn):
            raise UnsupportedMeaning(
                "ntkjax.nn.LayerNorm", "features", "random features carry no masks; for masked "
                "inputs use ntkjax.kernel_fn(module)(x1, x2, mask1=..., mask2=...).")
        if mask is not None and isinstance(x, Kernel):
            raise ValueError(
                "LayerNorm: a Kernel carries its own masks (kernel_fn's mask1 / mask2); the "
                "mask argument is for arrays."
            )
        if isinstance(x, FeatureStandIn):
            return _MEANINGS.on_features(x, self.__call__, self)
        if isinstance(x, Kernel):
            return layer_norm_kernel(x, self.axis, epsilon=self.epsilon)
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"LayerNorm needs inputs with a batch axis, got shape {x.shape}.")
        axes = _normalized_axes(self.axis, x.ndim)
        if mask is not None:
            return _masked_layer_norm(x, check_mask(x, mask), axes, self.epsilon)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        centred = x - mean
        var = jnp.mean(centred * centred, axis=axes, keepdims=True)
        v = var + jnp.asarray(self.epsilon, var.dtype)
        # a constant example with epsilon = 0: 0 (as its kernel), not 0 * inf = NaN
        return centred * jnp.where(v > 0, jax.lax.rsqrt(jnp.where(v > 0, v, 1)), 0)


def _masked_layer_norm(x: jax.Array, mask: jax.Array, axes: tuple[int, ...],
                       epsilon: float) -> jax.Array:
    """LayerNorm over ``axes`` with statistics over the unmasked positions only (``mask``
    (N, *S), True = masked); outputs at masked positions are 0 (as in the kernel)."""
    keep = jnp.broadcast_to(~mask[..., None], x.shape).astype(x.dtype)
    count = jnp.maximum(jnp.sum(keep, axis=axes, keepdims=True), 1)
    mean = jnp.sum(x * keep, axis=axes, keepdims=True) / count
    centred = (x - mean) * keep
    var = jnp.sum(centred * centred, axis=axes, keepdims=True) / count
    v = var + jnp.asarray(epsilon, var.dtype)
    return centred * jnp.where(v > 0, jax.lax.rsqrt(jnp.where(v > 0, v, 1)), 0)


def _layer_norm_features(x: FeatureStandIn, exact: Kernel, module: LayerNorm):
    """Random features after a LayerNorm, exact: its kernel rule multiplies entry
    ``[a, b, p, p']`` by ``r_a[p] r_b[p']`` with ``r = 1 / sqrt(v + eps)`` from the exact
    variances, so ``phi'[a, p] = r_a[p] phi[a, p]`` (likewise psi). (The kernel rule, applied
    first, has checked the axes and the Gaussian input.)"""
    nd = x.exact.spatial_ndim
    r = _inverse_scales(x.exact.position_variances()[0],
                        _normalized_axes(module.axis, nd + 2), module.epsilon)[..., None]
    return x.phi * r.astype(x.phi.dtype), x.psi * r.astype(x.psi.dtype)


_MEANINGS = declare(LayerNorm, kernel=layer_norm_kernel, features=_layer_norm_features,
                    structured="parameter-free", per_input_variances=True)
