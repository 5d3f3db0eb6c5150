"""Monte Carlo kernels (ntkjax.monte_carlo): convergence to the infinite-width kernels with a
fitted S^-1/2 slope, calibrated standard errors, and independence of the batch size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax.models import MLP
from ntkjax.monte_carlo import monte_carlo_kernel_fn
from ntkjax.scaling import fit_power_law

# One hidden layer: its empirical NNGP and NTK average exactly to the infinite-width kernels
# at any width (the readout sums independent hidden units), so the Monte Carlo error is pure
# sampling error.
MODEL = MLP(features=(16, 2), activation="erf", w_std=1.5, b_std=0.3)


def inputs(dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(0), (5, 3), dtype)


@pytest.mark.slow
def test_converges_to_kernel_fn_like_one_over_sqrt_samples(x64):
    x = inputs()
    exact = ntkjax.kernel_fn(MODEL)(x)
    samples = (16, 64, 256)
    repeats = 32
    errors = {"nngp": [], "ntk": []}
    z_scores = {"nngp": [], "ntk": []}
    for s in samples:
        mc = monte_carlo_kernel_fn(MODEL, jax.random.PRNGKey(s), s, batch_size=8)
        sq = {"nngp": [], "ntk": []}
        for r in range(repeats):
            k = mc(x, key=jax.random.PRNGKey(1000 * s + r))
            for name in sq:
                diff = np.asarray(getattr(k, name)) - np.asarray(getattr(exact, name))
                sq[name].append(np.mean(diff**2))
                if s == samples[-1]:
                    z_scores[name].append(diff / np.asarray(getattr(k, name + "_stderr")))
        for name in sq:
            errors[name].append(float(np.sqrt(np.mean(sq[name]))))
    for name in errors:
        fit = fit_power_law(samples, errors[name])
        assert -0.65 < fit.slope < -0.35, (name, errors[name], fit)
        # standard errors are calibrated: (estimate - limit) / stderr has RMS about 1
        rms_z = float(np.sqrt(np.mean(np.square(z_scores[name]))))
        assert 0.7 < rms_z < 1.4, (name, rms_z)


def test_batch_size_does_not_change_the_estimate(x64):
    x = inputs()
    x2 = x[:3] + 0.5
    key = jax.random.PRNGKey(3)
    whole = monte_carlo_kernel_fn(MODEL, key, 10)(x, x2)
    batched = monte_carlo_kernel_fn(MODEL, key, 10, batch_size=4)(x, x2)  # 4 + 4 + 2
    for name in ("nngp", "ntk", "nngp_stderr", "ntk_stderr"):
        np.testing.assert_allclose(getattr(batched, name), getattr(whole, name), rtol=1e-10)
    assert whole.nngp.shape == (5, 3) and whole.num_samples == 10
    # by hand: the mean over draws of the per-output empirical kernels
    keys = jax.random.split(key, 10)
    ntk_fn = ntkjax.empirical_ntk_fn(MODEL.apply, outputs="trace")
    by_hand = np.mean([np.asarray(ntk_fn(MODEL.init(k, x[:1]), x, x2)) / 2 for k in keys], 0)
    np.testing.assert_allclose(whole.ntk, by_hand, rtol=1e-10)
    out = [np.asarray(MODEL.apply(MODEL.init(k, x[:1]), x)) for k in keys]
    out2 = [np.asarray(MODEL.apply(MODEL.init(k, x[:1]), x2)) for k in keys]
    draws = np.stack([a @ b.T / 2 for a, b in zip(out, out2, strict=True)])
    np.testing.assert_allclose(whole.nngp, draws.mean(0), rtol=1e-10)
    np.testing.assert_allclose(whole.nngp_stderr, draws.std(0, ddof=1) / np.sqrt(10), rtol=1e-8)


def test_init_apply_pair_and_bad_input():
    x = inputs(jnp.float32)
    mc = monte_carlo_kernel_fn((MODEL.init, MODEL.apply), jax.random.PRNGKey(0), 4)
    k = mc(x)
    assert k.ntk.dtype == jnp.float32
    np.testing.assert_allclose(k.nngp, k.nngp.T, rtol=1e-6)
    with pytest.raises(ValueError, match="num_samples"):
        monte_carlo_kernel_fn(MODEL, jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="batch_size"):
        monte_carlo_kernel_fn(MODEL, jax.random.PRNGKey(0), 4, batch_size=0)
    with pytest.raises(ValueError, match="model"):
        monte_carlo_kernel_fn(lambda p, x: x, jax.random.PRNGKey(0), 4)
    with pytest.raises(ValueError, match="batch axis"):
        mc(jnp.ones(3))


def test_several_sample_counts_in_one_pass_with_output_axes(x64):
    """Each count's estimate is the mean (and standard error) over the first S draws of the
    per-draw kernels with all output axes, computed here from the definition."""
    x = inputs()
    x2 = x[:2] + 0.25
    key = jax.random.PRNGKey(11)
    counts = [2, 5, 9]
    estimates = monte_carlo_kernel_fn(MODEL, key, counts, batch_size=4, outputs="full")(x, x2)
    assert [e.num_samples for e in estimates] == counts
    keys = jax.random.split(key, counts[-1])
    ntk_fn = ntkjax.empirical_ntk_fn(MODEL.apply, outputs="full")
    ntks, nngps = [], []
    for k in keys:
        params = MODEL.init(k, x[:1])
        ntks.append(np.asarray(ntk_fn(params, x, x2)))
        a, b = np.asarray(MODEL.apply(params, x)), np.asarray(MODEL.apply(params, x2))
        nngps.append(np.einsum("ai,bj->abij", a, b))
    for est, s in zip(estimates, counts, strict=True):
        assert est.ntk.shape == (5, 2, 2, 2)
        np.testing.assert_allclose(est.ntk, np.mean(ntks[:s], 0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(est.nngp, np.mean(nngps[:s], 0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            est.ntk_stderr, np.std(ntks[:s], 0, ddof=1) / np.sqrt(s), rtol=1e-7, atol=1e-12
        )
    # the per-output "diagonal" layout of the last count is the diagonal of the full one
    diag = monte_carlo_kernel_fn(MODEL, key, counts[-1], outputs="diagonal")(x, x2)
    np.testing.assert_allclose(
        diag.ntk, np.diagonal(np.mean(ntks, 0), axis1=2, axis2=3), rtol=1e-10
    )


def test_batch_coupled_model_gets_the_whole_batch_kernel():
    """A model that centers its batch: each draw's NTK is that of the batched function,
    (X - mean)(X - mean)^T + 1 per output for a Dense readout (never the per-example zeros)."""
    import flax.linen as nn

    dense = nn.Dense(2)
    init_fn = lambda k, x: dense.init(k, x)
    apply_fn = lambda p, x: dense.apply(p, x - x.mean(0))
    x = inputs(jnp.float32)
    k = monte_carlo_kernel_fn((init_fn, apply_fn), jax.random.PRNGKey(0), 3)(x)
    centered = np.asarray(x - x.mean(0), np.float64)
    np.testing.assert_allclose(k.ntk, centered @ centered.T + 1.0, rtol=1e-5, atol=1e-5)


def test_sample_counts_and_outputs_bad_input():
    for bad in ([], [3, 3], [4, 2], [2, 0], [2.5]):
        with pytest.raises(ValueError, match="num_samples"):
            monte_carlo_kernel_fn(MODEL, jax.random.PRNGKey(0), bad)
    with pytest.raises(ValueError, match="outputs"):
        monte_carlo_kernel_fn(MODEL, jax.random.PRNGKey(0), 2, outputs="sum")
