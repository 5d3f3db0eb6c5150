"""How jitted kernels are evaluated (issues 21 and 22's speed work): the input Gram matrix built
from mirrored blocks, and the stored value of a true 1 that each layer of a deep network
reads from its own array.

Outside truths: the Gram matrix and the kernels in float64 (numpy, and the network in float64),
exact symmetry, and numpy's powers of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import kernels, nn
from ntkjax._kernel import ScaledParts
from ntkjax.kernels import input_kernel


@pytest.mark.parametrize("n", [256, 301])  # four equal row blocks; uneven ones
def test_the_jitted_mirrored_input_gram_is_exactly_symmetric_and_accurate(n):
    """From 256 inputs the jitted input kernel of a batch with itself is formed in blocks (each
    block above the diagonal once, its mirror image below): exactly symmetric, its diagonal
    the variances, and within float32 rounding of ``x x^T / d`` in float64."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(n), (n, 7), jnp.float32)) * 3.0
    k = jax.jit(input_kernel)(x)
    g = np.asarray(k.nngp)
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_array_equal(np.diagonal(g), np.asarray(k.var1))
    exact = x.astype(np.float64) @ x.T.astype(np.float64) / 7
    np.testing.assert_allclose(g, exact, rtol=1e-5, atol=1e-6 * np.max(np.abs(exact)))
    # and a network's kernels from it, jitted
    mlp = ntkjax.models.MLP((16, 16, 1), nn.relu, b_std=0.1)
    out = jax.jit(lambda a: ntkjax.kernel_fn(mlp)(a).ntk)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out).T)


def test_stored_ones_are_the_powers_of_two_with_or_without_per_layer_arrays():
    """``ScaledParts.stored_ones``: ``2^-(s1_i + s2_j)`` and ``2^(-2 s)`` (numpy), 0 where they
    are below float32's normal range, from the exponents or from carried ``ones`` arrays."""
    s1 = jnp.array([0, 3, 60, 70], jnp.int32)
    s2 = jnp.array([0, 1, 64], jnp.int32)
    base = ScaledParts(nngp=jnp.zeros((4, 3)), ntk=jnp.zeros((4, 3)), var1=jnp.zeros(4),
                       var2=jnp.zeros(3), log2_scale1=s1, log2_scale2=s2)
    carried = base.replace(ones1=jnp.asarray(2.0 ** -np.asarray(s1), jnp.float32),
                           ones2=jnp.asarray(2.0 ** -np.asarray(s2), jnp.float32))
    tiny = np.finfo(np.float32).tiny

    def flushed(a):
        a = np.asarray(a, np.float64)
        return np.where(a < tiny, 0.0, a).astype(np.float32)

    want_pairs = flushed(2.0 ** -(np.asarray(s1)[:, None] + np.asarray(s2)[None, :]))
    for parts in (base, carried):
        pairs, ones1, ones2 = (np.asarray(a) for a in jax.jit(lambda p: p.stored_ones())(parts))
        np.testing.assert_array_equal(pairs, want_pairs)
        np.testing.assert_array_equal(ones1, flushed(2.0 ** (-2 * np.asarray(s1))))
        np.testing.assert_array_equal(ones2, flushed(2.0 ** (-2 * np.asarray(s2))))


def test_a_deep_jitted_network_with_a_scaled_row_matches_float64(monkeypatch):
    """A depth-5 ReLU MLP with biases whose layers read the stored ones from a new array every
    2 layers (``_ONES_LAYERS``, 16 in use; 2 keeps the network small):
    float32 inputs with a row of 3e18 (its input kernel ~1e37, stored divided by 2^60, so its
    bias terms are stored as 2^-60 and 2^-30), jitted, against the network in float64."""
    x = np.random.default_rng(3).standard_normal((4, 5)) * np.array([3e18, 1.0, 3e-3, 2.0])[
        :, None]
    monkeypatch.setattr(kernels, "_ONES_LAYERS", 2)
    mlp = ntkjax.models.MLP((8,) * 5 + (1,), nn.relu, w_std=1.3, b_std=0.4)
    fn = jax.jit(lambda a: (lambda k: (k.nngp, k.ntk))(ntkjax.kernel_fn(mlp)(a)))
    got = fn(jnp.asarray(x, jnp.float32))
    with jax.enable_x64(True):  # float64: nothing near its range, nothing scaled
        want = tuple(np.asarray(a) for a in fn(jnp.asarray(x, jnp.float64)))
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6 * np.max(np.abs(w)))
