"""The loss convention shared by prediction and training.

ntkjax's MSE is ``L(f) = 1/(2n) * sum_i ||f(x_i) - y_i||^2`` over the n training examples (summed
over outputs). Gradient flow on it, d theta/dt = -lr grad L, moves the outputs by
``df/dt = -(lr / n) Theta (f - y)`` -- the normalization used by :mod:`ntkjax.predict`.
Note: ``((f - y) ** 2).mean()`` (a common alternative) equals ``2 L / n_outputs``; at the
same learning rate it trains ``2 / n_outputs`` times faster.

Cross-entropy follows the same convention, a mean over the n examples of the per-example loss
summed over classes: ``L(f) = -(1/n) sum_i sum_c y_ic log softmax(f_i)_c``
(``optax.softmax_cross_entropy(f, y).mean()``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["mse_loss", "softmax_cross_entropy"]


def mse_loss(predictions: ArrayLike, targets: ArrayLike) -> jax.Array:
    """``1/(2n) * sum((predictions - targets)**2)`` with n = ``predictions.shape[0]``.

    >>> float(mse_loss(jnp.ones((2, 1)), jnp.zeros((2, 1))))
    0.5
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions and targets must have the same shape; got {predictions.shape} and "
            f"{targets.shape}."
        )
    return 0.5 * jnp.sum((predictions - targets) ** 2) / predictions.shape[0]


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-(1/n) * sum_i sum_c targets[i, c] * log_softmax(logits[i])_c`` (n = ``logits.shape[0]``).

    ``targets`` are probability rows (one-hot labels); the gradient in the logits is
    ``(softmax(logits) - targets) / n``.

    >>> import jax.numpy as jnp
    >>> round(float(softmax_cross_entropy(jnp.zeros((2, 4)), jnp.eye(4)[:2])), 6)  # log 4
    1.386294
    """
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(
            "logits and targets must both have shape (n, classes); got "
            f"{logits.shape} and {targets.shape}."
        )
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(targets * log_p) / logits.shape[0]
