"""Dense layers (ntkjax.nn.dense): both parameterizations on arrays, their kernel rule."""

from __future__ import annotations

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from ntkjax.nn import dense


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



def test_dense_rule_rejects_unknown_parameterization():
    with pytest.raises(ValueError, match="parameterization"):
        dense.dense_kernels(jnp.ones(2), jnp.ones(2), w_std=1.0, b_std=0.0, parameterization="mup")




def test_dense_bias_parameter_rule_matches_conv_and_b_std_none_means_no_bias():
    x = _x()
    params = lambda layer: set(layer.init(jax.random.PRNGKey(0), x)["params"])
    assert params(nn.Dense(3)) == {"kernel"}  # NTK parameterization, b_std = 0: no effect
    assert params(nn.Dense(3, b_std=0.1)) == {"kernel", "bias"}
    assert params(nn.Dense(3, parameterization="standard")) == {"kernel", "bias"}
    assert params(nn.Dense(3, b_std=None, parameterization="standard")) == {"kernel"}
    # b_std=None is use_bias=False, on arrays and on kernels
    a = nn.Dense(3, b_std=None, w_std=1.3)
    b = nn.Dense(3, use_bias=False, w_std=1.3, b_std=0.7)
    va = a.init(jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(a.apply(va, x), b.apply(va, x))
    k = ntkjax.kernels.input_kernel(x)
    np.testing.assert_array_equal(a.apply({}, k).ntk, b.apply({}, k).ntk)
    mlp = ntkjax.models.MLP((8, 1), b_std=None)
    assert set(mlp.init(jax.random.PRNGKey(0), x)["params"]["Dense_0"]) == {"kernel"}


def test_dense_configuration_is_keyword_only_and_scales_must_be_finite():
    with pytest.raises(TypeError, match="positional"):
        nn.Dense(3, 2.0)
    with pytest.raises(TypeError, match="positional"):
        nn.Conv(8, (3, 3))
    for bad in (dict(w_std=np.inf), dict(b_std=np.nan), dict(w_std=-1.0)):
        with pytest.raises(ValueError, match="finite and >= 0"):
            nn.Dense(3, **bad).init(jax.random.PRNGKey(0), _x())
        with pytest.raises(ValueError, match="finite and >= 0"):
            ntkjax.kernel_fn(ntkjax.models.MLP((4, 1), **bad))(_x())


def test_dense_and_conv_without_input_features_raise():
    with pytest.raises(ValueError, match="at least one input feature"):
        nn.Dense(3).init(jax.random.PRNGKey(0), jnp.ones((2, 0)))
    with pytest.raises(ValueError, match="at least one input feature"):
        nn.Conv(3).init(jax.random.PRNGKey(0), jnp.ones((2, 4, 4, 0)))
