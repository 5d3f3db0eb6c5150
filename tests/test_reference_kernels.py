"""kernel_fn against neural-tangents' float64 reference kernels (tests/data/nt_kernels, a copy of
the project's shared reference set).

Every entry -- fully connected and convolutional (Conv 3x3 SAME, NTK parameterization, then a
flatten or global-average-pool readout and Dense(1), on 6x6x2 NHWC images) -- must match to
1e-10 relative in float64, and float32 must stay within 1e-5 (max-abs error over max-abs value)
of the reference.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import models, nn
from tests.helpers import max_relative_error

_JSON = Path(__file__).resolve().parent / "data" / "nt_kernels" / "kernels.json"
_META = json.loads(_JSON.read_text())
ENTRIES = _META["entries"]
FC = [e for e in ENTRIES if e["kind"] == "fully_connected"]
CONV = [e for e in ENTRIES if e["kind"] != "fully_connected"]


def _activation(name: str):
    if name.startswith("leaky_relu_"):
        return functools.partial(nn.leaky_relu, negative_slope=float(name.rsplit("_", 1)[1]))
    if name.startswith("rbf_"):
        return functools.partial(nn.rbf, gamma=float(name.rsplit("_", 1)[1]))
    return name


def _model(entry) -> models.MLP:
    return models.MLP(
        features=(entry["hidden_width"],) * entry["hidden_layers"] + (1,),
        activation=_activation(entry["activation"]),
        w_std=entry["W_std"],
        b_std=entry["b_std"],
        parameterization=entry["parameterization"],
    )


@pytest.fixture(scope="module")
def data(reference_dir):
    with np.load(reference_dir / "kernels.npz") as f:
        return dict(f)


def test_reference_set_is_complete(reference_dir):
    assert len(FC) == 40 and len(CONV) == 2
    assert not _META["nonfinite"]


@pytest.mark.parametrize("entry", FC, ids=[e["key"] for e in FC])
def test_fully_connected_float64(entry, data, x64):
    x1 = jnp.asarray(data[entry["x1"]], jnp.float64)
    x2 = jnp.asarray(data[entry["x2"]], jnp.float64)
    k = ntkjax.kernel_fn(_model(entry))(x1, x2)
    for name in ("nngp", "ntk"):
        got, want = np.asarray(getattr(k, name)), data[f"{entry['key']}_{name}"]
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.max(np.abs(want)))


@pytest.mark.parametrize("entry", FC, ids=[e["key"] for e in FC])
@pytest.mark.xla_optimized
def test_fully_connected_float32(entry, data):
    x1 = jnp.asarray(data[entry["x1"]], jnp.float32)
    x2 = jnp.asarray(data[entry["x2"]], jnp.float32)
    k = ntkjax.kernel_fn(_model(entry))(x1, x2)
    for name in ("nngp", "ntk"):
        got = getattr(k, name)
        assert got.dtype == jnp.float32
        assert max_relative_error(got, data[f"{entry['key']}_{name}"]) <= 1e-5


def _cnn(entry) -> models.CNN:
    assert entry["kind"] == "conv3x3_same"
    readout = {"flatten": "flatten", "global_avg_pool": "global_average_pool"}[entry["readout"]]
    return models.CNN(
        features=(16,) * entry["hidden_layers"] + (1,),  # any width: the limit is exact
        kernel_size=3,
        padding="SAME",
        activation=_activation(entry["activation"]),
        readout=readout,
        w_std=entry["W_std"],
        b_std=entry["b_std"],
        parameterization=entry["parameterization"],
    )


@pytest.mark.parametrize("entry", CONV, ids=[e["key"] for e in CONV])
def test_convolutional_float64(entry, data, x64):
    x1 = jnp.asarray(data[entry["x1"]], jnp.float64)
    x2 = jnp.asarray(data[entry["x2"]], jnp.float64)
    assert x1.ndim == 4  # NHWC images
    k = ntkjax.kernel_fn(_cnn(entry))(x1, x2)
    for name in ("nngp", "ntk"):
        got, want = np.asarray(getattr(k, name)), data[f"{entry['key']}_{name}"]
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.max(np.abs(want)))


@pytest.mark.parametrize("entry", CONV, ids=[e["key"] for e in CONV])
@pytest.mark.xla_optimized
def test_convolutional_float32(entry, data):
    x1 = jnp.asarray(data[entry["x1"]], jnp.float32)
    x2 = jnp.asarray(data[entry["x2"]], jnp.float32)
    k = jax.jit(ntkjax.kernel_fn(_cnn(entry)))(x1, x2)
    for name in ("nngp", "ntk"):
        got = getattr(k, name)
        assert got.dtype == jnp.float32
        assert max_relative_error(got, data[f"{entry['key']}_{name}"]) <= 1e-5
