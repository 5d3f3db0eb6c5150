"""Readouts (ntkjax.nn.pooling): flatten and global average pooling on arrays and on Kernels."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn


def _x(n=6, d=5, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)


def _images(n=3, spatial=(5, 6), c=2, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, *spatial, c), dtype)



def test_readouts_on_arrays():
    x = _images(3, (4, 5), 2)
    np.testing.assert_array_equal(nn.flatten(x), np.asarray(x).reshape(3, 40))
    np.testing.assert_allclose(nn.global_average_pool(x), np.asarray(x).mean(axis=(1, 2)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="spatial"):
        nn.global_average_pool(_x())
    with pytest.raises(ValueError, match="batch"):
        nn.flatten(jnp.ones(3))


@pytest.mark.parametrize("same_inputs", [True, False])
def test_readouts_of_the_input_kernel_are_the_kernels_of_the_read_out_inputs(same_inputs, x64):
    # the input kernel of flatten(x) is x.x'/(P C); of the pooled x, mean(x).mean(x')/C
    x1 = _images(3, (4, 5), 2, dtype=jnp.float64)
    x2 = None if same_inputs else _images(2, (4, 5), 2, seed=1, dtype=jnp.float64)
    k = ntkjax.kernels.input_kernel(x1, x2)
    for readout, width in ((nn.flatten, 40), (nn.global_average_pool, 2)):
        got = readout(k)
        want = ntkjax.kernels.input_kernel(readout(x1), None if x2 is None else readout(x2))
        assert got.width == want.width == width and got.spatial_ndim == 0
        for name in ("nngp", "ntk", "var1", "var2"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-13,
                                       atol=1e-15)
    with pytest.raises(ValueError, match="spatial axes"):
        nn.global_average_pool(ntkjax.kernels.input_kernel(_x()))
    flat = ntkjax.kernels.input_kernel(_x())
    assert nn.flatten(flat) is flat



# ---- windowed pooling: avg_pool, sum_pool ----


POOL_CASES = [
    ((2, 2), (2, 2), "VALID", (6, 5)),
    ((3, 3), (1, 1), "SAME", (5, 6)),
    ((3, 2), (2, 1), "SAME", (7, 5)),
    ((3,), (2,), "SAME", (8,)),
    ((2, 3), None, ((1, 0), (2, 1)), (5, 4)),
]


@pytest.mark.parametrize(("window", "strides", "padding", "spatial"), POOL_CASES)
def test_pooling_on_arrays_matches_flax(window, strides, padding, spatial):
    x = _images(2, spatial, 3)
    for include in (True, False):
        want = linen.avg_pool(x, window, strides, padding, count_include_pad=include)
        got = nn.avg_pool(x, window, strides, padding, count_include_pad=include)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    want = linen.pooling.pool(x, 0.0, jax.lax.add, window, strides, padding)
    np.testing.assert_allclose(nn.sum_pool(x, window, strides, padding), want, rtol=1e-6,
                               atol=1e-6)


def test_circular_pooling_on_arrays_is_valid_pooling_of_the_periodic_padding():
    # neural-tangents' CIRCULAR: the SAME amounts (lax.padtype_to_pads), filled periodically
    x = _images(2, (6, 7), 2)
    for window, strides in (((3, 3), (1, 1)), ((3, 2), (2, 2))):
        pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, "SAME")
        wrapped = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode="wrap")
        want = linen.avg_pool(wrapped, window, strides, "VALID")
        np.testing.assert_allclose(nn.avg_pool(x, window, strides, "CIRCULAR"), want,
                                   rtol=1e-6, atol=1e-7)


def test_global_sum_pool_and_pooling_validation():
    x = _images(3, (4, 5), 2)
    np.testing.assert_allclose(nn.global_sum_pool(x), np.asarray(x).sum(axis=(1, 2)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="spatial"):
        nn.global_sum_pool(_x())
    with pytest.raises(ValueError, match="larger than"):
        nn.avg_pool(x, (5, 5))
    with pytest.raises(ValueError, match="padding"):
        nn.avg_pool(x, (2, 2), padding="REFLECT")
    with pytest.raises(ValueError, match="window_shape"):
        nn.sum_pool(x, (2, 0))


@pytest.mark.parametrize(("window", "strides", "padding", "spatial"),
                         [*POOL_CASES, ((3, 3), (2, 2), "CIRCULAR", (5, 6))])
def test_pooling_of_the_input_kernel_is_the_kernel_of_the_pooled_inputs(
        window, strides, padding, spatial, x64):
    # pooling is linear and the input kernel is x.x'/C at every pair of positions, so the
    # pooled kernel must be the input kernel of the pooled images -- for every padding and
    # normalization, with x2 given and x2 = None
    x1 = _images(3, spatial, 2, dtype=jnp.float64)
    x2 = _images(2, spatial, 2, seed=1, dtype=jnp.float64)
    pools = [
        lambda a: nn.avg_pool(a, window, strides, padding),
        lambda a: nn.avg_pool(a, window, strides, padding, count_include_pad=False),
        lambda a: nn.sum_pool(a, window, strides, padding),
        nn.global_sum_pool,
    ]

    @jax.jit
    def both(a, b):
        got, want = [], []
        for x2_ in (b, None):
            k = ntkjax.kernels.input_kernel(a, x2_)
            for pool in pools:
                got.append(pool(k))
                want.append(ntkjax.kernels.input_kernel(pool(a), None if x2_ is None
                                                        else pool(x2_)))
        return got, want

    for got, want in zip(*both(x1, x2), strict=True):
        assert got.width == want.width == 2 and got.shape == want.shape
        for name in ("nngp", "ntk", "var1", "var2"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-13,
                                       atol=1e-14)


def test_poolings_need_all_pairs_of_positions():
    x = _images(2, (4, 4), 2)
    diag = ntkjax.kernels.input_kernel(x, diagonal_spatial=True)
    assert diag.shape == (2, 2, 4, 4) and diag.spatial_shape == (4, 4)
    for pool in (nn.global_average_pool, nn.global_sum_pool,
                 lambda k: nn.avg_pool(k, (2, 2), (2, 2))):
        with pytest.raises(ntkjax.kernels.AllPairsRequired):
            pool(diag)
    # flatten reads only same-position pairs
    full = ntkjax.kernels.input_kernel(x)
    np.testing.assert_allclose(nn.flatten(diag).nngp, nn.flatten(full).nngp, rtol=1e-6)
