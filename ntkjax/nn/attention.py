"""Multi-head self-attention and its infinite-width rule (Hron, Bahri, Sohl-Dickstein & Novak
2020, "Infinite attention: NNGP and NTK for deep attention networks"; neural-tangents'
``GlobalSelfAttention``).

On sequences ``x`` of shape (N, L, C) (any number of spatial axes; positions are flattened),
with H heads, key width ``d_k`` and value width ``d_v``, every projection a dense layer in the
NTK parameterization (standard normal weights scaled by ``1/sqrt(fan_in)``):

    q_h = w_q x W^Q_h / sqrt(C),  k_h = w_k x W^K_h / sqrt(C),  v_h = w_v x W^V_h / sqrt(C),
    A_h = mech(q_h k_h^T / d_k)         (linear_scaling=True: W^Q = W^K, tied)
    A_h = mech(q_h k_h^T / sqrt(d_k))   (linear_scaling=False: independent W^Q, W^K)
    y = w_o / sqrt(H d_v) concat_h(A_h v_h) W^O + b_std b

with ``mech`` one of ``softmax`` (over the key positions), ``identity``, ``abs``, ``relu``.
As H, d_k, d_v -> infinity:

* ``linear_scaling=True``: the logits converge to ``w_q w_k K_aa`` (the (L, L) covariance of
  example a across positions), so the attention matrix is deterministic,
  ``G_a = mech(w_q w_k K_aa)``, and with ``s = (w_o w_v)^2``

      Sigma'_ab = s G_a Sigma_ab G_b^T + b_std^2,
      Theta'_ab = s G_a (Theta_ab + 2 Sigma_ab) G_b^T + b_std^2

  (the value and output weights each add ``s G Sigma G^T``; the key/query gradients vanish);
* ``linear_scaling=False``: only ``identity`` has a closed form: with
  ``c = (w_q w_k w_o w_v)^2`` and ``<A, B> = sum_{p, p'} A[p, p'] B[p, p']``,

      Sigma'_ab = c <Sigma_ab, Sigma_ab> Sigma_ab + b_std^2,
      Theta'_ab = c (2 <Sigma_ab, Theta_ab> Sigma_ab
                     + <Sigma_ab, Sigma_ab> (Theta_ab + 4 Sigma_ab)) + b_std^2;

  the other mechanisms raise a ValueError on kernels (no known closed form).

Positional embeddings (nt's ``pos_emb_type``; Hron et al. 2020). Positions p are the
multi-indices of the spatial axes (l for sequences, (h, w) for images). The layer holds a
standard normal parameter ``z`` of shape (1, *S, c_pe) and adds ``e = w_pe_std L z`` to its
inputs (``"sum"``, c_pe = C) or appends it as c_pe more channels (``"concat"``), with
``L L^T = R`` (Cholesky) and

    R[p, p'] = decay(sum_a |p_a - p'_a| ** p_norm),   or R = identity when decay is None.

Keys and queries always see the embedded inputs; values only with ``val_pos_emb``. In the
limit every kernel the keys (and, with ``val_pos_emb``, the values) see is interpolated,

    K~ = w_in K + w_pe R,  Theta~ = w_in Theta + w_pe R  (the embedding is trained),
    "sum":    w_in = 1,                w_pe = w_pe_std^2,
    "concat": w_in = C / (C + c_pe),   w_pe = w_pe_std^2 c_pe / (C + c_pe),

C the input width (the input kernel's ``width``). Then, with ``(Kv, Thetav) = (K~, Theta~)`` if
``val_pos_emb`` else ``(K, Theta)``: ``linear_scaling=True`` uses ``G_a = mech(w_q w_k K~_aa)``
and ``Sigma' = s G_a Kv_ab G_b^T + b_std^2``, ``Theta' = s G_a (Thetav_ab + 2 Kv_ab) G_b^T +
b_std^2``; ``linear_scaling=False`` (identity): the formulas below with ``T`` all ones.

Causal attention (``causal=True``, sequences only): query i sees the keys j <= i; softmax
normalizes over them (logits of j > i at -inf), the other mechanisms zero the weights of j > i.
The limit follows Hron et al.'s derivation with the sums over keys cut at the query:

* ``linear_scaling=True``: the logits still converge to ``w_q w_k K~_aa[i, j]`` entrywise, so
  ``G_a = mech_causal(w_q w_k K~_aa)`` (zero above the diagonal; softmax renormalized over
  j <= i) and the formulas above hold with this G;
* ``linear_scaling=False``, identity: ``A_ij = q_i k_j / sqrt(d_k)`` is Gaussian with
  ``E[A_ij(a) A_kl(b)] = (w_q w_k)^2 K~_ab[i, k] K~_ab[j, l]`` (independent queries and keys),
  so with ``T`` the lower-triangular matrix of ones (all ones without the mask) and
  ``P_ab = T (K~_ab * Kv_ab) T^T`` (``P[i, k] = sum_{j <= i, l <= k} K~[j, l] Kv[j, l]``),

      Sigma'_ab = c K~_ab * P_ab + b_std^2,
      Theta'_ab = c [(T (Theta~_ab * Kv_ab + K~_ab * Thetav_ab) T^T) * K~_ab
                     + P_ab * (Theta~_ab + 4 K~_ab)] + b_std^2

  (products ``*`` entrywise: the query path gives ``Theta~ * P``, the key and value paths the
  first term, each of the four weight matrices ``K~ * P``). Without the mask these are nt's
  formulas (``<A, B>`` above is ``T (A * B) T^T`` with ``T`` all ones).


Masks (padding; neural-tangents' rule, Hron et al. 2020 appendix): masked positions take no
part as keys and values -- their softmax logits are set to the most negative number before the
softmax over keys (weight exactly 0), and their weights are set to 0 for the other mechanisms --
and the outputs at masked query positions are 0. The finite layer takes ``mask`` (boolean
(N, *S), True = masked) as a call argument; a :class:`~ntkjax.Kernel` carries its masks
(``kernel_fn(module)(x1, x2, mask1=..., mask2=...)``): in ``G_a`` the masked keys' columns are
0, and the entries of masked positions are 0 in its input and output. Positional
embeddings with masks: R is 0 on the pairs that involve a masked position (nt's rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from ntkjax._checks import check_choice, check_mask, float_dtype
from ntkjax._kernel import Kernel
from ntkjax._meanings import FeatureStandIn, declare
from ntkjax.nn.dense import Dense

__all__ = ["ATTENTION_MECHANISMS", "AttentionMechanism", "SelfAttention", "attention_kernel"]

AttentionMechanism = Literal["softmax", "identity", "abs", "relu"]
ATTENTION_MECHANISMS: tuple[AttentionMechanism, ...] = ("softmax", "identity", "abs", "relu")

_HI = jax.lax.Precision.HIGHEST


def _mechanism(name: str, logits: jax.Array) -> jax.Array:
    """The attention weights from logits ``(..., L_query, L_key)``."""
    if name == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if name == "identity":
        return logits
    if name == "abs":
        return jnp.abs(logits)
    return jnp.maximum(logits, 0)


# --- positional embeddings and the causal mask (helpers of SelfAttention) -------------------

_POS_EMB_TYPES = (None, "sum", "concat")


def _positional_covariance(
    spatial: tuple[int, ...], p_norm: float, decay_fn: Callable[[Any], Any] | None
) -> np.ndarray:
    """R (P, P) over the P = prod(spatial) flattened positions (row-major multi-indices p):
    ``R = decay_fn(d)`` with ``d(p, p') = sum_a |p_a - p'_a| ** p_norm``, or the identity when
    ``decay_fn`` is None (nt's ``_pos_emb_pdist``), in float64."""
    grid = np.indices(spatial).reshape(len(spatial), -1).T.astype(np.float64)
    if decay_fn is None:
        return np.eye(grid.shape[0])
    d = np.sum(np.abs(grid[:, None, :] - grid[None, :, :]) ** float(p_norm), axis=-1)
    with jax.ensure_compile_time_eval():  # R depends on the shape only
        r = np.asarray(decay_fn(d), dtype=np.float64)
    if r.shape != d.shape or not np.all(np.isfinite(r)):
        raise ValueError(
            f"pos_emb_decay_fn must map the ({d.shape[0]}, {d.shape[1]}) distances between "
            f"positions to finite values of the same shape; got shape {r.shape}."
        )
    return r


def _positional_weights(
    pos_emb_type: str, in_features: int, pos_emb_features: int | None, w_pos_emb_std: float
) -> tuple[float, float]:
    """(w_in, w_pe): the input and positional-embedding covariances' weights in the keys'
    inputs (``"sum"``: 1 and ``w_pos_emb_std^2``; ``"concat"``: the channel shares, times
    ``w_pos_emb_std^2`` for the embedding)."""
    w_pe = float(w_pos_emb_std) ** 2
    if pos_emb_type == "sum":
        return 1.0, w_pe
    c_pe = in_features if pos_emb_features is None else int(pos_emb_features)
    total = in_features + c_pe
    return in_features / total, w_pe * c_pe / total


def _causal_mask(length: int) -> np.ndarray:
    """The (L, L) boolean mask of allowed (query i, key j) pairs: j <= i."""
    return np.tril(np.ones((length, length), dtype=bool))


def _check_causal_shape(causal: bool, spatial: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if causal and len(spatial) != 1:
        raise ValueError(
            "SelfAttention(causal=True) needs sequences, (batch, length, channels), whose "
            f"positions are ordered; got inputs of shape {shape} with spatial shape {spatial}."
        )


def _positional_kernels(
    k: Kernel, k12: jax.Array, t12: jax.Array, v1: jax.Array, v2: jax.Array, *,
    pos_emb_type: str | None, pos_emb_p_norm: float, pos_emb_decay_fn: Callable | None,
    pos_emb_features: int | None, w_pos_emb_std: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The keys' input kernels with positional embeddings mixed in: ``w_in K + w_pe R`` for the
    NNGP, the NTK (the embedding is trained) and each input's covariance (module docstring)."""
    if pos_emb_type is None:
        return k12, t12, v1, v2
    if pos_emb_type == "sum" and pos_emb_features not in (None, k.width):
        raise ValueError(
            f"SelfAttention(pos_emb_type='sum') adds the embedding to the {k.width} input "
            f"channels; pos_emb_features={pos_emb_features} must be None or {k.width} (use "
            "pos_emb_type='concat' for another width)."
        )
    r = _positional_covariance(k.spatial_shape, pos_emb_p_norm, pos_emb_decay_fn)
    r = jnp.asarray(r, dtype=k12.dtype)
    w_in, w_pe = _positional_weights(pos_emb_type, k.width, pos_emb_features, w_pos_emb_std)

    r12 = r1 = r2 = r
    if k.mask1 is not None and k.mask2 is not None:  # R is 0 on pairs with a masked position
        n1, n2 = k12.shape[:2]
        keep1 = (~k.mask1.reshape(n1, -1)).astype(r.dtype)
        keep2 = (~k.mask2.reshape(n2, -1)).astype(r.dtype)
        r12 = r * keep1[:, None, :, None] * keep2[None, :, None, :]
        r1 = r * keep1[:, :, None] * keep1[:, None, :]
        r2 = r * keep2[:, :, None] * keep2[:, None, :]
    q1 = w_in * v1 + w_pe * r1
    return (w_in * k12 + w_pe * r12, w_in * t12 + w_pe * r12, q1,
            q1 if v2 is v1 else w_in * v2 + w_pe * r2)


# ---- masks (padding): masked keys take no part -------------------------------------------

def _key_masked_weights(name: str, logits: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """:func:`_mechanism` with the masked keys excluded: ``key_mask`` (broadcastable to the
    logits, True = masked key) sets their softmax logits to the most negative number (weight
    exactly 0; a row whose keys are all masked becomes uniform over zero values) and their
    weights to 0 for the other mechanisms (neural-tangents' rule)."""
    if key_mask is None:
        return _mechanism(name, logits)
    if name == "softmax":
        low = jnp.asarray(jnp.finfo(logits.dtype).min, logits.dtype)
        return _mechanism(name, jnp.where(key_mask, low, logits))
    return jnp.where(key_mask, jnp.zeros((), logits.dtype), _mechanism(name, logits))


def _attention_weights(name: str, logits: jax.Array, *, causal: bool,
                       key_mask: jax.Array | None) -> jax.Array:
    """The mechanism's weights over the keys each query may see: with ``causal``, keys j > i
    get weight 0 (softmax: logit -inf before normalizing over j <= i); masked keys
    (``key_mask``) get weight 0 too (:func:`_key_masked_weights`)."""
    if not causal:
        return _key_masked_weights(name, logits, key_mask)
    allowed = _causal_mask(logits.shape[-1])
    if name == "softmax":
        return _key_masked_weights(name, jnp.where(allowed, logits, -jnp.inf), key_mask)
    return jnp.where(allowed, _key_masked_weights(name, logits, key_mask), 0)


def attention_kernel(
    k: Kernel,
    out_features: int,
    *,
    linear_scaling: bool = True,
    qk_std: float = 1.0,
    ov_std: float = 1.0,
    b_std: float = 0.0,
    use_bias: bool = True,
    attention_mechanism: AttentionMechanism = "softmax",
    pos_emb_type: Literal["sum", "concat"] | None = None,
    pos_emb_p_norm: float = 2.0,
    pos_emb_decay_fn: Callable[[Any], Any] | None = None,
    pos_emb_features: int | None = None,
    w_pos_emb_std: float = 1.0,
    val_pos_emb: bool = False,
    causal: bool = False,
) -> Kernel:
    """The :class:`~ntkjax.Kernel` after :class:`SelfAttention` (module docstring), with
    ``qk_std = w_query_std * w_key_std`` and ``ov_std = w_out_std * w_value_std``; the
    positional-embedding arguments and ``causal`` are :class:`SelfAttention`'s.

    Raises:
      ValueError: for a kernel without spatial axes, ``linear_scaling=False`` with a
        mechanism other than ``"identity"``, ``causal`` on a kernel of other than sequences,
        or ``pos_emb_type="sum"`` with ``pos_emb_features`` other than the input width.
    """
    check_choice(attention_mechanism, ATTENTION_MECHANISMS, "attention_mechanism")
    check_choice(pos_emb_type, _POS_EMB_TYPES, "pos_emb_type")
    nd = k.spatial_ndim
    if nd == 0:
        raise ValueError(
            "SelfAttention needs inputs with positions, (batch, length, channels); got a kernel "
            "of feature vectors."
        )
    if not linear_scaling and attention_mechanism != "identity":
        raise ValueError(
            f"SelfAttention(linear_scaling=False, attention_mechanism={attention_mechanism!r}) "
            "has no known closed-form infinite-width kernel (Hron et al. 2020); use "
            "linear_scaling=True or attention_mechanism='identity'."
        )
    k = k.require_all_pairs("SelfAttention").masked()  # masked positions: zero entries
    spatial = k.spatial_shape
    _check_causal_shape(causal, spatial, k.shape)
    length = math.prod(spatial)
    n1, n2 = k.nngp.shape[:2]
    k12 = k.nngp.reshape(n1, n2, length, length)
    t12 = k.ntk.reshape(n1, n2, length, length)
    c1, c2 = k.self_covariances()
    v1 = c1.reshape(n1, length, length)
    v2 = v1 if k.same_inputs else c2.reshape(n2, length, length)
    # keys and queries see the positions; values only with val_pos_emb
    qk12, qt12, qv1, qv2 = _positional_kernels(
        k, k12, t12, v1, v2, pos_emb_type=pos_emb_type, pos_emb_p_norm=pos_emb_p_norm,
        pos_emb_decay_fn=pos_emb_decay_fn, pos_emb_features=pos_emb_features,
        w_pos_emb_std=w_pos_emb_std,
    )
    if val_pos_emb:
        k12, t12, v1, v2 = qk12, qt12, qv1, qv2
    bias = float(b_std) ** 2 if use_bias else 0.0
    keys1 = keys2 = None
    if k.mask1 is not None and k.mask2 is not None:
        keys1 = k.mask1.reshape(n1, 1, length)
        keys2 = keys1 if k.same_inputs else k.mask2.reshape(n2, 1, length)
    if linear_scaling:
        scale = float(ov_std) ** 2
        g1 = _attention_weights(attention_mechanism, float(qk_std) * qv1, causal=causal,
                                key_mask=keys1)
        g2 = g1 if k.same_inputs else _attention_weights(
            attention_mechanism, float(qk_std) * qv2, causal=causal, key_mask=keys2)

        def weigh(m: jax.Array) -> jax.Array:
            return scale * jnp.einsum("apq,abqr,bsr->abps", g1, m, g2, precision=_HI)

        def weigh_self(g: jax.Array, v: jax.Array) -> jax.Array:
            return scale * jnp.einsum("apq,aqr,asr->aps", g, v, g, precision=_HI) + bias

        nngp = weigh(k12) + bias
        ntk = weigh(t12 + 2 * k12) + bias
        new_v1 = weigh_self(g1, v1)
        new_v2 = new_v1 if k.same_inputs else weigh_self(g2, v2)
    else:
        scale = (float(qk_std) * float(ov_std)) ** 2
        if causal:
            tri = jnp.asarray(_causal_mask(length), dtype=k12.dtype)

            def fold(m: jax.Array) -> jax.Array:  # sum over keys j <= i, l <= i'
                return jnp.einsum("ij,...jl,kl->...ik", tri, m, tri, precision=_HI)
        else:

            def fold(m: jax.Array) -> jax.Array:  # sum over all key pairs
                return jnp.sum(m, axis=(-2, -1), keepdims=True)

        dot12 = fold(qk12 * k12)
        dot_t = fold(qt12 * k12) + fold(qk12 * t12)
        nngp = scale * dot12 * qk12 + bias
        ntk = scale * (dot_t * qk12 + dot12 * (qt12 + 4 * qk12)) + bias

        def self_map(q: jax.Array, v: jax.Array) -> jax.Array:
            return scale * fold(q * v) * q + bias

        new_v1 = self_map(qv1, v1)
        new_v2 = new_v1 if k.same_inputs else self_map(qv2, v2)
    shape2, shape1 = (n1, n2, *spatial, *spatial), (*spatial, *spatial)
    var1 = new_v1.reshape(n1, *shape1)
    out = k.replace(
        nngp=nngp.reshape(shape2),
        ntk=ntk.reshape(shape2),
        var1=var1,
        var2=var1 if k.same_inputs else new_v2.reshape(n2, *shape1),
        width=int(out_features),
        diagonal_spatial=False,
        non_gaussian="",
    )
    return out.masked()  # outputs at masked query positions are 0 (nt's remasking)


class SelfAttention(linen.Module):
    """Multi-head scaled dot-product self-attention over all positions, in the NTK
    parameterization, with its infinite-width limit (neural-tangents' ``GlobalSelfAttention``;
    Hron et al. 2020; formulas in the module docstring).

    On arrays (N, L, C) -- or (N, *S, C), positions flattened -- it returns (N, L, out_features).
    Parameters (all standard normal; nt's initialization): the dense submodules ``"key"``
    (C, H d_k), ``"query"`` (C, H d_k; only with ``linear_scaling=False``, as with
    ``linear_scaling=True`` queries and keys share weights), ``"value"`` (C, H d_v) and
    ``"out"`` (H d_v, out_features) with its bias; each is a :class:`ntkjax.nn.Dense` called
    once, which the structured empirical NTK (:mod:`ntkjax.structured`) factorizes like any
    dense layer.

    On a :class:`~ntkjax.Kernel` (with spatial axes): the exact limit :func:`attention_kernel`
    as heads, key and value widths go to infinity. ``linear_scaling=True`` (logits divided by
    ``d_k``, tied query/key weights) has closed forms for every mechanism;
    ``linear_scaling=False`` (the usual ``1/sqrt(d_k)``) only for ``"identity"`` (others raise
    a ValueError on kernels, and work on arrays). Positional embeddings (nt's ``pos_emb_type``
    ``"SUM"`` / ``"CONCAT"``) and causal attention (``causal=True``) have finite networks and
    exact kernels (module docstring); attention masks are not implemented yet.

    Attributes:
      out_features: output channels (nt's ``n_chan_out``).
      key_features: key / query width per head ``d_k`` (``n_chan_key``).
      value_features: value width per head ``d_v`` (``n_chan_val``).
      num_heads: number of heads H (``n_heads``).
      linear_scaling: logits ``q k^T / d_k`` with tied query/key weights (True), or
        ``q k^T / sqrt(d_k)`` with independent ones (False).
      w_key_std, w_query_std, w_value_std, w_out_std: the projections' weight scales (the
        kernel depends on ``w_query_std w_key_std`` and ``w_out_std w_value_std``).
      b_std: the output bias scale.
      use_bias: whether the output has a bias.
      attention_mechanism: ``"softmax"``, ``"identity"``, ``"abs"`` or ``"relu"``.
      param_dtype: dtype of the parameters; None uses the input's floating dtype.
      pos_emb_type: None (no positional embeddings), ``"sum"`` (added to the inputs) or
        ``"concat"`` (appended as channels); nt's ``"NONE"``, ``"SUM"``, ``"CONCAT"``. The
        parameter ``"pos_emb"`` (1, *S, c_pe) fixes the spatial shape at ``init``: inputs of
        another spatial shape raise a ValueError naming both.
      pos_emb_p_norm: p of the distance ``sum_a |p_a - p'_a| ** p`` between positions.
      pos_emb_decay_fn: the positional covariance ``R = decay(distance)`` (a function of an
        array, e.g. ``lambda d: jnp.exp(-d)``); None: ``R`` is the identity. The finite layer
        needs ``R`` positive definite (its Cholesky factor).
      pos_emb_features: embedding channels c_pe for ``"concat"`` (nt's ``n_chan_pos_emb``);
        None: as many as the inputs (the only choice for ``"sum"``).
      w_pos_emb_std: the embedding's scale (nt's ``W_pos_emb_std``).
      val_pos_emb: whether the values see the embeddings too (else keys and queries only).
      causal: position i attends only to positions j <= i (sequences (N, L, C) only; other
        inputs raise a ValueError naming their shape). nt has no causal attention.

    Masks: ``attn.apply(params, x, mask=mask)`` with a boolean (N, *S) ``mask`` (True = a
    padded position) excludes masked keys and values and sets the outputs at masked positions
    to 0; on kernels the masks come with the :class:`~ntkjax.Kernel` (module docstring).

    >>> import jax, ntkjax
    >>> attn = SelfAttention(8, key_features=4, value_features=4, num_heads=2)
    >>> x = jnp.ones((3, 5, 6))
    >>> attn.apply(attn.init(jax.random.key(0), x), x).shape
    (3, 5, 8)
    >>> ntkjax.kernel_fn(attn)(x).nngp.shape
    (3, 3, 5, 5)
    >>> decoder = SelfAttention(8, 4, 4, pos_emb_type="sum", causal=True,
    ...                         pos_emb_decay_fn=lambda d: jnp.exp(-d))
    >>> jax.tree_util.tree_map(jnp.shape, decoder.init(jax.random.key(0), x))["params"]["pos_emb"]
    (1, 5, 6)
    >>> k = ntkjax.kernel_fn(decoder)(x)
    """

    out_features: int
    key_features: int
    value_features: int
    num_heads: int = 1
    linear_scaling: bool = True
    w_key_std: float = 1.0
    w_value_std: float = 1.0
    w_query_std: float = 1.0
    w_out_std: float = 1.0
    b_std: float = 0.0
    use_bias: bool = True
    attention_mechanism: AttentionMechanism = "softmax"
    param_dtype: Any = None
    pos_emb_type: Literal["sum", "concat"] | None = None
    pos_emb_p_norm: float = 2.0
    pos_emb_decay_fn: Callable[[Any], Any] | None = None
    pos_emb_features: int | None = None
    w_pos_emb_std: float = 1.0
    val_pos_emb: bool = False
    causal: bool = False

    def _check(self) -> None:
        check_choice(self.attention_mechanism, ATTENTION_MECHANISMS, "attention_mechanism")
        check_choice(self.pos_emb_type, _POS_EMB_TYPES, "pos_emb_type")
        self._check_positions()
        for name in ("out_features", "key_features", "value_features", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        stds = ("w_key_std", "w_value_std", "w_query_std", "w_out_std", "b_std")
        for name in stds:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")

    def _check_positions(self) -> None:
        if not (self.pos_emb_p_norm > 0):
            raise ValueError(f"pos_emb_p_norm must be > 0, got {self.pos_emb_p_norm!r}.")
        if not self.w_pos_emb_std >= 0:
            raise ValueError(f"w_pos_emb_std must be >= 0, got {self.w_pos_emb_std!r}.")
        c_pe = self.pos_emb_features
        if c_pe is not None and (isinstance(c_pe, bool) or int(c_pe) != c_pe or c_pe < 1):
            raise ValueError(f"pos_emb_features must be None or a positive integer, got {c_pe!r}.")
        if self.pos_emb_decay_fn is not None and not callable(self.pos_emb_decay_fn):
            raise ValueError("pos_emb_decay_fn must be None or a function of the distances, got "
                             f"{self.pos_emb_decay_fn!r}.")

    def _position_options(self) -> dict[str, Any]:
        return {"pos_emb_type": self.pos_emb_type, "pos_emb_p_norm": self.pos_emb_p_norm,
                "pos_emb_decay_fn": self.pos_emb_decay_fn,
                "pos_emb_features": self.pos_emb_features, "w_pos_emb_std": self.w_pos_emb_std,
                "val_pos_emb": self.val_pos_emb, "causal": self.causal}

    def _with_positions(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(inputs of the keys and queries, inputs of the values): ``x`` with the positional
        embedding ``w_pos_emb_std * L z`` added or concatenated (``z`` the standard normal
        parameter ``"pos_emb"`` of shape (1, *S, pos_emb_features), ``L`` the Cholesky factor of
        R over the flattened positions; nt's ``GlobalSelfAttention``)."""
        if self.pos_emb_type is None:
            return x, x
        spatial, c = x.shape[1:-1], x.shape[-1]
        c_pe = c if self.pos_emb_features is None else int(self.pos_emb_features)
        if self.pos_emb_type == "sum" and c_pe != c:
            raise ValueError(
                f"SelfAttention(pos_emb_type='sum') adds the embedding to the {c} input channels "
                f"of inputs of shape {x.shape}; pos_emb_features={c_pe} must be None or {c}."
            )
        shape = (1, *spatial, c_pe)
        if self.has_variable("params", "pos_emb"):
            built = tuple(self.get_variable("params", "pos_emb").shape)
            if built != shape:
                raise ValueError(
                    "SelfAttention's positional embedding was built for inputs of spatial shape "
                    f"{built[1:-1]} with {built[-1]} embedding channels (parameter 'pos_emb' "
                    f"{built}); got inputs of shape {x.shape}, which need {shape}."
                )
        dtype = self.param_dtype if self.param_dtype is not None else float_dtype(x)
        z = self.param("pos_emb", linen.initializers.normal(1.0), shape, dtype)
        length = math.prod(spatial)
        if self.pos_emb_decay_fn is not None:
            r = _positional_covariance(spatial, self.pos_emb_p_norm, self.pos_emb_decay_fn)
            try:
                chol = np.linalg.cholesky(r)
            except np.linalg.LinAlgError:
                raise ValueError(
                    f"pos_emb_decay_fn gives a positional covariance over the {length} positions "
                    f"of spatial shape {spatial} that is not positive definite; the finite "
                    "network needs its Cholesky factor (the kernel does not)."
                ) from None
            z = jnp.einsum("pq,qc->pc", jnp.asarray(chol, dtype=z.dtype),
                           z.reshape(length, c_pe)).reshape(shape)
        pe = float(self.w_pos_emb_std) * z
        if self.pos_emb_type == "sum":
            keyed = x + pe
        else:
            keyed = jnp.concatenate([x, jnp.broadcast_to(pe, (x.shape[0], *spatial, c_pe))],
                                    axis=-1)
        return keyed, (keyed if self.val_pos_emb else x)

    @linen.compact
    def __call__(self, x: Any, mask: Any = None) -> Any:
        self._check()
        if mask is not None and isinstance(x, Kernel):
            raise ValueError(
                "SelfAttention: a Kernel carries its own masks (kernel_fn's mask1 / mask2); "
                "the mask argument is for arrays."
            )
        if isinstance(x, FeatureStandIn):
            return _MEANINGS.on_features(x, self.__call__)
        if isinstance(x, Kernel):
            return attention_kernel(
                x, self.out_features, linear_scaling=self.linear_scaling,
                qk_std=self.w_query_std * self.w_key_std,
                ov_std=self.w_out_std * self.w_value_std, b_std=self.b_std,
                use_bias=self.use_bias, attention_mechanism=self.attention_mechanism,
                **self._position_options(),
            )
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(
                f"SelfAttention needs inputs of shape (batch, length, channels), got {x.shape}."
            )
        mask = check_mask(x, mask)
        n, spatial = x.shape[0], x.shape[1:-1]
        length = math.prod(spatial)
        _check_causal_shape(self.causal, spatial, x.shape)
        h, dk, dv = int(self.num_heads), int(self.key_features), int(self.value_features)
        keyed, valued = self._with_positions(x)
        flat = keyed.reshape(n, length, keyed.shape[-1])
        flat_values = valued.reshape(n, length, valued.shape[-1])

        def project(features: int, w_std: float, name: str, inputs: jax.Array) -> jax.Array:
            layer = Dense(features, w_std=w_std, use_bias=False, param_dtype=self.param_dtype,
                          name=name)
            return layer(inputs)

        keys = project(h * dk, 1.0, "key", flat).reshape(n, length, h, dk)
        qk = float(self.w_query_std) * float(self.w_key_std)
        if self.linear_scaling:
            queries, norm = keys, qk / dk
        else:
            queries = project(h * dk, 1.0, "query", flat).reshape(n, length, h, dk)
            norm = qk / math.sqrt(dk)
        values = project(h * dv, self.w_value_std, "value", flat_values).reshape(n, length, h, dv)
        logits = norm * jnp.einsum("nlhd,nmhd->nhlm", queries, keys)
        key_mask = None if mask is None else mask.reshape(n, 1, 1, length)
        weights = _attention_weights(self.attention_mechanism, logits, causal=self.causal,
                                     key_mask=key_mask)
        heads = jnp.einsum("nhlm,nmhd->nlhd", weights, values).reshape(n, length, h * dv)
        out = Dense(self.out_features, w_std=self.w_out_std, b_std=self.b_std,
                    use_bias=self.use_bias, param_dtype=self.param_dtype, name="out")(heads)
        out = out.reshape(n, *spatial, self.out_features)
        if mask is not None:  # outputs at masked query positions are 0, as in the kernel
            out = jnp.where(mask[..., None], jnp.zeros((), out.dtype), out)
        return out


_MEANINGS = declare(
    SelfAttention, kernel=attention_kernel, features=None,
    structured="via its ntkjax.nn.Dense projections", all_pairs=True, per_input_variances=True,
    instead={"features": "self-attention has no random-feature rule; use ntkjax.kernel_fn "
             "(exact) or the empirical NTK of a finite network."},
)
