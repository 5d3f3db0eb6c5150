"""Tests of ntkjax.training against closed forms, brute-force float64 Jacobians and theory.

The model here is a small linen MLP written in the test (NTK parameterization), so the training
loop is checked independently of ntkjax.models.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkjax.training import (
    kernel_regime_check,
    learning_rate_check,
    make_train_fn,
    train_with_kernel_tracking,
)


class _NTKMLP(nn.Module):
    """f(x) = W_L relu(... relu(W_1 x / sqrt(d) + b_1) ...) / sqrt(h) + b_L, W ~ N(0, 1)."""

    features: tuple[int, ...]
    w_std: float = math.sqrt(2.0)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            fan_in = x.shape[-1]
            w = self.param(f"w{i}", nn.initializers.normal(1.0), (fan_in, width), x.dtype)
            b = self.param(f"b{i}", nn.initializers.normal(1.0), (width,), x.dtype)
            x = x @ w * (self.w_std / math.sqrt(fan_in)) + 0.1 * b
            if i < len(self.features) - 1:
                x = jax.nn.relu(x)
        return x


def _data(n=12, d=3, dtype=jnp.float32, seed=0):
    kx, kp = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, d), dtype)
    y = jnp.sin(x[:, :1] + 0.5 * x[:, 1:2])
    probe = jax.random.normal(kp, (5, d), dtype)
    return x, y, probe


def _model(width, depth=1):
    return _NTKMLP(features=(width,) * depth + (1,))


def _brute_force_ntk(apply_fn, params, x):
    """J J^T by flattening all parameters, in the dtype of the inputs (float64 under x64)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = jax.jacobian(lambda p: apply_fn(unravel(p), x).reshape(-1))(flat)
    return jac @ jac.T


def _edge(apply_fn, params, x):
    """2n / lambda_max of the brute-force NTK."""
    theta = np.asarray(_brute_force_ntk(apply_fn, params, x), dtype=np.float64)
    return 2 * x.shape[0] / np.linalg.eigvalsh(theta)[-1], theta


def test_records_match_brute_force_float64(x64):
    x, y, probe = _data(dtype=jnp.float64)
    model = _model(32)
    params0 = model.init(jax.random.PRNGKey(1), x)
    history = train_with_kernel_tracking(
        model.apply, params0, x, y, optimizer=optax.sgd(0.3), num_steps=20, record_every=20,
        probe_x=probe, x_test=probe,
    )
    assert history.loss.dtype == jnp.float64
    params = history.final_params
    np.testing.assert_allclose(history.steps, [0, 20])
    # loss at step 0 and after training, from the definition 1/(2n) sum (f - y)^2
    for k, p in enumerate([params0, params]):
        f = model.apply(p, x)
        assert abs(float(history.loss[k]) - float(jnp.sum((f - y) ** 2) / (2 * x.shape[0]))) < 1e-12
        np.testing.assert_allclose(history.train_predictions[k], f, rtol=1e-12)
        np.testing.assert_allclose(history.test_predictions[k], model.apply(p, probe), rtol=1e-12)
    # kernel change against a float64 brute-force Jacobian contraction
    theta0 = _brute_force_ntk(model.apply, params0, probe)
    theta1 = _brute_force_ntk(model.apply, params, probe)
    expected = float(jnp.linalg.norm(theta1 - theta0) / jnp.linalg.norm(theta0))
    assert expected > 1e-4  # the kernel did move at width 32
    np.testing.assert_allclose(history.kernel_change, [0.0, expected], rtol=1e-9, atol=1e-14)
    flat0 = jax.flatten_util.ravel_pytree(params0)[0]
    flat1 = jax.flatten_util.ravel_pytree(params)[0]
    expected_p = float(jnp.linalg.norm(flat1 - flat0) / jnp.linalg.norm(flat0))
    np.testing.assert_allclose(history.param_change, [0.0, expected_p], rtol=1e-9, atol=1e-14)
    assert not bool(history.diverged) and int(history.diverged_at) == -1
    assert bool(np.all(history.valid))


def test_gradient_step_is_plain_gradient_descent(x64):
    # one full-batch SGD step moves params by -lr * grad of 1/(2n) sum (f - y)^2 (autodiff)
    x, y, probe = _data(dtype=jnp.float64)
    model = _model(16)
    params0 = model.init(jax.random.PRNGKey(2), x)
    history = train_with_kernel_tracking(
        model.apply, params0, x, y, optimizer=optax.sgd(0.1), num_steps=1, record_every=1,
        probe_x=probe,
    )
    grads = jax.grad(lambda p: jnp.sum((model.apply(p, x) - y) ** 2) / (2 * x.shape[0]))(params0)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params0, grads)
    for a, e in zip(jax.tree_util.tree_leaves(history.final_params),
                    jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(history.step_loss[0], history.loss[0], rtol=1e-12)


def test_linearized_model_is_kernel_gradient_descent(x64):
    # theory check (1), exact case: f_lin under GD is f <- f - (lr/n) Theta_0 (f - y) exactly,
    # its kernel never changes, and with lr <= n / lambda_max the bound holds exactly.
    x, y, _ = _data(dtype=jnp.float64)
    model = _model(24)
    params0 = model.init(jax.random.PRNGKey(3), x)
    edge, _ = _edge(model.apply, params0, x)
    report = kernel_regime_check(
        model.apply, params0, x, y, learning_rate=0.45 * edge, num_steps=60, record_every=10,
        linearized=True,
    )
    assert report.prediction_deviation < 1e-10
    assert report.loss_deviation < 1e-10
    assert report.bound_excess < 1e-12
    assert report.loss_network[-1] < 0.5 * report.loss_network[0]
    assert bool(report.stability.stable)
    history = train_with_kernel_tracking(
        model.apply, params0, x, y, optimizer=optax.sgd(0.45 * edge), num_steps=10,
        record_every=5, probe_x=x[:4], linearized=True,
    )
    assert float(np.max(history.kernel_change)) < 1e-12


@pytest.mark.slow
def test_network_follows_kernel_prediction_closer_with_width():
    # theory check (1): NTK parameterization, lr below 2n/lambda_max: the network's training
    # outputs follow kernel GD with its initial NTK up to an O(width^-1/2) error, and the
    # residual decays at least as fast as exp(-lr lambda_min t / n) up to that error.
    x, y, _ = _data(n=16)
    deviations = {}
    for width in (64, 2048):
        model = _model(width)
        params0 = model.init(jax.random.PRNGKey(4), x)
        report = kernel_regime_check(
            model.apply, params0, x, y, learning_rate=0.5, num_steps=100, record_every=20,
        )
        assert bool(report.stability.stable), report.stability
        assert not report.diverged
        assert report.loss_network[-1] < 0.2 * report.loss_network[0]
        assert report.bound_excess < 1e-3
        deviations[width] = report.prediction_deviation
    # sqrt(2048/64) = 5.7 expected; demand a clear decrease
    assert deviations[2048] < deviations[64] / 2.5, deviations


def test_learning_rate_check_matches_brute_force_eigenvalues(x64):
    x, _, _ = _data(dtype=jnp.float64)
    model = _model(20, depth=2)
    params0 = model.init(jax.random.PRNGKey(5), x)
    edge, theta = _edge(model.apply, params0, x)
    eig = np.linalg.eigvalsh(theta)
    report = learning_rate_check(model.apply, params0, x, learning_rate=1.1 * edge)
    np.testing.assert_allclose(report.max_learning_rate, edge, rtol=1e-9)
    np.testing.assert_allclose(report.lambda_max, eig[-1], rtol=1e-9)
    np.testing.assert_allclose(report.lambda_min, eig[0], rtol=1e-6, atol=1e-10 * eig[-1])
    assert not bool(report.stable)
    assert bool(learning_rate_check(model.apply, params0, x, learning_rate=0.9 * edge).stable)


def test_divergence_detected_with_step_and_finite_histories(x64):
    # theory check (3): on the linearized model GD at lr = 1.5 * 2n/lambda_max multiplies the
    # top eigen-component of the residual by (1 - 3) = -2 each step, so the loss exceeds
    # divergence_factor * L0 no later than step ceil(log(factor * L0 / L_top) / log 4).
    x, y, probe = _data(dtype=jnp.float64)
    model = _model(24)
    params0 = model.init(jax.random.PRNGKey(6), x)
    edge, theta = _edge(model.apply, params0, x)
    lr = 1.5 * edge
    with pytest.warns(RuntimeWarning) as caught:
        history = train_with_kernel_tracking(
            model.apply, params0, x, y, optimizer=optax.sgd(lr), num_steps=60,
            record_every=10, probe_x=probe, linearized=True, learning_rate=lr,
        )
    messages = " ".join(str(w.message) for w in caught)
    assert "stability edge" in messages and "diverged at step" in messages
    assert not bool(history.stability.stable)
    assert bool(history.diverged)
    n = x.shape[0]
    residual = np.asarray(model.apply(params0, x) - y, dtype=np.float64).ravel()
    _, eigvec = np.linalg.eigh(theta)
    top = eigvec[:, -1] @ residual
    loss0 = residual @ residual / (2 * n)
    latest = math.ceil(math.log(1e4 * loss0 / (top**2 / (2 * n))) / math.log(4))
    assert 1 <= int(history.diverged_at) <= latest
    for leaf in jax.tree_util.tree_leaves(history):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    np.testing.assert_array_equal(history.valid, np.asarray(history.steps) <= history.diverged_at)
    # params were frozen: the last records repeat
    assert float(history.loss[-1]) == float(history.loss[-2])


def test_minibatch_of_all_examples_equals_full_batch():
    x, y, probe = _data()
    model = _model(32)
    params0 = model.init(jax.random.PRNGKey(7), x)
    common = dict(optimizer=optax.sgd(0.5), num_steps=20, record_every=5, probe_x=probe)
    full = train_with_kernel_tracking(model.apply, params0, x, y, **common)
    perm = train_with_kernel_tracking(
        model.apply, params0, x, y, batch_size=x.shape[0], key=jax.random.PRNGKey(0), **common
    )
    np.testing.assert_allclose(perm.loss, full.loss, rtol=2e-5)
    np.testing.assert_allclose(perm.kernel_change, full.kernel_change, rtol=1e-3, atol=1e-6)


def test_minibatch_is_keyed_and_trains():
    x, y, _ = _data(n=16)
    model = _model(32)
    params0 = model.init(jax.random.PRNGKey(8), x)
    train = jax.jit(make_train_fn(model.apply, optimizer=optax.sgd(0.3), num_steps=40,
                                  record_every=10, batch_size=4, track_kernel=False))
    a, b, c = (train(params0, x, y, key=jax.random.PRNGKey(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a.loss, b.loss)
    assert not np.allclose(a.loss[1:], c.loss[1:])
    assert float(a.loss[-1]) < 0.5 * float(a.loss[0])
    assert a.step_loss.shape == (40,)


def test_vmap_over_seeds_matches_separate_runs():
    x, y, probe = _data()
    model = _model(16)
    train = make_train_fn(model.apply, optimizer=optax.adam(1e-2), num_steps=10, record_every=5)
    run = lambda p: train(p, x, y, probe_x=probe)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1)])
    params = jax.vmap(lambda k: model.init(k, x))(keys)
    batched = jax.jit(jax.vmap(run))(params)
    single_run = jax.jit(run)
    for s in range(2):
        single = single_run(jax.tree_util.tree_map(lambda a, s=s: a[s], params))
        np.testing.assert_allclose(batched.loss[s], single.loss, rtol=1e-5)
        np.testing.assert_allclose(batched.kernel_change[s], single.kernel_change, rtol=1e-3,
                                   atol=1e-6)


def test_plain_training_without_kernel():
    x, y, _ = _data()
    model = _model(16)
    params0 = model.init(jax.random.PRNGKey(9), x)
    history = train_with_kernel_tracking(
        model.apply, params0, x, y, optimizer=optax.sgd(0.5), num_steps=10, record_every=5,
        track_kernel=False,
    )
    assert history.kernel_change is None and history.test_predictions is None
    assert history.loss.dtype == jnp.float32
    assert float(history.loss[-1]) < float(history.loss[0])


def test_bad_input_raises():
    x, y, probe = _data()
    model = _model(8)
    params0 = model.init(jax.random.PRNGKey(0), x)
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="multiple of record_every"):
        make_train_fn(model.apply, optimizer=opt, num_steps=10, record_every=3)
    with pytest.raises(ValueError, match="num_steps"):
        make_train_fn(model.apply, optimizer=opt, num_steps=0, record_every=1)
    with pytest.raises(ValueError, match="y_train"):
        train_with_kernel_tracking(model.apply, params0, x, y[:5], optimizer=opt, num_steps=2,
                                   record_every=1, probe_x=probe)
    with pytest.raises(ValueError, match="PRNG key"):
        train_with_kernel_tracking(model.apply, params0, x, y, optimizer=opt, num_steps=2,
                                   record_every=1, probe_x=probe, batch_size=4)
    with pytest.raises(ValueError, match="exceeds"):
        train_with_kernel_tracking(model.apply, params0, x, y, optimizer=opt, num_steps=2,
                                   record_every=1, probe_x=probe, batch_size=99,
                                   key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="probe_x"):
        train_with_kernel_tracking(model.apply, params0, x, y, optimizer=opt, num_steps=2,
                                   record_every=1, probe_x=probe[:, :2])
    with pytest.raises(ValueError, match="probe_x"):
        make_train_fn(model.apply, optimizer=opt, num_steps=2, record_every=1)(params0, x, y)


def test_bad_data_and_rates_are_rejected_not_reported_as_divergence():
    x, y, probe = _data()
    model = _model(16)
    params = model.init(jax.random.PRNGKey(0), x)
    train = lambda **kw: train_with_kernel_tracking(
        model.apply, params, kw.pop("x", x), kw.pop("y", y), optimizer=optax.sgd(0.1),
        num_steps=4, record_every=2, probe_x=probe, **kw)
    with pytest.raises(ValueError, match="x_train holds 1 non-finite"):
        train(x=x.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="y_train holds 1 non-finite"):
        train(y=y.at[3, 0].set(jnp.inf))
    for lr in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
            train(learning_rate=lr)
        with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
            learning_rate_check(model.apply, params, x, learning_rate=lr)


def test_linearized_training_with_the_default_structured_method(x64):
    """The linearized model's layers run inside a jvp: the structured method falls back to
    Jacobians for them, giving the NTK at the expansion point (brute force)."""
    import ntkjax
    from ntkjax.models import MLP

    model = MLP((16, 1), b_std=0.1)
    x, y, probe = _data(dtype=jnp.float64)
    params = model.init(jax.random.PRNGKey(1), x)
    lin = ntkjax.linearize(model.apply, params)
    want = _brute_force_ntk(model.apply, params, x)
    for method in ("auto", "structured"):
        got = ntkjax.empirical_ntk_fn(lin, ntk_method=method)(params, x)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    history = train_with_kernel_tracking(model.apply, params, x, y, optimizer=optax.sgd(0.1),
                                         num_steps=4, record_every=2, linearized=True,
                                         probe_x=probe)
    np.testing.assert_allclose(history.kernel_change, 0.0, atol=1e-10)  # exactly linear
