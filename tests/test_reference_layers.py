"""kernel_fn against neural-tangents' float64 reference kernels for the layers of
``tests/data/nt_layers`` (convolutions with flatten readouts, pooling, transposed convolutions,
normalization, dropout, attention, branches, activations, standard parameterization).

Every entry whose layers ntkjax has is compared, for ``x2`` given and ``x2 = None``, to 1e-10
relative (max |error| / max |reference|) in float64; nt's own x-with-itself NTK entries carry an
error of up to ~1e-8 (its README), so the diagonal of ``ntk_11`` is compared at 1e-7. Entries
with a layer ntkjax does not have yet are skipped, naming the layer.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import ntkjax
from tests.helpers import max_relative_error
from tests.nt_stax import Unsupported, build, load_reference

META, ARRAYS = load_reference()
ENTRIES = META["entries"]


def test_reference_set_is_complete():
    assert len(ENTRIES) == 66
    assert all(set(e["arrays"]) == {"x1", "x2", "nngp_12", "ntk_12", "nngp_11", "ntk_11"}
               for e in ENTRIES)


def _compare(got, want, name: str, *, self_kernel: bool) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if self_kernel and name.startswith("ntk"):
        off = ~np.eye(len(want), dtype=bool)
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)[off]) / scale < 1e-10, name
        assert np.max(np.abs(np.diagonal(got) - np.diagonal(want))) / scale < 1e-7, name
    else:
        assert max_relative_error(got, want) < 1e-10, name


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["key"] for e in ENTRIES])
def test_matches_neural_tangents_float64(entry, x64):
    try:
        net = build(entry["layers"])
    except Unsupported as missing:
        pytest.skip(f"ntkjax has no {missing} yet")
    arrays = {k: ARRAYS[v] for k, v in entry["arrays"].items()}
    fn = jax.jit(ntkjax.kernel_fn(net))
    k12 = fn(arrays["x1"], arrays["x2"])
    k11 = fn(arrays["x1"])
    _compare(k12.nngp, arrays["nngp_12"], "nngp_12", self_kernel=False)
    _compare(k12.ntk, arrays["ntk_12"], "ntk_12", self_kernel=False)
    _compare(k11.nngp, arrays["nngp_11"], "nngp_11", self_kernel=True)
    _compare(k11.ntk, arrays["ntk_11"], "ntk_11", self_kernel=True)
