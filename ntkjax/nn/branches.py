"""Branches: concatenations and products of independent branches, with their infinite-width rules.

A network that splits into branches -- each with its own weights, so independent in the limit --
and joins them again. Sums need nothing new (``k1 + k2`` on kernels, ``+`` on arrays; see
:class:`ntkjax.Kernel`); here:

* :func:`concatenate` along the channel axis: the outputs' channels are those of every branch,
  so the kernel of one channel is the width-weighted average of the branch kernels,
  ``K = sum_b C_b K_b / sum_b C_b`` (neural-tangents' ``FanInConcat``). The result is a mixture,
  not Gaussian: a Dense / Conv layer must come before any activation or LayerNorm.
  Along a spatial axis the positions of the branches follow one another, and two positions from
  different branches are independent: the kernel is block-diagonal over the branches (zero
  cross-blocks, valid for zero-mean Gaussian branches, which this requires).
* :func:`multiply`, the elementwise product of independent branches:
  ``Sigma = prod_b Sigma_b`` and ``Theta = sum_b Theta_b prod_{b' != b} Sigma_b'`` (the
  gradient with respect to branch b's weights is the product of the others times its own;
  neural-tangents' ``FanInProd``). Also not Gaussian.

Branches are assumed independent -- each must have its own weights (e.g. end in its own Dense
layer); that is not checked.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntkjax._kernel import Kernel, join_masks
from ntkjax._meanings import FeatureStandIn, declare

__all__ = ["concatenate", "multiply"]


def _channel_concat(ks: list[Kernel]) -> Kernel:
    if len({k.shape for k in ks}) != 1:
        raise ValueError(
            "concatenate along channels needs branches with the same batch and spatial shape; "
            f"got kernels of shapes {[k.shape for k in ks]}."
        )
    ks, mask1, mask2 = join_masks(ks)  # masks: masked iff masked in every branch
    widths = [k.width for k in ks]
    total = sum(widths)

    def average(arrays: list[jax.Array]) -> jax.Array:
        weighted = [a * (w / total) for a, w in zip(arrays, widths, strict=True)]
        return functools.reduce(operator.add, weighted)

    var1 = average([k.var1 for k in ks])
    same = all(k.same_inputs for k in ks)
    return ks[0].with_facts_of(*ks[1:]).replace(
        nngp=average([k.nngp for k in ks]),
        ntk=average([k.ntk for k in ks]),
        var1=var1,
        var2=var1 if same else average([k.var2 for k in ks]),
        same_inputs=same,
        width=total,
        mask1=mask1,
        mask2=mask2,
        non_gaussian="ntkjax.nn.concatenate (along channels)",
    )


def _block_diagonal(arrays: list[jax.Array], axes: tuple[int, int]) -> jax.Array:
    """Block-diagonal joining of ``arrays`` along the two position axes ``axes``: block
    ``(b, b)`` is ``arrays[b]``, the cross blocks are zero."""
    sizes = [a.shape[axes[0]] for a in arrays]
    total = sum(sizes)
    out = None
    offset = 0
    for a, size in zip(arrays, sizes, strict=True):
        pads = [(0, 0)] * a.ndim
        for axis in axes:
            pads[axis] = (offset, total - offset - size)
        padded = jnp.pad(a, pads)
        out = padded if out is None else out + padded
        offset += size
    assert out is not None
    return out


def _spatial_concat(ks: list[Kernel], axis: int) -> Kernel:
    """Concatenation along spatial axis ``axis`` (0-based among the spatial axes)."""
    ks = [k.require_all_pairs("concatenate along a spatial axis") for k in ks]
    nd = ks[0].spatial_ndim
    if len({k.width for k in ks}) != 1:
        raise ValueError(
            "concatenate along a spatial axis needs branches with the same number of channels; "
            f"got widths {[k.width for k in ks]}."
        )
    others = {(k.shape[:2], k.spatial_shape[:axis] + k.spatial_shape[axis + 1:]) for k in ks}
    if len(others) != 1:
        raise ValueError(
            f"concatenate along spatial axis {axis} needs branches whose other axes agree; got "
            f"kernels of shapes {[k.shape for k in ks]}."
        )
    mixed = [k.non_gaussian for k in ks if k.non_gaussian]
    if mixed:
        raise ValueError(
            "concatenate along a spatial axis needs zero-mean Gaussian branches (the kernel "
            f"between positions of different branches is then 0); a branch ends in {mixed[0]}. "
            "End every branch in a Dense or Conv layer."
        )
    pair_axes = (2 + axis, 2 + nd + axis)
    self_axes = (1 + axis, 1 + nd + axis)
    var1 = _block_diagonal([k.var1 for k in ks], self_axes)
    same = all(k.same_inputs for k in ks)
    masks: dict[str, Any] = {}
    if any(k.has_masks for k in ks):  # masks: concatenated along the axis (nt's rule)
        def joined(which: int) -> jax.Array:
            parts = [getattr(k, f"mask{which}") for k in ks]
            parts = [jnp.zeros((n, *k.spatial_shape), bool) if m is None else m
                     for m, k, n in zip(parts, ks, [k.nngp.shape[which - 1] for k in ks],
                                        strict=True)]
            return jnp.concatenate(parts, axis=1 + axis)

        masks = {"mask1": joined(1), "mask2": joined(1) if same else joined(2)}
    return ks[0].with_facts_of(*ks[1:]).replace(
        **masks,
        nngp=_block_diagonal([k.nngp for k in ks], pair_axes),
        ntk=_block_diagonal([k.ntk for k in ks], pair_axes),
        var1=var1,
        var2=var1 if same else _block_diagonal([k.var2 for k in ks], self_axes),
        same_inputs=same,
        non_gaussian="",
    )


def concatenate(branches: Sequence[Any], axis: int = -1) -> Any:
    """Concatenation of independent branches along ``axis`` (channels by default).

    On arrays ``jnp.concatenate(branches, axis)`` (not along the batch axis 0). On
    :class:`~ntkjax.Kernel` s (the kernels of the branches, in the same order):

    * channel axis (-1): ``K = sum_b C_b K_b / sum_b C_b`` for the NNGP, the NTK and the
      variances, with ``C_b`` the branches' widths; ``width = sum_b C_b``; the output is marked
      non-Gaussian (an activation or LayerNorm needs a Dense / Conv layer first);
    * a spatial axis: the kernel is block-diagonal over the branches along that axis's two
      position axes (cross-branch blocks 0; the branches must be zero-mean Gaussian and have
      the same width).

    (neural-tangents' ``FanInConcat``; module docstring.)

    Args:
      branches: the branches' outputs: arrays, or Kernels.
      axis: the axis joined (never the batch axis 0).

    Returns:
      The concatenated array, or the Kernel of the concatenation.

    >>> import jax.numpy as jnp
    >>> concatenate([jnp.ones((2, 3)), jnp.zeros((2, 5))]).shape
    (2, 8)
    """
    branches = list(branches)
    if not branches:
        raise ValueError("concatenate needs at least one branch.")
    if any(isinstance(b, FeatureStandIn) for b in branches):
        return _CONCATENATE.on_features(branches, lambda ks: concatenate(ks, axis), axis)
    kernels = [isinstance(b, Kernel) for b in branches]
    if any(kernels) and not all(kernels):
        raise ValueError("concatenate got a mix of Kernels and arrays; pass one kind.")
    if not all(kernels):
        arrays = [jnp.asarray(b) for b in branches]
        ndim = arrays[0].ndim
        if any(a.ndim != ndim for a in arrays) or ndim < 2:
            raise ValueError(
                "concatenate needs arrays with a batch axis and the same number of axes; got "
                f"shapes {[a.shape for a in arrays]}."
            )
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise ValueError(
                f"concatenate axis {axis} must be a feature or spatial axis of inputs with "
                f"{ndim} axes (not the batch axis 0)."
            )
        return jnp.concatenate(arrays, axis=axis)
    ks: list[Kernel] = branches
    if len({k.spatial_ndim for k in ks}) != 1:
        raise ValueError("concatenate needs branches with the same number of spatial axes.")
    if len(ks) == 1:
        return ks[0]
    ndim = ks[0].spatial_ndim + 2  # (batch, *spatial, channels)
    if not -ndim <= axis < ndim or axis % ndim == 0:
        raise ValueError(
            f"concatenate axis {axis} must be a feature or spatial axis of outputs with {ndim} "
            "axes (not the batch axis 0)."
        )
    axis %= ndim
    if axis == ndim - 1:
        return _channel_concat(ks)
    return _spatial_concat(ks, axis - 1)


def _multiply_kernels(a: Kernel, b: Kernel) -> Kernel:
    if a.shape != b.shape or a.width != b.width:
        raise ValueError(
            "multiply needs branches with the same shape and width; got kernels of shapes "
            f"{a.shape} and {b.shape}, widths {a.width} and {b.width}."
        )
    same = a.same_inputs and b.same_inputs
    (a, b), mask1, mask2 = join_masks([a, b])  # masks: masked iff masked in both
    var1 = a.var1 * b.var1
    return a.with_facts_of(b).replace(
        mask1=mask1,
        mask2=mask2,
        nngp=a.nngp * b.nngp,
        ntk=a.ntk * b.nngp + a.nngp * b.ntk,
        var1=var1,
        var2=var1 if same else a.var2 * b.var2,
        same_inputs=same,
        non_gaussian="ntkjax.nn.multiply",
    )


def multiply(a: Any, b: Any, *more: Any) -> Any:
    """The elementwise product of independent branches: ``a * b (* ...)``.

    On :class:`~ntkjax.Kernel` s: ``Sigma = Sigma_a Sigma_b`` and
    ``Theta = Theta_a Sigma_b + Sigma_a Theta_b`` (likewise the variances; more branches
    multiply in turn), marked non-Gaussian (neural-tangents' ``FanInProd``). On arrays of one
    shape: their product.

    Args:
      a: the first branch's output (an array or a Kernel).
      b: the second branch's output.
      *more: further branches.

    Returns:
      The product, or the Kernel of the product.

    >>> import jax.numpy as jnp
    >>> multiply(jnp.full((2, 3), 2.0), jnp.full((2, 3), 3.0))[0, 0].item()
    6.0
    """
    branches = [a, b, *more]
    if any(isinstance(x, FeatureStandIn) for x in branches):
        return _MULTIPLY.on_features(branches, lambda ks: multiply(*ks))
    kernels = [isinstance(x, Kernel) for x in branches]
    if any(kernels) and not all(kernels):
        raise ValueError("multiply got a mix of Kernels and arrays; pass one kind.")
    if all(kernels):
        return functools.reduce(_multiply_kernels, branches)
    arrays = [jnp.asarray(x) for x in branches]
    if len({x.shape for x in arrays}) != 1:
        raise ValueError(
            f"multiply needs branches of one shape; got shapes {[x.shape for x in arrays]}."
        )
    return functools.reduce(jnp.multiply, arrays)


def _concatenate_features(xs: list[FeatureStandIn], exact: Kernel, axis: int):
    """Random features of a concatenation, exact.

    * Channels: ``K = sum_b C_b K_b / C`` is a weighted sum of kernels, whose features are the
      concatenation ``phi = [sqrt(C_1 / C) phi_1, ..., sqrt(C_B / C) phi_B]`` (likewise psi).
    * A spatial axis: the positions of the branches follow one another along it and the kernel
      between positions of different branches is 0, so each branch's features go into
      coordinates of their own (zero elsewhere) and the positions are concatenated:
      ``phi[p] = [0, .., phi_b[p], .., 0]`` for p in branch b (likewise psi).
    """
    if len(xs) == 1:
        return xs[0].phi, xs[0].psi
    ndim = xs[0].exact.spatial_ndim + 2
    if axis % ndim == ndim - 1:
        widths = [x.exact.width for x in xs]
        total = sum(widths)
        scales = [(w / total) ** 0.5 for w in widths]
        return (jnp.concatenate([s * x.phi for s, x in zip(scales, xs, strict=True)], -1),
                jnp.concatenate([s * x.psi for s, x in zip(scales, xs, strict=True)], -1))

    def own_coordinates(parts: list[jax.Array]) -> jax.Array:
        sizes = [p.shape[-1] for p in parts]
        total, offset, placed = sum(sizes), 0, []
        for p, size in zip(parts, sizes, strict=True):
            pads = [(0, 0)] * (p.ndim - 1) + [(offset, total - offset - size)]
            placed.append(jnp.pad(p, pads))
            offset += size
        return jnp.concatenate(placed, axis=axis % ndim)

    return own_coordinates([x.phi for x in xs]), own_coordinates([x.psi for x in xs])


def _multiply_features(xs: list[FeatureStandIn], exact: Kernel):
    """Random features of a product of independent branches (unbiased): a product of kernels
    has the tensor product of the features as its features, sketched to a fixed size by
    TensorSRHT (Ahle et al. 2020; ``FeatureStandIn.tensor_sketch``, unbiased:
    ``E[S(a (x) b) . S(a' (x) b')] = (a . a')(b . b')``), so for two branches
    ``Sigma = Sigma_a Sigma_b`` has ``phi = S(phi_a (x) phi_b)`` and
    ``Theta = Theta_a Sigma_b + Sigma_a Theta_b`` has ``psi = [S(psi_a (x) phi_b),
    S(phi_a (x) psi_b)]``; more branches multiply in turn. Per position for images."""
    x0 = xs[0]
    phi, psi = x0.phi, x0.psi
    for x in xs[1:]:
        phi, psi = (x0.tensor_sketch(phi, x.phi),
                    jnp.concatenate([x0.tensor_sketch(psi, x.phi),
                                     x0.tensor_sketch(phi, x.psi)], axis=-1))
    return phi, psi


_CONCATENATE = declare(concatenate, kernel=concatenate, features=_concatenate_features,
                       structured="parameter-free")
_MULTIPLY = declare(multiply, kernel=_multiply_kernels, features=_multiply_features,
                    structured="parameter-free")
