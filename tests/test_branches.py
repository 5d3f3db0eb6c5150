"""ntkjax.nn.branches: concatenate and multiply on arrays and on kernels -- the channel
concatenation of inputs against the input kernel of the concatenated inputs (exact), products
against the product rule, and the spatial concatenation of independent branches against Monte
Carlo over finite networks. (Channel concatenation and products inside networks are checked
against neural-tangents in test_reference_layers: fanout_concat, fanout_prod.)"""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from ntkjax.kernels import input_kernel
from tests.helpers import max_relative_error
from tests.random_params import normal, ntk_param_sampler


def _x(n=5, shape=(6,), seed=0, dtype=jnp.float64):
    return normal((n, *shape), seed, dtype)


def test_on_arrays():
    a, b = jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 5))
    np.testing.assert_array_equal(nn.concatenate([a, b]), jnp.concatenate([a, b], axis=-1))
    np.testing.assert_array_equal(nn.concatenate([a, a], axis=1), jnp.concatenate([a, a], 1))
    np.testing.assert_array_equal(nn.multiply(a, 2 * a, 3 * a), 6 * a)
    with pytest.raises(ValueError, match="batch axis"):
        nn.concatenate([a, a], axis=0)
    with pytest.raises(ValueError, match="one shape"):
        nn.multiply(a, b)
    with pytest.raises(ValueError, match="mix"):
        nn.concatenate([a, input_kernel(a)])


def test_channel_concatenation_of_inputs_is_the_input_kernel_of_the_concatenation(x64):
    """x.x' / (C1 + C2) = (C1 K1 + C2 K2) / (C1 + C2): exact for any inputs, x2 given or not,
    vectors or images."""

    @jax.jit
    def both(a1, b1, a2, b2, img1, img2):
        got = [nn.concatenate([input_kernel(a1, a2), input_kernel(b1, b2)]),
               nn.concatenate([input_kernel(a1), input_kernel(b1)]),
               nn.concatenate([input_kernel(img1), input_kernel(img2)])]
        want = [input_kernel(jnp.concatenate([a1, b1], -1), jnp.concatenate([a2, b2], -1)),
                input_kernel(jnp.concatenate([a1, b1], -1)),
                input_kernel(jnp.concatenate([img1, img2], -1))]
        return got, want

    got, want = both(_x(5, (3,), 0), _x(5, (7,), 1), _x(4, (3,), 2), _x(4, (7,), 3),
                     _x(3, (4, 5, 2), 4), _x(3, (4, 5, 3), 5))
    for g, w in zip(got, want, strict=True):
        for name in ("nngp", "ntk", "var1", "var2"):
            np.testing.assert_allclose(getattr(g, name), getattr(w, name), rtol=1e-13,
                                       atol=1e-15)
        assert g.width == w.width
        assert g.non_gaussian  # a mixture: an activation needs a dense layer first
    k = nn.concatenate([input_kernel(_x(2, (3,))), input_kernel(_x(2, (4,)))])
    assert k.same_inputs
    with pytest.raises(ValueError, match="concatenate"):
        nn.relu(k)


def test_spatial_concatenation_is_block_diagonal_and_products(x64):
    h = input_kernel(_x(3, (3, 4), 0))
    a, b = nn.Dense(8, w_std=1.3).apply({}, h), nn.Dense(8, b_std=0.5).apply({}, h)
    k = nn.concatenate([a, b], axis=1)
    assert k.shape == (3, 3, 6, 6) and k.var1.shape == (3, 6, 6) and k.same_inputs
    np.testing.assert_array_equal(k.nngp[:, :, :3, :3], a.nngp)
    np.testing.assert_array_equal(k.nngp[:, :, 3:, 3:], b.nngp)
    assert np.all(np.asarray(k.nngp[:, :, :3, 3:]) == 0)
    np.testing.assert_array_equal(k.var1[:, 3:, 3:], b.var1)
    with pytest.raises(ValueError, match="zero-mean Gaussian"):
        nn.concatenate([nn.relu(a), b], axis=1)
    with pytest.raises(ValueError, match="same number of channels"):
        nn.concatenate([a, nn.Dense(4).apply({}, h)], axis=1)
    with pytest.raises(ValueError, match="batch axis"):
        nn.concatenate([a, b], axis=0)
    # products: Sigma_a Sigma_b and Theta_a Sigma_b + Sigma_a Theta_b
    p = nn.multiply(a, b)
    np.testing.assert_allclose(p.nngp, a.nngp * b.nngp, rtol=1e-15)
    np.testing.assert_allclose(p.ntk, a.ntk * b.nngp + a.nngp * b.ntk, rtol=1e-15)
    assert p.same_inputs and p.non_gaussian == "ntkjax.nn.multiply"
    with pytest.raises(ValueError, match="same shape and width"):
        nn.multiply(a, nn.Dense(4).apply({}, h))


class SpatialJoin(linen.Module):
    """Two Dense branches of sequences joined along the length axis, then relu, pooling and a
    readout."""

    width: int = 64

    @linen.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width, w_std=1.5, b_std=0.1)(x))
        a = nn.Dense(self.width, w_std=1.2, b_std=0.1)(h)
        b = nn.Dense(self.width, w_std=0.8, b_std=0.3)(h)
        return nn.Dense(1)(nn.global_average_pool(nn.relu(nn.concatenate([a, b], axis=1))))


@pytest.mark.slow
def test_spatial_concatenation_nngp_matches_monte_carlo_over_networks(x64):
    """E[f(x) f(x')] over 3000 networks of width 64 against the NNGP (sampling error ~3 %,
    finite-width bias ~2 %): positions from different branches are independent."""
    x = _x(3, (3, 2), 7)
    module = SpatialJoin()
    sample = ntk_param_sampler(module, x)
    outs = jax.jit(jax.vmap(lambda k: module.apply(sample(k), x)[:, 0]))(
        jax.random.split(jax.random.PRNGKey(1), 3000)
    )
    empirical = np.asarray(outs.T @ outs) / outs.shape[0]
    assert max_relative_error(empirical, ntkjax.kernel_fn(module)(x).nngp) < 0.08
