"""How jitted kernels are evaluated (issues 21 and 22's speed work): the input Gram matrix,
exactly symmetric as the product is or built from mirrored blocks, and the stored value of a
true 1 that each layer of a deep network reads from its own array.

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


@pytest.mark.parametrize("mirrored", [False, True])  # the product as it is; mirrored blocks
@pytest.mark.parametrize("n", [256, 301])  # four equal row blocks; uneven ones
def test_the_jitted_input_gram_is_exactly_symmetric_and_accurate(n, mirrored, monkeypatch):
    """From 256 inputs the jitted CPU input kernel of a batch with itself is the product
    ``x x^T`` where this process's product of that shape is bitwise symmetric (a probe), and is
    otherwise formed in blocks (each block above the diagonal once, its mirror image below;
    forced here): either way exactly symmetric, its diagonal the variances, and within float32
    rounding of ``x x^T / d`` in float64."""
    if mirrored:
        monkeypatch.setattr(kernels, "_gram_is_symmetric", lambda n, d, dtype: False)
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


def test_the_correlation_is_exact_symmetric_and_finite_over_the_whole_normal_range(x64):
    """``correlation(q12, q11, q22)`` from per-input doubled rsqrts (``(q12 (t1 t2)) / 4``):
    for variances from the smallest to the largest normal float, each end included, within a
    few ulps of ``q12 / (sqrt(q11) sqrt(q22))`` in float64 (or, for float64, in numpy's long
    double), bit-identical with q11 and q22 swapped, jitted (and eagerly in float32), and 0 --
    not NaN -- for ``q12 = 0`` at the smallest normal variances (where ``t1 t2`` would be
    2^128 in float32 without its cap)."""
    from ntkjax.nn.activations import correlation

    for dtype, ref_dtype in ((np.float32, np.float64), (np.float64, np.longdouble)):
        info = np.finfo(dtype)
        qs = [info.tiny, info.tiny * 3, dtype(1e-20), dtype(1.0), dtype(3e19), info.max / 3,
              info.max]
        q11, q22 = (np.asarray(a, dtype) for a in np.meshgrid(qs, qs, indexing="ij"))
        top = np.sqrt(q11.astype(ref_dtype)) * np.sqrt(q22.astype(ref_dtype))
        fracs = np.asarray([0.0, 1.0, -1.0, 0.5, -0.3, 1e-3])[:, None, None]
        q12 = np.asarray(top * fracs, dtype)  # representable: |q12| <= sqrt(q11 q22)
        # a subnormal q12 is flushed to 0 by XLA (the guarantee is for normal q12)
        q12 = np.where(np.abs(q12) < info.tiny, dtype(0), q12)
        want = np.clip(q12.astype(ref_dtype) / top, -1, 1)
        # eagerly (op by op: each op compiled once per dtype) in float32 only, to keep it fast
        for fn in (correlation, jax.jit(correlation)) if dtype == np.float32 else (
                jax.jit(correlation),):
            got = np.asarray(fn(q12, q11, q22))
            swapped = np.asarray(fn(q12, q22, q11))
            assert got.dtype == dtype and np.all(np.isfinite(got)), dtype
            np.testing.assert_array_equal(got, swapped)
            np.testing.assert_allclose(got.astype(ref_dtype), want, rtol=0,
                                       atol=8 * float(info.eps))
        # the product t1 t2 at the smallest variances: capped, so 0 * t1 t2 is 0
        zero = correlation(jnp.zeros((), dtype), info.tiny, info.tiny)
        assert float(zero) == 0.0
