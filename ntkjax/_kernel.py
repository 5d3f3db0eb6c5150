"""The :class:`Kernel` data type: infinite-width kernels of a layer's outputs, as plain data.

This is the lowest floor of the package: the layers of :mod:`ntkjax.nn` map a ``Kernel`` to a
``Kernel`` by their closed-form rules, and :mod:`ntkjax.kernels` evaluates modules on them. This
module imports no evaluation machinery (no blocking, stores or devices) and holds no ambient
state: everything a layer rule reads is a field of the ``Kernel`` it receives.

* Per-input variances are data. ``var1`` / ``var2`` hold each input's covariance with itself
  (across all pairs of its positions, for images), and every layer rule maps them along with
  the pairwise kernels; so a kernel of two different batches (``x2`` given, or one block of a
  blocked evaluation) has everything that activations, LayerNorm and attention read.
* Static facts travel with the kernel (``all_pairs_layers``, ``same_batch_layers``): a layer
  whose rule mixes positions, or depends on ``x2`` being the same batch as ``x1``, notes its
  name on its output, and sums and concatenations of branches keep the notes of every branch.
  :func:`ntkjax.kernel_fn` reads them off one shape-only trace of the module.
* A plain JAX function applied to a ``Kernel`` (``jnp.tanh(k)``) raises
  :class:`ForeignFunctionError` naming the call and what to use instead.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import linecache
import math
import operator
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ntkjax._checks import is_concrete
from ntkjax._meanings import jax_equivalents

__all__ = [
    "AllPairsRequired",
    "ForeignFunctionError",
    "InputPair",
    "Kernel",
    "ScaledParts",
    "batch_diagonal",
    "describe_foreign_call",
    "join_masks",
    "position_diagonal",
    "pow2",
    "traceback_frames",
]


class AllPairsRequired(ValueError):
    """Raised by a layer rule that needs the kernel between all pairs of positions when it
    meets a :class:`Kernel` that holds only same-position pairs (``diagonal_spatial``).

    :func:`ntkjax.kernel_fn` never lets this happen on its own (it reads which layers mix
    positions off the module first); it reaches a user who applies such a layer to a
    same-position kernel directly."""


def pow2(exponent: jax.Array, dtype: Any) -> jax.Array:
    """``2^exponent`` (integer exponents) in ``dtype``, exactly (0 below the dtype's range, inf
    above it).

    >>> import jax.numpy as jnp
    >>> pow2(jnp.array([-1, 3]), jnp.float32).tolist()
    [0.5, 8.0]
    """
    # Built from its bits: the biased exponent ``e + bias`` (clamped to the dtype's range: 0
    # gives 0, the all-ones exponent gives inf) shifted over the mantissa bits. A handful of
    # integer operations, where ``jnp.ldexp`` expands to a frexp, a float power and several
    # selects per call (in a deep network's jitted kernel, compile time).
    dtype = jnp.dtype(dtype)
    info = jnp.finfo(dtype)
    bits = jnp.dtype(f"int{8 * dtype.itemsize}")
    biased = jnp.clip(jnp.asarray(exponent) + (info.maxexp - 1), 0,
                      2 * info.maxexp - 1).astype(bits)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(biased, bits.type(info.nmant)),
                                        dtype)


def fusion_boundary(v: jax.Array) -> jax.Array:
    """``v / (1 + 0 sign(v))``: exactly ``v`` (NaN stays NaN, infinities stay; subnormals flush
    to zero, as in any arithmetic of XLA:CPU), computed once.

    A division is expensive to XLA, which does not duplicate it into several consumers nor into
    one that reads each element many times (a pairwise kernel broadcasting a per-input
    quantity: without it, XLA:CPU recomputes the cheap operations that form it in every entry
    of the fused loop). ``jax.lax.optimization_barrier`` is expanded before fusion on the CPU,
    and a division by one scalar becomes a multiplication (cheap, duplicated): the divisor is
    an array.

    >>> import jax.numpy as jnp
    >>> fusion_boundary(jnp.array([2.0, -0.0])).tolist()
    [2.0, -0.0]
    """
    return v / (1 + 0 * jnp.sign(v))


def per_input(v: jax.Array) -> jax.Array:
    """``v`` (one value per input, read by pairwise loops), computed once: traced, behind
    :func:`fusion_boundary`; eagerly (nothing is fused) ``v`` itself.

    >>> import jax.numpy as jnp
    >>> per_input(jnp.array([1.0, 4.0])).tolist()
    [1.0, 4.0]
    """
    return v if is_concrete(v) else fusion_boundary(v)


@struct.dataclass
class ScaledParts:
    """The scaled form of a :class:`Kernel` (its :attr:`Kernel.scaled`): the same kernels
    divided by per-input powers of two, so that inputs far beyond the dtype's square root
    (float32 |x| ~ 1e20, whose input kernel ``x . x' / d`` ~ 1e40 overflows) keep O(1) stored
    values through the layers whose rules read them (Dense, the ReLU family, erf, gaussian,
    gabor).

    ``true nngp[i, j] = nngp[i, j] 2^(log2_scale1[i] + log2_scale2[j])`` (likewise ``ntk``) and
    ``true var1[i] = var1[i] 2^(2 log2_scale1[i])`` (``var2`` with ``log2_scale2``). Powers of
    two make scaling and unscaling exact in every float dtype (no rounding), so the scaled form
    changes no value that is representable.

    Attributes:
      nngp: (N1, N2) stored NNGP.
      ntk: (N1, N2) stored NTK.
      var1: (N1,) stored variances of x1.
      var2: (N2,) stored variances of x2.
      log2_scale1: (N1,) integer exponents of x1's inputs.
      log2_scale2: (N2,) those of x2.
      ones1: None, or ``2^-log2_scale1`` (N1,) as floats, computed once per layer (a jitted
        network's layers each read their own copy, :meth:`stored_ones`); None computes it
        from the exponents.
      ones2: the same for x2.

    >>> import jax.numpy as jnp
    >>> parts = ScaledParts(nngp=jnp.ones((1, 1)), ntk=jnp.zeros((1, 1)), var1=jnp.ones(1),
    ...                     var2=jnp.ones(1), log2_scale1=jnp.array([3]),
    ...                     log2_scale2=jnp.array([2]))
    >>> parts.true_kernels()[0].tolist()  # 1 * 2^(3 + 2)
    [[32.0]]
    """

    nngp: jax.Array
    ntk: jax.Array
    var1: jax.Array
    var2: jax.Array
    log2_scale1: jax.Array
    log2_scale2: jax.Array
    ones1: jax.Array | None = None
    ones2: jax.Array | None = None

    def replace(self, **changes: Any) -> ScaledParts:
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    def stored_ones(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The stored value of a true 1 (e.g. a dense layer's bias term ``b^2``): ``(pairs,
        var_ones1, var_ones2)`` with ``pairs[i, j] = 2^-(log2_scale1[i] + log2_scale2[j])``
        (N1, N2) and ``var_ones1[i] = 2^(-2 log2_scale1[i])`` (likewise for x2); from
        :attr:`ones1` / :attr:`ones2` where the kernel carries them.

        A jitted network's kernel carries each layer's own ``ones`` (``kernel_fn``'s layer
        boundaries): formed from the exponents shared by all layers, this term was one node
        (or one integer computation) read by every layer of the network's fused loop over the
        entries, which XLA:CPU's fusion emitter compiles in more than linear time in the depth
        (a depth-75 ReLU MLP: 20 CPU-s, against 8 without a bias term)."""
        dtype = self.nngp.dtype
        s1, s2 = self.log2_scale1, self.log2_scale2
        if self.ones1 is None or self.ones2 is None:
            return (pow2(-(s1[:, None] + s2[None, :]), dtype), pow2(-2 * s1, dtype),
                    pow2(-2 * s2, dtype))
        # products of two powers of two: exact, or 0 exactly where 2^-(s1 + s2) is below the
        # normal range (flushed, as pow2 gives)
        o1, o2 = self.ones1, self.ones2
        return o1[:, None] * o2[None, :], o1 * o1, o2 * o2

    def input_ones(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """Each input's stored value of a true 1, ``(2^-log2_scale1, 2^-log2_scale2)`` in
        ``dtype``: :attr:`ones1` / :attr:`ones2` where carried, else formed from the exponents
        (0 below the normal range, as :func:`pow2` gives)."""
        return (pow2(-self.log2_scale1, dtype) if self.ones1 is None else self.ones1,
                pow2(-self.log2_scale2, dtype) if self.ones2 is None else self.ones2)

    def true_kernels(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(nngp, ntk, var1, var2)`` unscaled: the true kernels (``+-inf`` where they overflow
        the dtype, as a computation without the scale would give; never NaN from the
        unscaling)."""
        dtype = self.nngp.dtype
        # each input's power computed once (a pow2 read in the entries' loop is five integer
        # operations per entry)
        p1, p2 = per_input(pow2(self.log2_scale1, dtype)), per_input(pow2(self.log2_scale2, dtype))

        def pair(a: jax.Array) -> jax.Array:
            return (a * p1[:, None]) * p2[None, :]

        return (pair(self.nngp), pair(self.ntk), (self.var1 * p1) * p1,
                (self.var2 * p2) * p2)


def _union(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """The names of all groups, each once, in order of first appearance."""
    return tuple(dict.fromkeys(name for group in groups for name in group))


#: The mark (:attr:`Kernel.non_gaussian`) of the network's inputs: they are not the zero-mean
#: Gaussian outputs of a layer, so an activation or LayerNorm applied to them has no Gaussian
#: closed form (neural-tangents: its input kernel is not ``is_gaussian``); a Dense, Conv or
#: attention layer clears it. Every meaning that starts from the inputs' kernel carries it
#: (:func:`ntkjax.kernels.input_kernel`, the exact part of :func:`ntkjax.feature_map`'s
#: stand-in).
NETWORK_INPUTS = "the network's inputs (no Dense, Conv or attention layer before it)"


@struct.dataclass
class Kernel:
    """Infinite-width kernels of a layer's outputs at two batches of inputs (a pytree).

    Attributes:
      nngp: (N1, N2) NNGP -- the covariance ``Sigma(x1_i, x2_j)`` of one output unit. With
        spatial axes S (images): (N1, N2, *S, *S), ``Sigma(x1_i at p, x2_j at p')`` for all pairs
        of positions; or, with ``diagonal_spatial``, (N1, N2, *S): the same-position entries
        ``Sigma(x1_i at p, x2_j at p)`` only.
      ntk: the NTK ``Theta(x1_i, x2_j)`` of one output unit, shaped like ``nngp``.
      var1: (N1,) the NNGP variances ``Sigma(x1_i, x1_i)``; with spatial axes, (N1, *S, *S): each
        input's covariance across all pairs of positions ((N1, *S) with ``diagonal_spatial``).
        Always carried: every layer rule maps it with the pairwise kernels (:meth:`map_variances`)
        and reads it where its closed form needs each input's variance
        (:meth:`position_variances`, :meth:`self_covariances`).
      var2: the same for x2.
      width: number of features (channels) of the layer (static); the next dense layer's
        ``fan_in`` (a convolution's is ``|window| * width``), which the standard
        parameterization's NTK uses.
      diagonal_spatial: whether only same-position pairs are held (static).
      non_gaussian: (static) ``""`` when the layer's outputs are, in the limit, zero-mean
        Gaussian processes with i.i.d. channels -- the outputs of Dense, Conv and SelfAttention
        layers, their sums and normalizations -- else the name of the layer that made them
        otherwise (an activation, a channel concatenation or product of branches, train-mode
        Dropout), or the network's inputs themselves (:func:`ntkjax.kernels.input_kernel`).
        Activation rules and LayerNorm assume Gaussian inputs and raise a ValueError naming
        that layer (as neural-tangents' ``is_gaussian``); a dense layer makes outputs
        Gaussian again, and layers that only rearrange or pool positions (e.g.
        :func:`ntkjax.nn.flatten`) carry the mark.
      same_inputs: (static) True when x2 is the very batch x1 (``kernel_fn(module)(x1)``); then
        ``var2`` equals ``var1`` and rules that depend on it (train-mode
        :class:`ntkjax.nn.Dropout` scales each example's kernel with itself) see it. A given
        ``x2`` is a different batch, even when equal in value.
      all_pairs_layers: (static) the layers met so far whose rule mixes positions and so needs
        all pairs of positions (pooling, attention, ...): :meth:`require_all_pairs` notes them.
      same_batch_layers: (static) the layers met so far whose rule depends on
        :attr:`same_inputs` (:meth:`noting_same_batch`).
      mask1: None, or the position mask of x1: a boolean (N1, *S) array, True where a
        position is masked (padding: it takes no part). Masks are data, never ambient state:
        :func:`ntkjax.kernel_fn` sets them from its ``mask1`` / ``mask2`` arguments, and the
        layers that change the positions map them (neural-tangents' mask rules). Entries that
        involve a masked position are set to 0 (:meth:`masked`) wherever a layer mixes
        positions (pooling, convolutions, attention keys) and on the returned kernel; layers
        that act on each position alone (Dense, activations, LayerNorm over channels) leave
        them, which changes nothing else (neural-tangents zeroes them after every layer: the
        same kernels).
      mask2: the same for x2 (the same array as ``mask1`` when :attr:`same_inputs`).
      scaled: None, or the same kernel divided by per-input powers of two
        (``ScaledParts``), for kernels of feature vectors whose values would overflow the
        dtype (float32 inputs |x| ~ 1e20). ``nngp``, ``ntk``, ``var1`` and ``var2`` are always
        the true kernels (``+-inf`` where they overflow); ``scaled`` is read only by the rules
        declared ``scale_aware`` (Dense, the ReLU family, erf, gaussian, gabor), which map it
        alongside. Safe by construction: :meth:`replace` drops it unless the rule states the
        new scaled form, so a rule that ignores it (any other layer) returns a kernel without
        it, computed from the true kernels, exactly as without the scale. Public results
        (:func:`ntkjax.kernel_fn`, :func:`ntkjax.kernel_matrix`) never carry it.

    Arithmetic follows the networks it describes: ``k1 + k2`` is the kernel of the sum of two
    independent branches (kernels add; valid when each branch, or all but one, ends in a dense
    layer with fresh zero-mean weights, as in a residual block), and ``alpha * k`` (or
    ``k / alpha``) is the kernel of ``alpha`` times the outputs (kernels scale by ``alpha^2``).

    >>> import jax.numpy as jnp, ntkjax
    >>> k = ntkjax.kernel_fn(ntkjax.nn.Dense(1, w_std=1.0, b_std=0.0))(jnp.eye(2) * 2.0)
    >>> print(k.nngp)  # x1 x2^T / d
    [[2. 0.]
     [0. 2.]]
    >>> print((3.0 * k).ntk[0, 0], (k + k).ntk[0, 0])  # alpha^2 k; independent branches add
    18.0 4.0
    """

    nngp: jax.Array
    ntk: jax.Array
    var1: jax.Array
    var2: jax.Array
    width: int = struct.field(pytree_node=False)
    diagonal_spatial: bool = struct.field(pytree_node=False, default=False)
    non_gaussian: str = struct.field(pytree_node=False, default="")
    same_inputs: bool = struct.field(pytree_node=False, default=False)
    all_pairs_layers: tuple[str, ...] = struct.field(pytree_node=False, default=())
    same_batch_layers: tuple[str, ...] = struct.field(pytree_node=False, default=())
    mask1: jax.Array | None = None
    mask2: jax.Array | None = None
    scaled: ScaledParts | None = None

    def replace(self, **changes: Any) -> Kernel:  # flax's own; set to _replace below
        """A copy with the given fields replaced (``dataclasses.replace``); the scaled form
        ``scaled`` is dropped unless it is among the changes."""
        return self._replace(**changes)

    def _replace(self, **changes: Any) -> Kernel:
        """A copy with the given fields replaced (``dataclasses.replace``). The scaled form
        (:attr:`scaled`) is dropped unless ``scaled`` is among the changes: a rule that maps
        the kernels without stating their scaled form leaves none behind."""
        changes.setdefault("scaled", None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_scaled(cls, parts: ScaledParts, **fields: Any) -> Kernel:
        """The kernel whose scaled form is ``parts``, its true kernels unscaled from it, with
        the other ``fields`` (``width``, ``same_inputs``, ...)."""
        return cls(nngp=parts.nngp, ntk=parts.ntk, var1=parts.var1, var2=parts.var2,
                   **fields).with_scaled(parts)

    def with_scaled(self, parts: ScaledParts, **changes: Any) -> Kernel:
        """This kernel with the scaled form ``parts`` and the true kernels unscaled from it
        (``ScaledParts.true_kernels``), and the other ``changes`` (for the rules declared
        ``scale_aware``)."""
        nngp, ntk, var1, var2 = parts.true_kernels()
        if self.same_inputs and changes.get("same_inputs", True):
            var2 = var1
        return self.replace(nngp=nngp, ntk=ntk, var1=var1, var2=var2, scaled=parts, **changes)

    @property
    def shape(self) -> tuple[int, ...]:
        """``nngp.shape``: ``(N1, N2)``, ``(N1, N2, *S, *S)``, or ``(N1, N2, *S)`` with
        ``diagonal_spatial``."""
        return tuple(self.nngp.shape)

    @property
    def spatial_ndim(self) -> int:
        """The number of spatial axes (0 for a kernel of feature vectors)."""
        extra = len(self.nngp.shape) - 2
        return extra if self.diagonal_spatial else extra // 2

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``S``: the spatial shape of the layer's outputs (``()`` without spatial axes)."""
        return tuple(self.nngp.shape[2 : 2 + self.spatial_ndim])

    @property
    def dtype(self):
        return self.nngp.dtype

    # ---------------------------------------------------------------- masks

    @property
    def has_masks(self) -> bool:
        """Whether the kernel carries position masks (:attr:`mask1`, :attr:`mask2`)."""
        return self.mask1 is not None

    def masked(self) -> Kernel:
        """This kernel with every entry that involves a masked position set to 0: ``nngp`` and
        ``ntk`` ``[a, b, p, p']`` where ``mask1[a, p]`` or ``mask2[b, p']`` (``[a, b, p]`` for
        same-position kernels), ``var1[a, p, p']`` where ``mask1[a, p]`` or ``mask1[a, p']``
        (likewise ``var2``) -- neural-tangents' remasking (Hron et al. 2020, appendix; nt's
        ``_mask`` rule 3). Unchanged without masks or spatial axes."""
        if self.mask1 is None or self.mask2 is None or self.spatial_ndim == 0:
            return self
        self._check_masks()
        nd = self.spatial_ndim
        ones = (1,) * nd
        m1, m2 = self.mask1, self.mask2
        if self.diagonal_spatial:
            pair = m1[:, None] | m2[None, :]
            var_mask = (m1, m2)
        else:
            pair = (m1.reshape(m1.shape[0], 1, *m1.shape[1:], *ones)
                    | m2.reshape(1, m2.shape[0], *ones, *m2.shape[1:]))
            var_mask = tuple(m.reshape(*m.shape, *ones) | m.reshape(m.shape[0], *ones,
                                                                    *m.shape[1:])
                             for m in (m1, m2))

        def zero(a: jax.Array, mask: jax.Array) -> jax.Array:
            return jnp.where(mask, jnp.zeros((), a.dtype), a)

        var1, var2 = zero(self.var1, var_mask[0]), None
        var2 = var1 if self.same_inputs else zero(self.var2, var_mask[1])
        return self.replace(nngp=zero(self.nngp, pair), ntk=zero(self.ntk, pair), var1=var1,
                            var2=var2)

    def _check_masks(self) -> None:
        """A ValueError when the masks do not fit the kernel's batches and positions (a layer
        changed the positions without mapping the masks)."""
        want1 = (self.nngp.shape[0], *self.spatial_shape)
        want2 = (self.nngp.shape[1], *self.spatial_shape)
        got1 = () if self.mask1 is None else tuple(self.mask1.shape)
        got2 = () if self.mask2 is None else tuple(self.mask2.shape)
        if got1 != want1 or got2 != want2:
            raise ValueError(
                f"the kernel's masks have shapes {got1} and {got2}, but its batches and "
                f"positions are {want1} and {want2}: a layer changed the positions without a "
                "rule for masks. Give that layer unmasked inputs (no mask1 / mask2)."
            )

    def unmasked_counts(self) -> tuple[jax.Array, jax.Array]:
        """The number of unmasked positions of each input of x1 and x2, ``(N1,)`` and
        ``(N2,)`` (all positions without masks), in the kernel's dtype."""
        positions = math.prod(self.spatial_shape)
        n1, n2 = self.nngp.shape[:2]
        if self.mask1 is None or self.mask2 is None:
            full = jnp.asarray(float(positions), self.dtype)
            return jnp.full((n1,), full), jnp.full((n2,), full)

        self._check_masks()

        def count(m: jax.Array) -> jax.Array:
            return jnp.sum(~m.reshape(m.shape[0], -1), axis=1).astype(self.dtype)

        c1 = count(self.mask1)
        return c1, (c1 if self.same_inputs else count(self.mask2))

    def with_masks(self, mask1: jax.Array | None, mask2: jax.Array | None) -> Kernel:
        """This kernel with the position masks replaced (e.g. by a layer that changes the
        positions); ``mask2`` is ``mask1`` when :attr:`same_inputs`."""
        return self.replace(mask1=mask1, mask2=mask1 if self.same_inputs else mask2)

    def map_masks(self, fn: Callable[[jax.Array], jax.Array]) -> Kernel:
        """This kernel with ``fn`` applied to each position mask (None stays None)."""
        if self.mask1 is None or self.mask2 is None:
            return self
        m1 = fn(self.mask1)
        return self.with_masks(m1, m1 if self.same_inputs else fn(self.mask2))

    def without_masks(self) -> Kernel:
        """This kernel, remasked (:meth:`masked`), without its masks: for readouts that remove
        the positions (flatten, global pooling)."""
        return self.masked().replace(mask1=None, mask2=None)

    # ---------------------------------------------------------------- static facts

    def require_all_pairs(self, layer: str) -> Kernel:
        """For layer rules that mix positions: this kernel with ``layer`` noted in
        :attr:`all_pairs_layers`; raises :class:`AllPairsRequired` (a ValueError) when it holds
        only same-position pairs."""
        if self.diagonal_spatial:
            raise AllPairsRequired(
                f"{layer} needs the kernel between all pairs of positions, but this kernel "
                "holds only same-position pairs (kernel_fn(module, position_pairs='same'))."
            )
        return self.replace(all_pairs_layers=_union(self.all_pairs_layers, (layer,)),
                            scaled=self.scaled)

    def noting_same_batch(self, layer: str) -> Kernel:
        """For layer rules whose result depends on :attr:`same_inputs`: this kernel with
        ``layer`` noted in :attr:`same_batch_layers` (a blocked evaluation, which treats blocks
        of one batch as pairs of batches, then refuses or evaluates the batch whole)."""
        return self.replace(same_batch_layers=_union(self.same_batch_layers, (layer,)),
                            scaled=self.scaled)

    def with_facts_of(self, *others: Kernel) -> Kernel:
        """This kernel with the static facts (:attr:`all_pairs_layers`,
        :attr:`same_batch_layers`) of ``others`` added: for rules that join branches."""
        return self.replace(
            all_pairs_layers=_union(self.all_pairs_layers, *(k.all_pairs_layers for k in others)),
            same_batch_layers=_union(self.same_batch_layers,
                                     *(k.same_batch_layers for k in others)),
            scaled=self.scaled,
        )

    # ---------------------------------------------------------------- arithmetic

    def __add__(self, other: Any) -> Kernel:
        if not isinstance(other, Kernel):
            return NotImplemented
        if (self.width != other.width or self.shape != other.shape
                or self.diagonal_spatial != other.diagonal_spatial):
            raise ValueError(
                "can only add kernels of branches with the same width and inputs; got widths "
                f"{self.width} and {other.width}, shapes {self.shape} and {other.shape}."
            )
        if self.non_gaussian and other.non_gaussian:
            raise ValueError(
                "the sum of two branches that both end in a layer with non-Gaussian outputs "
                f"({self.non_gaussian} and {other.non_gaussian}) has no kernel here: their "
                "means do not vanish, so the cross terms E[f] E[g'] would be missing. End at "
                "least one branch in a Dense/Conv layer (as in a residual block)."
            )
        same = self.same_inputs and other.same_inputs
        (a, b), mask1, mask2 = join_masks([self, other])
        var1 = a.var1 + b.var1
        return self.with_facts_of(other).replace(
            nngp=a.nngp + b.nngp,
            ntk=a.ntk + b.ntk,
            var1=var1,
            var2=var1 if same else a.var2 + b.var2,
            same_inputs=same,
            non_gaussian=self.non_gaussian or other.non_gaussian,
            mask1=mask1,
            mask2=mask2,
        )

    def __mul__(self, scale: Any) -> Kernel:
        if isinstance(scale, Kernel) or jnp.ndim(scale) != 0:
            raise ValueError(
                "a Kernel can only be multiplied by a scalar (the network output times alpha has "
                f"kernel alpha^2 K); got {type(scale).__name__} of shape {jnp.shape(scale)}."
            )
        s2 = jnp.asarray(scale, self.dtype) ** 2
        if self.scaled is not None:
            p = self.scaled
            pv2 = p.var1 * s2 if self.same_inputs else p.var2 * s2
            return self.with_scaled(p.replace(nngp=p.nngp * s2, ntk=p.ntk * s2,
                                              var1=p.var1 * s2, var2=pv2))
        var1, var2 = self.map_variances(lambda v: v * s2)
        return self.replace(nngp=self.nngp * s2, ntk=self.ntk * s2, var1=var1, var2=var2)

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> Kernel:
        if isinstance(scale, Kernel):
            return NotImplemented
        return self * (1 / jnp.asarray(scale, self.dtype))

    def __neg__(self) -> Kernel:
        return self

    def __getitem__(self, index: Any) -> Kernel:
        """``k[rows, cols]``: the kernel of a subset of x1 (``rows``) and x2 (``cols``) -- any
        numpy-style index of one axis each (``k[rows]`` keeps every x2). ``nngp`` and ``ntk``
        are indexed on their two batch axes, ``var1`` by ``rows`` and ``var2`` by ``cols``; the
        result is a kernel of two batches (``same_inputs`` False)."""
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        p = self.scaled
        if p is not None:
            p = p.replace(nngp=p.nngp[rows][:, cols], ntk=p.ntk[rows][:, cols],
                          var1=p.var1[rows], var2=p.var2[cols],
                          log2_scale1=p.log2_scale1[rows], log2_scale2=p.log2_scale2[cols],
                          ones1=None if p.ones1 is None else p.ones1[rows],
                          ones2=None if p.ones2 is None else p.ones2[cols])
        return self.replace(scaled=p,nngp=self.nngp[rows][:, cols], ntk=self.ntk[rows][:, cols],
                            var1=self.var1[rows], var2=self.var2[cols], same_inputs=False,
                            mask1=None if self.mask1 is None else self.mask1[rows],
                            mask2=None if self.mask2 is None else self.mask2[cols])

    def __jax_array__(self) -> Any:
        """JAX asks for an array when a jnp / jax.nn function receives a Kernel: raise a
        :class:`ForeignFunctionError` naming the function and what to use."""
        stack = [(f.filename, f.lineno, f.function) for f in reversed(inspect.stack(0)[1:])]
        raise ForeignFunctionError(describe_foreign_call(stack))

    # ---------------------------------------------------------------- per-input variances

    def map_variances(self, fn: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(fn(var1), fn(var2))``, evaluated once for a batch with itself (:attr:`same_inputs`),
        so the two stay one array and the diagonal of a symmetric kernel stays consistent."""
        var1 = fn(self.var1)
        return var1, (var1 if self.same_inputs else fn(self.var2))

    def position_variances(self) -> tuple[jax.Array, jax.Array]:
        """Each input's variance at each position, ``var[a, p, p]``, shaped (N, *S), for x1 and
        x2 (the variances themselves, (N,), without spatial axes). One array for both when
        :attr:`same_inputs`."""
        nd = self.spatial_ndim
        if nd == 0 or self.diagonal_spatial:
            return self.var1, self.var2
        return self.map_variances(lambda v: position_diagonal(v, nd))

    def self_covariances(self) -> tuple[jax.Array, jax.Array]:
        """Each input's kernel with itself across all its positions, ``(N, *S, *S)`` (``(N, *S)``
        for same-position kernels, ``(N,)`` without spatial axes), for x1 and x2: ``var1`` and
        ``var2``."""
        return self.var1, self.var2


def join_masks(
    kernels: list[Kernel],
) -> tuple[list[Kernel], jax.Array | None, jax.Array | None]:
    """For layers that join branches position by position (sums, channel concatenations,
    products): the branch kernels remasked (:meth:`Kernel.masked`: each branch's entries at its
    own masked positions 0) and the joined masks, a position masked iff it is masked in every
    branch (neural-tangents' ``FanInSum`` / ``FanInConcat`` / ``FanInProd`` rule); the kernels
    unchanged and ``(None, None)`` without masks.

    >>> import jax.numpy as jnp
    >>> k = Kernel(nngp=jnp.ones((1, 1)), ntk=jnp.ones((1, 1)), var1=jnp.ones(1),
    ...            var2=jnp.ones(1), width=1)
    >>> join_masks([k, k])[1] is None
    True
    """
    with_masks = [k for k in kernels if k.mask1 is not None and k.mask2 is not None]
    if not with_masks:
        return list(kernels), None, None
    mask1 = functools.reduce(operator.and_, [k.mask1 for k in with_masks])
    mask2 = functools.reduce(operator.and_, [k.mask2 for k in with_masks])
    if all(k.same_inputs for k in kernels):
        mask2 = mask1
    return [k.masked() for k in kernels], mask1, mask2


def batch_diagonal(a: jax.Array) -> jax.Array:
    """``a[i, i, ...]`` of shape (N, ...) from ``a`` of shape (N, N, ...).

    >>> import jax.numpy as jnp
    >>> batch_diagonal(jnp.arange(8.0).reshape(2, 2, 2)).tolist()
    [[0.0, 1.0], [6.0, 7.0]]
    """
    return jnp.moveaxis(jnp.diagonal(a, axis1=0, axis2=1), -1, 0)


def position_diagonal(v: jax.Array, nd: int) -> jax.Array:
    """``v[a, p, p]`` of shape (N, *S) from per-input covariances ``v`` of shape (N, *S, *S).

    >>> import jax.numpy as jnp
    >>> position_diagonal(jnp.arange(8.0).reshape(2, 2, 2), 1).tolist()
    [[0.0, 3.0], [4.0, 7.0]]
    """
    n, spatial = v.shape[0], v.shape[1 : 1 + nd]
    positions = math.prod(spatial)
    flat = v.reshape(n, positions, positions)
    return jnp.diagonal(flat, axis1=1, axis2=2).reshape(n, *spatial)


# ------------------------------------------------------------- foreign functions on a Kernel

class ForeignFunctionError(ValueError):
    """A function without an infinite-width rule (``jax.nn.relu``, ``jnp.tanh``, a lambda) was
    applied to a :class:`Kernel`."""


# ntkjax equivalents of JAX functions, by the name of the JAX function that met the Kernel.
_API_DIRS = {
    "/jax/_src/nn/": "jax.nn.",
    "/jax/_src/numpy/": "jnp.",
    "/jax/_src/lax/": "jax.lax.",
    "/jax/_src/scipy/": "jax.scipy.",
    "/jax/_src/ops/": "jax.ops.",
}
_LIBRARY_DIRS = ("/jax/", "/jaxlib/", "/flax/", "/numpy/", "/ntkjax/kernels.py",
                 "/ntkjax/_kernel.py")


def describe_foreign_call(frames: list[tuple[str, int, str]]) -> str:
    """The message for a Kernel that reached a plain JAX function, from the call stack as
    ``(filename, lineno, function)`` tuples, outermost first: the user's frame is the innermost
    one outside JAX/Flax, the function applied the first public JAX function inside it.

    >>> describe_foreign_call([]).startswith("a function that is not an ntkjax activation")
    True
    """
    paths = [f.replace("\\", "/") for f, _, _ in frames]
    user = None
    for i in range(len(frames) - 1, -1, -1):
        if not any(d in paths[i] for d in _LIBRARY_DIRS):
            user = i
            break
    api, qualified = None, None
    for i in range(0 if user is None else user + 1, len(frames)):
        name = frames[i][2]
        prefix = next((p for d, p in _API_DIRS.items() if d in paths[i]), None)
        if prefix and not name.startswith(("_", "<")):
            api, qualified = name, prefix + name
            break
    where = ""
    if user is not None:
        filename, lineno, function = frames[user]
        line = linecache.getline(filename, lineno).strip()
        where = f" in {function} ({filename}:{lineno}{': ' + repr(line) if line else ''})"
        if function == "<lambda>" and qualified:
            qualified = f"a lambda calling {qualified}"
    what = qualified or "a function that is not an ntkjax activation"
    equivalents = jax_equivalents()  # from the layers' declarations
    if api in equivalents:
        fix = f"use {equivalents[api]} instead"
    else:
        fix = ("wrap the function in ntkjax.nn.elementwise(fn) (its kernel then comes from "
               "Gauss-Hermite quadrature)")
    return (
        f"{what} was applied to an ntkjax Kernel{where}. ntkjax.kernel_fn applies the module to "
        "a Kernel, and only ntkjax.nn layers and activations have an infinite-width rule: "
        f"{fix}."
    )


def traceback_frames(err: BaseException) -> list[tuple[str, int, str]]:
    """``(filename, lineno, function)`` of each frame of ``err``'s traceback, outermost first
    (the input of :func:`describe_foreign_call`).

    >>> try:
    ...     raise ValueError
    ... except ValueError as e:
    ...     traceback_frames(e)[-1][2]
    '<module>'
    """
    return [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(err.__traceback__)]


@struct.dataclass
class InputPair:
    """A per-input call argument of a module, for the two batches of a :class:`Kernel`.

    :func:`ntkjax.kernel_fn` passes every keyword argument it is given (e.g. the graphs'
    adjacency, ``kernel_fn(gnn)(x1, x2, pattern=(P1, P2))``) to the module as an
    ``InputPair``: ``first`` holds the rows of x1, ``second`` those of x2 (the same array for
    ``x2 = None``). Both are sliced with the inputs' rows wherever the kernel is evaluated in
    blocks, so a layer that reads them (:class:`ntkjax.nn.Aggregate`) sees the rows of exactly
    the inputs of its kernel. Plain data, no ambient state.

    Attributes:
      first: the argument's rows for x1, leading axis N1.
      second: its rows for x2, leading axis N2.

    >>> import jax.numpy as jnp
    >>> InputPair(jnp.zeros((2, 3, 3)), jnp.zeros((4, 3, 3))).second.shape
    (4, 3, 3)
    """

    first: Any
    second: Any

    def rows(self, index1: Any, index2: Any) -> InputPair:
        """The pair for rows ``index1`` of x1 and ``index2`` of x2."""
        return InputPair(self.first[index1], self.second[index2])


# flax.struct.dataclass installs its own ``replace`` (plain dataclasses.replace), which would
# keep a scaled form that no longer matches the kernels: Kernel's drops it.
Kernel.replace = Kernel._replace  # type: ignore[method-assign]

# Kernel's public home, where the API reference documents it (and pickles find it).
Kernel.__module__ = "ntkjax.kernels"
InputPair.__module__ = "ntkjax.kernels"
