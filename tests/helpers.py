"""chex-style test helpers shared by the suite."""

from __future__ import annotations

import os
import socket

import jax
import numpy as np


def assert_trees_all_close(actual, expected, *, rtol: float = 1e-7, atol: float = 0.0) -> None:
    """Asserts two pytrees have the same structure and leaf shapes, and close values."""
    a_leaves, a_def = jax.tree_util.tree_flatten(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def max_relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the error measure used for kernel matrices."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))


def with_and_without_jit(fn):
    """Both ``fn`` and ``jax.jit(fn)``: parametrize a test over them, as chex.variants does."""
    return [fn, jax.jit(fn)]


def assert_unbiased_estimate(samples, truth, *, closer: float, label: object = None) -> None:
    """Monte Carlo estimates ``samples`` (keys, n, n) of a symmetric ``truth`` (n, n) are
    unbiased: every upper-triangle entry's mean is within 4.5 standard errors of the truth, one
    draw is a genuine estimate (relative Frobenius error > 0.02, not exact) and the mean is
    closer than ``closer`` times one draw's error (about 1/sqrt(keys) for an unbiased one)."""
    samples, truth = np.asarray(samples), np.asarray(truth)
    keys = samples.shape[0]
    rows, cols = np.triu_indices(truth.shape[0])
    z = (samples.mean(0) - truth) / (samples.std(0, ddof=1) / np.sqrt(keys))
    assert np.max(np.abs(z[rows, cols])) < 4.5, (label, np.round(z[rows, cols], 1))

    def rel(a):
        return np.linalg.norm(a - truth) / np.linalg.norm(truth)

    single = np.mean([rel(s) for s in samples])
    assert single > 0.02, (label, single)  # a genuine Monte Carlo estimate, not exact
    assert rel(samples.mean(0)) < closer * single, (label, rel(samples.mean(0)), single)


def assert_feature_error_falls_like_inverse_sqrt(features_at, exact, sizes, keys: int, *,
                                                 final_below: float, average: str = "rms",
                                                 exact_ok: bool = False) -> np.ndarray:
    """Random features against their exact kernel: ``features_at(d, key)`` gives features of
    size ``d`` drawn with ``key`` (keys 0 .. keys - 1); the relative Frobenius errors of their
    NNGP and NTK Gram matrices against ``exact`` (a Kernel, or a pair (nngp, ntk)), averaged
    over the keys at each size, have a fitted log-log slope in [-0.65, -0.35] (Monte Carlo's
    -1/2: a plateau from a bias would flatten it), and fall below ``final_below`` at the
    largest size. Returns the errors, shape (len(sizes), keys, 2).

    ``average``: ``"rms"`` (root mean square: E|K_D - K|^2 = c / D exactly for a sum of D
    independent features) or ``"geometric"`` (exp of the mean log error: in the Monte Carlo
    regime sqrt(D) times the error has a D-independent law, so any location of it falls like
    D^-1/2; the log damps the rare large errors of composed sketches, which make the mean
    square noisy). ``exact_ok``: a kernel whose features are exact at every size (error
    < 1e-10: no random layer) passes."""
    nngp, ntk = (exact.nngp, exact.ntk) if hasattr(exact, "ntk") else exact
    truths = [np.asarray(t, np.float64) for t in (nngp, ntk)]
    errors = np.zeros((len(sizes), keys, 2))
    for j, d in enumerate(sizes):
        for s in range(keys):
            f = features_at(d, jax.random.key(s))
            for i, (phi, truth) in enumerate(zip((f.nngp, f.ntk), truths, strict=True)):
                phi = np.asarray(phi, np.float64)
                errors[j, s, i] = np.linalg.norm(phi @ phi.T - truth) / np.linalg.norm(truth)
    for which in range(2):
        e = errors[:, :, which]
        if exact_ok and np.all(e < 1e-10):
            continue
        mean = (np.sqrt(np.mean(e**2, axis=1)) if average == "rms"
                else np.exp(np.mean(np.log(e), axis=1)))
        slope = np.polyfit(np.log(sizes), np.log(mean), 1)[0]
        assert -0.65 <= slope <= -0.35, (("nngp", "ntk")[which], slope, mean)
        assert mean[-1] < final_below, (("nngp", "ntk")[which], mean)
    return errors


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a subprocess with ``devices`` forced CPU devices: this process's flags
    (the suite's compile options, tests/conftest.py) and the device count."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count=")]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


def free_port() -> int:
    """A local TCP port that nothing listened on a moment ago (for a ``jax.distributed``
    coordinator started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
