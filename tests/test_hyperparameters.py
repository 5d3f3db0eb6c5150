"""Hyperparameters by gradient (ntkjax.hyperparameters): kernels differentiable in w_std and
b_std, the GP evidence against scipy's multivariate normal, gradients against central finite
differences in float64, and a fit that recovers the hyperparameters data were drawn with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import ntkjax
from ntkjax.hyperparameters import fit_marginal_likelihood, gp_log_marginal_likelihood
from ntkjax.models import CNN, MLP


def central_difference(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (float(f(jnp.asarray(x + step))) - float(f(jnp.asarray(x - step)))) / (2 * eps)
    return grad


def test_evidence_is_the_multivariate_normal_log_density(x64):
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(kx, (6, 6), jnp.float64)
    k = a @ a.T / 6
    y = jax.random.normal(ky, (6, 3), jnp.float64)
    noise = 0.3
    expected = sum(
        scipy.stats.multivariate_normal(mean=np.zeros(6), cov=np.asarray(k) + noise * np.eye(6))
        .logpdf(np.asarray(y[:, c])) for c in range(3)
    )
    np.testing.assert_allclose(gp_log_marginal_likelihood(k, y, noise=noise), expected,
                               rtol=1e-12)
    np.testing.assert_allclose(gp_log_marginal_likelihood(k, y[:, 0], noise=noise),
                               scipy.stats.multivariate_normal(
                                   mean=np.zeros(6), cov=np.asarray(k) + noise * np.eye(6)
                               ).logpdf(np.asarray(y[:, 0])), rtol=1e-12)


def test_kernel_fn_gradients_in_w_std_and_b_std_match_finite_differences(x64):
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4), jnp.float64)
    probe = jax.random.normal(jax.random.PRNGKey(2), (5, 5), jnp.float64)

    @jax.jit
    def summary(h):  # a scalar touching every entry of both kernels
        k = ntkjax.kernel_fn(MLP(features=(8, 8, 8, 1), activation="erf",
                                 w_std=h[0], b_std=h[1]))(x)
        return jnp.sum(probe * k.nngp) + 0.3 * jnp.sum(probe * k.ntk)

    h = jnp.array([1.3, 0.4])
    grad = np.asarray(jax.grad(summary)(h))
    np.testing.assert_allclose(grad, central_difference(summary, h), rtol=1e-7)


def test_relu_convolutional_kernel_gradients_match_finite_differences(x64):
    images = jax.random.normal(jax.random.PRNGKey(3), (3, 4, 4, 2), jnp.float64)

    @jax.jit
    def summary(h):
        net = CNN(features=(4, 1), kernel_size=3, activation="relu", w_std=h[0], b_std=h[1],
                  readout="global_average_pool")
        k = ntkjax.kernel_fn(net)(images)
        return jnp.sum(k.nngp) + jnp.sum(k.ntk)

    h = jnp.array([1.4, 0.2])
    np.testing.assert_allclose(np.asarray(jax.grad(summary)(h)), central_difference(summary, h),
                               rtol=1e-7)


def nngp(h, x):
    net = MLP(features=(8, 8, 8, 1), activation="erf", w_std=h["w_std"], b_std=h["b_std"])
    return ntkjax.kernel_fn(net)(x).nngp


def test_evidence_gradient_in_w_std_b_std_and_noise_matches_finite_differences(x64):
    x = jax.random.normal(jax.random.PRNGKey(4), (7, 3), jnp.float64)
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    @jax.jit
    def evidence(v):
        k = nngp({"w_std": v[0], "b_std": v[1]}, x)
        return gp_log_marginal_likelihood(k, y, noise=v[2])

    v = jnp.array([1.6, 0.3, 0.05])
    np.testing.assert_allclose(np.asarray(jax.grad(evidence)(v)),
                               central_difference(evidence, v), rtol=1e-6)


@pytest.mark.slow
def test_fit_recovers_the_hyperparameters_the_targets_were_drawn_with(x64):
    n, outputs = 40, 60
    x = jax.random.normal(jax.random.PRNGKey(5), (n, 3), jnp.float64)
    truth = {"w_std": 1.8, "b_std": 0.6}
    true_noise = 0.05
    cov = np.asarray(nngp(truth, x)) + true_noise * np.eye(n)
    y = np.linalg.cholesky(cov) @ np.asarray(
        jax.random.normal(jax.random.PRNGKey(6), (n, outputs), jnp.float64))
    fit = fit_marginal_likelihood(nngp, y, {"w_std": 1.0, "b_std": 0.1}, args=(x,), noise=0.5,
                                  num_steps=300)
    history = np.asarray(fit.log_likelihood)
    assert history.shape == (301,) and history[-1] > history[0]
    at_truth = float(gp_log_marginal_likelihood(nngp(truth, x), y, noise=true_noise))
    assert history[-1] >= at_truth - 1e-3 * abs(at_truth)  # the maximum is at least the truth's
    np.testing.assert_allclose(float(fit.hyperparameters["w_std"]), truth["w_std"], rtol=0.1)
    np.testing.assert_allclose(float(fit.hyperparameters["b_std"]), truth["b_std"], rtol=0.2)
    np.testing.assert_allclose(float(fit.noise), true_noise, rtol=0.2)


def test_an_overshooting_optimizer_returns_the_best_iterate_never_worse_than_the_start(x64):
    import optax

    x = jax.random.normal(jax.random.PRNGKey(5), (30, 3), jnp.float64)
    y = jnp.sin(x[:, :1])
    init = {"w_std": 1.3, "b_std": 0.2}
    # plain gradient steps far too long for the log-evidence: every step lands far worse
    fit = fit_marginal_likelihood(nngp, y, init, args=(x,), noise=0.1, num_steps=5,
                                  optimizer=optax.sgd(10.0))
    history = np.asarray(fit.log_likelihood)
    start = float(gp_log_marginal_likelihood(nngp(init, x), y, noise=0.1))
    np.testing.assert_allclose(history[0], start, rtol=1e-12)
    assert history[-1] < start  # the last iterate went downhill
    fitted = float(gp_log_marginal_likelihood(nngp(fit.hyperparameters, x), y, noise=fit.noise))
    np.testing.assert_allclose(fitted, history.max(), rtol=1e-12)  # the best iterate is returned
    assert fitted >= start


def test_bad_input():
    k = jnp.eye(3)
    with pytest.raises(ValueError, match="noise"):
        gp_log_marginal_likelihood(k, jnp.ones(3), noise=-1.0)
    with pytest.raises(ValueError, match="positive definite"):
        gp_log_marginal_likelihood(jnp.ones((3, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match="square"):
        gp_log_marginal_likelihood(jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match="y_train"):
        gp_log_marginal_likelihood(k, jnp.ones(4))
    with pytest.raises(ValueError, match="positive"):
        fit_marginal_likelihood(lambda h: k * h["a"], jnp.ones(3), {"a": 0.0})
    with pytest.raises(ValueError, match="noise"):
        fit_marginal_likelihood(lambda h: k * h["a"], jnp.ones(3), {"a": 1.0}, noise=0.0)
    with pytest.raises(ValueError, match=r"\(3, 3\) matrix"):
        fit_marginal_likelihood(lambda h: jnp.ones((2, 2)) * h["a"], jnp.ones(3), {"a": 1.0})
    with pytest.raises(ValueError, match="w_std must be finite and >= 0"):
        ntkjax.kernel_fn(MLP(features=(4, 1), w_std=-1.0))(jnp.ones((2, 3)))


def test_non_finite_initial_values_are_refused_naming_init():
    # an infinite initial value gives an infinite kernel and a NaN evidence: refused up front
    k = jnp.eye(3)
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match="init must be a pytree of finite"):
            fit_marginal_likelihood(lambda h: k * h["a"], jnp.ones(3), {"a": bad}, num_steps=1)
    # finite in float64 but infinite once cast to the float32 the fit runs in
    with pytest.raises(ValueError, match="init holds a value that overflows float32"):
        fit_marginal_likelihood(lambda h: k * h["a"], jnp.ones(3), {"a": 1e300}, num_steps=1)
