"""Readouts (ntkjax.nn.pooling): flatten and global average pooling on arrays and on Kernels."""

from __future__ import annotations

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

