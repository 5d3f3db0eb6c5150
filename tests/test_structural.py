"""Structural layers (ntkjax.nn.structural) against neural-tangents' float64 reference kernels
(tests/data/nt_layers2, copied from the shared nt_layers2 set; README tolerance 1e-9 relative,
x2 given and None) and against closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from tests.helpers import max_relative_error

DATA = Path(__file__).resolve().parent / "data" / "nt_layers2"
TOLERANCE = 1e-9  # nt_layers2 README: relative, in general


def _reference(key: str):
    meta = json.loads((DATA / "kernels.json").read_text())
    entry = next(e for e in meta["entries"] if e["key"] == key)
    with np.load(DATA / "kernels.npz") as f:
        arrays = {name: f[path] for name, path in entry["arrays"].items()}
    return entry, arrays


# the entries' Elementwise functions, as their "formula" fields state them
ERF = nn.elementwise_nngp(
    jax.scipy.special.erf,
    lambda c, a, b: (2 / jnp.pi) * jnp.arcsin(2 * c / jnp.sqrt((1 + 2 * a) * (1 + 2 * b))),
)
COS = nn.elementwise_nngp(
    jnp.cos,
    lambda c, a, b: jnp.exp(-(a + b) / 2) * jnp.cosh(c),
    lambda c, a, b: jnp.exp(-(a + b) / 2) * jnp.sinh(c),
)


class ErfNet(linen.Module):
    """ew_erf_nngp: Dense(64) -> Elementwise(erf) twice, Dense(1); d_nngp_fn by autodiff."""

    @linen.compact
    def __call__(self, x):
        for _ in range(2):
            x = ERF(nn.Dense(64, w_std=1.3, b_std=0.1)(x))
        return nn.Dense(1, w_std=1.0, b_std=0.0)(x)


class CosNet(linen.Module):
    """ew_cos_dnngp_cnn: Conv(64, 3) -> Elementwise(cos) -> Conv -> Relu -> GAP -> Dense(1)."""

    @linen.compact
    def __call__(self, x):
        x = COS(nn.Conv(64, kernel_size=(3,), w_std=1.2, b_std=0.2)(x))
        x = nn.relu(nn.Conv(64, kernel_size=(3,), w_std=1.2, b_std=0.2)(x))
        return nn.Dense(1, w_std=1.0, b_std=0.0)(nn.global_average_pool(x))


@pytest.mark.parametrize(("key", "model"), [("ew_erf_nngp", ErfNet()),
                                             ("ew_cos_dnngp_cnn", CosNet())])
def test_elementwise_nngp_matches_the_nt_reference(key, model, x64):
    entry, ref = _reference(key)
    assert [layer["layer"] for layer in entry["layers"]].count("Elementwise") >= 1
    kernel_fn = ntkjax.kernel_fn(model)
    k12 = kernel_fn(jnp.asarray(ref["x1"]), jnp.asarray(ref["x2"]))
    k11 = kernel_fn(jnp.asarray(ref["x1"]))
    for got, name in ((k12.nngp, "nngp_12"), (k12.ntk, "ntk_12"), (k11.nngp, "nngp_11"),
                      (k11.ntk, "ntk_11")):
        assert max_relative_error(got, ref[name]) < TOLERANCE, (key, name)


def test_elementwise_nngp_maps_are_the_gaussian_expectations(x64):
    """cos: E[cos u cos v] and E[sin u sin v] by 2-D Gauss-Hermite quadrature (outside truth
    for the maps, including the autodiff derivative when d_nngp_fn is omitted)."""
    q11, q22, q12 = 0.7, 1.3, 0.4
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    chol = np.linalg.cholesky(np.array([[q11, q12], [q12, q22]]))
    z = np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2)
    w = np.outer(weights, weights).reshape(-1)
    u, v = (z @ chol.T).T
    sigma = np.sum(w * np.cos(u) * np.cos(v))
    sigma_dot = np.sum(w * np.sin(u) * np.sin(v))
    auto = nn.elementwise_nngp(jnp.cos, lambda c, a, b: jnp.exp(-(a + b) / 2) * jnp.cosh(c))
    for act in (COS, auto):
        maps = act.kernel_maps(jnp.array([q12]), jnp.array([q11]), jnp.array([q22]))
        np.testing.assert_allclose(maps.sigma, [sigma], rtol=1e-12)
        np.testing.assert_allclose(maps.sigma_dot, [sigma_dot], rtol=1e-12)
    np.testing.assert_allclose(COS(jnp.array([0.5])), np.cos([0.5]))


def test_elementwise_nngp_refuses_what_is_not_callable():
    with pytest.raises(ValueError, match="nngp_fn"):
        nn.elementwise_nngp(jnp.cos, 1.0)
    with pytest.raises(ValueError, match="d_nngp_fn"):
        nn.elementwise_nngp(jnp.cos, lambda c, a, b: c, "derivative")


class IndexCropNet(linen.Module):
    """idx_crop_stride: Conv(64, 3x3) -> Relu -> Index[:, 1:7, ::2, :] -> Conv -> Relu ->
    Flatten -> Dense(1)."""

    @linen.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(64, kernel_size=(3, 3), w_std=1.4, b_std=0.1)(x))
        x = nn.index(x, (slice(None), slice(1, 7), slice(None, None, 2), slice(None)))
        x = nn.relu(nn.Conv(64, kernel_size=(3, 3), w_std=1.4, b_std=0.1)(x))
        return nn.Dense(1, w_std=1.0, b_std=0.0)(nn.flatten(x))


class IndexRowNet(linen.Module):
    """idx_row_to_1d: Conv(64, 3x3) -> Relu -> Index[:, 2, ...] -> Conv(64, 3) -> Relu ->
    GlobalAvgPool -> Dense(1)."""

    @linen.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(64, kernel_size=(3, 3), w_std=1.4, b_std=0.1)(x))
        x = nn.index(x, (slice(None), 2, ...))
        x = nn.relu(nn.Conv(64, kernel_size=(3,), w_std=1.4, b_std=0.1)(x))
        return nn.Dense(1, w_std=1.0, b_std=0.0)(nn.global_average_pool(x))


class ScaleNet(linen.Module):
    """dg_scalar_rhs: Conv(64, 3) -> Relu -> DotGeneral(rhs=2.0) -> GlobalAvgPool -> Dense(1)."""

    @linen.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(64, kernel_size=(3,), w_std=1.3, b_std=0.1)(x))
        return nn.Dense(1, w_std=1.0, b_std=0.0)(nn.global_average_pool(nn.scale(x, 2.0)))


@pytest.mark.parametrize(("key", "model"), [("idx_crop_stride", IndexCropNet()),
                                             ("idx_row_to_1d", IndexRowNet()),
                                             ("dg_scalar_rhs", ScaleNet())])
def test_index_and_scale_match_the_nt_reference(key, model, x64):
    _, ref = _reference(key)
    kernel_fn = ntkjax.kernel_fn(model)
    k12 = kernel_fn(jnp.asarray(ref["x1"]), jnp.asarray(ref["x2"]))
    k11 = kernel_fn(jnp.asarray(ref["x1"]))
    for got, name in ((k12.nngp, "nngp_12"), (k12.ntk, "ntk_12"), (k11.nngp, "nngp_11"),
                      (k11.ntk, "ntk_11")):
        assert max_relative_error(got, ref[name]) < TOLERANCE, (key, name)
    # the finite network runs with the same layers
    x = jnp.asarray(ref["x1"])
    assert model.apply(model.init(jax.random.PRNGKey(0), x), x).shape == (x.shape[0], 1)


def test_index_and_scale_bad_input():
    k = ntkjax.kernels.input_kernel(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="batch axis"):
        nn.index(k, (slice(0, 1),))
    with pytest.raises(ValueError, match="channel axis"):
        nn.index(k, (slice(None), slice(None), 0))
    with pytest.raises(ValueError, match="selects nothing"):
        nn.index(k, (slice(None), slice(5, 9)))
    with pytest.raises(ValueError, match="ints, slices"):
        nn.index(k, (slice(None), [0, 1]))
    with pytest.raises(ValueError, match="finite scalar"):
        nn.scale(k, float("nan"))
