"""Function-space dynamics for any loss (ntkjax.dynamics), checked against outside truths:
the closed-form MSE flow, the damped-oscillator solution of the momentum system, a fixed-step
Runge-Kutta integration written here in numpy, the linear relation between test and training
outputs, and wide networks trained with optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntkjax
from ntkjax.dynamics import gradient_flow
from ntkjax.losses import mse_loss, softmax_cross_entropy
from ntkjax.models import MLP
from ntkjax.scaling import fit_power_law


def feature_kernels(key, n=10, m=4, p=30, dtype=jnp.float64):
    """Consistent train/test kernels from explicit random features: K = J J^T / p."""
    kj, kt = jax.random.split(key)
    j_train = jax.random.normal(kj, (n, p), dtype)
    j_test = jax.random.normal(kt, (m, p), dtype)
    return j_train @ j_train.T / p, j_test @ j_train.T / p


def one_hot_labels(n, classes, dtype=jnp.float64):
    return jax.nn.one_hot(jnp.arange(n) % classes, classes, dtype=dtype)


def rk4(field, state0, t_end, steps):
    """Classical fixed-step Runge-Kutta in numpy float64, returning the state at t_end."""
    h = t_end / steps
    s = state0
    for _ in range(steps):
        k1 = field(s)
        k2 = field(s + 0.5 * h * k1)
        k3 = field(s + 0.5 * h * k2)
        k4 = field(s + h * k3)
        s = s + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return s


def np_softmax(f):
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- MSE


def test_mse_equals_closed_form_gradient_flow(x64):
    k, k_xt = feature_kernels(jax.random.PRNGKey(0))
    n, m = k.shape[0], k_xt.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(1), (n, 3), jnp.float64)
    f0 = jax.random.normal(jax.random.PRNGKey(2), (n, 3), jnp.float64)
    ft0 = jax.random.normal(jax.random.PRNGKey(3), (m, 3), jnp.float64)
    ts = jnp.array([0.0, 0.5, 20.0, 150.0])
    kwargs = dict(learning_rate=0.7, k_test_train=k_xt, fx_train_0=f0, fx_test_0=ft0)
    predict = gradient_flow(mse_loss, k, y, **kwargs)
    exact = ntkjax.gradient_flow_mse(k, y, **kwargs)(ts)
    for out in (predict(ts), jax.jit(predict)(ts)):
        assert out.train.shape == (4, n, 3) and out.test.shape == (4, m, 3)
        np.testing.assert_allclose(out.train, exact.train, rtol=0, atol=1e-8)
        np.testing.assert_allclose(out.test, exact.test, rtol=0, atol=1e-8)


def test_momentum_mse_matches_damped_oscillator(x64):
    # With L = mse_loss each eigen-mode r of f - y obeys r'' + (1 - m) r' + (lr s / n) r = 0,
    # r(0) = r_0, r'(0) = 0: r(t) = r_0 (l+ e^{l- t} - l- e^{l+ t}) / (l+ - l-), l+- the roots.
    k, k_xt = feature_kernels(jax.random.PRNGKey(5))
    n = k.shape[0]
    y = jax.random.normal(jax.random.PRNGKey(6), (n, 3), jnp.float64)
    f0 = jax.random.normal(jax.random.PRNGKey(7), (n, 3), jnp.float64)
    lr, mom, ts = 2.0, 0.8, np.array([0.5, 2.0, 10.0, 40.0])
    out = gradient_flow(mse_loss, k, y, learning_rate=lr, momentum=mom, k_test_train=k_xt,
                        fx_train_0=f0)(jnp.asarray(ts))
    s, v = np.linalg.eigh(np.asarray(k))
    r0 = v.T @ np.asarray(f0 - y)
    disc = np.sqrt((1 - mom) ** 2 - 4 * lr * s / n + 0j)
    lp, lm = (-(1 - mom) + disc) / 2, (-(1 - mom) - disc) / 2
    t = ts[:, None]
    decay = ((lp * np.exp(lm * t) - lm * np.exp(lp * t)) / (lp - lm)).real  # (T, n)
    expected = np.asarray(y) + np.einsum("ij,tj,jk->tik", v, decay, r0)
    np.testing.assert_allclose(out.train, expected, rtol=0, atol=1e-8)
    # test outputs move by Theta(x, X) Theta^{-1} times the training outputs' change
    expected_test = np.einsum("ij,tjk->tik", np.asarray(k_xt) @ np.linalg.inv(np.asarray(k)),
                              expected - np.asarray(f0))
    np.testing.assert_allclose(out.test, expected_test, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_cross_entropy_matches_runge_kutta(x64, momentum):
    k, k_xt = feature_kernels(jax.random.PRNGKey(8))
    n, m, c = 10, 4, 3
    y = one_hot_labels(n, c)
    f0 = 0.5 * jax.random.normal(jax.random.PRNGKey(9), (n, c), jnp.float64)
    ft0 = 0.5 * jax.random.normal(jax.random.PRNGKey(10), (m, c), jnp.float64)
    lr, t_end = 3.0, 12.0
    out = gradient_flow(softmax_cross_entropy, k, y, learning_rate=lr, momentum=momentum,
                        k_test_train=k_xt, fx_train_0=f0, fx_test_0=ft0)(t_end)

    kk, kx, yy = np.asarray(k), np.asarray(k_xt), np.asarray(y)
    size = (n + m) * c

    def force(f_train):  # -lr K grad_f L with grad_f L = (softmax(f) - y) / n
        g = (np_softmax(f_train) - yy) / n
        return -lr * np.concatenate([(kk @ g).ravel(), (kx @ g).ravel()])

    if momentum is None:
        def field(s):
            return force(s[: n * c].reshape(n, c))
        s0 = np.concatenate([np.asarray(f0).ravel(), np.asarray(ft0).ravel()])
    else:
        def field(s):
            f, q = s[:size], s[size:]
            return np.concatenate([q, force(f[: n * c].reshape(n, c)) - (1 - momentum) * q])
        s0 = np.concatenate([np.asarray(f0).ravel(), np.asarray(ft0).ravel(), np.zeros(size)])
    final = rk4(field, s0, t_end, 4000)
    assert out.train.shape == (n, c) and out.test.shape == (m, c)  # a scalar time
    np.testing.assert_allclose(out.train, final[: n * c].reshape(n, c), rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.test, final[n * c : size].reshape(m, c), rtol=0, atol=1e-8)


def test_any_loss_keeps_test_outputs_linear_in_training_outputs(x64):
    # f_test' = Theta(x, X) Theta^{-1} f_train' for any loss: the change of the test outputs is
    # Theta(x, X) Theta^{-1} times the change of the training outputs, at every time.
    k, k_xt = feature_kernels(jax.random.PRNGKey(11))
    y = jax.random.normal(jax.random.PRNGKey(12), (10, 3), jnp.float64)
    huber = lambda f, t: jnp.mean(optax.huber_loss(f, t, delta=0.3))
    out = gradient_flow(huber, k, y, learning_rate=1.5, k_test_train=k_xt)(
        jnp.array([0.0, 1.0, 5.0, 25.0]))
    transfer = np.asarray(k_xt) @ np.linalg.inv(np.asarray(k))
    np.testing.assert_allclose(out.test, np.einsum("ij,tjk->tik", transfer, out.train),
                               atol=1e-8)
    # and the training loss decreases
    losses = [float(huber(f, y)) for f in out.train]
    assert losses[0] > losses[1] > losses[2] > losses[3]


def test_float32_and_solver_stats():
    k, k_xt = feature_kernels(jax.random.PRNGKey(13), dtype=jnp.float32)
    y = one_hot_labels(10, 4, jnp.float32)
    out, stats = gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0,
                               k_test_train=k_xt)(jnp.linspace(0.0, 50.0, 11),
                                                  return_stats=True)
    assert out.train.dtype == jnp.float32 and out.test.shape == (11, 4, 4)
    assert np.all(np.isfinite(out.train))
    assert int(stats.num_steps) == int(stats.num_accepted_steps) + int(stats.num_rejected_steps)
    assert 0 < int(stats.num_accepted_steps) < 1000
    np.testing.assert_allclose(out.train[0], 0.0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    k, _ = feature_kernels(jax.random.PRNGKey(14), n=5, m=2, dtype=jnp.float32)
    y = one_hot_labels(5, 2, jnp.float32)
    with pytest.raises(ValueError, match="scalar"):
        gradient_flow(lambda f, t: (f - t) ** 2, k, y, learning_rate=1.0)
    with pytest.raises(ValueError, match="loss"):
        gradient_flow(lambda f, t: f @ jnp.ones(7), k, y, learning_rate=1.0)
    predict = gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        predict(jnp.array([-1.0, 2.0]))
    with pytest.raises(ValueError, match="sorted"):
        predict(jnp.array([0.0, 3.0, 2.0]))
    with pytest.raises(ValueError, match="finite"):
        predict(jnp.inf)
    for momentum in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0, momentum=momentum)
    spatial = jnp.ones((5, 5, 3, 3))
    with pytest.raises(ValueError, match="spatial axes"):
        gradient_flow(softmax_cross_entropy, spatial, y, learning_rate=1.0)
    with pytest.raises(ValueError, match="spatial axes"):
        gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0,
                      k_test_train=jnp.ones((2, 5, 3, 3)))
    with pytest.raises(ValueError, match="fx_test_0 needs"):
        gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0,
                      fx_test_0=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="learning_rate"):
        gradient_flow(softmax_cross_entropy, k, y, learning_rate=0.0)
    with pytest.raises(ValueError, match="y_train"):
        gradient_flow(softmax_cross_entropy, k, y[:3], learning_rate=1.0)


def test_non_psd_and_asymmetric_kernels_are_refused_like_gradient_flow_mse():
    """Both dynamics validate k_train_train alike: a non-PSD float32 kernel (which the flow
    integrated to ~1e99, or ran out of solver steps on) and an asymmetric one are refused,
    naming the argument; a kernel and its transpose give bit-identical predictions."""
    k, _ = feature_kernels(jax.random.PRNGKey(15), n=6, m=2, dtype=jnp.float32)
    y = jnp.ones((6,), jnp.float32) - 2.0 * (jnp.arange(6) % 2)
    flows = [lambda kk, **kw: gradient_flow(mse_loss, kk, y, learning_rate=1.0, **kw),
             lambda kk, **kw: ntkjax.gradient_flow_mse(kk, y, learning_rate=1.0, **kw)]
    indefinite = k - 2.0 * jnp.eye(6, dtype=jnp.float32) * jnp.max(jnp.diag(k))
    skew = jnp.triu(jnp.ones((6, 6), jnp.float32), 1) * 0.05
    for flow in flows:
        with pytest.raises(ValueError, match="k_train_train is not positive semi-definite"):
            flow(indefinite)
        with pytest.raises(ValueError, match="k_train_train is not symmetric"):
            flow(k + skew)
        # entries near float32's largest: (K + K^T) / 2 formed as a sum would be inf, and NaN
        # eigenvalues compare as no negative one (the check passed it silently)
        huge = jnp.array([[3e38, 0.0], [0.0, -3e38]], jnp.float32)
        with pytest.raises(ValueError, match="k_train_train is not positive semi-definite"):
            gradient_flow(mse_loss, huge, y[:2], learning_rate=1.0)
    # PSD, but its eigenvalues (up to 4e38) overflow float32: the predictions were all NaN
    huge_psd = jnp.array([[3e38, 1e38], [1e38, 3e38]], jnp.float32)
    with pytest.raises(ValueError, match="k_train_train's eigendecomposition is not finite"):
        ntkjax.gradient_flow_mse(huge_psd, y[:2], learning_rate=1e-39)
    # asymmetric within round-off: both read (K + K^T) / 2, so K and K^T give the same outputs
    wobble = k + jnp.triu(jnp.full((6, 6), 4.0 * np.finfo(np.float32).eps), 1) * jnp.max(k)
    ts = jnp.array([0.0, 3.0, 30.0])
    for flow in flows:
        np.testing.assert_array_equal(flow(wobble)(ts).train, flow(wobble.T)(ts).train)


# ----------------------------------------------------------------------------- wide networks


@pytest.mark.slow
def test_wide_networks_trained_on_cross_entropy_follow_the_dynamics(x64):
    """optax SGD on softmax cross-entropy vs the function-space ODE under the analytic NTK,
    started from each network's own initial outputs: the gap shrinks like width^-1/2."""
    n, m, d, c = 12, 4, 3, 3
    kx, kt = jax.random.split(jax.random.PRNGKey(20))
    x = jax.random.normal(kx, (n, d), jnp.float64)
    x_test = jax.random.normal(kt, (m, d), jnp.float64)
    y = one_hot_labels(n, c)
    lr, steps = 0.05, 600  # time t = 600 steps at lr: small steps, so the flow is the limit
    widths = (64, 256, 1024, 4096)
    seeds = 4

    def module(width):
        return MLP(features=(width, c), activation="erf", w_std=1.5, b_std=0.2)

    k = ntkjax.kernel_fn(module(1))(x)
    k_xt = ntkjax.kernel_fn(module(1))(x_test, x)
    gaps = []
    for width in widths:
        net = module(width)
        opt = optax.sgd(lr)

        def train(key, net=net, opt=opt):
            params = net.init(key, x)
            loss = lambda p: softmax_cross_entropy(net.apply(p, x), y)

            def step(carry, _):
                p, s = carry
                updates, s = opt.update(jax.grad(loss)(p), s)
                return (optax.apply_updates(p, updates), s), None

            (p_end, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
            return (net.apply(params, x), net.apply(params, x_test),
                    net.apply(p_end, x), net.apply(p_end, x_test))

        keys = jax.random.split(jax.random.PRNGKey(width), seeds)
        f0, ft0, f_end, ft_end = jax.jit(jax.vmap(train))(keys)
        sq = []
        for i in range(seeds):
            pred = gradient_flow(softmax_cross_entropy, k.ntk, y, learning_rate=lr,
                                 k_test_train=k_xt.ntk, fx_train_0=f0[i], fx_test_0=ft0[i],
                                 rtol=1e-8, atol=1e-10)(float(steps))
            sq.append(np.sum((pred.train - f_end[i]) ** 2) + np.sum((pred.test - ft_end[i]) ** 2))
        gaps.append(float(np.sqrt(np.mean(sq) / ((n + m) * c))))
        moved = float(np.sqrt(np.mean((f_end - f0) ** 2)))
    fit = fit_power_law(widths, gaps)
    assert -0.75 < fit.slope < -0.35, (gaps, fit)
    assert gaps[-1] < 0.05 * moved, (gaps, moved)


# ----------------------------------------------------------------------------- resume, full kernels


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_resuming_from_a_returned_state_equals_running_straight(x64, momentum):
    """State at t1 (outputs and, with momentum, velocities) run for t2 - t1 is the run to t2;
    with momentum, dropping the velocity is measurably off (the test can fail)."""
    k, k_xt = feature_kernels(jax.random.PRNGKey(5), n=6, m=3)
    y = one_hot_labels(6, 3)
    args = dict(learning_rate=2.0, momentum=momentum, k_test_train=k_xt)
    straight = gradient_flow(softmax_cross_entropy, k, y, **args)
    t1, t2 = 3.0, 8.0
    state = straight(t1, return_state=True)
    assert (state.qx_train is None) == (momentum is None)
    resumed = gradient_flow(
        softmax_cross_entropy, k, y, **args, fx_train_0=state.fx_train,
        fx_test_0=state.fx_test, qx_train_0=state.qx_train, qx_test_0=state.qx_test,
    )
    want = straight(t2)
    got = resumed(t2 - t1)
    np.testing.assert_allclose(got.train, want.train, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(got.test, want.test, rtol=1e-8, atol=1e-9)
    if momentum is not None:
        # the velocity at t1 is the momentum system's own: q = df/dt, by finite differences
        h = 1e-4
        fd = (straight(t1 + h).train - straight(t1 - h).train) / (2 * h)
        np.testing.assert_allclose(state.qx_train, fd, rtol=1e-5, atol=1e-7)
        forgetful = gradient_flow(
            softmax_cross_entropy, k, y, **args, fx_train_0=state.fx_train,
            fx_test_0=state.fx_test,
        )
        assert np.abs(forgetful(t2 - t1).train - want.train).max() > 1e-3


def _random_output_kernel(key, n, o, m=3):
    """A full (n, n, O, O) train kernel with output coupling and its (m, n, O, O) test kernel,
    from explicit features: Theta_{(a,i),(b,j)} = phi_{a,i} . phi_{b,j} / p."""
    p = 40
    phi = jax.random.normal(key, (n + m, o, p), jnp.float64)
    full = jnp.einsum("aip,bjp->abij", phi, phi) / p
    return full[:n, :n], full[n:, :n]


def _expm_flow(theta, theta_xt, y, f0, ft0, rate, t):
    """Direct float64 solution of df/dt = -rate Theta (f - y) on the (n O) flattened system:
    f_t = y + expm(-rate t Theta) (f0 - y), f_test = ft0 + Theta_xX Theta^-1 (f_t - f0)."""
    import scipy.linalg

    n, o = y.shape
    mat = np.transpose(np.asarray(theta), (0, 2, 1, 3)).reshape(n * o, n * o)
    mat_xt = np.transpose(np.asarray(theta_xt), (0, 2, 1, 3)).reshape(-1, n * o)
    r0 = np.asarray(f0 - y).reshape(-1)
    ft = np.asarray(y).reshape(-1) + scipy.linalg.expm(-rate * t * mat) @ r0
    test = np.asarray(ft0).reshape(-1) + mat_xt @ np.linalg.solve(
        mat, ft - np.asarray(f0).reshape(-1)
    )
    return ft.reshape(n, o), test.reshape(-1, o)


def test_full_output_kernels_match_a_matrix_exponential(x64):
    n, o, lr, t = 5, 3, 1.5, 2.5
    theta, theta_xt = _random_output_kernel(jax.random.PRNGKey(1), n, o)
    y = jax.random.normal(jax.random.PRNGKey(2), (n, o), jnp.float64)
    f0 = 0.3 * jax.random.normal(jax.random.PRNGKey(3), (n, o), jnp.float64)
    ft0 = 0.3 * jax.random.normal(jax.random.PRNGKey(4), (3, o), jnp.float64)
    train, test = _expm_flow(theta, theta_xt, y, f0, ft0, lr / n, t)
    init = dict(k_test_train=theta_xt, fx_train_0=f0, fx_test_0=ft0)
    for out in (
        gradient_flow(mse_loss, theta, y, learning_rate=lr, **init)(t),
        ntkjax.gradient_flow_mse(theta, y, learning_rate=lr, **init)(t),
    ):
        np.testing.assert_allclose(out.train, train, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(out.test, test, rtol=1e-8, atol=1e-10)
    # gradient descent: the direct iteration f <- f - (lr / n) Theta (f - y), 7 steps
    mat = np.transpose(np.asarray(theta), (0, 2, 1, 3)).reshape(n * o, n * o)
    mat_xt = np.transpose(np.asarray(theta_xt), (0, 2, 1, 3)).reshape(-1, n * o)
    f, g = np.asarray(f0).reshape(-1), np.asarray(ft0).reshape(-1)
    for _ in range(7):
        r = f - np.asarray(y).reshape(-1)
        f, g = f - lr / n * mat @ r, g - lr / n * mat_xt @ r
    out = ntkjax.gradient_descent_mse(theta, y, learning_rate=lr, **init)(7)
    np.testing.assert_allclose(out.train, f.reshape(n, o), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out.test, g.reshape(-1, o), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_kernel_times_identity_over_outputs_is_the_per_output_dynamics(x64, momentum):
    k, k_xt = feature_kernels(jax.random.PRNGKey(8), n=5, m=2)
    y = one_hot_labels(5, 3)
    eye = jnp.eye(3)
    full = k[:, :, None, None] * eye
    full_xt = k_xt[:, :, None, None] * eye
    ts = jnp.array([0.5, 4.0])
    args = dict(learning_rate=1.0, momentum=momentum)
    want = gradient_flow(softmax_cross_entropy, k, y, k_test_train=k_xt, **args)(ts)
    got = gradient_flow(softmax_cross_entropy, full, y, k_test_train=full_xt, **args)(ts)
    np.testing.assert_allclose(got.train, want.train, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got.test, want.test, rtol=1e-9, atol=1e-11)


def test_full_kernel_and_state_bad_input():
    k, _ = feature_kernels(jax.random.PRNGKey(8), n=4, m=2, dtype=jnp.float32)
    y = one_hot_labels(4, 2, jnp.float32)
    full = k[:, :, None, None] * jnp.eye(2)
    with pytest.raises(ValueError, match=r"\(4, 4, 3, 3\)"):
        gradient_flow(softmax_cross_entropy, full, one_hot_labels(4, 3, jnp.float32),
                      learning_rate=1.0)
    with pytest.raises(ValueError, match="need momentum"):
        gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0, qx_train_0=y)
    with pytest.raises(ValueError, match="qx_train_0 must have shape"):
        gradient_flow(softmax_cross_entropy, k, y, learning_rate=1.0, momentum=0.5,
                      qx_train_0=y[:2])
    with pytest.raises(ValueError, match=r"\(n, n, O, O\)"):
        ntkjax.gradient_flow_mse(full, y[:, 0], learning_rate=1.0)
