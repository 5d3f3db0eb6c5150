"""Random features and sketches of the NNGP and NTK: kernel methods in time linear in the data.

:func:`feature_map` turns the same :mod:`ntkjax.nn` module that :func:`ntkjax.kernel_fn` accepts
into a jitted map ``x -> Features(nngp=phi(x), ntk=psi(x))`` of D features each, with
``phi(x) . phi(x') ~ Sigma(x, x')`` (NNGP) and ``psi(x) . psi(x') ~ Theta(x, x')`` (NTK);
:func:`feature_ridge` then fits kernel ridge regression on n points in O(n D^2) time and
O(D^2 + batch D) memory, streaming over the data.

How the module is walked. As :func:`ntkjax.kernel_fn` applies the module to a
:class:`~ntkjax.Kernel` instead of an array, :func:`feature_map` applies it to a stand-in of its
own type (a :class:`ntkjax.nn.FeatureStandIn`, not a Kernel): each input's exact kernel with
itself (its variances, O(N) entries, O(N P^2) for images of P positions) and, beside it, the
features. Every layer dispatches on its input's type; on the stand-in it applies the feature
rule of its declaration (``ntkjax._meanings``, beside the layer's finite code; collected in
:data:`FEATURE_RULES`): first its exact rule on the Kernel part -- the layer's own code, so the
variances are exact -- then its feature rule. A layer whose declaration has no feature rule, a
flax layer, or a JAX function that meets the stand-in raises
:class:`~ntkjax.UnsupportedMeaning` naming it: nothing passes through silently, and nothing of
:mod:`ntkjax.nn` is patched.

Feature rules (features per spatial position for images, shape (N, *S, D); each stated and
sourced beside its layer, summarized here). Every random quantity is drawn once per input
shape, on the host, by numpy's generator seeded with the bits of ``jax.random.fold_in(key, i)``
(i counts the draws of the walk):

* input: ``phi = x / sqrt(d)`` (exact), ``psi`` empty (Theta = 0).
* :class:`~ntkjax.nn.Dense`, from Sigma' = w^2 Sigma + b^2 and Theta' = Sigma' + w^2 Theta (NTK
  parameterization) or Theta' = fan_in Sigma + w^2 Theta (+ 1) (standard): sums of kernels are
  concatenations of features and scalings are scalings, so ``phi' = [w phi, b]``,
  ``psi' = [phi', w psi]`` (NTK) or ``[sqrt(fan_in) phi, w psi, 1]`` (standard) -- exact.
* :class:`~ntkjax.nn.Conv`: a convolution is a dense layer on patches; ``patches(phi)[o] =
  concat_delta phi[s o + delta] / sqrt(|K|)`` reproduces the patch average
  ``T(Sigma)[o, o'] = mean_delta Sigma[s o + delta, s o' + delta]`` exactly (zero padding for
  SAME, periodic for CIRCULAR), then the dense rule with ``fan_in = |K| C`` (the CNTK features
  of Zandieh et al. 2021, section 5).
* :class:`~ntkjax.nn.ConvLocal` (weights not shared between positions): the convolution's
  exact features, then a count sketch of each output position's features into m coordinates
  with hashes and signs drawn independently per position (Charikar et al. 2002): same-position
  products are kept (exactly while the patch features fit in m), cross-position ones vanish in
  expectation -- unbiased features of its kernel, ``delta_{oo'}`` times the convolution's.
* :class:`~ntkjax.nn.Aggregate`: the layer's own sums along each input's graph applied to
  phi and psi (it is linear) -- exact; the pattern is passed per input,
  ``feature_map(gnn, ...)(x, pattern=A)``.
* :func:`~ntkjax.nn.flatten`: ``phi.reshape(N, P D) / sqrt(P)``; the poolings
  (:func:`~ntkjax.nn.global_average_pool`, ``global_sum_pool``, ``avg_pool``, ``sum_pool``):
  the finite pooling applied to the per-position features (pooling is linear, so
  ``phi'[o] . phi'[o']`` is the pooled kernel) -- all exact (Novak et al. 2019 readouts).
* residual sums ``k1 + k2`` (independent branches): concatenation; ``alpha * k``: ``|alpha| phi``.
* :func:`~ntkjax.nn.concatenate`: along channels ``[sqrt(C_b / C) phi_b]_b`` (the width-weighted
  sum of kernels), along a spatial axis each branch in coordinates of its own -- exact;
  :func:`~ntkjax.nn.multiply`: ``phi = S(phi_a (x) phi_b)``, ``psi = [S(psi_a (x) phi_b),
  S(phi_a (x) psi_b)]`` with the TensorSRHT S below -- unbiased.
* :class:`~ntkjax.nn.LayerNorm`: ``phi[a, p] / sqrt(v_a[p] + eps)`` from the exact variances --
  exact. No rule (UnsupportedMeaning): :class:`~ntkjax.nn.SelfAttention`, active
  :class:`~ntkjax.nn.Dropout` (its kernel depends on which inputs coincide),
  :class:`~ntkjax.nn.ConvTranspose`, ``exp_normalized``.
* ReLU family ``a min(u, 0) + b max(u, 0)`` (:data:`~ntkjax.nn.relu`, ``leaky_relu``,
  ``ab_relu``, ``abs``) -- arc-cosine random features (Cho & Saul 2009; Zandieh et al. 2021,
  "Scaling Neural Tangent Kernels via Sketching and Random Features", NeurIPS, section 4): with
  the unit direction ``u = phi / |phi|``, the exact pre-activation variance q, Gaussian
  ``G (d, m)``, ``F = sqrt(q / m) act(u G)`` and ``F_dot = act'(u G) / sqrt(m)``. Given the
  input features, ``E[F . F'] = sigma(q12, q1, q2)`` and ``E[F_dot . F_dot'] = sigma_dot`` at
  the correlation ``u . u'`` exactly (the arc-cosine kernels kappa_1, kappa_0). Identity (a = b)
  is exact: ``F = |a| phi``.
* Any other activation (erf, GELU, sin, :func:`~ntkjax.nn.elementwise` ...) -- truncated Hermite
  expansion (Han et al. 2022, "Fast Neural Kernel Embeddings for General Activations",
  NeurIPS): with the normalized Hermite polynomials h_k and
  ``a_k(q) = E[act(sqrt(q) z) h_k(z)]``, ``b_k(q) = E[act'(sqrt(q) z) h_k(z)]`` (z ~ N(0, 1),
  by Gauss-Hermite quadrature of the activation's ``fn``), Mehler's formula gives
  ``sigma = sum_k a_k(q1) a_k(q2) c^k`` and ``sigma_dot = sum_k b_k(q1) b_k(q2) c^k``; the
  features are ``F = [a_0, a_1 u, a_2 T_2(u), ..., a_K T_K(u)]`` (then compressed to m, below)
  with ``T_k = TensorSRHT(T_{k-1}, u)`` unbiased sketches of ``u^{(x) k}`` (the degree-by-degree
  form of PolySketch, Ahle et al. 2020); the exact degrees 0 and 1 keep coordinates of their own
  when compressed. Truncating at degree K errs by at most
  ``sqrt(tail(q1) tail(q2))`` with ``tail(q) = E[act^2] - sum_{k <= K} a_k(q)^2``
  (Cauchy-Schwarz, |c| <= 1): :func:`hermite_truncation_error` computes it and tabulates values.
  By default K is the lowest of 8, 16, 32, 64 that keeps this relative error within 1e-2 at the
  first batch's variances (:func:`feature_map`); beyond, the features are refused.
* Every activation: ``Theta' = sigma_dot Theta`` is a product of kernels, whose features are
  the tensor product ``psi (x) F_dot``, sketched to m coordinates by TensorSRHT (Ahle et al.
  2020, "Oblivious Sketching of High-Degree Polynomial Kernels", SODA; used for the NTK by
  Zandieh et al. 2021): ``u_I * v_J / sqrt(m)`` with ``u = H fold(psi)``, ``v = H fold(F_dot)``
  -- H the Walsh-Hadamard matrix, ``fold`` a sum of blocks of the input with independent random
  signs (so no input is padded beyond the sketch size), I, J sampled coordinates. Every
  coordinate is a random-sign combination of all of the input, so the sketch is unbiased:
  ``E[S(a (x) b) . S(a' (x) b')] = (a . a')(b . b')``.
* compression (the output, and the Hermite features): more than D coordinates are randomly
  permuted and folded with random signs into D (a count sketch with balanced buckets; Charikar
  et al. 2002): unbiased, and only coordinates sharing a bucket add error, so a few extra
  coordinates (e.g. a bias) cost almost nothing. Fewer than D are zero-padded (exact).

Bias and error. Each random layer is unbiased given its input features, so a network with one
random layer (e.g. Dense -> ReLU -> Dense, or one convolution, an activation and a readout) has
unbiased NNGP and NTK features; deeper networks compose nonlinear maps of estimates and are
biased by O(1/m). The error falls like D^(-1/2) (tests/test_features.py fits the slope).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from ntkjax._checks import check_batched, check_choice, check_finite, float_dtype, is_concrete
from ntkjax._kernel import NETWORK_INPUTS, Kernel
from ntkjax._meanings import FeatureStandIn, UnsupportedMeaning, declaration_of, feature_rules
from ntkjax._progress import progress
from ntkjax._tiling import pad_rows
from ntkjax.nn.activations import Activation

__all__ = [
    "FEATURE_RULES",
    "GETS",
    "FeatureMap",
    "FeatureRidge",
    "Features",
    "Get",
    "feature_map",
    "feature_ridge",
    "hermite_truncation_error",
]

Get = Literal["ntk", "nngp"]
GETS: tuple[Get, ...] = ("ntk", "nngp")


class Features(NamedTuple):
    """Feature matrices of a batch: ``nngp`` (N, D) with ``nngp @ nngp.T ~ NNGP`` and ``ntk``
    (N, D) with ``ntk @ ntk.T ~ NTK`` (the kernels of one output, as :func:`ntkjax.kernel_fn`).

    >>> import jax.numpy as jnp
    >>> f = Features(nngp=jnp.ones((3, 2)), ntk=jnp.ones((3, 2)))
    >>> print(f.ntk @ f.ntk.T)  # the NTK estimate these features give
    [[2. 2. 2.]
     [2. 2. 2.]
     [2. 2. 2.]]
    """

    nngp: jax.Array
    ntk: jax.Array


# --------------------------------------------------------------------------- the stand-in


def _concat(parts: list[jax.Array]) -> jax.Array:
    return jnp.concatenate(parts, axis=-1)


@jax.tree_util.register_pytree_node_class
class _StandIn(FeatureStandIn):
    """What :func:`feature_map` applies a module to: ``exact``, the :class:`Kernel` of each
    input with itself (``nngp`` (N, 1, ...) a placeholder column, ``var1`` the exact variances),
    and ``phi`` (N, *S, D_nngp), ``psi`` (N, *S, D_ntk); its own type (not a Kernel), so a layer
    without a feature rule cannot pass it through as a kernel. The walk (``self.walk``) draws
    the random parameters of the primitives below."""

    def __init__(self, walk: _Walk, exact: Kernel, phi: jax.Array, psi: jax.Array) -> None:
        self.walk, self.exact, self.phi, self.psi = walk, exact, phi, psi

    # a pytree (leaves: the exact kernel and the features), so that a JAX function applied to
    # it reaches __jax_array__ below and raises UnsupportedMeaning naming the function
    def tree_flatten(self) -> tuple[tuple, _Walk]:
        return (self.exact, self.phi, self.psi), self.walk

    @classmethod
    def tree_unflatten(cls, walk: _Walk, leaves: tuple) -> _StandIn:
        return cls(walk, *leaves)

    def after(self, layer: str, exact: Any, phi: Any, psi: Any) -> _StandIn:
        if not isinstance(exact, Kernel):
            raise ValueError(f"feature_map: {layer}'s kernel rule returned {type(exact).__name__}.")
        self.walk.trail.append(layer)
        return _StandIn(self.walk, exact, phi, psi)

    # shapes, as the array of activations (N, *S, C) and as the Kernel
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.phi.shape[0], *self.exact.spatial_shape, self.exact.width)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.exact.spatial_shape

    @property
    def spatial_ndim(self) -> int:
        return self.exact.spatial_ndim

    # random-feature primitives (module docstring)
    def tensor_sketch(self, a: Any, b: Any) -> Any:
        return _tensor_sketch(self.walk, a, b, self.walk.config.sketch_features)

    def arc_cosine(self, a: float, b: float) -> tuple[Any, Any]:
        return _relu_family_features(self, a, b)

    def hermite(self, fn: Callable[[Any], Any]) -> tuple[Any, Any]:
        return _hermite_features(self, fn)

    def local_projection(self, a: Any) -> Any:
        return _local_projection(self.walk, a, self.walk.config.hidden_features)

    # residual sums of independent branches: kernels add, features concatenate
    def __add__(self, other: Any) -> Any:
        if not isinstance(other, _StandIn):
            raise UnsupportedMeaning(
                "a residual sum (+)", "features",
                f"both terms must come from the module's input; got {type(other).__name__} "
                f"after {self.walk.last()}.")
        exact = self.exact + other.exact
        return self.after("+", exact, _concat([self.phi, other.phi]),
                          _concat([self.psi, other.psi]))

    __radd__ = __add__

    def __mul__(self, scale: Any) -> Any:
        if isinstance(scale, _StandIn):
            raise UnsupportedMeaning(
                "a product (*) of two branches", "features", "use ntkjax.nn.multiply.")
        exact = self.exact * scale  # validates the scalar
        s = jnp.abs(jnp.asarray(scale, self.phi.dtype))
        return _StandIn(self.walk, exact, self.phi * s, self.psi * s)

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> Any:
        return self * (1 / jnp.asarray(scale, self.phi.dtype))

    def __neg__(self) -> _StandIn:
        return self

    def __jax_array__(self) -> Any:
        raise UnsupportedMeaning(
            f"{_foreign_function()} (applied after {self.walk.last()})", "features",
            "only ntkjax.nn layers and activations have random-feature rules: use them, wrap "
            "other elementwise functions in ntkjax.nn.elementwise, and declare your own layers "
            "(docs/development.md, 'Adding an activation or a layer').")


_API_PREFIXES = {"/jax/_src/numpy/": "jnp.", "/jax/_src/nn/": "jax.nn.",
                 "/jax/_src/lax/": "jax.lax.", "/jax/_src/scipy/": "jax.scipy."}


def _foreign_function() -> str:
    """The public JAX function that asked the stand-in for an array (outermost such frame)."""
    for frame in reversed(inspect.stack(0)):  # outermost first
        path = frame.filename.replace("\\", "/")
        prefix = next((p for d, p in _API_PREFIXES.items() if d in path), None)
        if prefix and not frame.function.startswith(("_", "<")):
            return f"{prefix}{frame.function}"
    return "a function that is not an ntkjax.nn layer"


def _self_covariance(x: jax.Array) -> jax.Array:
    """(N,) for (N, d); (N, *S, *S) for images (N, *S, C): ``x[a, p] . x[a, p'] / C``."""
    c = x.shape[-1]
    if x.ndim == 2:
        return jnp.sum(x * x, axis=1) / c
    flat = x.reshape(x.shape[0], -1, c)
    cov = jnp.einsum("apc,aqc->apq", flat, flat, precision=jax.lax.Precision.HIGHEST) / c
    return cov.reshape(x.shape[0], *x.shape[1:-1], *x.shape[1:-1])


def _input_stand_in(walk: _Walk, x: jax.Array) -> _StandIn:
    var = _self_covariance(x)
    c = x.shape[-1]
    phi = x * (1.0 / math.sqrt(c))
    psi = jnp.zeros((*x.shape[:-1], 0), x.dtype)
    exact = Kernel(nngp=var[:, None], ntk=jnp.zeros_like(var)[:, None], var1=var, var2=var[:1],
                   width=c, non_gaussian=NETWORK_INPUTS)  # no activation/LayerNorm on inputs
    return _StandIn(walk, exact, phi, psi)


# --------------------------------------------------------------------------- the walk


@dataclasses.dataclass(frozen=True)
class _Config:
    num_features: int
    hidden_features: int
    sketch_features: int
    hermite_degree: int
    hermite_quadrature: int
    max_truncation_error: float = 1e-2
    auto_degree: bool = False


class _Walk:
    """One pass of a module over the stand-in: draws (init) or replays (apply) the random
    parameters in the order the rules ask for them, and remembers the layers it applied."""

    def __init__(self, config: _Config, key: jax.Array | None, params: tuple | None = None) -> None:
        self.config = config
        self.key = key
        self.init = params is None
        self.params: list = [] if params is None else list(params)
        self.makers: list[Callable[[np.random.Generator], Any]] = []
        self.index = 0
        self.trail: list[str] = []
        # the relative Hermite truncation errors of the activations walked (traced scalars)
        self.truncation: list[jax.Array] = []

    def draw(self, make: Callable[[np.random.Generator], Any]) -> Any:
        """The next random parameter: when initializing, ``make(rng)`` with a numpy generator
        seeded by the bits of ``jax.random.fold_in(key, i)`` (host-side: no compilation per
        shape); when applying, the recorded one."""
        if self.init:
            assert self.key is not None
            value = make(_rng(self.key, self.index))
            self.params.append(value)
            self.makers.append(make)
        else:
            if self.index >= len(self.params):
                raise ValueError("feature map parameters do not match the module's walk.")
            value = self.params[self.index]
        self.index += 1
        return value

    def last(self) -> str:
        return self.trail[-1] if self.trail else "the input"


def _rng(key: jax.Array, index: int) -> np.random.Generator:
    """numpy's generator seeded by the bits of ``jax.random.fold_in(key, index)``."""
    with jax.ensure_compile_time_eval():
        bits = jax.random.key_data(jax.random.fold_in(key, index))
    return np.random.default_rng(np.asarray(bits, np.uint32).ravel().tolist())


@functools.partial(jax.jit, static_argnums=1)
def _fold_in_range(key: jax.Array, size: int) -> jax.Array:
    """The key data of ``jax.random.fold_in(key, i)`` for i < size."""
    return jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        key, jnp.arange(size, dtype=jnp.uint32)))


def _rngs(key: jax.Array, count: int) -> list[np.random.Generator]:
    """``[_rng(key, i) for i in range(count)]`` from one batched ``fold_in`` (the same bits;
    the count padded to a power of two, so few shapes are evaluated)."""
    size = _next_pow2(max(count, 1))
    with jax.ensure_compile_time_eval():  # concrete also under an outer trace
        bits = _fold_in_range(key, size)
    rows = np.asarray(bits, np.uint32).reshape(size, -1)[:count]
    return [np.random.default_rng(row.tolist()) for row in rows]



# --------------------------------------------------------------------------- random sketches


def _next_pow2(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _hadamard(x: jax.Array) -> jax.Array:
    """Unnormalized Walsh-Hadamard transform of the last axis (length 2^L), as a Kronecker
    product of small Sylvester matrices (one dense matmul per factor of at most 64)."""
    n = x.shape[-1]
    levels = n.bit_length() - 1
    chunks = max(1, math.ceil(levels / 6))
    base, extra = divmod(levels, chunks)
    sizes = [1 << (base + (i < extra)) for i in range(chunks)]
    lead = x.shape[:-1]
    y = x.reshape(-1, *sizes)
    letters = "bcdefgh"[: len(sizes)]
    for i, s in enumerate(sizes):
        if s == 1:
            continue
        h = jnp.asarray(_sylvester(s), x.dtype)
        out = letters[:i] + "z" + letters[i + 1 :]
        y = jnp.einsum(f"a{letters},{letters[i]}z->a{out}", y, h)
    return y.reshape(*lead, n)


def _fold(a: jax.Array, signs: jax.Array) -> jax.Array:
    """``sum_r D_r a_r``: ``a`` cut into blocks of ``signs.shape[1]`` coordinates (the last one
    zero-padded), each multiplied by its row of random signs, summed. ``E[fold(a) . fold(a')] =
    a . a'`` (random signs make cross-block terms vanish in expectation)."""
    blocks, n = signs.shape
    d = a.shape[-1]
    out = None
    for r in range(blocks):  # contiguous slices: a few fused elementwise passes
        part = a[..., r * n : min((r + 1) * n, d)]
        if part.shape[-1] < n:
            part = jnp.pad(part, [(0, 0)] * (a.ndim - 1) + [(0, n - part.shape[-1])])
        term = part * signs[r]
        out = term if out is None else out + term
    assert out is not None
    return out


def _signs(rng: np.random.Generator, blocks: int, n: int, dtype) -> np.ndarray:
    return rng.choice(np.asarray([-1.0, 1.0], np.dtype(dtype)), size=(blocks, n))


def _srht_params(rng: np.random.Generator, d: int, m: int,
                 dtype) -> tuple[np.ndarray, np.ndarray]:
    """Signs (blocks, n) and m coordinates of [0, n): n = 2^ceil(log2 min(d, m)), inputs
    folded into n coordinates when wider; coordinates balanced (each used ceil or floor m/n
    times, in independent random orders)."""
    n = _next_pow2(min(d, m))
    reps = -(-m // n)
    # reps independent permutations of [0, n), drawn row by row (the same numbers as reps calls
    # of rng.permutation(n), without a Python loop: n can be 4 and reps 1024)
    idx = rng.permuted(np.tile(np.arange(n), (reps, 1)), axis=1).ravel()[:m].astype(np.int32)
    return _signs(rng, -(-d // n), n, dtype), idx


def _srht_apply(a: jax.Array, signs: jax.Array, idx: jax.Array) -> jax.Array:
    """``(H fold(a))[idx]``, H the Walsh-Hadamard matrix: every coordinate is a +-1
    combination of all of ``a`` with random signs, so ``E[u_i u'_i] = a . a'`` for each i."""
    return jnp.take(_hadamard(_fold(a, signs)), idx, axis=-1)


def _compress(walk: _Walk, a: jax.Array, m: int) -> jax.Array:
    """``a`` (d > m coordinates) to m: a random permutation, then a signed fold into m
    buckets (a count sketch with balanced buckets; Charikar et al. 2002, Weinberger et al.
    2009): ``E[S a . S a'] = a . a'``, and only coordinates sharing a bucket add error -- for
    d = m + 1 a single pair. The identity when d <= m."""
    d = a.shape[-1]
    if d <= m:
        return a
    dtype = a.dtype
    perm, signs = walk.draw(lambda rng: (rng.permutation(d).astype(np.int32),
                                         _signs(rng, -(-d // m), m, dtype)))
    return _fold(jnp.take(a, perm, axis=-1), signs)


def _tensor_sketch(walk: _Walk, a: jax.Array, b: jax.Array, m: int) -> jax.Array:
    """TensorSRHT of ``a (x) b`` to m coordinates (Ahle et al. 2020): ``u_I * v_J / sqrt(m)``
    with independent SRHTs u of a and v of b; ``E[S . S'] = (a . a')(b . b')``. Empty (zero
    coordinates) when ``a`` or ``b`` is, i.e. when the product kernel is identically zero."""
    if a.shape[-1] == 0 or b.shape[-1] == 0:
        return jnp.zeros((*a.shape[:-1], 0), a.dtype)
    da, db, dtype = a.shape[-1], b.shape[-1], a.dtype
    sa, ia = walk.draw(lambda rng: _srht_params(rng, da, m, dtype))
    sb, ib = walk.draw(lambda rng: _srht_params(rng, db, m, dtype))
    return _srht_apply(a, sa, ia) * _srht_apply(b, sb, ib) * (1.0 / math.sqrt(m))


def _position_hashes(rng: np.random.Generator, positions: int, d: int, m: int,
                     dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per position, a bucket in [0, m) and a random sign for each of d coordinates, the
    buckets balanced (a random permutation of ceil(d / m) copies of [0, m), cut to d): (P, d)
    int32 and (P, d) signs, independent between positions."""
    copies = -(-d // m)
    # one permutation per position, row by row (as rng.permutation per position)
    buckets = rng.permuted(np.tile(np.arange(copies * m), (positions, 1)), axis=1)[:, :d] % m
    return buckets.astype(np.int32), _signs(rng, positions, d, dtype)


def _local_projection(walk: _Walk, a: jax.Array, m: int) -> jax.Array:
    """A count sketch of each position's features into m coordinates with hashes and signs
    drawn independently per position (Charikar et al. 2002): ``S_p a[p] . S_p' a'[p']`` has
    mean ``delta_{pp'} a[p] . a'[p]`` (independent random signs make the cross-position terms
    vanish in expectation) and variance O(|a[p]|^2 |a'[p']|^2 / m); same-position products are
    exact while d <= m (every coordinate has a bucket of its own). Memory: two (P, d) arrays."""
    d = a.shape[-1]
    if d == 0:
        return jnp.zeros((*a.shape[:-1], m), a.dtype)
    n, spatial, dtype = a.shape[0], a.shape[1:-1], a.dtype
    p = math.prod(spatial)
    buckets, signs = walk.draw(lambda rng: _position_hashes(rng, p, d, m, dtype))
    signed = a.reshape(n, p, d) * jnp.asarray(signs)
    rows = jnp.arange(p)[:, None]
    out = jnp.zeros((n, p, m), dtype).at[:, rows, jnp.asarray(buckets)].add(signed)
    return out.reshape(n, *spatial, m)


def _standard_normal(rng: np.random.Generator, d: int, m: int, dtype) -> np.ndarray:
    """A (d, m) standard normal matrix in ``dtype``, drawn in float64 (the same numbers for
    every dtype) a block of rows at a time (bounded temporary memory)."""
    out = np.empty((d, m), np.dtype(dtype))
    rows = max(1, (1 << 22) // max(m, 1))
    for start in range(0, d, rows):
        stop = min(start + rows, d)
        out[start:stop] = rng.standard_normal((stop - start, m))
    return out


def _gaussian(walk: _Walk, d: int, m: int, dtype) -> jax.Array:
    return walk.draw(lambda rng: _standard_normal(rng, d, m, dtype))


def _unit(phi: jax.Array) -> jax.Array:
    """``phi / |phi|`` along the last axis (0 where phi = 0)."""
    sq = jnp.sum(phi * phi, axis=-1, keepdims=True)
    positive = sq > 0
    return phi * jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, sq, 1)), 0)


# --------------------------------------------------------------------------- activation rules


def _relu_family_features(x: _StandIn, a: float, b: float):
    """Arc-cosine random features (module docstring): ``F = sqrt(q/m) act(u G)``,
    ``F_dot = act'(u G) / sqrt(m)``, ``psi' = TensorSRHT(psi (x) F_dot)``."""
    if a == b:  # a linear activation: exact
        return abs(a) * x.phi, abs(a) * x.psi
    walk = x.walk
    cfg = walk.config
    m = cfg.hidden_features
    q = x.exact.position_variances()[0]
    u = _unit(x.phi)
    g = _gaussian(walk, u.shape[-1], m, u.dtype)
    z = jnp.matmul(u, g)
    act = a * jnp.minimum(z, 0) + b * jnp.maximum(z, 0)
    f = act * (jnp.sqrt(jnp.maximum(q, 0) / m)[..., None])
    f_dot = jnp.where(z > 0, b, a).astype(z.dtype) * (1.0 / math.sqrt(m))
    return f, _tensor_sketch(walk, x.psi, f_dot, cfg.sketch_features)


def _hermite_basis(num_quadrature: int, degree: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Probabilists' Gauss-Hermite nodes folded into ``W[j, k] = w_j h_k(z_j)`` and the nodes
    z_j, with ``h_k = He_k / sqrt(k!)`` orthonormal under N(0, 1)."""
    z, w = np.polynomial.hermite.hermgauss(num_quadrature)
    z, w = z * np.sqrt(2.0), w / np.sqrt(np.pi)
    h = np.zeros((num_quadrature, degree + 1))
    h[:, 0] = 1.0
    if degree >= 1:
        h[:, 1] = z
    for k in range(1, degree):
        h[:, k + 1] = (z * h[:, k] - np.sqrt(k) * h[:, k - 1]) / np.sqrt(k + 1)
    return jnp.asarray(z, dtype), jnp.asarray(w[:, None] * h, dtype)


def _hermite_coefficients(fn: Callable[[jax.Array], jax.Array], q: jax.Array, degree: int,
                          num_quadrature: int) -> tuple[jax.Array, jax.Array]:
    """``a_k(q) = E[fn(sqrt(q) z) h_k(z)]`` and ``b_k(q) = E[fn'(sqrt(q) z) h_k(z)]``, shape
    (*q.shape, degree + 1), by Gauss-Hermite quadrature (fn' by forward-mode autodiff)."""
    a, b, _, _ = _hermite_moments(fn, q, degree, num_quadrature)
    return a, b


def _hermite_moments(
    fn: Callable[[jax.Array], jax.Array], q: jax.Array, degree: int, num_quadrature: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The Hermite coefficients ``a``, ``b`` (:func:`_hermite_coefficients`) and the second
    moments ``E[fn(sqrt(q) z)^2]``, ``E[fn'(sqrt(q) z)^2]``, from one evaluation of fn and fn'
    at the quadrature nodes."""
    z, wh = _hermite_basis(num_quadrature, degree, q.dtype)
    s = jnp.sqrt(jnp.maximum(q, 0))[..., None] * z
    values, derivs = jax.jvp(fn, (s,), (jnp.ones_like(s),))
    w = wh[:, 0]  # h_0 = 1: the quadrature weights
    return (jnp.matmul(values, wh), jnp.matmul(derivs, wh), jnp.matmul(values * values, w),
            jnp.matmul(derivs * derivs, w))


def _quadrature_nodes(config: _Config) -> int:
    """Gauss-Hermite nodes: at least 4 per degree of the highest expansion computed (the
    truncation errors are computed up to degree 64: :func:`_hermite_features`)."""
    return max(config.hermite_quadrature, 4 * max(config.hermite_degree, _AUTO_DEGREES[-1]))


def _degree_ladder(config: _Config) -> tuple[int, ...]:
    """The degrees whose truncation errors a walk reports: its own, then the automatic ones."""
    return (config.hermite_degree, *_AUTO_DEGREES)


def _sketched_powers(walk: _Walk, t: jax.Array, u: jax.Array, count: int,
                     m: int) -> jax.Array | None:
    """``count`` further TensorSRHT powers ``T_{k+1} = S_k(T_k (x) u)`` of ``t`` (m coordinates),
    stacked on a leading axis; None when ``count`` is 0 or ``u`` is empty. The parameters are
    drawn as ``count`` calls of :func:`_tensor_sketch` would draw them (the same numbers), and
    the chain is one ``lax.scan``: its compilation does not grow with the degree (a degree-64
    expansion unrolled took seconds to compile)."""
    if count <= 0 or u.shape[-1] == 0 or t.shape[-1] == 0:
        return None
    dt, du, dtype = t.shape[-1], u.shape[-1], t.dtype
    draws = [(walk.draw(lambda rng: _srht_params(rng, dt, m, dtype)),
              walk.draw(lambda rng: _srht_params(rng, du, m, dtype))) for _ in range(count)]
    stacked = tuple(jnp.stack([jnp.asarray(d[i][j]) for d in draws])
                    for i in range(2) for j in range(2))

    def step(t, p):
        sa, ia, sb, ib = p
        t = _srht_apply(t, sa, ia) * _srht_apply(u, sb, ib) * (1.0 / math.sqrt(m))
        return t, t

    return jax.lax.scan(step, t, stacked)[1]


def _weighted_powers(c: jax.Array, powers: jax.Array | None) -> jax.Array:
    """``[c_0 P_0, c_1 P_1, ...]`` concatenated along the last axis: ``c`` (..., K) coefficients,
    ``powers`` (K, ..., m) stacked (empty when None)."""
    if powers is None:
        return jnp.zeros((*c.shape[:-1], 0), c.dtype)
    weighted = c[..., None] * jnp.moveaxis(powers, 0, -2)
    return weighted.reshape(*weighted.shape[:-2], -1)


def _hermite_features(x: _StandIn, fn: Callable[[jax.Array], jax.Array]):
    """Truncated Hermite expansion (module docstring; Han et al. 2022)."""
    walk = x.walk
    cfg = walk.config
    m, degree = cfg.hidden_features, cfg.hermite_degree
    q = x.exact.position_variances()[0]
    top = max(degree, _AUTO_DEGREES[-1])
    a, b, second, second_dot = _hermite_moments(fn, q, top, _quadrature_nodes(cfg))
    # relative truncation errors at each degree of the ladder (Parseval: the tail is the
    # second moment less the kept coefficients' squares), from the one quadrature
    tiny = jnp.finfo(q.dtype).tiny
    kept, kept_dot = jnp.cumsum(a * a, -1), jnp.cumsum(b * b, -1)
    walk.truncation.append(jnp.stack([jnp.maximum(
        jnp.max(jnp.maximum(second - kept[..., k], 0) / jnp.maximum(second, tiny)),
        jnp.max(jnp.maximum(second_dot - kept_dot[..., k], 0) / jnp.maximum(second_dot, tiny)))
        for k in _degree_ladder(cfg)]))
    a, b = a[..., : degree + 1], b[..., : degree + 1]
    u = _unit(x.phi)
    powers = [jnp.ones((*u.shape[:-1], 1), u.dtype), u]
    if degree >= 2:
        powers.append(_tensor_sketch(walk, u, u, m))
    high = _sketched_powers(walk, powers[-1], u, degree - 2, m)  # degrees 3 .. K, stacked
    f = _concat([a[..., k : k + 1] * powers[k] for k in range(len(powers))] + [
        _weighted_powers(a[..., len(powers):], high)])
    f_dot = _concat([b[..., k : k + 1] * powers[k] for k in range(len(powers))] + [
        _weighted_powers(b[..., len(powers):], high)])
    # the exact coordinates of degrees 0 and 1 keep buckets of their own: hashed with the
    # rest they are a few heavy coordinates whose rare collisions (probability ~ 1/m) err by
    # a fixed amount -- a heavy-tailed error, 10x the typical one for a nearly linear
    # activation (sigmoid_like, measured); only the sketched degrees share buckets
    exact = 1 + u.shape[-1]
    if f.shape[-1] > m > exact:
        f = jnp.concatenate([f[..., :exact], _compress(walk, f[..., exact:], m - exact)], -1)
    else:
        f = _compress(walk, f, m)
    return f, _tensor_sketch(walk, x.psi, f_dot, cfg.sketch_features)


#: The random-feature rule of each declared layer, by its public name -- derived from the
#: layers' declarations (:func:`ntkjax.nn.declaration_of`; a live table that layers declared
#: later join), never listed here: a layer gets its rule by its own declaration, beside its
#: finite code.
FEATURE_RULES: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = feature_rules()


# --------------------------------------------------------------------------- the walk of a module


def _reject_foreign_modules(next_fun, args, kwargs, context):
    """Flax interceptor: a flax built-in layer (not a container) that receives the stand-in
    raises UnsupportedMeaning; ntkjax.nn layers dispatch on the stand-in themselves, user
    modules and containers are walked through."""
    module = context.module
    cls = type(module)
    if (cls.__module__.startswith("flax.") and not isinstance(module, linen.Sequential)
            and any(isinstance(a, _StandIn) for a in (*args, *kwargs.values()))):
        decl = declaration_of(cls)
        name = f"{cls.__module__}.{cls.__qualname__} (module {module.name!r})"
        instead = (decl.instead.get("features", "") if decl else "") or (
            "use the ntkjax.nn layers (ntkjax.nn.Dense, ntkjax.nn.Conv, ...).")
        raise UnsupportedMeaning(name, "features", instead)
    return next_fun(*args, **kwargs)


def _walk_module(module: linen.Module, walk: _Walk, x: jax.Array,
                 per_input: dict[str, Any] | None = None) -> Features:
    stand_in = _input_stand_in(walk, x)
    with linen.intercept_methods(_reject_foreign_modules):
        try:
            out = module.apply({}, stand_in, **(per_input or {}))
        except TypeError as err:
            if _StandIn.__name__ not in str(err):
                raise
            raise UnsupportedMeaning(
                f"a function applied after {walk.last()}", "features",
                f"it received feature_map's stand-in ({err}); use ntkjax.nn layers, wrap other "
                "elementwise functions in ntkjax.nn.elementwise.") from err
    if not isinstance(out, _StandIn):
        raise ValueError(
            f"{type(module).__name__} returned {type(out).__name__} for the feature stand-in; "
            "feature_map needs a module whose output is a single array built from ntkjax.nn "
            "layers."
        )
    if out.spatial_ndim:
        raise ValueError(
            "feature_map needs a module whose output has no spatial axes; this one's output has "
            f"spatial shape {out.spatial_shape}. End the network with ntkjax.nn.flatten or "
            "ntkjax.nn.global_average_pool and a Dense readout."
        )
    d = walk.config.num_features
    return Features(nngp=_fit(walk, out.phi, d), ntk=_fit(walk, out.psi, d))


def _fit(walk: _Walk, a: jax.Array, d: int) -> jax.Array:
    """Exactly d columns: compressed (SRHT) when wider, zero-padded when narrower."""
    a = _compress(walk, a, d)
    return jnp.pad(a, [(0, 0), (0, d - a.shape[-1])])



# --------------------------------------------------------------------------- public API


# What each (module, config, example shape, dtype) draws, in order: walking once is enough.
_PLANS: dict[tuple, tuple[Callable[[np.random.Generator], Any], ...]] = {}


class _ByIdentity:
    """A module with unhashable fields (e.g. a list of widths), hashed by identity."""

    def __init__(self, module: linen.Module) -> None:
        self.module = module

    def __hash__(self) -> int:
        return id(self.module)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.module is self.module


def _static_module(module: linen.Module) -> Any:
    """``module`` as a cache key / static jit argument: by value when hashable."""
    try:
        hash(module)
    except TypeError:
        return _ByIdentity(module)
    return module


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_features(
    static: Any, config: _Config, params: tuple, x: jax.Array, per_input: dict[str, Any]
) -> tuple[Features, jax.Array]:
    """The features and the largest relative Hermite truncation error of the walk's activations
    at each degree of :func:`_degree_ladder` (zeros when no activation is expanded)."""
    module = static.module if isinstance(static, _ByIdentity) else static
    walk = _Walk(config, None, params)
    features = _walk_module(module, walk, x, per_input)
    ladder = len(_degree_ladder(config))
    worst = (jnp.max(jnp.stack(walk.truncation), axis=0) if walk.truncation
             else jnp.zeros((ladder,), x.dtype))
    return features, worst


# Degrees tried, in order, by feature_map(hermite_degree=None) until the truncation error of
# every expanded activation is within max_truncation_error.
_AUTO_DEGREES = (8, 16, 32, 64)


def _truncation_exceeded(worst: jax.Array, config: _Config) -> float | None:
    """The largest relative Hermite truncation error when it exceeds ``max_truncation_error``
    (a concrete check; under an outer jit the value is not known: None)."""
    if not is_concrete(worst):
        return None
    value = float(worst[0])
    return value if value > config.max_truncation_error else None


def _truncation_refusal(value: float, config: _Config) -> UnsupportedMeaning:
    raise_it = ("the automatic degree stops at" if config.auto_degree
                else "raise hermite_degree (or leave it None to raise it automatically up to")
    return UnsupportedMeaning(
        f"an activation's degree-{config.hermite_degree} Hermite expansion", "features",
        f"its truncation leaves a relative error of up to {value:.3g} in the activation's "
        f"kernel maps at these inputs (max_truncation_error={config.max_truncation_error}), "
        f"a bias that more features do not remove: {raise_it} {_AUTO_DEGREES[-1]}"
        f"{'' if config.auto_degree else ')'}; see ntkjax.features.hermite_truncation_error, "
        "or use kernel_fn for the exact kernel.")


class FeatureMap:
    """A random feature map of a module's NNGP and NTK (built by :func:`feature_map`).

    ``fmap(x)`` maps a batch ``x`` (N, d) or images (N, *S, C) to :class:`Features` with
    ``nngp`` and ``ntk`` of shape (N, num_features). The random parameters are drawn once per
    per-example shape and dtype (:meth:`init`) and reused, so every batch gets the same map;
    :meth:`apply` is the jitted map with explicit parameters. Rows are independent: the map is
    vmappable and batch sizes can differ between calls.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> mlp = ntkjax.models.MLP((512, 1), "relu", w_std=2**0.5)
    >>> fmap = feature_map(mlp, key=jax.random.key(0), num_features=256)
    >>> fmap.num_features, fmap(jnp.ones((3, 4))).ntk.shape
    (256, (3, 256))
    """

    def __init__(self, module: linen.Module, key: jax.Array, config: _Config) -> None:
        self.module = module
        self.key = key
        self.config = config
        self._static = _static_module(module)
        self._params: dict[tuple, tuple] = {}
        # per (example shape, dtype): the configuration, its Hermite degree chosen by the
        # first call when automatic (then fixed: every batch gets the same map)
        self._configs: dict[tuple, _Config] = {}

    @staticmethod
    def _shape_key(example_shape: tuple[int, ...], dtype: Any,
                   per_input: dict[str, Any] | None = None) -> tuple:
        extra = tuple(sorted((name, tuple(jnp.shape(v)[1:]), jnp.result_type(v).name)
                             for name, v in (per_input or {}).items()))
        return (tuple(example_shape), jnp.dtype(dtype).name, extra)

    @staticmethod
    def _check_per_input(x: Any, per_input: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in per_input.items():
            value = jnp.asarray(value)
            if value.ndim == 0 or value.shape[0] != jnp.shape(x)[0]:
                raise ValueError(
                    f"feature_map: the per-input argument {name!r} needs one row per input "
                    f"(leading axis {jnp.shape(x)[0]}, as x of shape {tuple(jnp.shape(x))}); "
                    f"got shape {tuple(value.shape)}.")
            out[name] = value
        return out

    def _config_for(self, shape_key: tuple) -> _Config:
        return self._configs.get(shape_key, self.config)

    def apply(self, params: tuple, x: jax.Array, **per_input: Any) -> Features:
        """The jitted map with explicit parameters (from :meth:`init`); one compilation is
        shared by every FeatureMap of an equal module and configuration. Refuses (concrete
        inputs) features whose Hermite truncation error exceeds ``max_truncation_error``.
        ``per_input``: the module's per-input call arguments (as when calling the map)."""
        per_input = self._check_per_input(x, per_input)
        config = self._config_for(self._shape_key(x.shape[1:], x.dtype, per_input))
        features, worst = _apply_features(self._static, config, params, x, per_input)
        value = _truncation_exceeded(worst, config)
        if value is not None:
            raise _truncation_refusal(value, config)
        return features

    @property
    def num_features(self) -> int:
        """D: the number of columns of both feature matrices."""
        return self.config.num_features

    def init(self, example_shape: tuple[int, ...], dtype: Any = None,
             **per_input: Any) -> tuple:
        """The random parameters for inputs of per-example shape ``example_shape`` (a tuple of
        concrete arrays, drawn by walking the module on an abstract batch of one). With an
        automatic Hermite degree not yet chosen by a call on such inputs: those of degree 8.
        ``per_input``: the module's per-input call arguments for a batch (only their
        per-example shapes and dtypes are read)."""
        dtype = jnp.dtype(dtype if dtype is not None else float_dtype())
        shape_key = self._shape_key(example_shape, dtype, per_input)
        return self._init(self._config_for(shape_key), shape_key)

    def _init(self, config: _Config, shape_key: tuple) -> tuple:
        example_shape, dtype = shape_key[0], jnp.dtype(shape_key[1])
        cache_key = (config, *shape_key)
        if cache_key not in self._params:
            plan_key = (self._static, *cache_key)
            makers = _PLANS.get(plan_key)
            if makers is None:  # walk the module once (abstractly) to find what to draw
                walk = _Walk(config, self.key)
                spec = jax.ShapeDtypeStruct((1, *example_shape), dtype)
                extra = {name: jax.ShapeDtypeStruct((1, *shape), jnp.dtype(kind))
                         for name, shape, kind in shape_key[2]}
                jax.eval_shape(lambda a, e: _walk_module(self.module, walk, a, e), spec, extra)
                _PLANS[plan_key] = tuple(walk.makers)
                params = tuple(walk.params)
            else:
                params = tuple(make(rng) for make, rng in
                               zip(makers, _rngs(self.key, len(makers)), strict=True))
            self._params[cache_key] = params
        return self._params[cache_key]

    def __call__(self, x: jax.Array, **per_input: Any) -> Features:
        """The features of the batch ``x``. ``per_input``: keyword arrays with one row per
        input that the module's ``__call__`` takes beside ``x`` (e.g. the graphs' adjacency
        ``pattern=A`` of :class:`ntkjax.models.GNN`: ``fmap(x, pattern=A)``)."""
        check_batched(x, "x")
        x = jnp.asarray(x)
        x = x.astype(float_dtype(x))
        per_input = self._check_per_input(x, per_input)
        shape_key = self._shape_key(x.shape[1:], x.dtype, per_input)
        if not self.config.auto_degree or shape_key in self._configs:
            return self.apply(self._init(self._config_for(shape_key), shape_key), x,
                              **per_input)
        # automatic degree: the lowest of _AUTO_DEGREES whose truncation error at this
        # batch's variances is within the tolerance (the walk reports them all), kept for
        # every later batch
        config = self.config
        features, worst = _apply_features(self._static, config,
                                          self._init(config, shape_key), x, per_input)
        if not is_concrete(worst):  # under an outer trace: not checked
            return features
        errors = dict(zip(_degree_ladder(config), np.asarray(worst).tolist(), strict=True))
        good = [k for k in _AUTO_DEGREES if errors[k] <= config.max_truncation_error]
        if not good:
            top = _AUTO_DEGREES[-1]
            raise _truncation_refusal(errors[top], dataclasses.replace(config, hermite_degree=top))
        if good[0] != config.hermite_degree:
            config = dataclasses.replace(config, hermite_degree=good[0])
            features, worst = _apply_features(self._static, config,
                                              self._init(config, shape_key), x, per_input)
        self._configs[shape_key] = config
        return features


def feature_map(
    module: linen.Module,
    *,
    key: jax.Array,
    num_features: int,
    hidden_features: int | None = None,
    sketch_features: int | None = None,
    hermite_degree: int | None = None,
    hermite_quadrature: int = 64,
    max_truncation_error: float = 1e-2,
) -> FeatureMap:
    """Random features of ``module``'s NNGP and NTK: ``feature_map(...)(x) -> Features``.

    ``module`` is any ``flax.linen`` module that :func:`ntkjax.kernel_fn` accepts, built from
    the layers with feature rules (module docstring; the layer table of the developer guide):
    Dense, Conv and ConvLocal in either parameterization, Aggregate (graphs; the pattern is
    passed per input, ``fmap(x, pattern=A)``), the ReLU family in closed form (arc-cosine
    random features, Zandieh et al. 2021), any other activation by its Hermite expansion
    truncated at ``hermite_degree`` (Han et al. 2022; truncation error:
    :func:`hermite_truncation_error`), residual sums, concatenations and products of branches,
    LayerNorm, the poolings and readouts. ``features.nngp @ features.nngp.T`` estimates
    ``kernel_fn(module)(x).nngp`` and ``features.ntk @ features.ntk.T`` its ``.ntk``, the kernels
    of one output (see :func:`ntkjax.kernel_fn`).

    Args:
      module: the network.
      key: PRNG key of every random projection and sketch.
      num_features: D, the columns of each output feature matrix.
      hidden_features: random features per activation and per position of a ConvLocal layer
        (m; default D). Memory: m x (width of the layer's input features) floats for each
        ReLU-family layer.
      sketch_features: coordinates of each NTK tensor sketch (default D).
      hermite_degree: K, the degree of the Hermite expansion of non-ReLU activations (>= 1);
        None (default): chosen by the first call on inputs of each shape -- the lowest of 8,
        16, 32, 64 whose truncation error at that batch's variances is within
        ``max_truncation_error`` -- and kept for every later batch (one map for all batches).
      hermite_quadrature: Gauss-Hermite nodes for the Hermite coefficients (at least 2K are
        used; exact for polynomial activations of degree < 2 * nodes - K).
      max_truncation_error: the largest relative truncation error of an activation's kernel
        maps that the features may carry, ``tail(q) / E[act(sqrt(q) z)^2]`` (and likewise for
        act') at the inputs' variances (:func:`hermite_truncation_error`): a bias that more
        features do not remove. Beyond it (at degree 64 when automatic), a call with concrete
        inputs raises UnsupportedMeaning naming the degree (e.g. ``sign``, whose coefficients
        decay too slowly: 0.035 at K = 64). (This bounds the worst case, correlation 1, of
        one activation's maps; the kernel's own bias is smaller.) Under an outer ``jax.jit``
        of :meth:`FeatureMap.apply` it is not checked.

    Cost: O(N m (d_in + log m)) per layer, linear in N. The error of the kernel estimates falls
    like D^(-1/2) (with m = D); networks with one random layer are unbiased. The exact rules
    involve no matrix products; the random projections use the default matmul precision (TF32
    on recent GPUs, relative errors ~1e-3, far below the Monte Carlo error).

    Returns:
      A :class:`FeatureMap`: ``fmap(x)`` gives the :class:`Features` of a batch.

    >>> import jax, jax.numpy as jnp, ntkjax
    >>> mlp = ntkjax.models.MLP((512, 1), "relu", w_std=2**0.5)
    >>> fmap = feature_map(mlp, key=jax.random.key(0), num_features=256)
    >>> f = fmap(jnp.ones((3, 4)))
    >>> f.nngp.shape, f.ntk.shape
    ((3, 256), (3, 256))

    Raises:
      UnsupportedMeaning: (a ValueError) for a layer without a feature rule, naming it.
      ValueError: for a module whose output keeps spatial axes, and bad sizes.
    """
    sizes = {"num_features": num_features, "hidden_features": hidden_features,
             "sketch_features": sketch_features, "hermite_degree": hermite_degree,
             "hermite_quadrature": hermite_quadrature}
    for name, value in sizes.items():
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(module, linen.Module):
        raise ValueError(f"feature_map needs a flax.linen module, got {type(module).__name__}.")
    d = int(num_features)
    config = _Config(
        num_features=d,
        hidden_features=int(hidden_features or d),
        sketch_features=int(sketch_features or d),
        hermite_degree=_AUTO_DEGREES[0] if hermite_degree is None else int(hermite_degree),
        hermite_quadrature=int(hermite_quadrature),
        max_truncation_error=_positive_float(max_truncation_error, "max_truncation_error"),
        auto_degree=hermite_degree is None,
    )
    return FeatureMap(module, key, config)


def _positive_float(value: Any, name: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return v


def hermite_truncation_error(
    activation: Activation | Callable[[jax.Array], jax.Array],
    variance: jax.Array,
    *,
    degree: int = 8,
    num_quadrature: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Bounds on the truncation error of the degree-K Hermite expansion used by
    :func:`feature_map` for an activation at pre-activation variance q:

    ``|sigma - sigma_K| <= tail(q1)^(1/2) tail(q2)^(1/2)`` with
    ``tail(q) = E[act(sqrt(q) z)^2] - sum_{k <= K} a_k(q)^2`` (and likewise for sigma_dot with
    act'), by Mehler's formula and Cauchy-Schwarz over ``|c| <= 1`` (Han et al. 2022). Returns
    ``(tail_nngp(q), tail_ntk(q))``: at equal variances, the largest possible error of the NNGP
    map and of sigma_dot. Expectations by Gauss-Hermite quadrature.

    Args:
      activation: an :class:`ntkjax.nn.Activation` or an elementwise function.
      variance: the pre-activation variance q (an array; the bounds are elementwise).
      degree: K, the truncation degree.
      num_quadrature: Gauss-Hermite nodes for the expectations.

    Returns:
      ``(tail_nngp(q), tail_ntk(q))``, arrays of the shape of ``variance``.

    Values at the default degree 8 (``tail_nngp / tail_ntk``; 128 nodes), growing with q --
    saturating activations of large variance need a higher degree:

    ========  ===============  ===============  ===============
    act       q = 0.5          q = 1            q = 2
    ========  ===============  ===============  ===============
    erf       4.6e-05/2.0e-04  7.6e-04/3.1e-03  5.1e-03/1.7e-02
    tanh      4.0e-05/2.4e-04  4.8e-04/2.2e-03  3.0e-03/9.9e-03
    GELU      6.7e-07/1.4e-05  3.6e-05/3.8e-04  6.5e-04/3.6e-03
    sin       3.3e-09/1.6e-10  1.0e-06/1.0e-07  2.0e-04/3.9e-05
    softplus  3.7e-10/7.6e-09  3.9e-08/4.0e-07  1.9e-06/1.0e-05
    ========  ===============  ===============  ===============

    (erf at degree 16: 1.2e-05/9.2e-05 at q = 1.) Kinks converge slowly (ReLU is handled in
    closed form instead); a polynomial activation of degree <= K is exact.

    >>> import jax.numpy as jnp
    >>> from ntkjax import nn
    >>> t_nngp, t_ntk = hermite_truncation_error(nn.erf, jnp.asarray(1.0))
    >>> bool(t_nngp < 1e-3)
    True
    """
    fn = activation.fn if isinstance(activation, Activation) else activation
    if int(degree) != degree or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}.")
    q = jnp.asarray(variance)
    q = q.astype(float_dtype(q))
    a, b, second, second_dot = _hermite_moments(fn, q, int(degree), int(num_quadrature))
    return (jnp.maximum(second - jnp.sum(a * a, -1), 0),
            jnp.maximum(second_dot - jnp.sum(b * b, -1), 0))


# --------------------------------------------------------------------------- ridge regression


@dataclasses.dataclass(frozen=True)
class FeatureRidge:
    """Ridge regression on random features (from :func:`feature_ridge`).

    Attributes:
      weights: (D, O) -- or (D,) for 1-D targets -- the solution of
        ``(Phi^T Phi + ridge I) w = Phi^T y``.
      ridge: the ridge lambda used (``diag_reg`` times the mean of ``|phi(x_i)|^2``).
      num_train: n.
      get: ``"ntk"`` or ``"nngp"``, the features regressed on.
      feature_fn: the feature map.
      batch_size: the rows per compiled step.

    >>> import jax, ntkjax
    >>> fmap = feature_map(ntkjax.models.MLP((64, 1)), key=jax.random.key(0), num_features=64)
    >>> x = jax.random.normal(jax.random.key(1), (100, 3))
    >>> fit = feature_ridge(fmap, x, x[:, :1], diag_reg=1e-3)
    >>> fit.num_train, fit.get, fit.predict(x[:2]).shape
    (100, 'ntk', (2, 1))
    """

    weights: jax.Array
    ridge: float
    num_train: int
    get: Get
    feature_fn: Callable[[jax.Array], Features]
    batch_size: int

    def predict(self, x: Any, *, batch_size: int | None = None) -> jax.Array:
        """``phi(x) @ weights``, streamed over ``x`` in batches (default: the fit's batch size;
        the last one padded, so one compiled step serves every batch):
        ``K(x, X) (K(X, X) + ridge I)^{-1} y`` with ``K = Phi Phi^T``."""
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        check_batched(x, "x")
        return _predict(self.feature_fn, self.get, self.weights, x, int(batch_size))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict_step(feature_fn: Callable, get: str, w: jax.Array, xb: jax.Array) -> jax.Array:
    return jnp.matmul(getattr(feature_fn(xb), get), w, precision=jax.lax.Precision.HIGHEST)


def _predict(feature_fn: Callable, get: str, w: jax.Array, x: Any, batch_size: int) -> jax.Array:
    n = int(np.shape(x)[0])
    batch_size = min(batch_size, n)
    dtype = w.dtype
    out = []
    for start in range(0, n, batch_size):
        xb, count = _padded(x, start, batch_size)
        out.append(_predict_step(feature_fn, get, w, jnp.asarray(xb, dtype))[:count])
    return jnp.concatenate(out, axis=0)


def _padded(a: Any, start: int, size: int) -> tuple[np.ndarray, int]:
    """Rows ``start : start + size`` of ``a`` as a host array, zero-padded to ``size`` rows."""
    block = np.asarray(a[start : start + size])
    return pad_rows(block, size, mode="zeros"), block.shape[0]


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _solve_psd(a: np.ndarray, ridge: float, rhs: np.ndarray) -> np.ndarray:
    """``(a + ridge I)^{-1} rhs`` in float64: Cholesky, or the minimum-norm least-squares
    solution when ``a + ridge I`` is singular (e.g. ``ridge = 0`` with fewer points than
    features)."""
    import scipy.linalg  # a dependency of jax

    reg = a + ridge * np.eye(a.shape[0])
    if ridge > 0:
        try:
            return scipy.linalg.cho_solve(scipy.linalg.cho_factor(reg), rhs)
        except np.linalg.LinAlgError:
            pass
    return np.linalg.lstsq(reg, rhs, rcond=None)[0]


def _check_feature_kernel(a: np.ndarray, dtype: Any) -> None:
    """Raises ValueError when the accumulated feature kernel is not finite (finite inputs whose
    features overflow ``dtype``, or a feature map that returns NaN)."""
    if not np.all(np.isfinite(a)):
        raise ValueError(
            f"the features of x overflowed {np.dtype(dtype).name} (or feature_fn returned NaN): "
            "their Gram matrix is not finite. Scale x down, or compute in float64 "
            "(jax.enable_x64)."
        )


def feature_ridge(
    feature_fn: Callable[[jax.Array], Features],
    x: Any,
    y: Any,
    *,
    get: Get = "ntk",
    diag_reg: float = 0.0,
    batch_size: int = 4096,
    show_progress: bool = False,
) -> FeatureRidge:
    """Kernel ridge regression on random features, streamed over the data.

    Solves ``(Phi^T Phi + lambda I) w = Phi^T y`` (``Phi`` the ``get`` features of
    :func:`feature_map`, n x D) with ``lambda = diag_reg * trace(Phi^T Phi) / n`` -- the
    ``diag_reg`` convention of :func:`ntkjax.gp_inference`, relative to the mean diagonal of
    ``K = Phi Phi^T``. Predictions ``phi(x) w = K(x, X) (K + lambda I)^{-1} y`` are kernel ridge
    regression with the approximate kernel (push-through identity), so with the NTK they
    approximate the infinitely wide network trained to convergence on the MSE loss, and with the
    NNGP the GP posterior mean.

    Streaming: for n > D, ``A = Phi^T Phi`` (D x D) and ``c = Phi^T y`` (D x O) are accumulated
    batch by batch and ``(A + lambda I) w = c`` is solved by Cholesky in float64 on the host:
    time O(n D^2 + D^3), memory O(D^2 + batch_size D) whatever n. For n <= D the features
    themselves (n x D, at most D^2 numbers) are kept and the dual system
    ``w = Phi^T (Phi Phi^T + lambda I)^{-1} y`` is solved instead (O(n^2 D), the same w).
    ``x`` and ``y`` may be host (numpy) arrays, transferred one batch at a time; every batch
    (the last padded and masked) runs one compiled step. With ``diag_reg = 0`` and a singular
    system the minimum-norm (least-squares) solution is returned. ``show_progress`` draws a
    progress bar on stderr.

    Args:
      feature_fn: the feature map, e.g. a :class:`FeatureMap` from :func:`feature_map`.
      x: training inputs ``(n, *features)`` (host or device arrays).
      y: training targets ``(n,)`` or ``(n, O)``.
      get: ``"ntk"`` or ``"nngp"``: the features regressed on.
      diag_reg: the ridge, relative to the mean diagonal of the feature kernel.
      batch_size: rows per compiled step.
      show_progress: progress bar on stderr.

    Returns:
      The fitted :class:`FeatureRidge` (``predict(x)`` gives predictions).

    >>> import jax, ntkjax
    >>> fmap = feature_map(ntkjax.models.MLP((64, 1)), key=jax.random.key(0), num_features=64)
    >>> x = jax.random.normal(jax.random.key(1), (100, 3))
    >>> fit = feature_ridge(fmap, x, x[:, :1], diag_reg=1e-3)
    >>> fit.weights.shape, fit.predict(x).shape
    ((64, 1), (100, 1))

    Raises:
      ValueError: for mismatched x and y, NaN or Inf in ``x`` or ``y`` (naming the rows), a
        bad ``get``, a negative or infinite ``diag_reg``, ``batch_size < 1``, or features that
        overflow the dtype.
    """
    check_choice(get, GETS, "get")
    _check_batch_size(batch_size)
    if not (np.isfinite(diag_reg) and diag_reg >= 0):
        raise ValueError(f"diag_reg must be finite and >= 0, got {diag_reg!r}.")
    check_batched(x, "x")
    n = int(np.shape(x)[0])
    y_shape = tuple(np.shape(y))
    if len(y_shape) not in (1, 2) or y_shape[0] != n:
        raise ValueError(
            f"y must have shape (n,) or (n, outputs) with n = {n} rows of x; got {y_shape}."
        )
    if n == 0:
        raise ValueError("feature_ridge needs at least one training point.")
    dtype = float_dtype(jnp.asarray(x[:1]))
    batch_size = min(int(batch_size), n)
    d = getattr(jax.eval_shape(feature_fn, jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), dtype)),
                get).shape[-1]
    outputs = 1 if len(y_shape) == 1 else y_shape[1]
    dual = n <= d
    hi = jax.lax.Precision.HIGHEST

    def features(xb, count):
        f = getattr(feature_fn(xb), get)
        return f * (jnp.arange(xb.shape[0]) < count).astype(f.dtype)[:, None]  # padded rows: 0

    def step(gram, proj, xb, yb, count):
        f = features(xb, count)
        return (gram + jnp.matmul(f.T, f, precision=hi),
                proj + jnp.matmul(f.T, yb, precision=hi))

    step = jax.jit(step, donate_argnums=(0, 1))
    collect = jax.jit(features)
    gram = jnp.zeros((d, d), dtype)
    proj = jnp.zeros((d, outputs), dtype)
    rows: list[jax.Array] = []
    starts = range(0, n, batch_size)
    for start in progress(starts, total=len(starts), description="feature ridge",
                          enabled=show_progress):
        xb, count = _padded(x, start, batch_size)
        check_finite(xb[:count], f"x (rows {start} to {start + count - 1})")
        if dual:
            rows.append(collect(jnp.asarray(xb, dtype), count)[:count])
        else:
            yb = np.asarray(y[start : start + batch_size]).reshape(-1, outputs)
            check_finite(yb, f"y (rows {start} to {start + count - 1})")
            yb = np.pad(yb, [(0, batch_size - count), (0, 0)])
            gram, proj = step(gram, proj, jnp.asarray(xb, dtype), jnp.asarray(yb, dtype),
                              count)
    if dual:
        targets = np.asarray(y, np.float64).reshape(n, outputs)
        check_finite(targets, "y")
        phi = jnp.concatenate(rows)
        k = np.asarray(jnp.matmul(phi, phi.T, precision=hi), np.float64)
        _check_feature_kernel(k, dtype)
        ridge = float(diag_reg) * float(np.trace(k)) / n
        alpha = jnp.asarray(_solve_psd(k, ridge, targets), dtype)
        w = jnp.matmul(phi.T, alpha, precision=hi)
    else:
        a = np.asarray(gram, np.float64)
        _check_feature_kernel(a, dtype)
        ridge = float(diag_reg) * float(np.trace(a)) / n
        w = jnp.asarray(_solve_psd(a, ridge, np.asarray(proj, np.float64)), dtype)
    if len(y_shape) == 1:
        w = w[:, 0]
    return FeatureRidge(weights=w, ridge=ridge, num_train=n, get=get, feature_fn=feature_fn,
                        batch_size=batch_size)
