"""Convolutions (ntkjax.nn.conv): the finite layer against numpy loops, patch averaging against
explicit patches, the kernel rule."""

from __future__ import annotations

import itertools
import math

import flax.linen
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import nn
from ntkjax.nn import conv


def _x(n=6, d=5, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)





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



# ---- convolutions: patch averaging against explicit patches ----


def _numpy_patches(x, window, strides, padding):
    """(N, *out, |K| C) patch vectors of NHWC-like x, built with plain numpy loops: zero (SAME)
    or periodic (CIRCULAR) padding, both split as in the TensorFlow/XLA SAME convention
    (total = max((ceil(n/s) - 1) s + k - n, 0), the smaller half in front; for CIRCULAR this is
    neural-tangents' convention)."""
    nd = len(window)
    pads = []
    for n, k, s in zip(x.shape[1:-1], window, strides, strict=True):
        if padding == "VALID":
            pads.append((0, 0))
        else:
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
    mode = "wrap" if padding == "CIRCULAR" else "constant"
    xp = np.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)
    outs = [(xp.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(nd)]
    patches = np.zeros((x.shape[0], *outs, int(np.prod(window)) * x.shape[-1]))
    for o in itertools.product(*map(range, outs)):
        parts = [
            xp[(slice(None), *(o[i] * strides[i] + d[i] for i in range(nd)))]
            for d in itertools.product(*map(range, window))
        ]
        patches[(slice(None), *o)] = np.concatenate(parts, axis=-1)
    return patches



CONV_CASES = [
    ((3, 3), (1, 1), "SAME", (6, 5)),
    ((3, 2), (2, 1), "SAME", (7, 5)),
    ((2, 3), (2, 2), "VALID", (6, 7)),
    ((3, 3), (1, 2), "CIRCULAR", (5, 6)),
    ((4,), (3,), "SAME", (9,)),
    ((3,), (1,), "VALID", (7,)),
]


@pytest.mark.parametrize(("window", "strides", "padding", "spatial"), CONV_CASES)
def test_patch_average_is_the_kernel_of_explicit_patches(window, strides, padding, spatial, x64):
    rng = np.random.default_rng(0)
    c = 2
    x1, x2 = rng.normal(size=(3, *spatial, c)), rng.normal(size=(2, *spatial, c))
    nd = len(spatial)
    flat1, flat2 = x1.reshape(3, -1, c), x2.reshape(2, -1, c)
    gram = np.einsum("apc,bqc->abpq", flat1, flat2).reshape(3, 2, *spatial, *spatial) / c
    got = conv.patch_average(
        jnp.asarray(gram), batch_ndim=2, window=window, strides=strides, padding=padding
    )
    p1, p2 = (_numpy_patches(x, window, strides, padding) for x in (x1, x2))
    outs = p1.shape[1:-1]
    want = np.einsum(
        "apc,bqc->abpq", p1.reshape(3, -1, p1.shape[-1]), p2.reshape(2, -1, p2.shape[-1])
    ).reshape(3, 2, *outs, *outs) / p1.shape[-1]
    assert got.shape == want.shape and got.ndim == 2 + 2 * nd
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def test_patch_average_keeps_dtype_and_rejects_bad_shapes():
    k = jnp.ones((2, 2, 4, 4, 4, 4), jnp.float32)
    assert conv.patch_average(k, batch_ndim=2, window=(3, 3)).dtype == jnp.float32
    with pytest.raises(ValueError, match="spatial axes"):
        conv.patch_average(k, batch_ndim=2, window=(3,))
    with pytest.raises(ValueError, match="padding"):
        conv.patch_average(k, batch_ndim=2, window=(3, 3), padding="REFLECT")
    with pytest.raises(ValueError, match="does not fit"):
        conv.patch_average(k, batch_ndim=2, window=(5, 5), padding="VALID")



# ---- same-position (diagonal) kernels, transposed convolutions, validation ----


@pytest.mark.parametrize(("window", "strides", "padding", "spatial"), CONV_CASES[:4])
def test_diagonal_patch_average_is_the_same_position_kernel_of_explicit_patches(
        window, strides, padding, spatial, x64):
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(3, *spatial, 2)), rng.normal(size=(2, *spatial, 2))
    diag = np.einsum("apc,bpc->abp", x1.reshape(3, -1, 2), x2.reshape(2, -1, 2)) / 2
    got = conv.patch_average(jnp.asarray(diag.reshape(3, 2, *spatial)), batch_ndim=2,
                             window=window, strides=strides, padding=padding,
                             diagonal_spatial=True)
    p1, p2 = (_numpy_patches(x, window, strides, padding) for x in (x1, x2))
    outs = p1.shape[1:-1]
    want = np.einsum("apc,bpc->abp", p1.reshape(3, -1, p1.shape[-1]),
                     p2.reshape(2, -1, p2.shape[-1])).reshape(3, 2, *outs) / p1.shape[-1]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def _flax_transpose_patches(x, window, strides, padding):
    """The patches a transposed convolution reads, taken from ``flax.linen.ConvTranspose``
    itself (not from our padding rule): with the identity kernel -- one output feature per
    window offset and input channel -- output feature ``(d, c)`` at position ``o`` is the entry
    of the stride-dilated, padded input that offset ``d`` of the window at ``o`` sees."""
    size = int(np.prod(window)) * x.shape[-1]
    identity = np.eye(size).reshape(*window, x.shape[-1], size)
    layer = flax.linen.ConvTranspose(size, tuple(window), strides=tuple(strides),
                                     padding=padding, use_bias=False)
    return np.asarray(layer.apply({"params": {"kernel": identity}}, x))


TRANSPOSE_CASES = [
    ((3, 3), (2, 2), "SAME", (3, 4)),
    ((3, 2), (2, 1), "VALID", (3, 4)),
    ((2,), (3,), "SAME", (4,)),
    ((4,), (2,), "VALID", (3,)),
]


@pytest.mark.parametrize(("window", "strides", "padding", "spatial"), TRANSPOSE_CASES)
def test_conv_transpose_matches_flax_and_its_kernel_the_dilated_patches(
        window, strides, padding, spatial, x64):
    x1 = _images(3, spatial, 2, dtype=jnp.float64)
    x2 = _images(2, spatial, 2, seed=1, dtype=jnp.float64)
    # finite: flax.linen.ConvTranspose with the same kernel and bias, times the NTK scales
    layer = nn.ConvTranspose(4, kernel_size=window, strides=strides, padding=padding,
                             w_std=1.3, b_std=0.4)
    params = layer.init(jax.random.PRNGKey(2), x1)
    w, b = params["params"]["conv"]["kernel"], params["params"]["conv"]["bias"]
    flax_layer = flax.linen.ConvTranspose(4, window, strides=strides, padding=padding)
    want = flax_layer.apply({"params": {"kernel": w, "bias": b}}, 1.3 / math.sqrt(
        np.prod(window) * 2) * x1 / 0.4) * 0.4
    got = layer.apply(params, x1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # kernel: the patch kernel of the dilated, padded inputs (full and same-position), with
    # the patches read off flax's layer
    p1, p2 = (_flax_transpose_patches(x, window, strides, padding) for x in (x1, x2))
    assert p1.shape[1:-1] == got.shape[1:-1]
    outs, width = p1.shape[1:-1], p1.shape[-1]
    f1, f2 = p1.reshape(3, -1, width), p2.reshape(2, -1, width)
    k = ntkjax.kernels.input_kernel(x1, x2)
    full = conv.transpose_patch_average(k.nngp, batch_ndim=2, window=window, strides=strides,
                                        padding=padding)
    np.testing.assert_allclose(full, np.einsum("apc,bqc->abpq", f1, f2).reshape(
        3, 2, *outs, *outs) / width, rtol=1e-13, atol=1e-14)
    kd = ntkjax.kernels.input_kernel(x1, x2, diagonal_spatial=True)
    diag = conv.transpose_patch_average(kd.nngp, batch_ndim=2, window=window,
                                        strides=strides, padding=padding,
                                        diagonal_spatial=True)
    np.testing.assert_allclose(diag, np.einsum("apc,bpc->abp", f1, f2).reshape(
        3, 2, *outs) / width, rtol=1e-13, atol=1e-14)


def test_conv_layers_validate_window_and_padding():
    x = _images(2, (3, 3), 2)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="larger than"):
        nn.Conv(3, kernel_size=5, padding="VALID").init(key, x)
    with pytest.raises(ValueError, match="does not fit"):
        ntkjax.kernel_fn(nn.Conv(3, kernel_size=5, padding="VALID"))(x)
    with pytest.raises(ValueError, match="padding"):
        nn.ConvTranspose(3, padding="REFLECT").init(key, x)
    assert nn.Conv(3, kernel_size=5).init(key, x)  # SAME pads a 3 x 3 input to fit


CIRCULAR_TRANSPOSE_CASES = [
    ((3, 2), (2, 1), (3, 4)),  # window larger than the stride: the VALID output wraps
    ((2,), (3,), (4,)),  # window smaller than the stride: nothing to wrap
    ((4,), (1,), (5,)),
]


@pytest.mark.parametrize(("window", "strides", "spatial"), CIRCULAR_TRANSPOSE_CASES)
def test_circular_conv_transpose_is_the_adjoint_of_a_circular_conv_and_its_kernel_exact(
        window, strides, spatial, x64):
    """Finite layer: without bias it is the adjoint of the stride-s circular convolution with
    the kernel flipped and its channels swapped (wrap-padded by lax's SAME amounts, then VALID
    lax.conv): <T x, z> = <x, C z>. Kernel: the exact covariance of the layer over its Gaussian
    weights, J J^T from the float64 Jacobian of the finite layer in its kernel, plus b_std^2."""
    nd = len(window)
    x1 = _images(3, spatial, 2, dtype=jnp.float64)
    x2 = _images(2, spatial, 2, seed=1, dtype=jnp.float64)
    w_std, b_std = 1.3, 0.4
    layer = nn.ConvTranspose(3, kernel_size=window, strides=strides, padding="CIRCULAR",
                             w_std=w_std, b_std=b_std)
    params = layer.init(jax.random.PRNGKey(2), x1)
    y = layer.apply(params, x1)
    out_spatial = tuple(n * s for n, s in zip(spatial, strides, strict=True))
    assert y.shape == (3, *out_spatial, 3)
    w = params["params"]["conv"]["kernel"]  # (*window, C_in, F)
    bias = params["params"]["bias"]
    scale = w_std / math.sqrt(np.prod(window) * 2)
    z = jax.random.normal(jax.random.PRNGKey(3), y.shape, jnp.float64)
    flipped = jnp.swapaxes(jnp.flip(w, axis=tuple(range(nd))), -1, -2)  # (*window, F, C_in)
    pads = jax.lax.padtype_to_pads(out_spatial, window, strides, "SAME")
    z_wrapped = jnp.pad(z, [(0, 0), *pads, (0, 0)], mode="wrap")
    spec = ("NHC", "HIO", "NHC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
    cz = scale * jax.lax.conv_general_dilated(z_wrapped, flipped, strides, "VALID",
                                              dimension_numbers=spec)
    assert cz.shape == x1.shape
    lhs = jnp.vdot(y - b_std * bias, z)
    np.testing.assert_allclose(lhs, jnp.vdot(x1, cz), rtol=1e-12)

    def feature0(kernel, x):
        p = {"params": {**params["params"], "conv": {"kernel": kernel}}}
        return layer.apply(p, x)[..., 0]

    j1 = jax.jacrev(feature0)(w, x1)[..., 0].reshape(3, *out_spatial, -1)
    j2 = jax.jacrev(feature0)(w, x2)[..., 0].reshape(2, *out_spatial, -1)
    exact = jnp.einsum("apk,bqk->abpq", j1.reshape(3, -1, j1.shape[-1]),
                       j2.reshape(2, -1, j2.shape[-1])).reshape(
        3, 2, *out_spatial, *out_spatial) + b_std**2
    k = ntkjax.kernel_fn(layer)(x1, x2)
    np.testing.assert_allclose(k.nngp, exact, rtol=1e-12, atol=1e-13)
    same = ntkjax.kernel_fn(layer, position_pairs="same")(x1, x2).nngp
    idx = np.indices(out_spatial).reshape(nd, -1)
    diag = exact.reshape(3, 2, -1, int(np.prod(out_spatial)))[
        :, :, np.arange(idx.shape[1]), np.arange(idx.shape[1])].reshape(3, 2, *out_spatial)
    np.testing.assert_allclose(same, diag, rtol=1e-12, atol=1e-13)
