"""The conformance matrix: every public layer of ``ntkjax.nn`` and every model of
``ntkjax.models``, in small networks (tests/conformance_networks.py), x every meaning of a
network. Each cell agrees with a truth from outside the meaning under test, or raises the clear
error (``ntkjax.UnsupportedMeaning``, or the documented refusal); no cell gives a silent wrong
answer. Float64 throughout.

Meanings and their truths:

* ``kernel_fn``: ``kernel_fn(module)(x)`` on one batch ``x = [x1; x2]`` (the joint kernel,
  which the other kernel cells compare against) -- finite, exactly symmetric up to rounding and
  positive semi-definite; the ``kernel_matrix`` cells check that its ``x1`` block is the
  kernel of ``x1`` alone (an entry does not depend on the rest of the batch), and
  ``wide_limit`` that it is the limit of the finite networks;
* ``kernel_fn_x2``: ``kernel_fn(module)(x1, x2)`` equals the off-diagonal block of the joint
  kernel ``kernel_fn(module)([x1; x2])`` to 1e-12 (train-mode dropout included: its documented
  exception touches only an example with itself);
* ``kernel_matrix_blocks`` / ``_store`` / ``_devices``: ``kernel_matrix`` in blocks of 2 rows
  (``x1`` against ``x2``), into a zarr store (``x2 = None``: mirrored blocks) and on 4 forced CPU
  devices (one subprocess for every network) equal the joint kernel's blocks to 1e-12;
  ``kernel_matrix(module, x1)`` of a train-mode dropout network is the documented refusal;
* ``empirical_ntk``: the three methods of ``empirical_ntk_fn`` agree to 1e-10;
* ``wide_limit`` (slow): the empirical NTK of networks 16x wider is closer to ``kernel_fn``,
  with a log-log slope between -1 and -0.3 (fluctuations of a finite network's NTK are
  O(width^-1/2): Jacot et al. 2018; Hanin & Nica 2020; narrow networks add an O(1/width) bias;
  a wrong limit flattens the slope towards 0), as the suite's other width fits
  (tests/test_models.py, tests/test_normalization.py);
* ``feature_map`` (slow): the error of random features against ``kernel_fn`` falls like
  D^-1/2 (fitted slope in [-0.65, -0.35]: :func:`check_feature_map`), or
  ``feature_map`` raises ``UnsupportedMeaning``.

:data:`MATRIX` is the expected table (network x meaning: ``ok`` / ``unsupported`` /
``refused``), derived from the layers each network uses; compare it with the generated docs
table. Cells that still fail carry a strict xfail (:data:`XFAIL`), each with its reason.
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax.scaling import fit_power_law
from tests.conformance_networks import (
    FEATURELESS_LAYERS,
    FINITE_REFUSALS,
    KERNEL_REFUSALS,
    Net,
    by_name,
    feature_cell,
    inputs,
    networks,
)
from tests.helpers import assert_feature_error_falls_like_inverse_sqrt, xla_flags


class _NotDefinedYet(Exception):
    """Stands for ``ntkjax.UnsupportedMeaning`` until it exists (never raised: a cell that
    expects the error fails until then)."""


UnsupportedMeaning = getattr(ntkjax, "UnsupportedMeaning", None) or _NotDefinedYet

MEANINGS = ("kernel_fn", "kernel_fn_x2", "kernel_matrix_blocks", "kernel_matrix_store",
            "kernel_matrix_devices", "empirical_ntk", "wide_limit", "feature_map")
SLOW_MEANINGS = frozenset({
    "kernel_matrix_devices", "wide_limit", "feature_map", "empirical_ntk",
})
WORKER = Path(__file__).resolve().parent / "conformance_networks.py"
ROOT = WORKER.parent.parent


# Networks whose activation feature_map refuses at its default max_truncation_error (1e-2):
# sign's Hermite coefficients decay too slowly (relative tail 0.035 even at degree 64).
HERMITE_TRUNCATED: frozenset[str] = frozenset({"act_sign"})


def expected(net: Net, meaning: str) -> str:
    """``ok``, ``unsupported`` (UnsupportedMeaning) or ``refused`` (the documented ValueError
    of a finite network that has no single empirical NTK, or of a network whose
    infinite-width kernel is not the one its layers' rules would give)."""
    if meaning == "feature_map" and (FEATURELESS_LAYERS.intersection(net.layers)
                                     or net.name in HERMITE_TRUNCATED):
        return "unsupported"
    if meaning in ("empirical_ntk", "wide_limit") and set(FINITE_REFUSALS) & set(net.layers):
        return "refused"
    if meaning != "empirical_ntk" and set(KERNEL_REFUSALS) & set(net.layers):
        return "refused"
    return "ok"


MATRIX: dict[str, dict[str, str]] = {
    net.name: {meaning: expected(net, meaning) for meaning in MEANINGS} for net in networks()
}

# Cells that still fail, each seen failing.
XFAIL: dict[tuple[str, str], str] = {}


def _cells():
    for net in networks():
        for meaning in MEANINGS:
            marks = []
            if meaning in SLOW_MEANINGS:
                marks.append(pytest.mark.slow)  # statistical, or compiles for over ~5 s
            if (net.name, meaning) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[net.name, meaning]))
            yield pytest.param(net.name, meaning, marks=marks, id=f"{net.name}-{meaning}")


# ---------------------------------------------------------------- shared work (float64)


@functools.cache
def joint_kernel(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``kernel_fn(module)([x1; x2])``: (nngp, ntk) of one batch of 5 examples."""
    net = by_name(name)
    x1, x2 = inputs(net.kind)
    with jax.enable_x64(True):
        k = ntkjax.kernel_fn(net.make(8))(np.concatenate([x1, x2]))
        return np.asarray(k.nngp), np.asarray(k.ntk)


def _close(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)),
                               err_msg=what)


def _blocks(name: str, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """The joint kernel's x1-x1 block (``same``) or x1-x2 block."""
    nngp, ntk = joint_kernel(name)
    n1 = len(inputs(by_name(name).kind)[0])
    cols = slice(0, n1) if same else slice(n1, None)
    return nngp[:n1, cols], ntk[:n1, cols]


def _assert_kernel(k, name: str, same: bool, what: str) -> None:
    nngp, ntk = _blocks(name, same)
    _close(k.nngp[...], nngp, f"{what} nngp")
    _close(k.ntk[...], ntk, f"{what} ntk")


def _variables(module, x, train_dropout: bool):
    """Every parameter N(0, 1) (the NTK parameterization's initialization), from numpy."""
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    shapes = jax.eval_shape(lambda: module.init(rngs, x) if train_dropout
                            else module.init(rngs["params"], x))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                                  shapes)


def _apply_fn(module, train_dropout: bool):
    if train_dropout:
        return lambda p, a: module.apply(p, a, rngs={"dropout": jax.random.PRNGKey(2)})
    return module.apply


# ---------------------------------------------------------------- the meanings


def check_kernel_fn(net: Net, _) -> None:
    nngp, ntk = joint_kernel(net.name)
    for what, a in (("nngp", nngp), ("ntk", ntk)):
        assert np.all(np.isfinite(a)), what
        np.testing.assert_allclose(a, a.T, rtol=1e-12, atol=1e-14 * np.max(np.abs(a)),
                                   err_msg=what)
        assert np.linalg.eigvalsh(a)[0] >= -1e-10 * np.max(np.abs(a)), (what, a)


def check_kernel_fn_x2(net: Net, _) -> None:
    x1, x2 = inputs(net.kind)
    _assert_kernel(ntkjax.kernel_fn(net.make(8))(x1, x2), net.name, False, "kernel_fn(x1, x2)")


def check_kernel_matrix_blocks(net: Net, _) -> None:
    x1, x2 = inputs(net.kind)
    k = ntkjax.kernel_matrix(net.make(8), x1, x2, block_size=2)
    _assert_kernel(k, net.name, False, "kernel_matrix(x1, x2)")
    variances = np.diagonal(joint_kernel(net.name)[0])
    _close(k.var1, variances[: len(x1)], "var1")
    _close(k.var2, variances[len(x1):], "var2")


def check_kernel_matrix_store(net: Net, tmp_path: Path) -> None:
    x1, x2 = inputs(net.kind)
    module = net.make(8)
    if net.train_dropout:  # documented: its blocks cannot tell an example from its copy
        with pytest.raises(ValueError, match="Dropout"):
            ntkjax.kernel_matrix(module, x1, block_size=2, out=tmp_path / "refused.zarr")
        k = ntkjax.kernel_matrix(module, x1, x2, block_size=2, out=tmp_path / "k.zarr")
        _assert_kernel(k, net.name, False, "stored kernel_matrix(x1, x2)")
        return
    k = ntkjax.kernel_matrix(module, x1, block_size=2, out=tmp_path / "k.zarr")
    _assert_kernel(k, net.name, True, "stored kernel_matrix(x1)")


@pytest.fixture(scope="module")
def device_kernels(tmp_path_factory) -> dict[str, np.ndarray]:
    """Every network's ``kernel_matrix`` on 4 forced CPU devices: one subprocess for the whole
    run (the pytest-xdist workers share the basetemp's parent; the first to take the lock
    computes, the others read its file)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "conformance_devices.npz"
    with open(shared / "conformance_devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            partial = shared / "conformance_devices.partial.npz"
            env = dict(os.environ, XLA_FLAGS=xla_flags(4),
                       JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.run([sys.executable, str(WORKER), "devices", str(partial)],
                                  env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-3000:]
            partial.replace(out)
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


def check_kernel_matrix_devices(net: Net, device_kernels: dict[str, np.ndarray]) -> None:
    i = next(i for i, n in enumerate(networks()) if n.name == net.name)
    error = device_kernels.get(f"{i}/error")
    if error is not None and str(error).startswith("ValueError: "):
        raise ValueError(str(error).removeprefix("ValueError: "))  # the worker's, as raised
    assert error is None, str(error)
    nngp, ntk = _blocks(net.name, same=False)
    _close(device_kernels[f"{i}/nngp"], nngp, "4 devices nngp")
    _close(device_kernels[f"{i}/ntk"], ntk, "4 devices ntk")


def check_empirical_ntk(net: Net, _) -> None:
    x1, x2 = inputs(net.kind)
    module = net.make(8)
    params = _variables(module, x1, net.train_dropout)
    apply = _apply_fn(module, net.train_dropout)
    # the shape only: an eager call would compile each of the network's operations apart
    assert jax.eval_shape(apply, params, x1).shape == (len(x1), 1)
    kernels = [np.asarray(ntkjax.empirical_ntk_fn(apply, ntk_method=method)(params, x1, x2))
               for method in ("jacobian", "ntk_vp", "structured")]
    assert kernels[0].shape == (len(x1), len(x2)) and np.all(np.isfinite(kernels[0]))
    scale = np.max(np.abs(kernels[0]))
    for method, k in zip(("ntk_vp", "structured"), kernels[1:], strict=True):
        np.testing.assert_allclose(k, kernels[0], rtol=1e-10, atol=1e-10 * scale,
                                   err_msg=method)


WIDTHS = {"vector": (16, 256), "image": (8, 128), "sequence": (16, 256)}
NETWORK_DRAWS = 8


def check_wide_limit(net: Net, _) -> None:
    """RMS over 8 networks of ||Theta_emp - Theta||_F / ||Theta||_F at two widths 16x apart:
    log-log slope in [-1, -0.3] (the suite's [-0.7, -0.3], widened to -1 for the O(1/width)
    bias of the narrow networks that a two-point fit sees). One compiled empirical NTK per
    width, called per network (cheaper to compile than a vmapped one)."""
    x1, x2 = inputs(net.kind)
    x = np.concatenate([x1, x2])
    theta = joint_kernel(net.name)[1]
    errors = []
    for width in WIDTHS[net.kind]:
        module = net.make(width)
        shapes = _variables(module, x[:1], net.train_dropout)
        # examples are independent in these networks (the empirical_ntk cells run the default
        # probe, batch="auto"); here it would compile a probe per width for the same answer
        ntk_fn = ntkjax.empirical_ntk_fn(_apply_fn(module, net.train_dropout),
                                         batch="per_sample")
        rng = np.random.default_rng(width)
        sq = []
        for _ in range(NETWORK_DRAWS):
            params = jax.tree_util.tree_map(
                lambda s, r=rng: jnp.asarray(r.standard_normal(s.shape), s.dtype), shapes)
            emp = np.asarray(ntk_fn(params, x))
            sq.append(np.sum((emp - theta) ** 2) / np.sum(theta**2))
        errors.append(float(np.sqrt(np.mean(sq))))
    fit = fit_power_law(WIDTHS[net.kind], errors)
    # between the O(width^-1) bias of the narrow networks and their O(width^-1/2)
    # fluctuations; a wrong limit flattens it towards 0
    assert -1.0 <= fit.slope <= -0.3, (fit, errors)


def check_feature_map(net: Net, _) -> None:
    """Relative Frobenius errors of the NNGP and NTK feature Gram matrices against
    ``kernel_fn`` on 5 examples, geometric mean over keys (32 to 96) at each of the network's
    two feature counts D (a factor 16 to 64 apart: :func:`tests.conformance_networks.feature_cell`):
    log-log slope in [-0.65, -0.35] (or exact: networks without a random layer).

    The Monte Carlo law: an estimate from D independent samples errs like D^-1/2 (sqrt(D)
    times the error has a law that does not depend on D, so its geometric mean falls like
    D^-1/2), and a wrong limit (a bias: a missing cross term, a truncated expansion) makes the
    error plateau, which flattens the slope towards 0. The geometric mean, not the mean
    square: the error of one key scatters by a factor e^0.45 (5 examples of 3 inputs give the
    Frobenius norm few independent directions) and composed sketches have rare large errors;
    the log damps both (tests/helpers.py). The sizes and key counts, and what they cost, are
    set and measured beside :func:`tests.conformance_networks.feature_cell`."""
    x1, x2 = inputs(net.kind)
    x = np.concatenate([x1, x2])
    module = net.make(8)
    sizes, keys = feature_cell(net)
    assert_feature_error_falls_like_inverse_sqrt(
        lambda d, key: ntkjax.feature_map(module, key=key, num_features=d)(x),
        joint_kernel(net.name), sizes, keys, final_below=0.5, average="geometric",
        exact_ok=True)


CHECKS = {name: globals()[f"check_{name}"] for name in MEANINGS}


@pytest.mark.parametrize("name, meaning", list(_cells()))
def test_conformance(name: str, meaning: str, request, x64) -> None:
    net = by_name(name)
    arg = (request.getfixturevalue("device_kernels") if meaning == "kernel_matrix_devices"
           else request.getfixturevalue("tmp_path") if meaning == "kernel_matrix_store"
           else None)
    outcome = MATRIX[name][meaning]
    if outcome == "unsupported":  # the error names the layer (or the Hermite expansion)
        layers = FEATURELESS_LAYERS.intersection(net.layers)
        with pytest.raises(UnsupportedMeaning,
                           match="|".join(sorted(name.split("(")[0] for name in layers))
                           or "Hermite expansion"):
            CHECKS[meaning](net, arg)
    elif outcome == "refused":
        with pytest.raises(ValueError, match=next(
                text for layer, text in {**FINITE_REFUSALS, **KERNEL_REFUSALS}.items()
                if layer in net.layers)):
            CHECKS[meaning](net, arg)
    else:
        CHECKS[meaning](net, arg)


def test_matrix_agrees_with_the_declared_table():
    """The layers this matrix expects to lack random features are exactly those whose
    declaration (the generated table of docs/development.md) says so."""
    from ntkjax import _meanings

    declared = {row[0].removeprefix("ntkjax.nn.") for row in _meanings.meaning_rows()
                if row[0].startswith("ntkjax.nn.") and row[3] == "UnsupportedMeaning"}
    expected_here = {name.removesuffix("(train)") for name in FEATURELESS_LAYERS}
    expected_here |= {"index", "image_resize"}  # no feature rule yet; not in these networks
    expected_here |= {"dot_general"}  # no feature rule; not in these networks
    assert declared == expected_here
