"""ntkjax.nn: Dense in both parameterizations and the activations, on arrays and on Kernels."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import ntkjax
from ntkjax import analytic, nn


def _x(n=6, d=5, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)


def test_dense_ntk_parameterization_formula():
    layer = nn.Dense(7, w_std=1.7, b_std=0.3)
    x = _x()
    params = layer.init(jax.random.PRNGKey(1), x)
    w, b = params["params"]["kernel"], params["params"]["bias"]
    assert w.shape == (5, 7) and b.shape == (7,)
    want = 1.7 / math.sqrt(5) * np.asarray(x) @ np.asarray(w) + 0.3 * np.asarray(b)
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-5, atol=1e-6)


def test_dense_standard_parameterization_formula_and_init_scale():
    layer = nn.Dense(512, w_std=2.0, b_std=0.5, parameterization="standard")
    x = _x(3, 400)
    params = layer.init(jax.random.PRNGKey(2), x)
    w, b = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    np.testing.assert_allclose(layer.apply(params, x), np.asarray(x) @ w + b, rtol=1e-4, atol=1e-5)
    assert abs(w.std() / (2.0 / math.sqrt(400)) - 1) < 0.02  # 204800 samples
    assert abs(b.std() / 0.5 - 1) < 0.1
    no_bias = nn.Dense(4, use_bias=False).init(jax.random.PRNGKey(0), x)
    assert set(no_bias["params"]) == {"kernel"}


def test_dense_params_follow_input_dtype(x64):
    params = nn.Dense(3).init(jax.random.PRNGKey(0), _x(dtype=jnp.float64))
    assert params["params"]["kernel"].dtype == jnp.float64
    assert nn.Dense(3).apply(params, _x(dtype=jnp.float64)).dtype == jnp.float64


def test_dense_validation():
    with pytest.raises(ValueError, match="parameterization"):
        nn.Dense(3, parameterization="mup").init(jax.random.PRNGKey(0), _x())
    with pytest.raises(ValueError, match="w_std"):
        nn.Dense(3, w_std=-1.0).init(jax.random.PRNGKey(0), _x())
    with pytest.raises(ValueError, match="features"):
        nn.Dense(0).init(jax.random.PRNGKey(0), _x())


def test_dense_on_a_kernel_creates_no_parameters():
    k = ntkjax.kernels.input_kernel(_x())
    out = nn.Dense(10, w_std=2.0, b_std=0.5).apply({}, k)
    assert isinstance(out, ntkjax.Kernel) and out.width == 10
    np.testing.assert_allclose(out.nngp, 4 * k.nngp + 0.25, rtol=1e-6)
    np.testing.assert_allclose(out.ntk, out.nngp, rtol=1e-6)
    std = nn.Dense(10, parameterization="standard").apply({}, out)
    # Theta <- fan_in * Sigma + w^2 Theta + 1
    np.testing.assert_allclose(std.ntk, 10 * out.nngp + out.ntk + 1, rtol=1e-6)


ARRAY_CASES = [
    (nn.relu, lambda x: np.maximum(x, 0)),
    (functools.partial(nn.leaky_relu, negative_slope=0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    (functools.partial(nn.ab_relu, a=-0.5, b=2.0), lambda x: np.where(x > 0, 2 * x, -0.5 * x)),
    (nn.abs, np.abs),
    (nn.erf, special.erf),
    (nn.gelu, lambda x: 0.5 * x * (1 + special.erf(x / np.sqrt(2)))),
    (nn.sin, np.sin),
    (nn.cos, np.cos),
    (functools.partial(nn.rbf, gamma=0.7),
     lambda x: np.sqrt(2) * np.sin(np.sqrt(1.4) * x + np.pi / 4)),
    (nn.sign, np.sign),
    (nn.identity, lambda x: x),
    (nn.elementwise(jnp.tanh), np.tanh),
]


@pytest.mark.parametrize(("act", "ref"), ARRAY_CASES)
def test_activations_on_arrays(act, ref):
    x = np.linspace(-3, 3, 13).astype(np.float32)
    np.testing.assert_allclose(act(jnp.asarray(x)), ref(x), rtol=1e-6, atol=1e-6)
    assert nn.is_activation(act)


KERNEL_CASES = [
    (nn.relu, analytic.relu),
    (functools.partial(nn.leaky_relu, negative_slope=0.2),
     functools.partial(analytic.leaky_relu, negative_slope=0.2)),
    (functools.partial(nn.ab_relu, a=-0.5, b=2.0),
     functools.partial(analytic.ab_relu, a=-0.5, b=2.0)),
    (nn.abs, analytic.abs),
    (nn.erf, analytic.erf),
    (nn.gelu, analytic.gelu),
    (nn.sin, analytic.sin),
    (nn.cos, analytic.cos),
    (functools.partial(nn.rbf, gamma=0.7), functools.partial(analytic.rbf, gamma=0.7)),
    (nn.sign, analytic.sign),
    (nn.identity, analytic.identity),
    (nn.elementwise(jnp.sin), analytic.sin),
]


@pytest.mark.parametrize(("act", "maps"), KERNEL_CASES)
def test_activations_on_kernels(act, maps, x64):
    k = nn.Dense(4, b_std=0.3).apply({}, ntkjax.kernels.input_kernel(_x(dtype=jnp.float64)))
    out = act(k)
    want = maps(k.nngp, k.var1[:, None], k.var2[None, :])
    np.testing.assert_allclose(out.nngp, want.sigma, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(out.ntk, k.ntk * want.sigma_dot, rtol=1e-9, atol=1e-14)
    # variances: the map's diagonal
    np.testing.assert_allclose(out.var1, np.diagonal(want.sigma), rtol=1e-9, atol=1e-14)


def test_elementwise_validation():
    with pytest.raises(ValueError, match="callable"):
        nn.elementwise(3.0)
    with pytest.raises(ValueError, match="n_quadrature"):
        nn.elementwise(jnp.tanh, n_quadrature=1)
    assert not nn.is_activation(jnp.tanh)
