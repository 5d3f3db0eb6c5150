"""ntkjax.models.MLP and CNN: the finite networks, activation selection, closed-form limits, and
the Monte Carlo checks that finite networks' empirical NTKs converge to kernel_fn's NTK like
width^(-1/2)."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import models, nn
from ntkjax.scaling import fit_power_law
from tests.helpers import max_relative_error


def test_mlp_init_apply_shapes_and_layers():
    mlp = models.MLP((16, 8, 3), "gelu", w_std=1.2, b_std=0.1)
    x = jnp.ones((5, 4))
    params = mlp.init(jax.random.PRNGKey(0), x)
    assert set(params["params"]) == {"Dense_0", "Dense_1", "Dense_2"}
    assert params["params"]["Dense_1"]["kernel"].shape == (16, 8)
    assert mlp.apply(params, x).shape == (5, 3)
    assert ntkjax.kernel_fn(mlp)(x).ntk.shape == (5, 5)


def test_mlp_hidden_layers_apply_the_activation():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    mlp = models.MLP((6, 2), activation=functools.partial(nn.leaky_relu, negative_slope=0.3))
    params = mlp.init(jax.random.PRNGKey(0), x)
    p = params["params"]
    h = nn.Dense(6).apply({"params": p["Dense_0"]}, x)
    want = nn.Dense(2).apply({"params": p["Dense_1"]}, jnp.where(h > 0, h, 0.3 * h))
    np.testing.assert_allclose(mlp.apply(params, x), want, rtol=1e-6)


def test_activation_names_and_errors():
    x = jnp.ones((2, 3))
    for name in models.ACTIVATIONS:
        assert ntkjax.kernel_fn(models.MLP((4, 1), name))(x).nngp.shape == (2, 2)
    with pytest.raises(ValueError, match="allowed"):
        models.MLP((4, 1), "swish").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="partial"):
        models.MLP((4, 1), "ab_relu").init(jax.random.PRNGKey(0), x)
    plain = models.MLP((4, 1), jnp.tanh)
    assert plain.apply(plain.init(jax.random.PRNGKey(0), x), x).shape == (2, 1)
    with pytest.raises(ValueError, match="elementwise"):
        ntkjax.kernel_fn(plain)(x)
    with pytest.raises(ValueError, match="features"):
        models.MLP(()).init(jax.random.PRNGKey(0), x)


def _empirical_ntk(model, params, x):
    """Plain float64 Jacobian contraction: Theta = J J^T over all parameters."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = jax.jacrev(lambda p: model.apply(unravel(p), x)[:, 0])(flat)
    return jac @ jac.T


@pytest.mark.slow
def test_empirical_ntk_converges_to_kernel_fn_like_inverse_sqrt_width(x64):
    """RMS over 64 networks of ||Theta_emp - Theta|| / ||Theta|| for a depth-2 ReLU MLP;
    fitted log-log slope over five widths in [-0.65, -0.35]. (The RMS, not the error of the
    64-network mean: the mean also carries the O(1/width) bias of deep finite networks, which
    bends its slope towards -1.)"""
    x = jax.random.normal(jax.random.PRNGKey(42), (6, 4), jnp.float64)
    widths = [32, 64, 128, 256, 512]
    errors = []
    for width in widths:
        mlp = models.MLP((width, width, 1), "relu", w_std=np.sqrt(2), b_std=0.1)
        theta = ntkjax.kernel_fn(mlp)(x).ntk
        keys = jax.random.split(jax.random.PRNGKey(width), 64)
        emp = jax.jit(jax.vmap(lambda k, m=mlp: _empirical_ntk(m, m.init(k, x), x)))(keys)
        sq = jnp.sum((emp - theta) ** 2, axis=(1, 2)) / jnp.sum(theta**2)
        errors.append(float(jnp.sqrt(jnp.mean(sq))))
        mean_err = float(jnp.linalg.norm(emp.mean(0) - theta) / jnp.linalg.norm(theta))
        assert mean_err < errors[-1]  # averaging networks helps
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, errors)
    assert errors[-1] < 0.2


# ---- CNN ----


def _images(n=4, spatial=(5, 4), c=3, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, *spatial, c), dtype)


def test_cnn_init_apply_shapes_and_layers():
    cnn = models.CNN((6, 5, 3), kernel_size=3, readout="flatten", b_std=0.1)
    x = _images()
    params = cnn.init(jax.random.PRNGKey(0), x)
    assert set(params["params"]) == {"Conv_0", "Conv_1", "Dense_0"}
    assert params["params"]["Conv_1"]["conv"]["kernel"].shape == (3, 3, 6, 5)
    assert params["params"]["Dense_0"]["kernel"].shape == (5 * 4 * 5, 3)
    assert cnn.apply(params, x).shape == (4, 3)
    gap = models.CNN((6, 1), readout="global_average_pool")
    gparams = gap.init(jax.random.PRNGKey(0), x)
    assert gparams["params"]["Dense_0"]["kernel"].shape == (6, 1)
    one_d = models.CNN((6, 2), kernel_size=2, strides=2)
    xs = jnp.ones((3, 8, 2))
    assert one_d.apply(one_d.init(jax.random.PRNGKey(0), xs), xs).shape == (3, 2)
    assert ntkjax.kernel_fn(one_d)(xs).ntk.shape == (3, 3)
    with pytest.raises(ValueError, match="readout"):
        models.CNN((4, 1), readout="max_pool").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="features"):
        models.CNN(()).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize(("kernel_size", "padding"), [(1, "SAME"), (3, "CIRCULAR")])
def test_cnn_on_one_pixel_images_is_the_mlp(kernel_size, padding, parameterization, x64):
    """On 1x1 images a 1x1 convolution is a dense layer, and so is a circular 3x3 one in the
    NTK parameterization (all 9 taps see the one pixel: the summed weight has the dense
    variance). In the standard parameterization the 9 taps' gradients add 9 C Sigma, not
    C Sigma, so there only the NNGP agrees."""
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 4), jnp.float64)
    kw = dict(activation="relu", w_std=1.4, b_std=0.2, parameterization=parameterization)
    mlp = ntkjax.kernel_fn(models.MLP((8, 8, 1), **kw))(x)
    cnn = ntkjax.kernel_fn(models.CNN((8, 8, 1), kernel_size=kernel_size, padding=padding,
                                      readout="flatten", **kw))(x[:, None, None, :])
    np.testing.assert_allclose(cnn.nngp, mlp.nngp, rtol=1e-13)
    if kernel_size == 1 or parameterization == "ntk":
        np.testing.assert_allclose(cnn.ntk, mlp.ntk, rtol=1e-13)
    else:
        assert max_relative_error(cnn.ntk, mlp.ntk) > 0.1


@pytest.mark.slow
def test_cnn_empirical_ntk_converges_to_kernel_fn_like_inverse_sqrt_width(x64):
    """RMS over 16 networks of ||Theta_emp - Theta|| / ||Theta|| for a 1-D ReLU CNN (two
    3-tap SAME convolutions, global average pooling, Dense readout), empirical NTK by
    ntkjax.empirical_ntk_fn; fitted log-log slope over four widths in [-0.7, -0.3]."""
    x = jax.random.normal(jax.random.PRNGKey(42), (4, 6, 2), jnp.float64)
    widths = [32, 64, 128, 256]
    errors = []
    for width in widths:
        cnn = models.CNN((width, width, 1), kernel_size=3, activation="relu",
                         readout="global_average_pool", w_std=np.sqrt(2), b_std=0.1)
        theta = ntkjax.kernel_fn(cnn)(x).ntk
        ntk_fn = ntkjax.empirical_ntk_fn(cnn.apply, batch="per_sample")  # no probe per width
        sq = []
        for key in jax.random.split(jax.random.PRNGKey(width), 16):
            emp = ntk_fn(cnn.init(key, x), x)
            sq.append(float(jnp.sum((emp - theta) ** 2) / jnp.sum(theta**2)))
        errors.append(float(np.sqrt(np.mean(sq))))
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -0.7 <= slope <= -0.3, (slope, errors)
    assert errors[-1] < 0.2


# ---- pooling between convolutions, Myrtle ----


def test_cnn_pooling_between_convolutions():
    x = _images(2, (8, 6), 3)
    cnn = models.CNN((4, 4, 5, 2), pooling="avg", pool_window=2, readout="flatten", b_std=0.1)
    params = cnn.init(jax.random.PRNGKey(0), x)
    # 8 x 6 -> pool -> 4 x 3 -> pool -> 2 x 1 (after the first two of three convolutions)
    assert params["params"]["Dense_0"]["kernel"].shape == (2 * 1 * 5, 2)
    p = params["params"]
    h = nn.relu(nn.Conv(4, b_std=0.1).apply({"params": p["Conv_0"]}, x))
    h = nn.relu(nn.Conv(4, b_std=0.1).apply({"params": p["Conv_1"]}, nn.avg_pool(h, (2, 2),
                                                                                (2, 2))))
    h = nn.relu(nn.Conv(5, b_std=0.1).apply({"params": p["Conv_2"]}, nn.avg_pool(h, (2, 2),
                                                                                (2, 2))))
    want = nn.Dense(2, b_std=0.1).apply({"params": p["Dense_0"]}, nn.flatten(h))
    np.testing.assert_allclose(cnn.apply(params, x), want, rtol=1e-5, atol=1e-6)
    summed = models.CNN((4, 4, 1), pooling="sum", pool_after=(0,), pool_window=(2, 3),
                        readout="global_sum_pool")
    assert summed.apply(summed.init(jax.random.PRNGKey(0), x), x).shape == (2, 1)
    with pytest.raises(ValueError, match="pooling"):
        models.CNN((4, 1), pooling="max").init(jax.random.PRNGKey(0), x)


def test_myrtle_layers_and_validation():
    x = _images(2, (16, 16), 3)
    net = models.Myrtle(7, channels=8, num_outputs=3)
    params = net.init(jax.random.PRNGKey(0), x)
    assert sorted(params["params"]) == [f"Conv_{i}" for i in range(6)] + ["Dense_0"]
    # 16 -> 8 -> 4 after the stages, then pooled to one pixel: the readout sees 8 channels
    assert params["params"]["Dense_0"]["kernel"].shape == (8, 3)
    assert net.apply(params, x).shape == (2, 3)
    assert models.Myrtle(10, channels=4).init(jax.random.PRNGKey(0), x)["params"][
        "Conv_8"]["conv"]["kernel"].shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="depth"):
        models.Myrtle(6).init(jax.random.PRNGKey(0), x)


def test_myrtle5_kernel_matches_neural_tangents_myrtle_notebook_network(x64):
    """nt's reference entry myrtle5_16x16 is the notebook's MyrtleNetwork(5) (readout W_std 1)
    on 16 x 16 images."""
    from tests.nt_stax import load_reference

    meta, arrays = load_reference()
    entry = next(e for e in meta["entries"] if e["key"] == "myrtle5_16x16")
    x1, x2 = (arrays[entry["arrays"][name]] for name in ("x1", "x2"))
    k = ntkjax.kernel_fn(models.Myrtle(5, num_outputs=1, readout_w_std=1.0))(x1, x2)
    assert max_relative_error(k.nngp, arrays[entry["arrays"]["nngp_12"]]) < 1e-10
    assert max_relative_error(k.ntk, arrays[entry["arrays"]["ntk_12"]]) < 1e-10


@pytest.mark.slow
def test_myrtle_empirical_ntk_converges_to_kernel_fn_like_inverse_sqrt_width(x64):
    """RMS over 8 networks of ||Theta_emp - Theta|| / ||Theta|| for Myrtle-5 (ReLU, 2x2 average
    pooling between the stages) on 4 x 4 images, empirical NTK by ntkjax.empirical_ntk_fn;
    fitted log-log slope over four channel counts in [-0.7, -0.3] (fluctuations of a finite
    network's NTK are O(width^-1/2): Jacot et al. 2018, Hanin & Nica 2020)."""
    x = jax.random.normal(jax.random.PRNGKey(7), (4, 4, 4, 2), jnp.float64)
    widths = [8, 16, 32, 64]
    theta = ntkjax.kernel_fn(models.Myrtle(5, num_outputs=1))(x).ntk
    errors = []
    for width in widths:
        net = models.Myrtle(5, channels=width, num_outputs=1)
        # examples are independent: batch="per_sample" (under the jit below the default probe
        # would be compiled into the program, with both kernels behind a lax.cond)
        ntk_fn = ntkjax.empirical_ntk_fn(net.apply, batch="per_sample")

        @jax.jit
        def relative_squared_errors(keys, net=net, ntk_fn=ntk_fn):
            def one(key):
                emp = ntk_fn(net.init(key, x), x)
                return jnp.sum((emp - theta) ** 2) / jnp.sum(theta**2)
            return jax.lax.map(one, keys)

        sq = relative_squared_errors(jax.random.split(jax.random.PRNGKey(width), 8))
        errors.append(float(np.sqrt(np.mean(np.asarray(sq)))))
    fit = fit_power_law(widths, errors)
    assert -0.7 <= fit.slope <= -0.3, (fit, errors)
    assert errors[-1] < errors[0] / 2  # 8x the channels: about sqrt(8) ~ 2.8x smaller
