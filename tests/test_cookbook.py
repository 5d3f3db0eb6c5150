"""neural-tangents' cookbook (notebooks/neural_tangents_cookbook.ipynb) in ntkjax, as a test.

The cookbook fits ``sin`` from 5 noisy points with an Erf network
``Dense(512, W_std=1.5, b_std=0.05) -> Erf -> Dense(512, ...) -> Erf -> Dense(1, ...)``:
prior draws and the NNGP prior, exact Bayesian inference (NNGP posterior), gradient descent on
the infinite network (NTK ensemble) at infinite and finite times with the mean MSE, and an
ensemble of finite networks trained with SGD. Conversions applied
(docs/guides/coming_from_neural_tangents.md):

* ``stax.serial(...)`` -> a Flax module of :mod:`ntkjax.nn` layers (here ``ntkjax.models.MLP``);
* ``nt.predict.gradient_descent_mse_ensemble(kernel_fn, x, y, diag_reg=1e-4)`` ->
  ``ntkjax.ensemble_predictor(module, x, y, diag_reg=1e-4)`` (``diag_reg`` relative to the mean
  diagonal in both);
* ``predict_fn(t, x_test=..., get=..., compute_cov=True)`` -> ``predict(x_test, t=..., get=...)``
  (``t`` defaults to infinity);
* time: nt scales time by ``y.size`` = n O, ntkjax by n; with one output they agree, so the
  cookbook's times are used unchanged. Its loss ``0.5 * mean((f - y)**2)`` is
  :func:`ntkjax.losses.mse_loss` for one output, so ``optax.sgd(0.1)`` for k steps reaches
  time ``0.1 k`` of a predictor built with ``learning_rate=1`` -- or time ``k`` of one built
  with ``learning_rate=0.1``, which is used here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkjax
from ntkjax.models import MLP

# stax.serial(Dense(512, W_std=1.5, b_std=0.05), Erf(), Dense(512, ...), Erf(), Dense(1, ...))
MODEL = MLP(features=(512, 512, 1), activation="erf", w_std=1.5, b_std=0.05)
DIAG_REG = 1e-4
LEARNING_RATE = 0.1


def sin_task():
    """The cookbook's data: 5 noisy training points of sin on [-pi, pi], 50 test points."""
    key = jax.random.PRNGKey(10)
    key, x_key, y_key = jax.random.split(key, 3)
    train_xs = jax.random.uniform(x_key, (5, 1), minval=-jnp.pi, maxval=jnp.pi)
    train_ys = jnp.sin(train_xs) + 0.1 * jax.random.normal(y_key, (5, 1))
    test_xs = jnp.linspace(-jnp.pi, jnp.pi, 50).reshape(50, 1)
    return key, train_xs, train_ys, test_xs, jnp.sin(test_xs)


def mean_loss(gaussian, ys):
    """The cookbook's ``loss_fn``: E[0.5 mean((f - y)^2)] under the ensemble's Gaussian."""
    mean = gaussian.mean.reshape(gaussian.mean.shape[0], -1)
    var = np.diagonal(gaussian.covariance, axis1=1, axis2=2)
    ys = np.asarray(ys).reshape(1, -1)
    return 0.5 * np.mean(ys**2 - 2 * mean * ys + var + mean**2, axis=1)


def test_prior_posterior_and_infinite_time_gradient_descent():
    key, train_xs, train_ys, test_xs, test_ys = sin_task()
    # prior draws vs the NNGP prior: kernel = kernel_fn(test_xs, test_xs, 'nngp')
    kernel = jax.jit(ntkjax.kernel_fn(MODEL))(test_xs)
    std_dev = np.sqrt(np.diag(kernel.nngp))
    draws = jax.jit(jax.vmap(lambda k: MODEL.apply(MODEL.init(k, test_xs), test_xs)))(
        jax.random.split(key, 200))
    empirical_std = np.asarray(jnp.std(draws[..., 0], axis=0))
    assert np.max(np.abs(empirical_std / std_dev - 1)) < 0.25  # 200 draws of width 512

    predict = ntkjax.ensemble_predictor(MODEL, train_xs, train_ys, diag_reg=DIAG_REG)
    nngp = predict(test_xs, get="nngp")  # exact Bayesian inference
    ntk = predict(test_xs, get="ntk")  # gradient descent for infinite time
    nngp_std = np.sqrt(np.diag(nngp.covariance))
    ntk_std = np.sqrt(np.diag(ntk.covariance))
    # both fit the data: at the training points the mean is the (noisy) target, the spread ~0
    on_train = predict(train_xs, get="nngp")
    np.testing.assert_allclose(on_train.mean, train_ys, atol=1e-2)
    assert np.max(np.sqrt(np.diag(on_train.covariance))) < 0.05 * np.max(std_dev)
    # similar but not identical: Bayesian inference vs gradient descent
    assert np.max(np.abs(nngp.mean - ntk.mean)) < 0.3
    assert np.max(np.abs(nngp.mean - ntk.mean)) > 1e-3
    # the posterior is narrower than the prior everywhere, and both track sin between points
    assert np.all(nngp_std <= std_dev + 1e-6) and np.all(ntk_std <= std_dev + 1e-6)
    inside = np.abs(np.asarray(test_xs[:, 0])) < 2.0
    assert np.mean(np.abs(ntk.mean - np.asarray(test_ys))[inside]) < 0.3


@pytest.mark.slow
def test_trained_ensemble_of_finite_networks_matches_the_infinite_ensemble():
    key, train_xs, train_ys, test_xs, test_ys = sin_task()
    # the cookbook trains 100 networks of width 512 for 10,000 steps; 16 of width 256 for 600
    # steps keep this test short (the kernels do not depend on the width)
    steps, record_every, ensemble_size = 600, 30, 16
    finite = MLP(features=(256, 256, 1), activation="erf", w_std=1.5, b_std=0.05)
    # time in optimizer steps at learning rate 0.1 (nt: ts = 0.1 * steps with lr = 1)
    predict = ntkjax.ensemble_predictor(MODEL, train_xs, train_ys,
                                        learning_rate=LEARNING_RATE, diag_reg=DIAG_REG)
    ts = jnp.arange(0, steps + 1, record_every, dtype=jnp.float32)
    infinite_train = mean_loss(predict(train_xs, t=ts), train_ys)
    infinite_test = mean_loss(predict(test_xs, t=ts), test_ys)
    assert np.all(np.diff(infinite_train) < 0)  # gradient descent lowers the training loss

    train = ntkjax.make_train_fn(finite.apply, optimizer=optax.sgd(LEARNING_RATE),
                                 num_steps=steps, record_every=record_every, track_kernel=False)
    params = jax.vmap(finite.init, (0, None))(jax.random.split(key, ensemble_size), train_xs)
    history = jax.jit(jax.vmap(lambda p: train(p, train_xs, train_ys, x_test=test_xs)))(params)
    ensemble_train = np.mean(np.asarray(history.loss), axis=0)
    test_loss = 0.5 * np.mean((np.asarray(history.test_predictions) - np.asarray(test_ys)) ** 2,
                              axis=(2, 3))
    ensemble_test = np.mean(test_loss, axis=0)
    # the finite ensemble's mean losses follow the infinite ensemble's over training
    late = ts > 100  # after the first 100 steps
    # (at t = 0 the loss is the prior variance, too noisy an estimate from 16 draws)
    np.testing.assert_allclose(ensemble_test[1:], infinite_test[1:], rtol=0.35)
    np.testing.assert_allclose(ensemble_train[late], infinite_train[late], rtol=0.5)
    # and so does the distribution of the trained functions at the end
    end = predict(test_xs, t=float(steps))
    fx = np.asarray(history.test_predictions[:, -1, :, 0])
    ntk_std = np.sqrt(np.diag(end.covariance))
    standard_error = ntk_std / np.sqrt(ensemble_size)
    assert np.mean(np.abs(fx.mean(0) - end.mean[:, 0]) / standard_error) < 2.0
    np.testing.assert_allclose(np.mean(fx.std(0)), np.mean(ntk_std), rtol=0.3)
