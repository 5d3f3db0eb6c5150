"""ntkjax.models.MLP: the finite network, activation selection, and the Monte Carlo check that
finite networks' empirical NTKs converge to kernel_fn's NTK like width^(-1/2)."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import models, nn


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
