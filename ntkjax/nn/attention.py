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

Masks (padding; neural-tangents' rule, Hron et al. 2020 appendix): masked positions take no
part as keys and values -- their softmax logits are set to the most negative number before the
softmax over keys (weight exactly 0), and their weights are set to 0 for the other mechanisms --
and the outputs at masked query positions are 0. The finite layer takes ``mask`` (boolean
(N, *S), True = masked) as a call argument; a :class:`~ntkjax.Kernel` carries its masks
(``kernel_fn(module)(x1, x2, mask1=..., mask2=...)``): in ``G_a`` the masked keys' columns are
0, and the entries of masked positions are 0 in its input and output.

Not implemented (yet): positional embeddings.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen

from ntkjax._checks import check_choice, check_mask
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
) -> Kernel:
    """The :class:`~ntkjax.Kernel` after :class:`SelfAttention` (module docstring), with
    ``qk_std = w_query_std * w_key_std`` and ``ov_std = w_out_std * w_value_std``.

    Raises:
      ValueError: for a kernel without spatial axes, or ``linear_scaling=False`` with a
        mechanism other than ``"identity"``.
    """
    check_choice(attention_mechanism, ATTENTION_MECHANISMS, "attention_mechanism")
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
    length = math.prod(spatial)
    n1, n2 = k.nngp.shape[:2]
    k12 = k.nngp.reshape(n1, n2, length, length)
    t12 = k.ntk.reshape(n1, n2, length, length)
    c1, c2 = k.self_covariances()
    v1 = c1.reshape(n1, length, length)
    v2 = v1 if k.same_inputs else c2.reshape(n2, length, length)
    bias = float(b_std) ** 2 if use_bias else 0.0
    keys1 = keys2 = None
    if k.mask1 is not None and k.mask2 is not None:
        keys1 = k.mask1.reshape(n1, 1, length)
        keys2 = keys1 if k.same_inputs else k.mask2.reshape(n2, 1, length)
    if linear_scaling:
        scale = float(ov_std) ** 2
        g1 = _key_masked_weights(attention_mechanism, float(qk_std) * v1, keys1)
        g2 = g1 if k.same_inputs else _key_masked_weights(attention_mechanism,
                                                          float(qk_std) * v2, keys2)

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
        dot12 = jnp.sum(k12 * k12, axis=(2, 3), keepdims=True)
        dot_kt = jnp.sum(k12 * t12, axis=(2, 3), keepdims=True)
        nngp = scale * dot12 * k12 + bias
        ntk = scale * (2 * dot_kt * k12 + dot12 * (t12 + 4 * k12)) + bias

        def self_map(v: jax.Array) -> jax.Array:
            return scale * jnp.sum(v * v, axis=(1, 2), keepdims=True) * v + bias

        new_v1 = self_map(v1)
        new_v2 = new_v1 if k.same_inputs else self_map(v2)
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
    a ValueError on kernels, and work on arrays). Positional embeddings and attention masks are
    not implemented yet.

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

    def _check(self) -> None:
        check_choice(self.attention_mechanism, ATTENTION_MECHANISMS, "attention_mechanism")
        for name in ("out_features", "key_features", "value_features", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        stds = ("w_key_std", "w_value_std", "w_query_std", "w_out_std", "b_std")
        for name in stds:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")

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
            )
        x = jnp.asarray(x)
        if x.ndim < 3:
            raise ValueError(
                f"SelfAttention needs inputs of shape (batch, length, channels), got {x.shape}."
            )
        mask = check_mask(x, mask)
        n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
        length = math.prod(spatial)
        h, dk, dv = int(self.num_heads), int(self.key_features), int(self.value_features)
        flat = x.reshape(n, length, c)

        def project(features: int, w_std: float, name: str) -> jax.Array:
            layer = Dense(features, w_std=w_std, use_bias=False, param_dtype=self.param_dtype,
                          name=name)
            return layer(flat)

        keys = project(h * dk, 1.0, "key").reshape(n, length, h, dk)
        qk = float(self.w_query_std) * float(self.w_key_std)
        if self.linear_scaling:
            queries, norm = keys, qk / dk
        else:
            queries = project(h * dk, 1.0, "query").reshape(n, length, h, dk)
            norm = qk / math.sqrt(dk)
        values = project(h * dv, self.w_value_std, "value").reshape(n, length, h, dv)
        logits = norm * jnp.einsum("nlhd,nmhd->nhlm", queries, keys)
        key_mask = None if mask is None else mask.reshape(n, 1, 1, length)
        weights = _key_masked_weights(self.attention_mechanism, logits, key_mask)
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
