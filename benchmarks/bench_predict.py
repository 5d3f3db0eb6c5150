"""Predictions at many training times: one eigendecomposition vs a solve per time point; and
the cross-entropy function-space dynamics (workload ``predict_ce``, see :func:`predict_ce`).

Workload ``predict_times``: gradient-flow predictions on num_test points at 100 times for
num_train = 4,000, num_test = 1,000 in float64 (``--quick``: 400 / 100).

- ``eigh_once``: :func:`ntkjax.predict.gradient_flow_mse` (one ``eigh``, then O(n^2) per time).
- ``expm_per_time_point``: for each t, ``expm(-lr Theta t / n)`` and a Cholesky solve
  (factor computed once) -- O(n^3) per time point. On CPU this costs minutes per time point at
  n = 4,000, so it is timed on ``baseline_time_points`` of the 100 times (all 100 on an
  accelerator) and ``extrapolated_s`` scales its median to 100 points; the row says so.

``accuracy``: max |difference| of the test predictions between the two methods on the shared
time points, absolute and relative to max |prediction|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call
from ntkjax.predict import gradient_flow_mse


def _rbf(x1, x2, length_scale):
    d2 = jnp.sum(x1**2, 1)[:, None] + jnp.sum(x2**2, 1)[None, :] - 2 * x1 @ x2.T
    return jnp.exp(-0.5 * jnp.maximum(d2, 0.0) / length_scale**2)


def predict_times(quick: bool = False) -> None:
    with jax.enable_x64(True):
        num_train, num_test, n_times, dim = (400, 100, 100, 20) if quick else (4000, 1000, 100, 20)
        on_cpu = jax.default_backend() == "cpu"
        baseline_points = 3 if on_cpu else n_times
        key_train, key_test, key_y = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(key_train, (num_train, dim), jnp.float64)
        xt = jax.random.normal(key_test, (num_test, dim), jnp.float64)
        length_scale = float(np.sqrt(dim))
        k = _rbf(x, x, length_scale) + 1e-6 * jnp.eye(num_train)
        k_xt = _rbf(xt, x, length_scale)
        y = jnp.sin(x[:, :1]) + 0.1 * jax.random.normal(key_y, (num_train, 1), jnp.float64)
        lr = 1.0
        # lr t / n from 1e-3 to 1e2: spans the fast (top eigenvalue ~0.4 n) to the slow modes
        times = jnp.asarray(num_train / lr * np.geomspace(1e-3, 1e2, n_times))
        params = {"num_train": num_train, "num_test": num_test, "num_times": n_times,
                  "dtype": "float64",
                  "kernel": "rbf", "learning_rate": lr}

        @jax.jit
        def eigh_once(k, k_xt, y, times):
            return gradient_flow_mse(k, y, learning_rate=lr, k_test_train=k_xt)(times).test

        @jax.jit
        def expm_per_time_point(k, k_xt, y, times):
            factor = jax.scipy.linalg.cho_factor(k, lower=True)

            def one(t):
                decay = jax.scipy.linalg.expm(-(lr * t / num_train) * k)
                change = y - decay @ y  # (I - exp(-lr K t / n)) (y - f_0), f_0 = 0
                return k_xt @ jax.scipy.linalg.cho_solve(factor, change)

            return jax.lax.map(one, times)

        log(f"predict_times: eigh_once num_train={num_train}")
        fast = time_call(lambda: eigh_once(k, k_xt, y, times), repeats=3 if quick else 2)
        sub = times[np.linspace(0, n_times - 1, baseline_points).astype(int)]
        log(f"predict_times: expm_per_time_point on {baseline_points} time points")
        slow = time_call(lambda: expm_per_time_point(k, k_xt, y, sub), repeats=2 if quick else 1)
        fast_sub = np.asarray(eigh_once(k, k_xt, y, sub))
        diff = float(np.max(np.abs(fast_sub - np.asarray(slow["result"]))))
        scale = float(np.max(np.abs(fast_sub)))
        accuracy = {"max_abs_diff_vs_expm": diff, "max_rel_diff_vs_expm": diff / scale,
                    "time_points_compared": baseline_points}
        emit("predict_times", {**params, "method": "eigh_once"}, fast, accuracy=accuracy)
        extrapolated = slow["median_s"] * n_times / baseline_points
        emit(
            "predict_times",
            {**params, "method": "expm_per_time_point", "time_points_timed": baseline_points},
            slow,
            accuracy=accuracy,
            extrapolated_s=round(extrapolated, 3),
            extrapolated=baseline_points != n_times,
            speedup_eigh_once=round(extrapolated / fast["median_s"], 2),
        )


WORKLOADS = {"predict_times": predict_times}


def predict_ce(quick: bool = False) -> None:
    """Cross-entropy function-space dynamics on digits (:func:`ntkjax.gradient_flow`).

    n = 1,257 training and 540 test images (``--quick``: 300 / 100), 10 classes, the NTK of a
    depth-3 ReLU MLP (3 hidden layers, w_std = sqrt 2, b_std = 0.1, NTK parameterization),
    float32; ``optax.sgd`` learning rate half the stability edge ``2n / lambda_max``; outputs at
    100 times evenly spaced over 2,000 steps. The kernel is computed first (its time is
    reported as ``kernel_s``, not in ``median_s``). ``solver_steps``: the adaptive solver's
    accepted + rejected steps; ``accuracy``: test accuracy at the last time and the training
    loss there.
    """
    import time

    from ntkjax.dynamics import gradient_flow
    from ntkjax.kernels import kernel_matrix
    from ntkjax.losses import softmax_cross_entropy
    from ntkjax.models import MLP
    from ntkjax.predict import max_learning_rate
    from ntkjax.study.datasets import load_digits

    digits = load_digits(dtype=jnp.float32)
    x, y, x_test = digits.x_train, digits.y_train, digits.x_test
    if quick:
        x, y, x_test = x[:300], y[:300], x_test[:100]
    labels = np.asarray(digits.labels_test)[: x_test.shape[0]]
    module = MLP(features=(512, 512, 512, 10), activation="relu", w_std=2**0.5, b_std=0.1)
    t0 = time.perf_counter()
    k = jnp.asarray(kernel_matrix(module, x).ntk)
    k_xt = jnp.asarray(kernel_matrix(module, x_test, x).ntk)
    kernel_s = time.perf_counter() - t0
    lr = 0.5 * float(max_learning_rate(k))
    n_times, horizon = 100, 2000.0
    times = jnp.linspace(0.0, horizon, n_times)
    predict = gradient_flow(softmax_cross_entropy, k, y, learning_rate=lr, k_test_train=k_xt)
    solve = jax.jit(lambda ts: predict(ts, return_stats=True))
    log(f"predict_ce: n={x.shape[0]} m={x_test.shape[0]} lr={lr:.4g}")
    timing = time_call(lambda: solve(times), repeats=3)
    out, stats = timing["result"]
    test_acc = float(np.mean(np.argmax(np.asarray(out.test[-1]), -1) == labels))
    train_loss = float(softmax_cross_entropy(out.train[-1], y))
    emit(
        "predict_ce",
        {"num_train": int(x.shape[0]), "num_test": int(x_test.shape[0]), "classes": 10,
         "num_times": n_times, "horizon_steps": horizon, "learning_rate": round(lr, 6),
         "kernel": "NTK, ReLU MLP 3 x 512 -> 10", "dtype": "float32", "solver": "Tsit5",
         "rtol": 1e-5, "atol": 1e-6},
        timing,
        accuracy={"test_accuracy_at_end": test_acc, "train_loss_at_end": train_loss},
        solver_steps=int(stats.num_steps),
        solver_rejected_steps=int(stats.num_rejected_steps),
        kernel_s=round(kernel_s, 3),
    )


WORKLOADS["predict_ce"] = predict_ce
