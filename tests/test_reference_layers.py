"""kernel_fn against neural-tangents' float64 reference kernels for the layers of
``tests/data/nt_layers`` (convolutions with flatten readouts, pooling, transposed convolutions,
normalization, dropout, attention, branches, activations, standard parameterization).

Every entry whose layers ntkjax has is compared, for ``x2`` given and ``x2 = None``, to 1e-10
relative (max |error| / max |reference|) in float64. nt's NTK entries of two inputs at angle 0
-- an input with itself, on the diagonal of ``ntk_11``, or two parallel inputs (the ``vec`` set
has a row that is a multiple of another) -- carry an error of up to ~1e-8 (its README), so those
entries are compared at 1e-7. Entries with a layer ntkjax does not have yet are skipped, naming
the layer. The entries nt could not compute finitely (RectifiedMonomial) are compared on the
cross kernels nt stored, and must be finite everywhere here.
"""

from __future__ import annotations

import numpy as np
import pytest

import ntkjax
from tests.helpers import max_relative_error
from tests.nt_stax import Unsupported, build, load_reference

META, ARRAYS = load_reference()
ENTRIES = META["entries"]
PARTIAL = [e for e in META["skipped"] if "partial" in e]


def test_reference_set_is_complete():
    assert len(ENTRIES) == 66
    assert all(set(e["arrays"]) == {"x1", "x2", "nngp_12", "ntk_12", "nngp_11", "ntk_11"}
               for e in ENTRIES)


def _angle_zero(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """(N1, N2) mask of input pairs at angle 0 (parallel, same direction)."""
    a, b = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
    cos = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    return cos > 1 - 1e-12


def _compare(got, want, name: str, angle_zero: np.ndarray) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if name.startswith("ntk"):
        scale = np.max(np.abs(want))
        err = np.abs(got - want) / scale
        assert np.max(err[~angle_zero], initial=0) < 1e-10, name
        assert np.max(err[angle_zero], initial=0) < 1e-7, name
    else:
        assert max_relative_error(got, want) < 1e-10, name


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["key"] for e in ENTRIES])
def test_matches_neural_tangents_float64(entry, x64):
    try:
        net = build(entry["layers"])
    except Unsupported as missing:
        pytest.skip(f"ntkjax has no {missing} yet")
    arrays = {k: ARRAYS[v] for k, v in entry["arrays"].items()}
    x1, x2 = arrays["x1"], arrays["x2"]
    # not wrapped in jax.jit: vector entries then share the op-by-op compilation cache (3x
    # faster in total); inputs with positions are compiled as one call by kernel_fn itself
    fn = ntkjax.kernel_fn(net)
    k12 = fn(x1, x2)
    k11 = fn(x1)
    _compare(k12.nngp, arrays["nngp_12"], "nngp_12", _angle_zero(x1, x2))
    _compare(k12.ntk, arrays["ntk_12"], "ntk_12", _angle_zero(x1, x2))
    _compare(k11.nngp, arrays["nngp_11"], "nngp_11", _angle_zero(x1, x1))
    _compare(k11.ntk, arrays["ntk_11"], "ntk_11", _angle_zero(x1, x1))


@pytest.mark.parametrize("entry", PARTIAL, ids=[e["key"] for e in PARTIAL])
def test_finite_where_neural_tangents_is_not(entry, x64):
    """nt's RectifiedMonomial is NaN on every x-with-itself entry (README); ntkjax's kernel is
    finite there and matches the x1-x2 kernels nt could compute."""
    arrays = {k: ARRAYS[v] for k, v in entry["partial"]["arrays"].items()}
    fn = ntkjax.kernel_fn(build(entry["layers"]))
    k12 = fn(arrays["x1"], arrays["x2"])
    assert max_relative_error(k12.nngp, arrays["nngp_12"]) < 1e-10
    assert max_relative_error(k12.ntk, arrays["ntk_12"]) < 1e-10
    k11 = fn(arrays["x1"])
    assert np.all(np.isfinite(k11.nngp)) and np.all(np.isfinite(k11.ntk))
    # the x-with-itself kernel is the x1-x2 kernel with x2 a copy of x1 (no dropout here)
    copy = fn(arrays["x1"], arrays["x1"].copy())
    np.testing.assert_allclose(k11.nngp, copy.nngp, rtol=1e-12)
    np.testing.assert_allclose(k11.ntk, copy.ntk, rtol=1e-12)
