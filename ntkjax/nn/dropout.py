"""Dropout and its infinite-width rule.

Convention: ``rate`` is the probability of DROPPING a unit, as in ``flax.linen.Dropout``; the
keep probability is ``keep = 1 - rate``. (neural-tangents' ``Dropout(rate)`` takes the KEEP
probability: its ``Dropout(p)`` is ``Dropout(rate=1 - p)`` here.)

In train mode every unit is multiplied by an independent ``Bernoulli(keep) / keep`` mask, drawn
per example (and position). In the limit of infinitely many channels (neural-tangents' rule):
``E[m m'] / keep^2`` is 1 for two different examples or positions (independent masks) and
``1 / keep`` for an example with itself at the same position (one mask, ``E[m^2] = keep``), so

* each example's own variance at each position is multiplied by ``1 / keep`` (``var1``,
  ``var2`` -- always: within one example the mask is shared);
* the NNGP and NTK entries of an example with itself at the same position are multiplied by
  ``1 / keep`` when both sides are the same batch (``x2 = None``; see
  :attr:`ntkjax.Kernel.same_inputs`); every other entry is unchanged -- later nonlinear layers
  still see the inflated variances.

The output is not Gaussian (a mixture over masks): an activation or LayerNorm needs a Dense /
Conv layer first. ``deterministic=True`` (evaluation) is the identity on arrays and kernels.

Empirical NTKs: with an active (train-mode) dropout the network's Jacobian depends on how the
examples are batched (each batch row draws its own mask, a per-sample computation one mask for
all), so :func:`ntkjax.empirical_ntk_fn` refuses such a network with a ValueError rather than
return a method-dependent kernel; compute empirical NTKs with ``deterministic=True``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, declare

__all__ = ["Dropout", "dropout_kernel"]


def _scale_self_entries(a: jax.Array, factor: float, lead: int, nd: int) -> jax.Array:
    """``a`` with its entries at matching positions (``p == p'``) multiplied by ``factor``;
    ``a`` has ``lead`` leading axes then ``(*S, *S)`` (or nothing when ``nd == 0``)."""
    if nd == 0:
        return a * factor
    spatial = a.shape[lead : lead + nd]
    positions = math.prod(spatial)
    eye = jnp.eye(positions, dtype=bool).reshape(*spatial, *spatial)
    return jnp.where(eye, a * factor, a)


def dropout_kernel(k: Kernel, rate: float) -> Kernel:
    """The :class:`~ntkjax.Kernel` after train-mode :class:`Dropout` with drop probability
    ``rate`` (module docstring): each example's variance at each position times
    ``1 / (1 - rate)``, and, for ``x2 = None``, the NNGP and NTK of every example with itself
    at the same position likewise."""
    keep = 1.0 - float(rate)
    factor = 1.0 / keep
    nd = 0 if k.diagonal_spatial else k.spatial_ndim  # same-position kernels: every entry
    k = k.noting_same_batch("ntkjax.nn.Dropout (train mode)")
    var1, var2 = k.map_variances(lambda v: _scale_self_entries(v, factor, 1, nd))
    nngp, ntk = k.nngp, k.ntk
    if k.same_inputs:
        n = nngp.shape[0]
        self_pairs = jnp.eye(n, dtype=bool).reshape(n, n, *(1,) * (nngp.ndim - 2))
        if nd:
            spatial = k.spatial_shape
            positions = math.prod(spatial)
            same_position = jnp.eye(positions, dtype=bool).reshape(*spatial, *spatial)
            self_pairs = self_pairs & same_position
        nngp = jnp.where(self_pairs, nngp * factor, nngp)
        ntk = jnp.where(self_pairs, ntk * factor, ntk)
    return k.replace(nngp=nngp, ntk=ntk, var1=var1, var2=var2,
                     non_gaussian="ntkjax.nn.Dropout (train mode)")


class Dropout(linen.Module):
    """Dropout: in train mode (``deterministic=False``) each unit is zeroed with probability
    ``rate`` and the others scaled by ``1 / (1 - rate)``; ``deterministic=True`` is the
    identity.

    The same call semantics as ``flax.linen.Dropout``: ``rate`` is the DROP probability (nt's
    ``Dropout(p)`` keeps with probability p: it is ``Dropout(rate=1 - p)`` here),
    ``deterministic`` is an attribute or a call argument (one of them must be given), and the
    masks come from the ``"dropout"`` PRNG stream (``module.apply(..., rngs={"dropout": key})``),
    one independent mask per example and position.

    On a :class:`~ntkjax.Kernel`: the identity when deterministic, else neural-tangents' dropout
    rule :func:`dropout_kernel` (module docstring): variances, and for ``x2 = None`` every
    example's kernel with itself at the same position, times ``1 / (1 - rate)``. The output is
    not Gaussian (an activation needs a Dense / Conv layer first), and
    :func:`ntkjax.kernel_matrix` refuses ``x2 = None`` (its blocks cannot tell an example from
    its copy). Empirical NTKs of a train-mode dropout network raise a ValueError (module
    docstring).

    Attributes:
      rate: the drop probability, in [0, 1).
      deterministic: True for evaluation (identity), False for training; None to pass it at
        call time.
      rng_collection: the PRNG stream of the masks.

    >>> import jax
    >>> layer = Dropout(0.5, deterministic=False)
    >>> y = layer.apply({}, jnp.ones((2, 4)), rngs={"dropout": jax.random.key(0)})
    >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    def active(self, deterministic: bool | None = None) -> bool:
        """Whether the layer drops units for this call (train mode and ``rate > 0``)."""
        det = linen.merge_param("deterministic", self.deterministic, deterministic)
        return not det and float(self.rate) > 0

    @linen.compact
    def __call__(self, x: Any, deterministic: bool | None = None) -> Any:
        if not 0 <= float(self.rate) < 1:
            raise ValueError(
                f"Dropout rate (the drop probability) must be in [0, 1), got {self.rate!r} "
                "(neural-tangents' Dropout(p) keeps with probability p: use rate=1 - p)."
            )
        if not self.active(deterministic):
            return x
        if isinstance(x, FeatureStandIn):
            return _MEANINGS.on_features(x, lambda k: self(k, deterministic))
        if isinstance(x, Kernel):
            return dropout_kernel(x, self.rate)
        x = jnp.asarray(x)
        keep = 1.0 - float(self.rate)
        mask = jax.random.bernoulli(self.make_rng(self.rng_collection), keep, x.shape)
        return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


# Active dropout raises only each input's own entries (its kernel depends on which inputs are
# the same, i.e. on the batch), which no fixed feature map of one input reproduces; inactive
# dropout is the identity in every meaning.
_MEANINGS = declare(
    Dropout, kernel=dropout_kernel, features=None, structured="parameter-free",
    batch_dependent=True,
    instead={"features": "active dropout's kernel depends on which inputs coincide; use "
             "Dropout(deterministic=True) in the feature map, or ntkjax.kernel_fn."},
)
