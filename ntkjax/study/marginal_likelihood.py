"""NNGP hyperparameters of a deep ReLU network fitted by marginal likelihood on digits.

``python -m ntkjax.study.marginal_likelihood [--steps N] [--subset N]`` prints one JSON object.

The NNGP of the ReLU MLP (``depth`` hidden layers, NTK parameterization) is the prior covariance
of a Gaussian process over each of the 10 one-hot outputs (centred by the class frequency 0.1).
Its ``w_std``, ``b_std`` and an observation-noise variance are fitted by maximizing the GP
evidence of the training targets (:func:`ntkjax.fit_marginal_likelihood`, Adam on their
logarithms, gradients through the whole kernel recursion). Test accuracy is the argmax of the
GP posterior mean (:func:`ntkjax.gp_inference`) before (the demo's ``w_std = sqrt 2``,
``b_std = 0.1``, noise ``1e-4`` x the mean diagonal) and after the fit.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax.hyperparameters import fit_marginal_likelihood, gp_log_marginal_likelihood
from ntkjax.kernels import kernel_fn
from ntkjax.models import MLP
from ntkjax.predict import gp_inference
from ntkjax.study.datasets import load_digits

__all__ = ["INITIAL", "INITIAL_RELATIVE_NOISE", "digits_marginal_likelihood", "main"]

INITIAL = {"w_std": math.sqrt(2.0), "b_std": 0.1}
INITIAL_RELATIVE_NOISE = 1e-4  # the demo's ridge, relative to the mean diagonal


def digits_marginal_likelihood(
    *, depth: int = 3, num_steps: int = 100, learning_rate: float = 0.05,
    train_subset: int | None = None, test_subset: int | None = None,
) -> dict:
    """Fits ``w_std``, ``b_std`` and the noise of the depth-``depth`` ReLU NNGP on the digits
    training split (its first ``train_subset`` images) by marginal likelihood; returns test
    accuracies (on the first ``test_subset`` test images) before and after, the fitted values,
    the evidence before and after, and the seconds the fit took (float64)."""
    import optax

    with jax.enable_x64(True):
        digits = load_digits(dtype=jnp.float64)
        x, y = digits.x_train, digits.y_train
        if train_subset is not None:
            x, y = x[:train_subset], y[:train_subset]
        x_test, labels = digits.x_test[:test_subset], np.asarray(digits.labels_test)[:test_subset]
        y_centred = y - 0.1

        def net(h):
            return MLP(features=(1,) * depth + (10,), activation="relu", w_std=h["w_std"],
                       b_std=h["b_std"])

        def kernel(h, x):
            return kernel_fn(net(h))(x).nngp

        @jax.jit
        def posterior_scores(h, noise, x, x_test, y):
            k = kernel_fn(net(h))
            k_train, k_test = k(x).nngp, k(x_test, x).nngp
            relative = noise / (jnp.trace(k_train) / k_train.shape[0])
            return gp_inference(k_train, k_test, None, y, diag_reg=relative).mean

        def accuracy(h, noise):
            scores = posterior_scores(h, noise, x, x_test, y_centred)
            return float(np.mean(np.argmax(np.asarray(scores), -1) == labels))

        k0 = jax.jit(kernel)(INITIAL, x)
        noise0 = float(INITIAL_RELATIVE_NOISE * jnp.trace(k0) / k0.shape[0])
        start = time.perf_counter()
        fit = fit_marginal_likelihood(kernel, y_centred, INITIAL, args=(x,), noise=noise0,
                                      num_steps=num_steps, optimizer=optax.adam(learning_rate))
        jax.block_until_ready(fit)
        seconds = time.perf_counter() - start
        fitted = {name: float(v) for name, v in fit.hyperparameters.items()}
        return {
            "depth": depth,
            "num_train": int(x.shape[0]),
            "num_test": int(x_test.shape[0]),
            "num_steps": num_steps,
            "initial": {**INITIAL, "noise": noise0},
            "fitted": {**fitted, "noise": float(fit.noise)},
            "log_marginal_likelihood_initial": float(gp_log_marginal_likelihood(
                k0, y_centred, noise=noise0)),
            "log_marginal_likelihood_fitted": float(gp_log_marginal_likelihood(
                jax.jit(kernel)(fitted, x), y_centred, noise=float(fit.noise))),
            "test_accuracy_initial": accuracy(INITIAL, noise0),
            "test_accuracy_fitted": accuracy(fitted, float(fit.noise)),
            "fit_seconds": round(seconds, 2),
        }


def main(argv: list[str] | None = None) -> None:
    """Fits the digits NNGP by marginal likelihood and prints the accuracies (a script)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(digits_marginal_likelihood(depth=args.depth, num_steps=args.steps,
                                                train_subset=args.subset), indent=1))


if __name__ == "__main__":
    main()
