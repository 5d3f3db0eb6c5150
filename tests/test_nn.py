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


# ---- convolutions and readouts ----


def _images(n=3, spatial=(5, 6), c=2, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, *spatial, c), dtype)


def _numpy_conv(x, w, strides, padding):
    """Cross-correlation of NHWC-like x with w (*window, C, F) by explicit loops (numpy)."""
    nd = w.ndim - 2
    pads = []
    for n, k, s in zip(x.shape[1:-1], w.shape[:nd], strides, strict=True):
        total = max((-(-n // s) - 1) * s + k - n, 0) if padding == "SAME" else 0
        pads.append((total // 2, total - total // 2))
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    outs = [(xp.shape[1 + i] - w.shape[i]) // strides[i] + 1 for i in range(nd)]
    y = np.zeros((x.shape[0], *outs, w.shape[-1]))
    for o in np.ndindex(*outs):
        for d in np.ndindex(*w.shape[:nd]):
            pos = tuple(o[i] * strides[i] + d[i] for i in range(nd))
            y[(slice(None), *o)] += xp[(slice(None), *pos)] @ w[d]
    return y


@pytest.mark.parametrize(
    ("spatial", "kernel_size", "strides", "padding"),
    [((5, 6), 3, 1, "SAME"), ((7, 6), (3, 2), (2, 1), "VALID"), ((8,), 3, 2, "SAME")],
)
def test_conv_ntk_parameterization_formula(spatial, kernel_size, strides, padding, x64):
    x = _images(spatial=spatial, dtype=jnp.float64)
    layer = nn.Conv(4, kernel_size=kernel_size, strides=strides, padding=padding, w_std=1.3,
                    b_std=0.4)
    params = layer.init(jax.random.PRNGKey(1), x)
    w, b = (np.asarray(params["params"]["conv"][name]) for name in ("kernel", "bias"))
    nd = len(spatial)
    window = (kernel_size,) * nd if isinstance(kernel_size, int) else kernel_size
    assert w.shape == (*window, 2, 4) and b.shape == (4,)
    stride_t = (strides,) * nd if isinstance(strides, int) else strides
    fan_in = int(np.prod(window)) * 2
    want = 1.3 / math.sqrt(fan_in) * _numpy_conv(np.asarray(x), w, stride_t, padding) + 0.4 * b
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-12, atol=1e-12)


def test_conv_standard_parameterization_formula_and_init_scale():
    x = _images(2, (6, 6), 40)
    layer = nn.Conv(256, kernel_size=3, w_std=2.0, b_std=0.5, parameterization="standard")
    params = layer.init(jax.random.PRNGKey(2), x)
    w, b = (np.asarray(params["params"]["conv"][name]) for name in ("kernel", "bias"))
    assert abs(w.std() / (2.0 / math.sqrt(9 * 40)) - 1) < 0.02  # 92160 samples
    assert abs(b.std() / 0.5 - 1) < 0.15
    want = _numpy_conv(np.asarray(x, np.float64), w.astype(np.float64), (1, 1), "SAME") + b
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-4, atol=1e-4)


def test_conv_parameters_dtype_and_bias_rules(x64):
    x = _images(dtype=jnp.float64)
    params = nn.Conv(3).init(jax.random.PRNGKey(0), x)  # NTK parameterization, b_std = 0
    assert set(params["params"]["conv"]) == {"kernel"}  # a bias would have no effect
    assert params["params"]["conv"]["kernel"].dtype == jnp.float64
    assert nn.Conv(3).apply(params, x).dtype == jnp.float64
    assert set(nn.Conv(3, b_std=0.1).init(jax.random.PRNGKey(0), x)["params"]["conv"]) == {
        "kernel", "bias"}
    no_bias = nn.Conv(3, b_std=0.1, use_bias=False).init(jax.random.PRNGKey(0), x)
    assert set(no_bias["params"]["conv"]) == {"kernel"}
    std = nn.Conv(3, parameterization="standard").init(jax.random.PRNGKey(0), x)
    assert set(std["params"]["conv"]) == {"kernel", "bias"}  # trained even from b = 0


def test_conv_validation():
    x = _images()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="padding"):
        nn.Conv(3, padding="REFLECT").init(key, x)
    with pytest.raises(ValueError, match="kernel_size"):
        nn.Conv(3, kernel_size=(3, 3, 3)).init(key, x)
    with pytest.raises(ValueError, match="strides"):
        nn.Conv(3, strides=0).init(key, x)
    with pytest.raises(ValueError, match=r"\(batch, \*spatial, channels\)"):
        nn.Conv(3).init(key, _x())
    with pytest.raises(ValueError, match="features"):
        nn.Conv(0).init(key, x)
    with pytest.raises(ValueError, match="spatial axes"):
        nn.Conv(3).apply({}, ntkjax.kernels.input_kernel(_x()))
    with pytest.raises(ValueError, match="kernel_size"):
        nn.Conv(3, kernel_size=(3,)).apply({}, ntkjax.kernels.input_kernel(x))


def test_one_by_one_conv_on_a_kernel_is_a_per_position_dense_layer(x64):
    x1, x2 = _images(3, dtype=jnp.float64), _images(2, seed=1, dtype=jnp.float64)
    k = nn.relu(nn.Dense(5, b_std=0.2).apply({}, ntkjax.kernels.input_kernel(x1, x2)))
    for parameterization in ("ntk", "standard"):
        conv = nn.Conv(7, kernel_size=1, w_std=1.5, b_std=0.3, parameterization=parameterization)
        dense = nn.Dense(7, w_std=1.5, b_std=0.3, parameterization=parameterization)
        a, b = conv.apply({}, k), dense.apply({}, k)
        assert a.width == b.width == 7 and a.spatial_shape == (5, 6)
        for name in ("nngp", "ntk", "var1", "var2"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-14)


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
