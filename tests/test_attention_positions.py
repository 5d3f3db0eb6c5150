"""SelfAttention with positional embeddings and causal attention (issue 24).

* every ``attention_posemb`` entry of neural-tangents' float64 reference set
  (tests/data/nt_layers2/attention_posemb.*, copied from the shared nt_layers2 set) at 1e-10
  relative (x2 given and None; the ntk_11 diagonal behind ReLU at 1e-7, nt's known error);
* the finite layer is the formula of nt's ``GlobalSelfAttention`` written out in numpy, and
  converges to ``kernel_fn`` as widths grow (Monte Carlo over channels, fitted slope);
* x2 given is the off-diagonal block of the joint kernel;
* causal attention: position i does not depend on later positions (finite and kernel), the
  exact kernel against the wide finite network, and the bad-input errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen
from scipy import special

import ntkjax
from ntkjax import nn
from tests.helpers import max_relative_error
from tests.nt_stax import build
from tests.random_params import normal

DATA = Path(__file__).resolve().parent / "data" / "nt_layers2"
META = json.loads((DATA / "attention_posemb.json").read_text())
ENTRIES = META["entries"]


def _arrays(entry: dict) -> dict[str, np.ndarray]:
    with np.load(DATA / "attention_posemb.npz") as f:
        return {name: f[path] for name, path in entry["arrays"].items()}


def test_reference_group_is_complete():
    assert len(ENTRIES) == 7 and {e["group"] for e in ENTRIES} == {"attention_posemb"}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["key"] for e in ENTRIES])
def test_matches_neural_tangents_float64(entry, x64):
    net = build(entry["layers"])
    a = _arrays(entry)
    k12 = ntkjax.kernel_fn(net)(a["x1"], a["x2"])
    k11 = ntkjax.kernel_fn(net)(a["x1"])
    for got, name in ((k12.nngp, "nngp_12"), (k12.ntk, "ntk_12"), (k11.nngp, "nngp_11")):
        assert max_relative_error(got, a[name]) < 1e-10, name
    got, want = np.asarray(k11.ntk), a["ntk_11"]
    err = np.abs(got - want) / np.max(np.abs(want))
    off = ~np.eye(len(want), dtype=bool)
    assert np.max(err[off]) < 1e-10 and np.max(err) < 1e-7


def _decay(d):
    return jnp.exp(-d / 2)


def _numpy_positional_attention(params, x, *, heads, dk, dv, pe_type, c_pe, decay, p_norm,
                                w_pe, val, causal=False):
    """nt's GlobalSelfAttention apply_fn (linear scaling, softmax, unit weight scales) written
    out: pe = w_pe * L z (L L^T = R = decay(sum_a |p_a - p'_a|^p)), keys/queries on x + pe
    (sum) or [x, pe] (concat), values on the same (val) or on x; every projection / sqrt(fan_in)."""
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    x = np.asarray(x, dtype=np.float64)
    n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    length = int(np.prod(spatial))
    grid = np.array(list(np.ndindex(*spatial)), dtype=np.float64)
    dist = (np.abs(grid[:, None] - grid[None]) ** p_norm).sum(-1)
    chol = np.linalg.cholesky(np.asarray(decay(dist)))
    pe = w_pe * (chol @ p["pos_emb"].reshape(length, c_pe))
    flat = x.reshape(n, length, c)
    keyed = flat + pe if pe_type == "sum" else np.concatenate(
        [flat, np.broadcast_to(pe, (n, length, c_pe))], axis=-1)
    valued = keyed if val else flat
    keys = (keyed @ p["key"]["kernel"] / np.sqrt(keyed.shape[-1])).reshape(n, length, heads, dk)
    values = (valued @ p["value"]["kernel"] / np.sqrt(valued.shape[-1])).reshape(
        n, length, heads, dv)
    logits = np.einsum("nlhd,nmhd->nhlm", keys, keys) / dk
    if causal:
        logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    out = np.einsum("nhlm,nmhd->nlhd", special.softmax(logits, axis=-1), values)
    out = out.reshape(n, length, heads * dv) @ p["out"]["kernel"] / np.sqrt(heads * dv)
    return (out + 0.3 * p["out"]["bias"]).reshape(n, *spatial, -1)


@pytest.mark.parametrize(("pe_type", "c_pe", "val", "shape", "causal"), [
    ("sum", None, True, (5,), True), ("concat", 3, False, (2, 3), False)])
def test_finite_layer_is_nt_formula(pe_type, c_pe, val, shape, causal, x64):
    layer = nn.SelfAttention(4, key_features=3, value_features=2, num_heads=2, b_std=0.3,
                             pos_emb_type=pe_type, pos_emb_features=c_pe, pos_emb_p_norm=1.5,
                             pos_emb_decay_fn=_decay, w_pos_emb_std=0.7, val_pos_emb=val,
                             causal=causal)
    x = normal((2, *shape, 4), 0)
    params: Any = layer.init(jax.random.key(1), x)
    c_pe = 4 if c_pe is None else c_pe
    assert params["params"]["pos_emb"].shape == (1, *shape, c_pe)
    want = _numpy_positional_attention(params, x, heads=2, dk=3, dv=2, pe_type=pe_type,
                                       c_pe=c_pe, decay=_decay, p_norm=1.5, w_pe=0.7, val=val,
                                       causal=causal)
    np.testing.assert_allclose(np.asarray(layer.apply(params, x)), want, rtol=1e-11,
                               atol=1e-12)


def _position_kernels(k, out: int):
    """(N1, N2, L, L) of a Monte Carlo kernel over the flattened (L * out) outputs
    (``outputs="full"``): the mean over the channel diagonal, with its standard error."""
    def fold(a):
        n1, n2, m, _ = a.shape
        a = np.asarray(a).reshape(n1, n2, m // out, out, m // out, out)
        return np.einsum("abpcqc->abpq", a) / out
    return fold(k.nngp), fold(k.ntk), fold(k.nngp_stderr), fold(k.ntk_stderr)


_IDENTITY = dict(key_features=6, value_features=6, num_heads=2, linear_scaling=False,
                 attention_mechanism="identity", w_query_std=0.9, w_value_std=1.2, b_std=0.3)


@pytest.mark.parametrize(("options", "wrong"), [
    ({"causal": True}, {"causal": False}),
    ({"pos_emb_type": "concat", "pos_emb_features": 128, "w_pos_emb_std": 1.3,
      "pos_emb_decay_fn": _decay}, {"val_pos_emb": True}),
], ids=["causal", "concat_keys_only"])
def test_identity_attention_kernel_is_the_monte_carlo_mean(options, wrong, x64):
    """One identity-mechanism layer (1/sqrt(d_k), independent queries and keys) on raw inputs.
    Causal: E[y_i y_k] = c K[i,k] sum_{j<=i, l<=k} K[j,l]^2 at ANY width (Gaussian weights, four
    independent matrices), so the Monte Carlo mean over 192 networks agrees within 5 standard
    errors at widths 6, for the NNGP and the NTK at every pair of positions. Concatenated
    embeddings in keys and queries only (128 channels: their realized covariance is within
    ~1/11 of R, a second-order bias), whose NTK has nt's T = <K~, Theta> + <K, Theta~>: within
    5 standard errors too. The kernel with the other choice (no mask; embeddings in the values
    too) is > 20 standard errors off."""
    out = 4
    layer = nn.SelfAttention(out, **_IDENTITY, **options)
    x1, x2 = normal((2, 4, 3), 3), normal((1, 4, 3), 4)
    mc = ntkjax.monte_carlo_kernel_fn(layer, jax.random.key(5), 192, outputs="full")(x1, x2)
    nngp, ntk, nngp_se, ntk_se = _position_kernels(mc, out)
    exact = ntkjax.kernel_fn(layer)(x1, x2)
    other = ntkjax.kernel_fn(layer.clone(**wrong))(x1, x2)
    for got, se, want, bad in ((nngp, nngp_se, exact.nngp, other.nngp),
                               (ntk, ntk_se, exact.ntk, other.ntk)):
        z = np.abs(got - np.asarray(want)) / se
        assert np.max(z) < 5, np.max(z)
        assert np.max(np.abs(got - np.asarray(bad)) / se) > 20


def _relative_frobenius(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _wide_causal_layer(out: int, values: int) -> nn.SelfAttention:
    return nn.SelfAttention(out, key_features=128, value_features=values, num_heads=1,
                            b_std=0.2, pos_emb_type="concat", pos_emb_features=128,
                            w_pos_emb_std=1.3, pos_emb_decay_fn=_decay, val_pos_emb=True,
                            causal=True)


def test_wide_causal_softmax_with_positions_converges_to_the_kernel(x64):
    """Softmax attention (linear scaling) with concatenated positional embeddings and a causal
    mask on raw 3-channel inputs: with 128 embedding channels and key width 128 the logits are
    within ~1/11 of their limit (the bias of the mean is second order). NNGP: the mean of
    y y'^T over 16 networks with 512 value and 512 output channels (noise ~ 1/sqrt(16 * 512)
    per stage, ~2 % measured) is within 6 % (Frobenius, relative) of the kernel at every pair
    of positions; NTK: the Monte Carlo empirical NTK over 16 networks (2 outputs, 32 value
    channels; ~4 % noise) within 10 %. The kernel without the mask, or without the
    embeddings, is > 25 % off both."""
    x = normal((2, 5, 3), 7)
    wide = _wide_causal_layer(512, 512)
    ys = jax.jit(jax.vmap(lambda k: wide.apply(wide.init(k, x), x)))(
        jax.random.split(jax.random.key(9), 16))
    nngp = np.einsum("sapc,sbqc->abpq", ys, ys) / (16 * 512)
    layer = _wide_causal_layer(2, 32)
    mc = ntkjax.monte_carlo_kernel_fn(layer, jax.random.key(8), 16, outputs="full")(x)
    ntk = _position_kernels(mc, 2)[1]
    exact = ntkjax.kernel_fn(layer)(x)
    assert _relative_frobenius(nngp, exact.nngp) < 0.06
    assert _relative_frobenius(ntk, exact.ntk) < 0.1
    for other in (layer.clone(causal=False), layer.clone(pos_emb_type=None)):
        k = ntkjax.kernel_fn(other)(x)
        assert _relative_frobenius(nngp, k.nngp) > 0.25
        assert _relative_frobenius(ntk, k.ntk) > 0.25


class _CausalNet(linen.Module):
    """Dense -> causal SelfAttention (positional embeddings summed) -> relu -> Dense(1) per
    position: a sequence-to-sequence decoder block."""

    mech: Any = "softmax"
    linear_scaling: bool = True

    @linen.compact
    def __call__(self, x):
        h = nn.Dense(16, w_std=1.2, b_std=0.1)(x)
        h = nn.SelfAttention(16, key_features=8, value_features=8, num_heads=2, b_std=0.1,
                             attention_mechanism=self.mech, linear_scaling=self.linear_scaling,
                             pos_emb_type="sum", pos_emb_decay_fn=_decay, val_pos_emb=True,
                             causal=True)(h)
        return nn.Dense(1)(nn.relu(h))


@pytest.mark.parametrize(("mech", "linear"), [("softmax", True), ("relu", True),
                                             ("identity", False)])
def test_position_i_does_not_see_later_positions(mech, linear, x64):
    """Finite: changing positions > i leaves outputs at <= i unchanged. Kernel: its (<= i, <= i)
    block is the kernel of the sequences cut after position i (positional covariance R only
    depends on the two positions)."""
    net = _CausalNet(mech, linear)
    x1, x2 = normal((2, 6, 3), 11), normal((3, 6, 3), 12)
    params = net.init(jax.random.key(0), x1)
    changed = x1.at[:, 4:].set(normal((2, 2, 3), 13))
    y, y_changed = np.asarray(net.apply(params, x1)), np.asarray(net.apply(params, changed))
    np.testing.assert_allclose(y[:, :4], y_changed[:, :4], rtol=1e-13, atol=1e-13)
    assert np.max(np.abs(y[:, 4:] - y_changed[:, 4:])) > 1e-3
    whole = ntkjax.kernel_fn(net)(x1, x2)
    cut = ntkjax.kernel_fn(net)(x1[:, :4], x2[:, :4])
    for a, b in ((whole.nngp, cut.nngp), (whole.ntk, cut.ntk)):
        np.testing.assert_allclose(np.asarray(a)[:, :, :4, :4], b, rtol=1e-12, atol=1e-14)


def test_x2_given_is_the_off_diagonal_block_of_the_joint_kernel(x64):
    """Summed positional embeddings (in the values too), causal identity attention with
    1/sqrt(d_k): kernel_fn(x1, x2) is the (x1, x2) block of kernel_fn([x1; x2])."""
    net = _CausalNet("identity", False)
    x1, x2 = normal((3, 6, 3), 21), normal((2, 6, 3), 22)
    joint = ntkjax.kernel_fn(net)(jnp.concatenate([x1, x2]))
    pair = ntkjax.kernel_fn(net)(x1, x2)
    for a, b in ((joint.nngp, pair.nngp), (joint.ntk, pair.ntk)):
        np.testing.assert_allclose(np.asarray(a)[:3, 3:], b, rtol=1e-12)


def test_bad_input_errors():
    seq, img = jnp.ones((2, 5, 3)), jnp.ones((2, 3, 4, 3))
    causal = nn.SelfAttention(4, 4, 4, causal=True)
    with pytest.raises(ValueError, match=r"causal=True.*\(2, 3, 4, 3\)"):
        causal.init(jax.random.key(0), img)
    with pytest.raises(ValueError, match=r"causal=True.*\(3, 4\)"):
        ntkjax.kernel_fn(causal)(img)
    pos = nn.SelfAttention(4, 4, 4, pos_emb_type="concat", pos_emb_features=2)
    params = pos.init(jax.random.key(0), seq)
    with pytest.raises(ValueError, match=r"spatial shape \(5,\).*\(2, 3, 4, 3\)"):
        pos.apply(params, img)
    with pytest.raises(ValueError, match=r"spatial shape \(5,\).*\(2, 7, 3\)"):
        pos.apply(params, jnp.ones((2, 7, 3)))
    with pytest.raises(ValueError, match="pos_emb_features=2 must be None or 3"):
        nn.SelfAttention(4, 4, 4, pos_emb_type="sum", pos_emb_features=2).init(
            jax.random.key(0), seq)
    with pytest.raises(ValueError, match="pos_emb_features=2 must be None or 3"):
        ntkjax.kernel_fn(nn.SelfAttention(4, 4, 4, pos_emb_type="sum", pos_emb_features=2))(seq)
    with pytest.raises(ValueError, match="pos_emb_type"):
        bad: Any = "SUM"  # nt's spelling
        nn.SelfAttention(4, 4, 4, pos_emb_type=bad).init(jax.random.key(0), seq)
    with pytest.raises(ValueError, match="not positive definite"):
        nn.SelfAttention(4, 4, 4, pos_emb_type="sum",
                         pos_emb_decay_fn=lambda d: jnp.ones_like(d)).init(jax.random.key(0), seq)
    with pytest.raises(ValueError, match="pos_emb_p_norm"):
        nn.SelfAttention(4, 4, 4, pos_emb_type="sum", pos_emb_p_norm=0).init(
            jax.random.key(0), seq)


def test_float32_kernel_and_finite_layer():
    """float32 (the default): a CONCAT entry within 1e-4 of nt's float64 kernel, and the
    finite layer with a decay (Cholesky factor formed in float64) stays float32 under jit."""
    entry = ENTRIES[3]  # pe_concat_nchan32_noval
    a = _arrays(entry)
    k = ntkjax.kernel_fn(build(entry["layers"]))(a["x1"].astype(np.float32),
                                                 a["x2"].astype(np.float32))
    assert k.nngp.dtype == jnp.float32
    assert max_relative_error(k.nngp, a["nngp_12"]) < 1e-4
    assert max_relative_error(k.ntk, a["ntk_12"]) < 1e-4
    layer = nn.SelfAttention(4, 4, 4, pos_emb_type="concat", pos_emb_decay_fn=_decay,
                             causal=True)
    x = jnp.ones((2, 5, 3), jnp.float32)
    params = layer.init(jax.random.key(0), x)
    y = jax.jit(layer.apply)(params, x)
    assert y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


class _PreNormDecoder(linen.Module):
    """models.Transformer(depth=1, causal=True, positional embeddings) written out by hand from
    its documented layers (pre-norm block, final LayerNorm, global average pool)."""

    @linen.compact
    def __call__(self, x):
        x = nn.Dense(8, b_std=0.1)(x)
        h = nn.SelfAttention(8, key_features=8, value_features=8, num_heads=2, b_std=0.1,
                             pos_emb_type="sum", pos_emb_decay_fn=_decay, causal=True)(
            nn.LayerNorm()(x))
        x = x + h
        h = nn.Dense(8, b_std=0.1)(nn.relu(nn.Dense(8, b_std=0.1)(nn.LayerNorm()(x))))
        return nn.Dense(1, b_std=0.1)(nn.global_average_pool(nn.LayerNorm()(x + h)))


def test_transformer_passes_causal_and_positional_options_to_every_block(x64):
    from ntkjax import models

    net = models.Transformer(8, depth=1, num_heads=2, b_std=0.1, causal=True,
                             pos_emb_type="sum", pos_emb_decay_fn=_decay)
    x1, x2 = normal((3, 5, 2), 31), normal((2, 5, 2), 32)
    params = net.init(jax.random.key(0), x1)["params"]
    assert params["block0_attention"]["pos_emb"].shape == (1, 5, 8)
    want = ntkjax.kernel_fn(_PreNormDecoder())(x1, x2)
    got = ntkjax.kernel_fn(net)(x1, x2)
    plain = ntkjax.kernel_fn(models.Transformer(8, depth=1, num_heads=2, b_std=0.1))(x1, x2)
    for a, b, c in ((got.nngp, want.nngp, plain.nngp), (got.ntk, want.ntk, plain.ntk)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
        assert max_relative_error(c, b) > 1e-3  # the options change the kernel
