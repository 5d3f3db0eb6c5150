"""ntkjax.nn.SelfAttention and models.Transformer: the finite layer against the formula of the
module docstring written out in numpy; kernel-rule errors; the structured empirical NTK factors
the projections (agrees with Jacobian contraction); and (slow) the empirical NTK of softmax
attention networks (linear scaling) converging to kernel_fn as widths and heads grow.
(The kernels themselves are checked against neural-tangents in test_reference_layers.)"""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import ntkjax
from ntkjax import models, nn
from ntkjax.kernels import input_kernel
from ntkjax.scaling import fit_power_law
from ntkjax.structured import count_structured_layers
from tests.random_params import normal, ntk_params
from tests.test_normalization import ntk_errors


def _x(n=3, shape=(5, 4), seed=0):
    return normal((n, *shape), seed)


def _numpy_attention(params, x, *, heads, dk, dv, linear, mech, stds, b_std):
    """y = w_o / sqrt(H dv) concat_h(mech(q_h k_h^T / d) v_h) W_O + b_std b, projections
    w x W / sqrt(C) with unit-normal W (module docstring of ntkjax.nn.attention)."""
    wq, wk, wv, wo = stds
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    x = np.asarray(x)
    n, length, c = x.shape
    keys = (x @ p["key"]["kernel"] / np.sqrt(c)).reshape(n, length, heads, dk)
    queries = keys if linear else (x @ p["query"]["kernel"] / np.sqrt(c)).reshape(
        n, length, heads, dk)
    values = (wv * x @ p["value"]["kernel"] / np.sqrt(c)).reshape(n, length, heads, dv)
    logits = wq * wk * np.einsum("nlhd,nmhd->nhlm", queries, keys) / (dk if linear
                                                                      else np.sqrt(dk))
    weights = {"softmax": lambda a: special.softmax(a, axis=-1), "identity": lambda a: a,
               "abs": np.abs, "relu": lambda a: np.maximum(a, 0)}[mech](logits)
    out = np.einsum("nhlm,nmhd->nlhd", weights, values).reshape(n, length, heads * dv)
    return wo / np.sqrt(heads * dv) * out @ p["out"]["kernel"] + b_std * p["out"]["bias"]


@pytest.mark.parametrize(("linear", "mech"), [(True, "softmax"), (False, "relu")])
def test_finite_layer_is_the_formula(linear, mech, x64):
    cfg = dict(heads=3, dk=4, dv=2, linear=linear, mech=mech, stds=(0.8, 1.3, 1.1, 0.7),
               b_std=0.2)
    layer = nn.SelfAttention(5, key_features=4, value_features=2, num_heads=3,
                             linear_scaling=linear, attention_mechanism=mech, w_query_std=0.8,
                             w_key_std=1.3, w_value_std=1.1, w_out_std=0.7, b_std=0.2)
    x = _x()
    params = ntk_params(layer, x, seed=1)
    assert ("query" in params["params"]) == (not linear)  # tied query/key weights
    np.testing.assert_allclose(layer.apply(params, x), _numpy_attention(params, x, **cfg),
                               rtol=1e-12, atol=1e-12)
    # images: positions flattened, shape kept
    img = _x(2, (2, 3, 4))
    assert layer.apply(params, img).shape == (2, 2, 3, 5)


def test_kernel_rule_errors_and_shapes(x64):
    seq = input_kernel(_x())
    with pytest.raises(ValueError, match="no known closed-form"):
        nn.SelfAttention(4, 4, 4, linear_scaling=False).apply({}, seq)
    with pytest.raises(ValueError, match="positions"):
        nn.SelfAttention(4, 4, 4).apply({}, input_kernel(_x(3, (4,))))
    with pytest.raises(ValueError, match="attention_mechanism"):
        nn.SelfAttention(4, 4, 4, attention_mechanism="sigmoid").apply({}, seq)
    with pytest.raises(ValueError, match="num_heads"):
        nn.SelfAttention(4, 4, 4, num_heads=0).apply({}, seq)
    k = nn.SelfAttention(7, 4, 4, b_std=0.3).apply({}, nn.Dense(6).apply({}, seq))
    assert k.shape == (3, 3, 5, 5) and k.width == 7 and k.same_inputs and not k.non_gaussian
    # softmax rows sum to 1: a constant input kernel stays constant, scaled by w_o^2 w_v^2
    const = seq.replace(nngp=jnp.ones_like(seq.nngp), var1=jnp.ones_like(seq.var1),
                        var2=jnp.ones_like(seq.var1))
    const = const.replace(var2=const.var1)
    out = nn.SelfAttention(2, 3, 3, w_value_std=1.5, w_out_std=0.5, b_std=0.1).apply({}, const)
    np.testing.assert_allclose(out.nngp, (1.5 * 0.5) ** 2 + 0.01, rtol=1e-14)


class AttentionNet(linen.Module):
    """Dense -> SelfAttention -> relu -> global average pool -> Dense(1)."""

    width: int
    heads: int
    linear_scaling: bool = True
    mech: str = "softmax"

    @linen.compact
    def __call__(self, x):
        h = nn.Dense(self.width, b_std=0.1)(x)
        h = nn.SelfAttention(self.width, key_features=self.width, value_features=self.width,
                             num_heads=self.heads, linear_scaling=self.linear_scaling,
                             attention_mechanism=self.mech, w_value_std=1.2, b_std=0.1)(h)
        return nn.Dense(1)(nn.global_average_pool(nn.relu(h)))


def test_structured_ntk_factors_the_projections(x64):
    x = _x(3, (4, 3))
    for linear in (True, False):
        net = AttentionNet(6, 2, linear_scaling=linear)
        params = ntk_params(net, x)
        # Dense, key (+ query), value, out, readout: each a dense layer the structured method
        # knows, its Jacobian factored from inputs and cotangents
        assert count_structured_layers(net.apply, params, x) == (5 if linear else 6)
    # examples are independent: batch="per_sample" (no probe compiled per kernel function)
    got = ntkjax.empirical_ntk_fn(net.apply, ntk_method="structured", batch="per_sample")(
        params, x)
    want = ntkjax.empirical_ntk_fn(net.apply, ntk_method="jacobian", batch="per_sample")(
        params, x)
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.slow
def test_softmax_attention_empirical_ntk_converges_like_inverse_sqrt_width(x64):
    """RMS over 32 networks of the relative NTK error of softmax attention (linear scaling)
    with width = key = value features w and w / 8 heads, w = 16-128; fitted log-log slope in
    [-0.7, -0.3]."""
    x = _x(4, (5, 3), 42)
    configs = [(16, 2), (32, 4), (64, 8), (128, 16)]
    errors = ntk_errors(AttentionNet, configs, x, 32)
    slope = fit_power_law([c[0] for c in configs], errors).slope
    assert -0.7 <= slope <= -0.3, (slope, errors)
    assert errors[-1] < 0.3


def test_transformer_finite_and_infinite(x64):
    net = models.Transformer(8, out_features=2, depth=1, num_heads=2, mlp_features=12,
                             activation="gelu", b_std=0.1)
    x = _x(3, (4, 3))
    params = ntk_params(net, x)
    assert net.apply(params, x).shape == (3, 2)
    assert params["params"]["block0_mlp_in"]["kernel"].shape == (8, 12)
    # embed, key, value, out, mlp_in, mlp_out, readout: all factored by the structured method
    assert count_structured_layers(net.apply, params, x) == 7
    k = ntkjax.kernel_fn(net)(x)
    for a in (np.asarray(k.nngp), np.asarray(k.ntk)):
        np.testing.assert_allclose(a, a.T, rtol=1e-12)
        assert np.linalg.eigvalsh(a).min() > -1e-12 * np.abs(a).max()
    with pytest.raises(ValueError, match="readout"):
        models.Transformer(8, readout="max").apply(params, x)
