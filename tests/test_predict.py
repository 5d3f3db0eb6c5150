"""Closed-form training dynamics and GP inference, checked against outside truths.

References used here: the scalar ODE solution for diagonal kernels, scipy-style matrix
exponentials and linear solves in float64, explicit iteration of the gradient-descent update,
optax SGD on the same loss, and the textbook GP posterior formulas.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkjax import predict as P
from ntkjax.losses import mse_loss
from tests.helpers import with_and_without_jit


def feature_kernels(key, n=12, m=7, p=40, dtype=jnp.float64):
    """Consistent train/test kernels from explicit random features: K = J J^T."""
    kj, kt = jax.random.split(key)
    j_train = jax.random.normal(kj, (n, p), dtype)
    j_test = jax.random.normal(kt, (m, p), dtype)
    return j_train, j_test, j_train @ j_train.T / p, j_test @ j_train.T / p, j_test @ j_test.T / p


def rbf(x1, x2, scale=1.0):
    d2 = jnp.sum((x1[:, None, :] - x2[None, :, :]) ** 2, -1)
    return jnp.exp(-0.5 * d2 / scale**2)


# ----------------------------------------------------------------------------- gradient flow


def test_diagonal_kernel_matches_scalar_ode(x64):
    s = jnp.array([0.1, 0.5, 1.0, 3.0, 10.0])
    n = s.shape[0]
    y = jnp.array([1.0, -2.0, 0.5, 0.0, 4.0])
    f0 = jnp.array([0.3, 0.1, -0.2, 1.0, 0.0])
    lr, ts = 0.7, jnp.array([0.0, 0.5, 2.0, 10.0, 100.0])
    out = P.gradient_flow_mse(jnp.diag(s), y, learning_rate=lr, fx_train_0=f0)(ts)
    # scalar ODE f' = -(lr/n) s (f - y): f_t = y + (f_0 - y) exp(-lr s t / n)
    expected = y + (f0 - y) * np.exp(-lr * np.asarray(s) * np.asarray(ts)[:, None] / n)
    assert out.train.shape == (5, n)
    np.testing.assert_allclose(out.train, expected, rtol=1e-12, atol=1e-14)
    assert out.test is None


def test_matches_matrix_exponential(x64):
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(0))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(1), (n, 3))
    f0 = jax.random.normal(jax.random.PRNGKey(2), (n, 3))
    ft0 = jax.random.normal(jax.random.PRNGKey(3), (k_xt.shape[0], 3))
    lr, t = 0.3, 7.0
    out = P.gradient_flow_mse(
        k, y, learning_rate=lr, k_test_train=k_xt, fx_train_0=f0, fx_test_0=ft0
    )(t)
    decay = jax.scipy.linalg.expm(-lr * t / n * k)
    change = (jnp.eye(n) - decay) @ (y - f0)
    np.testing.assert_allclose(out.train, f0 + change, rtol=1e-10, atol=1e-10)
    expected_test = ft0 + k_xt @ jnp.linalg.solve(k, change)
    np.testing.assert_allclose(out.test, expected_test, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("diag_reg", [0.0, 1e-2])
def test_infinite_time_is_kernel_ridge(x64, diag_reg):
    key = jax.random.PRNGKey(4)
    x = jax.random.normal(key, (15, 3))
    xt = jax.random.normal(jax.random.PRNGKey(5), (6, 3))
    k, k_xt = rbf(x, x), rbf(xt, x)
    y = jnp.sin(x[:, :1]) + x[:, 1:2]
    f0 = 0.1 * jnp.cos(x[:, :1])
    ft0 = 0.1 * jnp.cos(xt[:, :1])
    out = P.gradient_flow_mse(
        k, y, learning_rate=1.0, k_test_train=k_xt, fx_train_0=f0, fx_test_0=ft0,
        diag_reg=diag_reg,
    )(jnp.inf)
    lam = diag_reg * np.trace(np.asarray(k)) / k.shape[0]
    alpha = np.linalg.solve(np.asarray(k) + lam * np.eye(15), np.asarray(y - f0))
    np.testing.assert_allclose(out.test, ft0 + k_xt @ alpha, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(out.train, f0 + k @ alpha, rtol=1e-7, atol=1e-8)
    if diag_reg == 0.0:
        np.testing.assert_allclose(out.train, y, atol=1e-7)


def test_time_derivative_is_the_ode(x64):
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(6))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(7), (n, 2))
    lr = 0.5
    predict = P.gradient_flow_mse(k, y, learning_rate=lr, k_test_train=k_xt)
    for t in (0.0, 1.5, 20.0):
        out, tangent = jax.jvp(predict, (jnp.asarray(t),), (jnp.asarray(1.0),))
        residual = out.train - y
        np.testing.assert_allclose(tangent.train, -(lr / n) * k @ residual, atol=1e-12)
        np.testing.assert_allclose(tangent.test, -(lr / n) * k_xt @ residual, atol=1e-12)
        # and by central finite differences, independent of autodiff
        h = 1e-5
        fd = (predict(t + h).train - predict(max(t - h, 0.0)).train) / (h + min(t, h))
        np.testing.assert_allclose(fd, -(lr / n) * k @ residual, atol=1e-6)


def test_ridge_flow_derivative_and_limit(x64):
    """With diag_reg, predictions follow the linear model trained with weight decay."""
    j, jt, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(8), n=10, p=30)
    n, p = j.shape
    y = jax.random.normal(jax.random.PRNGKey(9), (n,))
    lr, diag_reg = 0.4, 0.05
    lam = diag_reg * float(jnp.trace(k)) / n
    out = P.gradient_flow_mse(k, y, learning_rate=lr, k_test_train=k_xt, diag_reg=diag_reg)(5.0)
    # linear model f = J w / sqrt(p), loss 1/(2n)(||J w/sqrt(p) - y||^2 + lam ||w||^2), w_0 = 0:
    # dw/dt = -(lr/n) (J^T (f - y)/sqrt(p) + lam w) is linear; solve it with a matrix exponential
    a = (j.T @ j / p + lam * jnp.eye(p)) * lr / n
    b = lr / n * j.T @ y / np.sqrt(p)
    w = jnp.linalg.solve(a, (jnp.eye(p) - jax.scipy.linalg.expm(-5.0 * a)) @ b)
    np.testing.assert_allclose(out.train, j @ w / np.sqrt(p), atol=1e-9)
    np.testing.assert_allclose(out.test, jt @ w / np.sqrt(p), atol=1e-9)


# ----------------------------------------------------------------------------- gradient descent


@pytest.mark.parametrize("edge_fraction", [0.3, 0.95, 1.05])
def test_descent_equals_iterated_update(x64, edge_fraction):
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(10))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(11), (n, 2))
    lr = edge_fraction * 2 * n / float(np.linalg.eigvalsh(np.asarray(k))[-1])
    steps = jnp.arange(0, 60, 7)
    out = P.gradient_descent_mse(k, y, learning_rate=lr, k_test_train=k_xt)(steps)
    f, ft = np.zeros((n, 2)), np.zeros((k_xt.shape[0], 2))
    k_np, kxt_np, y_np = map(np.asarray, (k, k_xt, y))
    for step in range(int(steps[-1]) + 1):
        if step % 7 == 0:
            np.testing.assert_allclose(out.train[step // 7], f, rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(out.test[step // 7], ft, rtol=1e-9, atol=1e-9)
        residual = f - y_np
        f, ft = f - lr / n * k_np @ residual, ft - lr / n * kxt_np @ residual
    growth = np.linalg.norm(out.train[-1] - y) / np.linalg.norm(y)
    assert (growth > 1.0) == (edge_fraction > 1.0)


def test_descent_converges_to_flow_as_lr_shrinks(x64):
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(12))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(13), (n,))
    time = 30.0
    flow = P.gradient_flow_mse(k, y, learning_rate=1.0, k_test_train=k_xt)(time)
    lrs = np.array([1.0, 0.5, 0.25, 0.125, 0.0625])
    errors = []
    for lr in lrs:
        gd = P.gradient_descent_mse(k, y, learning_rate=lr, k_test_train=k_xt)(time / lr)
        errors.append(float(jnp.max(jnp.abs(gd.test - flow.test))))
    slope = np.polyfit(np.log(lrs), np.log(errors), 1)[0]
    assert 0.9 < slope < 1.1, (errors, slope)  # first-order (Euler) convergence


def test_descent_infinite_steps_is_ridge(x64):
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(14))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(15), (n,))
    gd = P.gradient_descent_mse(k, y, learning_rate=1.0, k_test_train=k_xt, diag_reg=0.1)(jnp.inf)
    lam = 0.1 * float(jnp.trace(k)) / n
    np.testing.assert_allclose(
        gd.test, k_xt @ np.linalg.solve(np.asarray(k) + lam * np.eye(n), np.asarray(y)),
        rtol=1e-8,
    )


def test_descent_matches_optax_sgd_on_linear_model(x64):
    """A model linear in its parameters has a constant NTK: optax.sgd follows the closed form."""
    j, jt, *_ = feature_kernels(jax.random.PRNGKey(16), n=16, m=5, p=24)
    n, p = j.shape
    y = jax.random.normal(jax.random.PRNGKey(17), (n, 3))
    w0 = jax.random.normal(jax.random.PRNGKey(18), (p, 3))

    def apply(w, x):
        return x @ w / np.sqrt(p)

    kernel = j @ j.T / p  # d f_i / d w . d f_j / d w, per output
    lr, steps = 0.9 * float(P.max_learning_rate(kernel)), 40
    opt = optax.sgd(lr)
    state, w = opt.init(w0), w0
    for _ in range(steps):
        grads = jax.grad(lambda w: mse_loss(apply(w, j), y))(w)
        updates, state = opt.update(grads, state)
        w = optax.apply_updates(w, updates)
    out = P.gradient_descent_mse(
        kernel, y, learning_rate=lr, k_test_train=jt @ j.T / p,
        fx_train_0=apply(w0, j), fx_test_0=apply(w0, jt),
    )(steps)
    np.testing.assert_allclose(out.train, apply(w, j), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out.test, apply(w, jt), rtol=1e-9, atol=1e-9)


def _init_mlp(key, width, d_in=1):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (d_in, width)),
        "b1": 0.1 * jax.random.normal(k2, (width,)),
        "w2": jax.random.normal(k3, (width, 1)),
    }


def _apply_mlp(params, x):
    """One-hidden-layer ReLU net in NTK parameterization (weights N(0, 1), 1/sqrt(fan_in))."""
    h = jax.nn.relu(x @ params["w1"] / np.sqrt(x.shape[1]) + params["b1"])
    return h @ params["w2"] / np.sqrt(h.shape[1])


@jax.jit
def _empirical_ntk(params, x1, x2):
    """Brute-force empirical NTK: J(x1) J(x2)^T from full Jacobians."""
    flat = lambda x: jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a: a.reshape(a.shape[0], -1),
                               jax.jacrev(lambda p: _apply_mlp(p, x)[:, 0])(params)))
    j1, j2 = jnp.concatenate(flat(x1), 1), jnp.concatenate(flat(x2), 1)
    return j1 @ j2.T


@functools.partial(jax.jit, static_argnums=4)
def _optax_sgd(params, x, y, lr, steps):
    """``steps`` of optax.sgd(lr) on the MSE, one compiled scan (compiled once per width)."""
    opt = optax.sgd(lr)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(lambda q: mse_loss(_apply_mlp(q, x), y))(p)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(p, updates), state), None

    return jax.lax.scan(step, (params, opt.init(params)), None, length=steps)[0][0]


def _optax_vs_prediction_gap(params, x, xt, y, steps):
    """Max gap between optax.sgd training and the empirical-NTK prediction on test inputs,
    relative to how far the network's test outputs moved."""
    n = x.shape[0]
    k, k_xt = _empirical_ntk(params, x, x), _empirical_ntk(params, xt, x)
    lr = 0.5 * n / float(jnp.linalg.eigvalsh(k)[-1])
    trained = _optax_sgd(params, x, y, lr, steps)
    out = P.gradient_descent_mse(
        k, y, learning_rate=lr, k_test_train=k_xt,
        fx_train_0=_apply_mlp(params, x), fx_test_0=_apply_mlp(params, xt),
    )(steps)
    net_change = jnp.max(jnp.abs(_apply_mlp(trained, xt) - _apply_mlp(params, xt)))
    return float(jnp.max(jnp.abs(out.test - _apply_mlp(trained, xt))) / net_change)


@pytest.mark.slow
def test_wide_network_trained_with_optax_follows_prediction(x64):
    """optax.sgd on a wide NTK-parameterized MLP tracks the empirical-NTK prediction; the gap
    shrinks with width (lazy training, Lee et al. 2019: O(1/sqrt(width)))."""
    n = 16
    x = jnp.linspace(-2.0, 2.0, n)[:, None]
    xt = jnp.linspace(-2.5, 2.5, 9)[:, None]
    y = jnp.sin(2 * x)
    widths = [128, 512, 2048, 8192]
    steps, gaps = 200, []
    for width in widths:
        gap = []
        for seed in range(2):
            params = _init_mlp(jax.random.PRNGKey(1000 * seed + width), width)
            gap.append(_optax_vs_prediction_gap(params, x, xt, y, steps))
        gaps.append(float(np.mean(gap)))
    slope = np.polyfit(np.log(widths), np.log(gaps), 1)[0]
    assert slope < -0.3, (gaps, slope)
    assert gaps[-1] < 0.02, gaps


# ----------------------------------------------------------------------------- rates and bounds


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_max_learning_rate_with_momentum_is_the_heavy_ball_edge(x64, momentum):
    # optax.sgd(lr, momentum) on the linear model f = J theta with the MSE: just below the
    # edge the loss shrinks, just above it grows (the top mode's roots leave the unit circle).
    j_train, _, k, _, _ = feature_kernels(jax.random.PRNGKey(21), n=6, p=40)
    j = j_train / np.sqrt(40)  # Theta = J J^T = k
    y = jax.random.normal(jax.random.PRNGKey(22), (6,), jnp.float64)
    edge = float(P.max_learning_rate(k, momentum=momentum))
    np.testing.assert_allclose(edge, (1 + momentum) * float(P.max_learning_rate(k)), rtol=1e-12)

    @jax.jit
    def final_loss(lr):
        opt = optax.sgd(lr, momentum=momentum if momentum else None)
        loss = lambda th: mse_loss(j @ th, y)

        def step(carry, _):
            theta, state = carry
            updates, state = opt.update(jax.grad(loss)(theta), state)
            return (optax.apply_updates(theta, updates), state), None

        theta0 = jnp.zeros(40, jnp.float64)
        (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=400)
        return loss(theta), loss(theta0)

    below, start = map(float, final_loss(0.97 * edge))
    above = float(final_loss(1.03 * edge)[0])
    assert below < start and above > 10 * start


def test_max_learning_rate_and_bound(x64):
    s = jnp.array([0.2, 1.0, 5.0])
    n = 3
    np.testing.assert_allclose(P.max_learning_rate(jnp.diag(s)), 2 * n / 5.0, rtol=1e-12)
    np.testing.assert_allclose(
        P.max_learning_rate(jnp.diag(s), diag_reg=0.3), 2 * n / (5.0 + 0.3 * 6.2 / 3), rtol=1e-12
    )
    _, _, k, _, _ = feature_kernels(jax.random.PRNGKey(19))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(20), (n,))
    ts = jnp.linspace(0.0, 200.0, 11)
    lr = 0.8
    out = P.gradient_flow_mse(k, y, learning_rate=lr)(ts)
    residual_norms = jnp.linalg.norm(out.train - y, axis=-1)
    bound = P.convergence_bound(k, jnp.linalg.norm(y), learning_rate=lr, t=ts)
    assert np.all(np.asarray(residual_norms) <= np.asarray(bound) * (1 + 1e-10))
    # tight for a residual along the smallest eigenvector
    values, vectors = np.linalg.eigh(np.asarray(k))
    out = P.gradient_flow_mse(k, vectors[:, 0], learning_rate=lr)(ts)
    np.testing.assert_allclose(
        jnp.linalg.norm(out.train - vectors[:, 0], axis=-1),
        np.exp(-lr * values[0] * np.asarray(ts) / n), rtol=1e-6,
    )
    np.testing.assert_allclose(
        P.convergence_bound(k, 1.0, learning_rate=lr, t=ts),
        np.exp(-lr * values[0] * np.asarray(ts) / n), rtol=1e-8,
    )


# ----------------------------------------------------------------------------- GP inference


@pytest.mark.parametrize("diag_reg", [0.0, 1e-3])
def test_gp_posterior_textbook(x64, diag_reg):
    x = jax.random.normal(jax.random.PRNGKey(21), (20, 2))
    xt = jax.random.normal(jax.random.PRNGKey(22), (8, 2))
    k, k_xt, k_xx = rbf(x, x, 1.5), rbf(xt, x, 1.5), rbf(xt, xt, 1.5)
    y = jnp.cos(x[:, 0]) * x[:, 1]
    post = P.gp_inference(k, k_xt, k_xx, y, diag_reg=diag_reg)
    kn = np.asarray(k) + diag_reg * np.trace(np.asarray(k)) / 20 * np.eye(20)
    inv = np.linalg.inv(kn)
    np.testing.assert_allclose(post.mean, np.asarray(k_xt) @ inv @ np.asarray(y), atol=1e-7)
    expected_cov = np.asarray(k_xx) - np.asarray(k_xt) @ inv @ np.asarray(k_xt).T
    np.testing.assert_allclose(post.covariance, expected_cov, atol=1e-7)
    assert post.mean.shape == (8,) and post.covariance.shape == (8, 8)


def test_gp_cholesky_and_eigh_paths_agree_and_singular_is_finite(x64):
    j, jt, k, k_xt, k_xx = feature_kernels(jax.random.PRNGKey(23), n=10, m=4, p=6)
    # rank-6 kernel of 10 points: Cholesky fails; the pseudo-inverse answer is the
    # least-norm fit in feature space, which we compute from the features directly.
    y = jax.random.normal(jax.random.PRNGKey(24), (10,))
    post = P.gp_inference(k, k_xt, k_xx, y)
    w = np.linalg.pinv(np.asarray(j) / np.sqrt(6)) @ np.asarray(y)
    np.testing.assert_allclose(post.mean, np.asarray(jt) @ w / np.sqrt(6), atol=1e-8)
    assert np.all(np.isfinite(post.covariance))
    # a full-rank kernel takes the Cholesky path; under jit the same answer
    _, _, k2, k2_xt, k2_xx = feature_kernels(jax.random.PRNGKey(25), n=10, m=4, p=30)
    for fn in with_and_without_jit(lambda a, b, c: P.gp_inference(a, b, c, y)):
        post2 = fn(k2, k2_xt, k2_xx)
        np.testing.assert_allclose(
            post2.mean, k2_xt @ np.linalg.solve(np.asarray(k2), np.asarray(y)), rtol=1e-8
        )


@pytest.mark.xla_optimized
def test_float32_keeps_small_but_real_eigenvalues():
    """cond = 3e4 at n = 400 in float32: n eps cond > 1, yet every direction is resolvable
    (eigenvalue errors ~ eps s_max); interpolation at t = inf must use all of them."""
    n = 400
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    s = np.geomspace(1.0, 1.0 / 3e4, n)
    k = jnp.asarray((q * s) @ q.T, jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(n,)), jnp.float32)
    fit = P.gradient_flow_mse(k, y, learning_rate=1.0)(jnp.inf).train
    assert fit.dtype == jnp.float32
    assert float(jnp.linalg.norm(fit - y) / jnp.linalg.norm(y)) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_duplicated_training_points_give_finite_outputs(x64, dtype):
    x = jnp.concatenate([jnp.linspace(-1, 1, 6), jnp.linspace(-1, 1, 6)])[:, None].astype(dtype)
    xt = jnp.linspace(-1, 1, 5)[:, None].astype(dtype)
    k, k_xt, k_xx = rbf(x, x), rbf(xt, x), rbf(xt, xt)
    y = (jnp.sin(3 * x) + 0.1 * jnp.arange(12)[:, None] % 2).astype(dtype)  # noisy duplicates
    predict = P.gradient_flow_mse(k, y, learning_rate=1.0, k_test_train=k_xt)
    for t in (1.0, 1e6, jnp.inf):
        out = predict(t)
        assert out.train.dtype == dtype and out.test.dtype == dtype
        assert np.all(np.isfinite(out.train)) and np.all(np.isfinite(out.test))
    # at t = inf duplicated inputs are fitted by the average of their targets
    np.testing.assert_allclose(
        predict(jnp.inf).train[:6], (y[:6] + y[6:]) / 2, atol=1e-5 if dtype == jnp.float64 else 0.05
    )
    post = P.gp_inference(k, k_xt, k_xx, y)
    assert np.all(np.isfinite(post.mean)) and np.all(np.isfinite(post.covariance))
    ens = P.gradient_flow_ensemble((k, k_xt, k_xx), (k, k_xt, None), y, learning_rate=1.0,
                                   t=jnp.array([0.0, 10.0, jnp.inf]))
    assert np.all(np.isfinite(ens.mean)) and np.all(np.isfinite(ens.covariance))


# ----------------------------------------------------------------------------- ensembles


def _ensemble_inputs(key):
    x = jax.random.normal(key, (14, 2))
    xt = jax.random.normal(jax.random.fold_in(key, 1), (5, 2))
    nngp = (rbf(x, x, 2.0), rbf(xt, x, 2.0), rbf(xt, xt, 2.0))
    ntk = (rbf(x, x, 1.0) + 0.5 * nngp[0], rbf(xt, x, 1.0) + 0.5 * nngp[1], None)
    y = jnp.sin(x[:, :1])
    return nngp, ntk, y


def test_ensemble_limits(x64):
    nngp, ntk, y = _ensemble_inputs(jax.random.PRNGKey(26))
    ens0 = P.gradient_flow_ensemble(nngp, ntk, y, learning_rate=1.0, t=0.0)
    np.testing.assert_allclose(ens0.mean, 0.0, atol=1e-14)
    np.testing.assert_allclose(ens0.covariance, nngp[2], atol=1e-14)
    ens = P.gradient_flow_ensemble(nngp, ntk, y, learning_rate=1.0, t=jnp.inf)
    theta, theta_x = map(np.asarray, ntk[:2])
    k, k_x, k_xx = map(np.asarray, nngp)
    a = theta_x @ np.linalg.inv(theta)
    np.testing.assert_allclose(ens.mean, a @ np.asarray(y), atol=1e-6)
    expected = k_xx + a @ k @ a.T - a @ k_x.T - k_x @ a.T
    np.testing.assert_allclose(ens.covariance, expected, atol=1e-6)


def test_ensemble_equals_affine_map_of_initial_gp(x64):
    """f_t(x) is affine in the initial outputs f_0 ~ GP(0, K): push the prior through the
    gradient-flow predictor (columns of the identity as initial outputs)."""
    nngp, ntk, y = _ensemble_inputs(jax.random.PRNGKey(27))
    n, m = y.shape[0], nngp[1].shape[0]
    k_joint = jnp.block([[nngp[0], nngp[1].T], [nngp[1], nngp[2]]])
    ts = jnp.array([0.3, 3.0, 30.0])
    eye = jnp.eye(n + m)
    lr = 0.7
    linear = P.gradient_flow_mse(
        ntk[0], jnp.zeros((n, n + m)), learning_rate=lr, k_test_train=ntk[1],
        fx_train_0=eye[:n], fx_test_0=eye[n:],
    )(ts).test  # (T, m, n + m): d f_t(x) / d f_0
    offset = P.gradient_flow_mse(ntk[0], y, learning_rate=lr, k_test_train=ntk[1])(ts).test
    ens = P.gradient_flow_ensemble(nngp, ntk, y, learning_rate=lr, t=ts)
    np.testing.assert_allclose(ens.mean, offset, atol=1e-10)
    cov = jnp.einsum("tij,jk,tlk->til", linear, k_joint, linear)
    np.testing.assert_allclose(ens.covariance, cov, atol=1e-10)


# ----------------------------------------------------------------------------- API behaviour


def test_jit_vmap_and_time_axis():
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(28), dtype=jnp.float32)
    y = jax.random.normal(jax.random.PRNGKey(29), (k.shape[0], 2))
    predict = P.gradient_flow_mse(k, y, learning_rate=0.5, k_test_train=k_xt)
    ts = jnp.array([0.0, 1.0, 10.0, jnp.inf])
    batched = predict(ts)
    assert batched.train.shape == (4, *y.shape) and batched.test.shape == (4, 7, 2)
    assert batched.train.dtype == jnp.float32
    for fn in with_and_without_jit(predict):
        single = [fn(t) for t in ts]
        for i, out in enumerate(single):
            np.testing.assert_allclose(out.train, batched.train[i], rtol=1e-5, atol=1e-5)
    mapped = jax.vmap(predict)(ts)
    np.testing.assert_allclose(mapped.test, batched.test, rtol=1e-5, atol=1e-5)
    steps_fn = P.gradient_descent_mse(k, y, learning_rate=0.5, k_test_train=k_xt)
    np.testing.assert_allclose(
        jax.jit(steps_fn)(jnp.arange(5)).test, steps_fn(jnp.arange(5)).test, rtol=1e-5, atol=1e-6
    )


def test_whole_pipeline_jits_in_float64(x64):
    _, _, k, k_xt, _ = feature_kernels(jax.random.PRNGKey(30))
    y = jax.random.normal(jax.random.PRNGKey(31), (k.shape[0],))

    @jax.jit
    def run(k, k_xt, y):
        return P.gradient_flow_mse(k, y, learning_rate=1.0, k_test_train=k_xt)(jnp.inf).test

    expected = k_xt @ np.linalg.solve(np.asarray(k), np.asarray(y))
    np.testing.assert_allclose(run(k, k_xt, y), expected, rtol=1e-8)
    assert run(k, k_xt, y).dtype == jnp.float64


def test_bad_inputs_raise():
    k = jnp.eye(4)
    y = jnp.ones((4, 2))
    flow = lambda **kw: P.gradient_flow_mse(
        kw.pop("k", k), kw.pop("y", y), learning_rate=kw.pop("lr", 1.0), **kw)
    bad_k = k.at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="non-finite"):
        flow(k=bad_k)
    with pytest.raises(ValueError, match="non-finite"):
        flow(k_test_train=jnp.full((3, 4), jnp.inf))
    with pytest.raises(ValueError, match="square"):
        flow(k=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="y_train"):
        flow(y=jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="k_test_train"):
        flow(k_test_train=jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="fx_train_0"):
        flow(fx_train_0=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="fx_test_0"):
        flow(k_test_train=jnp.ones((3, 4)), fx_test_0=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="learning_rate"):
        flow(lr=0.0)
    with pytest.raises(ValueError, match="diag_reg"):
        flow(diag_reg=-1.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        flow(k=jnp.diag(jnp.array([1.0, 1.0, -0.5, 1.0])))
    with pytest.raises(ValueError, match="t must be"):
        flow()(-1.0)
    with pytest.raises(ValueError, match="t must be"):
        flow()(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="whole numbers"):
        P.gradient_descent_mse(k, y, learning_rate=1.0)(2.5)
    with pytest.raises(ValueError, match="k_test_test"):
        P.gp_inference(k, jnp.ones((3, 4)), jnp.ones((2, 2)), y)
    with pytest.raises(ValueError, match="nngp"):
        P.gradient_flow_ensemble((k, jnp.ones((3, 4)), None), (k, jnp.ones((2, 4)), None), y,
                                 learning_rate=1.0, t=1.0)


@pytest.mark.slow
def test_study_sin_task_wide_mlp_follows_kernel_predictions(x64):
    """The study's section 5 claim done exactly: a width-4096 ntkjax MLP trained with optax.sgd
    on the sin task follows both the empirical-NTK and the infinite-width NTK predictions
    (started from the network's own initial outputs) to within a few % of its movement."""
    import ntkjax
    from ntkjax import tasks
    from ntkjax.models import MLP

    data = tasks.sin_regression(jax.random.PRNGKey(0))
    x, y, xt = data.x_train, data.y_train, data.x_test
    model = MLP(features=(4096, 1), activation="relu", w_std=float(np.sqrt(2.0)), b_std=0.1)
    kernels = ntkjax.kernel_fn(model)
    k, k_xt = kernels(x).ntk, kernels(xt, x).ntk
    empirical = ntkjax.empirical_ntk_fn(model.apply)
    steps = 100
    for seed in range(2):
        params = model.init(jax.random.PRNGKey(seed), x)
        ek, ek_xt = empirical(params, x), empirical(params, xt, x)
        lr = 0.5 * float(P.max_learning_rate(ek))
        opt = optax.sgd(lr)

        def body(carry, _):
            p, state = carry
            grads = jax.grad(lambda p: mse_loss(model.apply(p, x), y))(p)
            updates, state = opt.update(grads, state)  # noqa: B023
            return (optax.apply_updates(p, updates), state), None

        (trained, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        f0, ft0 = model.apply(params, x), model.apply(params, xt)
        net = model.apply(trained, xt)
        moved = float(jnp.max(jnp.abs(net - ft0)))
        for kernel, kernel_xt in ((ek, ek_xt), (k, k_xt)):
            out = P.gradient_descent_mse(kernel, y, learning_rate=lr, k_test_train=kernel_xt,
                                         fx_train_0=f0, fx_test_0=ft0)(steps)
            assert float(jnp.max(jnp.abs(out.test - net))) < 0.04 * moved


@pytest.mark.xla_optimized
def test_float32_posterior_variances_are_never_negative():
    """RBF kernel on a dense 100-point grid: in float32 the exact posterior variances at test
    points between (or on) training points are ~0 and round-off makes some negative; they are
    clipped at 0 (so standard deviations are never NaN), and agree with float64 to round-off."""
    grid = jnp.linspace(-3, 3, 100)[:, None]
    test = jnp.linspace(-3, 3, 37)[:, None]
    y = jnp.sin(grid[:, 0])
    k, k_xt, k_xx = rbf(grid, grid, 1.0), rbf(test, grid, 1.0), rbf(test, test, 1.0)
    post = P.gp_inference(k, k_xt, k_xx, y, diag_reg=1e-6)
    ens = P.gradient_flow_ensemble((k, k_xt, k_xx), (k, k_xt, None), y, learning_rate=1.0,
                                   t=jnp.inf, diag_reg=1e-6)
    for cov in (post.covariance, ens.covariance):
        variances = np.diagonal(np.asarray(cov))
        assert variances.dtype == np.float32 and np.all(variances >= 0)
        assert np.all(np.isfinite(np.sqrt(variances)))
        np.testing.assert_array_equal(np.asarray(cov), np.asarray(cov).T)
        assert np.max(variances) < 1e-4  # the truth is ~0 everywhere on this grid


def test_descent_above_the_edge_is_never_nan_and_warns(x64):
    """K = [[10, .3, 0], [.3, 9.5, 0], [0, 0, 1]], lr = 1.5 x the edge: two modes grow like
    |1 - lr lambda / n|^k; after 10,000 steps they overflow to +-inf, the third coordinate
    (its own stable mode) stays finite, and nothing is NaN. Exact values where representable
    (k = 20 against the matrix power in numpy)."""
    k = np.array([[10.0, 0.3, 0.0], [0.3, 9.5, 0.0], [0.0, 0.0, 1.0]])
    y = np.array([1.0, -2.0, 0.5])
    edge = 2 * 3 / np.linalg.eigvalsh(k)[-1]
    lr = 1.5 * edge
    with pytest.warns(UserWarning, match="above the gradient-descent stability edge"):
        predict = P.gradient_descent_mse(jnp.asarray(k), jnp.asarray(y), learning_rate=lr)
    step = np.eye(3) - lr * k / 3
    exact = (np.eye(3) - np.linalg.matrix_power(step, 20)) @ y
    np.testing.assert_allclose(predict(20).train, exact, rtol=1e-10)
    far = np.asarray(predict(jnp.asarray([10_000, 10_001])).train)
    assert not np.any(np.isnan(far))
    assert np.all(np.isinf(far[:, :2]))
    assert np.all(np.sign(far[0, :2]) == -np.sign(far[1, :2]))  # the modes alternate sign
    np.testing.assert_allclose(far[:, 2], 0.5, rtol=1e-10)  # the stable mode converged
    with pytest.raises(ValueError, match="no limit"):
        predict(jnp.inf)
    at_edge = P.gradient_descent_mse(jnp.asarray(k), jnp.asarray(y), learning_rate=edge)
    with pytest.raises(ValueError, match="no limit"):
        at_edge(jnp.inf)
    # under jit nothing is checked, and the result is still free of NaN
    jitted = jax.jit(lambda kk, steps: P.gradient_descent_mse(kk, jnp.asarray(y),
                                                               learning_rate=lr)(steps).train)
    assert not np.any(np.isnan(np.asarray(jitted(jnp.asarray(k), 10_000))))


def test_empty_training_kernels_are_refused_like_empty_inputs():
    empty = jnp.zeros((0, 0))
    for call in (lambda: P.gradient_flow_mse(empty, jnp.zeros((0,)), learning_rate=1.0),
                 lambda: P.gradient_descent_mse(empty, jnp.zeros((0,)), learning_rate=1.0),
                 lambda: P.max_learning_rate(empty),
                 lambda: P.gp_inference(empty, jnp.zeros((2, 0)), None, jnp.zeros((0,)))):
        with pytest.raises(ValueError, match="empty"):
            call()
