"""Digits (scikit-learn, 8x8 images) classified by infinite-width kernels and by baselines.

Stratified 70/30 split (random_state=0), pixels scaled to [0, 1]. Classification by regression
on one-hot targets: the class is the argmax of the predicted outputs.

- NTK: infinite-width ReLU MLP (two hidden layers, w_std = sqrt(2), b_std = 0.1) trained by
  gradient flow on the MSE to t = inf (kernel ridge, diag_reg = 1e-4); also shown at finite
  training times.
- NNGP: GP posterior mean with the same network's NNGP kernel (Bayesian counterpart).
- SVM: sklearn.svm.SVC with an RBF kernel (defaults: C = 1, gamma = "scale").
- Finite MLP: the same architecture at width 512, trained with optax (Adam, softmax
  cross-entropy, mini-batches of 64).

Run: ``python examples/digits_classification.py [--epochs 100] [--float32]``
(needs scikit-learn: ``pip install ntkjax[examples]``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntkjax
from ntkjax import datasets
from ntkjax.models import MLP
from ntkjax.predict import gp_inference, gradient_flow_mse


def accuracy(outputs, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(outputs), axis=1) == np.asarray(labels)))


def kernel_results(data, *, diag_reg: float) -> dict:
    module = MLP(features=(512, 512, 10), activation="relu", w_std=float(np.sqrt(2.0)),
                 b_std=0.1, parameterization="ntk")
    kernel = jax.jit(ntkjax.kernel_fn(module))
    k_train, k_test = kernel(data.x_train), kernel(data.x_test, data.x_train)
    n = data.x_train.shape[0]
    predict = gradient_flow_mse(k_train.ntk, data.y_train, learning_rate=1.0,
                                k_test_train=k_test.ntk, diag_reg=diag_reg)
    # times in units of n / lambda_max (lambda_max sets the fastest mode's time scale)
    lam_max = float(jnp.linalg.eigvalsh(k_train.ntk)[-1])
    scales = np.array([1.0, 10.0, 100.0, 1000.0])
    over_time = predict(jnp.asarray(scales * n / lam_max, data.x_train.dtype))
    results = {"NTK (t = inf)": accuracy(predict(jnp.inf).test, data.labels_test)}
    for scale, out in zip(scales, over_time.test, strict=True):
        results[f"NTK (t = {scale:g} n / lambda_max)"] = accuracy(out, data.labels_test)
    post = gp_inference(k_train.nngp, k_test.nngp, None, data.y_train, diag_reg=diag_reg)
    results["NNGP posterior mean"] = accuracy(post.mean, data.labels_test)
    return results


def svm_result(data) -> float:
    from sklearn.svm import SVC

    svc = SVC(kernel="rbf").fit(np.asarray(data.x_train), np.asarray(data.labels_train))
    return float(svc.score(np.asarray(data.x_test), np.asarray(data.labels_test)))


def finite_mlp_result(data, *, width: int, epochs: int, seed: int) -> float:
    model = MLP(features=(width, width, 10), activation="relu", w_std=float(np.sqrt(2.0)),
                b_std=0.1, parameterization="ntk")
    key_init, key_data = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(key_init, data.x_train[:1])
    optimizer = optax.adam(1e-3)
    state = optimizer.init(params)

    def loss_fn(params, x, labels):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, state, x, labels):
        grads = jax.grad(loss_fn)(params, x, labels)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    n, batch = data.x_train.shape[0], 64
    for epoch in range(epochs):
        order = jax.random.permutation(jax.random.fold_in(key_data, epoch), n)
        for start in range(0, n - batch + 1, batch):
            idx = order[start:start + batch]
            params, state = step(params, state, data.x_train[idx], data.labels_train[idx])
    return accuracy(model.apply(params, data.x_test), data.labels_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float32", action="store_true", help="kernels in float32")
    parser.add_argument("--diag-reg", type=float, default=1e-4)
    parser.add_argument("--width", type=int, default=512, help="finite MLP width")
    parser.add_argument("--epochs", type=int, default=100, help="finite MLP epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", not args.float32)
    data = datasets.load_digits(test_size=0.3, random_state=0)
    print(f"digits: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, "
          f"{data.x_train.dtype}")
    rows = []
    t0 = time.perf_counter()
    for name, acc in kernel_results(data, diag_reg=args.diag_reg).items():
        rows.append((name, acc))
    rows.append(("(kernels + solves, s)", time.perf_counter() - t0))
    rows.append(("RBF SVM (sklearn SVC)", svm_result(data)))
    t0 = time.perf_counter()
    rows.append((f"finite MLP width {args.width} (optax Adam, {args.epochs} epochs)",
                 finite_mlp_result(data, width=args.width, epochs=args.epochs, seed=args.seed)))
    rows.append(("(finite MLP training, s)", time.perf_counter() - t0))
    for name, value in rows:
        text = f"{value:8.1f}" if name.startswith("(") else f"{100 * value:7.2f} %"
        print(f"{name:48s} {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
