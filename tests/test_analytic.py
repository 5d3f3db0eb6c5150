"""The closed-form two-layer ReLU kernels (ntkjax.analytic) against the formula evaluated in
numpy, kernel_fn, and the empirical NTK of wide two-layer networks."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ntkjax
from ntkjax import models


def _notebook_formula(x1, x2):
    """The notebook's expression, evaluated in numpy."""
    dot = x1 @ x2.T
    norms = np.linalg.norm(x1, axis=1)[:, None] * np.linalg.norm(x2, axis=1)[None, :]
    t = np.arccos(np.clip(dot / norms, -1, 1))
    return norms * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi), dot, t


def test_two_layer_functions_formulas_and_relation_to_kernel_fn(x64):
    x = np.random.default_rng(0).normal(size=(5, 3))
    y = np.random.default_rng(1).normal(size=(4, 3))
    nngp, dot, t = _notebook_formula(x, y)
    np.testing.assert_allclose(ntkjax.two_layer_relu_nngp(x, y), nngp, rtol=1e-12)
    np.testing.assert_allclose(
        ntkjax.two_layer_relu_ntk(x, y), nngp + dot * (np.pi - t) / (2 * np.pi), rtol=1e-12
    )
    # d * (NTK-parameterized MLP with w_std = 1, no bias): the same network
    k = ntkjax.kernel_fn(models.MLP((64, 1), "relu", w_std=1.0, b_std=0.0))(x, y)
    np.testing.assert_allclose(3 * k.ntk, ntkjax.two_layer_relu_ntk(x, y), rtol=1e-12)
    np.testing.assert_allclose(3 * k.nngp, ntkjax.two_layer_relu_nngp(x, y), rtol=1e-12)
    # x2 = None is x2 = x1, symmetric
    sym = np.asarray(ntkjax.two_layer_relu_ntk(x))
    np.testing.assert_allclose(sym, sym.T, rtol=1e-14)


@pytest.mark.slow
def test_empirical_ntk_of_two_layer_relu_converges_to_the_ntk_not_the_nngp(x64):
    """f(x) = (1/sqrt m) sum_j v_j relu(w_j . x), w_j ~ N(0, I), v_j ~ N(0, 1): the float64
    Jacobian contraction over (w, v), averaged over networks, approaches two_layer_relu_ntk."""
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 3), jnp.float64)
    m, seeds = 4096, 16

    def f(params, xs):
        w, v = params
        return jax.nn.relu(xs @ w) @ v / np.sqrt(m)

    def empirical_ntk(key):
        kw, kv = jax.random.split(key)
        params = (jax.random.normal(kw, (3, m), jnp.float64),
                  jax.random.normal(kv, (m,), jnp.float64))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        jac = jax.jacrev(lambda p: f(unravel(p), x))(flat)
        return jac @ jac.T

    mean = jnp.mean(jax.vmap(empirical_ntk)(jax.random.split(jax.random.PRNGKey(0), seeds)), 0)
    ntk, nngp = ntkjax.two_layer_relu_ntk(x), ntkjax.two_layer_relu_nngp(x)
    err = lambda a: float(jnp.linalg.norm(mean - a) / jnp.linalg.norm(a))
    assert err(ntk) < 0.02
    assert err(nngp) > 0.25  # the NNGP misses the first layer's gradient (~half the NTK)
    assert float(jnp.linalg.norm(ntk - nngp) / jnp.linalg.norm(ntk)) > 0.25
