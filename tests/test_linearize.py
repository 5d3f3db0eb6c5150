"""linearize: exact for a model linear in its params, second-order error otherwise, trainable."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkjax
from tests.models_for_ntk import MLP


def _perturb(params, key, scale):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                  for p, k in zip(leaves, keys, strict=True)])


def test_exact_for_a_linear_model():
    model = nn.Dense(3)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    p0 = model.init(jax.random.PRNGKey(1), x)
    p1 = _perturb(p0, jax.random.PRNGKey(2), 1.0)
    f_lin = ntkjax.linearize(model.apply, p0)
    np.testing.assert_allclose(f_lin(p1, x), model.apply(p1, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f_lin(p0, x), model.apply(p0, x), rtol=1e-6, atol=1e-6)


def test_error_is_second_order_for_a_nonlinear_model(x64):
    model = MLP(widths=(8,), out=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3), jnp.float64)
    p0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                model.init(jax.random.PRNGKey(1), x.astype(jnp.float32)))
    direction = _perturb(jax.tree_util.tree_map(jnp.zeros_like, p0), jax.random.PRNGKey(2), 1.0)
    f_lin = jax.jit(ntkjax.linearize(lambda p, x: jnp.tanh(model.apply(p, x)), p0))
    f = lambda p, x: jnp.tanh(model.apply(p, x))
    eps = np.array([3e-2, 1e-2, 3e-3, 1e-3, 3e-4])
    errors = []
    for e in eps:
        p = jax.tree_util.tree_map(lambda a, d, e=e: a + e * d, p0, direction)
        errors.append(float(jnp.max(jnp.abs(f_lin(p, x) - f(p, x)))))
    slope = np.polyfit(np.log(eps), np.log(errors), 1)[0]
    assert 1.85 < slope < 2.15, (slope, errors)


def test_trainable_with_optax_and_gradient_is_the_initial_jacobian():
    model = MLP(widths=(16,), out=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    y = jnp.sin(x[:, :1])
    p0 = model.init(jax.random.PRNGKey(1), x)
    f_lin = ntkjax.linearize(model.apply, p0)
    # The gradient of a linear model is constant: at any params it is J(params0)^T.
    p_far = _perturb(p0, jax.random.PRNGKey(3), 0.5)
    g_lin = jax.grad(lambda p: f_lin(p, x).sum())(p_far)
    g_true = jax.grad(lambda p: model.apply(p, x).sum())(p0)
    for a, b in zip(jax.tree_util.tree_leaves(g_lin), jax.tree_util.tree_leaves(g_true),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    opt = optax.sgd(0.1)
    loss = lambda p: 0.5 * jnp.mean((f_lin(p, x) - y) ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    params, state = p0, opt.init(p0)
    start = loss(params)
    for _ in range(50):
        params, state = step(params, state)
    assert loss(params) < 0.5 * start


def test_other_collections_pass_through():
    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.BatchNorm(use_running_average=True)(x))

    model = BNNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    v0 = model.init(jax.random.PRNGKey(1), x)
    v1 = {**v0, "params": _perturb(v0["params"], jax.random.PRNGKey(2), 0.3)}
    # the model is linear in its 'params' (BatchNorm scale/bias and Dense), given the stats?
    # Dense(scale * xhat + bias) is bilinear, so compare against jvp written out by hand.
    f_lin = ntkjax.linearize(model.apply, v0)
    delta = jax.tree_util.tree_map(lambda a, b: a - b, v1["params"], v0["params"])
    y0, dy = jax.jvp(lambda p: model.apply({**v0, "params": p}, x), (v0["params"],), (delta,))
    np.testing.assert_allclose(f_lin(v1, x), y0 + dy, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- taylor_expand


def test_taylor_degree_one_is_linearize_and_degree_zero_the_initial_network(x64):
    model = MLP(widths=(8,), out=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3), jnp.float64)
    p0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                model.init(jax.random.PRNGKey(1), x.astype(jnp.float32)))
    p1 = _perturb(p0, jax.random.PRNGKey(2), 0.3)
    f = lambda p, x: jnp.tanh(model.apply(p, x))
    both = jax.jit(lambda p, x: (ntkjax.taylor_expand(f, p0, 1)(p, x),
                                 ntkjax.linearize(f, p0)(p, x),
                                 ntkjax.taylor_expand(f, p0, 0)(p, x), f(p0, x)))
    first, lin, zeroth, initial = both(p1, x)
    np.testing.assert_allclose(first, lin, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(zeroth, initial, rtol=1e-13)


def test_taylor_degree_two_matches_the_hessian_expansion(x64):
    from jax.flatten_util import ravel_pytree

    model = MLP(widths=(5,), out=2)
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 3), jnp.float64)
    p0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                model.init(jax.random.PRNGKey(4), x.astype(jnp.float32)))
    p1 = _perturb(p0, jax.random.PRNGKey(5), 0.2)
    f = lambda p, x: jnp.tanh(model.apply(p, x))
    flat0, unravel = ravel_pytree(p0)
    delta = ravel_pytree(p1)[0] - flat0
    g = lambda v: f(unravel(v), x).ravel()

    @jax.jit
    def by_hand_fn(flat0, delta):
        jac = jax.jacfwd(g)(flat0)  # (outputs, P)
        hess = jax.hessian(g)(flat0)  # (outputs, P, P)
        return g(flat0) + jac @ delta + 0.5 * jnp.einsum("opq,p,q->o", hess, delta, delta)

    by_hand = by_hand_fn(flat0, delta)
    f2 = jax.jit(ntkjax.taylor_expand(f, p0, 2))
    np.testing.assert_allclose(f2(p1, x).ravel(), by_hand, rtol=1e-12, atol=1e-12)
    # the error of degree k is of order k + 1 in the step
    f_jit = jax.jit(f)
    expansions = {k: jax.jit(ntkjax.taylor_expand(f, p0, k)) for k in (1, 3)}
    expansions[2] = f2
    errors = {k: [] for k in expansions}
    eps = np.array([0.1, 0.05, 0.025])
    for e in eps:
        p = jax.tree_util.tree_map(lambda a, b, e=e: a + e * (b - a), p0, p1)
        for k, fk in expansions.items():
            errors[k].append(float(jnp.max(jnp.abs(fk(p, x) - f_jit(p, x)))))
    for k, errs in errors.items():
        slope = np.polyfit(np.log(eps), np.log(errs), 1)[0]
        assert k + 0.8 < slope < k + 1.2, (k, slope, errs)


def test_taylor_is_exact_for_a_polynomial_and_rejects_bad_degrees(x64):
    f = lambda p, x: (x @ p["w"]) ** 3 + p["b"] * x[:, 0]
    p0 = {"w": jnp.array([0.3, -0.2]), "b": jnp.array(0.5)}
    p1 = {"w": jnp.array([1.1, 0.4]), "b": jnp.array(-0.7)}
    x = jnp.array([[1.0, 2.0], [-0.5, 0.3]])
    for degree in (3, 4):
        np.testing.assert_allclose(ntkjax.taylor_expand(f, p0, degree)(p1, x), f(p1, x),
                                   rtol=1e-12)
    assert not np.allclose(ntkjax.taylor_expand(f, p0, 2)(p1, x), f(p1, x))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="degree"):
            ntkjax.taylor_expand(f, p0, bad)
