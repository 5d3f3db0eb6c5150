"""Kernel hyperparameters by gradient: the Gaussian-process marginal likelihood and its maximizer.

The NNGP of a network is the covariance of a Gaussian process prior over its outputs (Neal 1996;
Lee et al. 2018), so its hyperparameters -- ``w_std``, ``b_std`` of every layer, and an
observation-noise variance -- can be chosen by maximizing the evidence of the training targets
(Rasmussen & Williams 2006, "Gaussian Processes for Machine Learning", section 5.4, eq. 5.8)::

    log p(Y | X) = sum_c [ -1/2 y_c^T (K + s I)^{-1} y_c ] - (C/2) log det(K + s I)
                   - (n C / 2) log(2 pi),

for targets ``Y`` of shape ``(n, C)``: C independent outputs sharing the kernel ``K`` (the
per-output NNGP of :func:`ntkjax.kernel_fn`) and noise variance ``s``. JAX differentiates
through the whole kernel recursion: ``ntkjax.nn`` layers accept traced ``w_std`` / ``b_std``,
so ``jax.grad`` of a function that builds the module from its hyperparameters and evaluates
``kernel_fn(module)(x).nngp`` (or ``.ntk``) gives exact gradients.
:func:`fit_marginal_likelihood` maximizes the evidence with optax over the logarithms of the
(positive) hyperparameters and of the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from ntkjax._checks import check_finite, float_dtype, is_concrete

__all__ = ["MarginalLikelihoodFit", "fit_marginal_likelihood", "gp_log_marginal_likelihood"]


def gp_log_marginal_likelihood(
    k_train_train: ArrayLike, y_train: ArrayLike, *, noise: float | jax.Array = 0.0
) -> jax.Array:
    """``log N(Y | 0, (K + noise I) (x) I_C)``: the GP evidence of the targets (R&W eq. 5.8).

    Computed from the Cholesky factor ``L`` of ``K + noise I``:
    ``-1/2 ||L^{-1} Y||_F^2 - C sum_i log L_ii - (n C / 2) log 2 pi``. Differentiable in the
    kernel (hence in whatever built it) and in ``noise`` (an absolute variance).

    Args:
      k_train_train: ``(n, n)`` kernel of the training inputs (e.g. the NNGP).
      y_train: ``(n,)`` or ``(n, C)`` targets.
      noise: observation-noise variance ``>= 0`` added to the diagonal.

    Returns:
      A scalar. Concrete inputs whose ``K + noise I`` is not numerically positive definite
      raise ``ValueError`` (add noise); under ``jit`` the result is then NaN.

    >>> round(float(gp_log_marginal_likelihood(jnp.eye(2), jnp.zeros(2))), 4)  # -log(2 pi)
    -1.8379
    """
    shape = np.shape(k_train_train)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"k_train_train must be a square (n, n) matrix; got shape {shape}.")
    n = shape[0]
    y_shape = np.shape(y_train)
    if len(y_shape) not in (1, 2) or y_shape[0] != n:
        raise ValueError(f"y_train must have shape ({n},) or ({n}, outputs); got {y_shape}.")
    check_finite(k_train_train, "k_train_train")
    check_finite(y_train, "y_train")
    if is_concrete(noise):
        v = np.asarray(noise, dtype=np.float64)
        if v.shape != () or not np.isfinite(v) or v < 0:
            raise ValueError(f"noise must be a finite scalar >= 0; got {noise!r}.")
    dtype = float_dtype(k_train_train, y_train)
    k = jnp.asarray(k_train_train, dtype)
    y = jnp.asarray(y_train, dtype)
    y = y[:, None] if y.ndim == 1 else y
    cov = 0.5 * (k + k.T) + jnp.asarray(noise, dtype) * jnp.eye(n, dtype=dtype)
    chol = jnp.linalg.cholesky(cov)
    white = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
    outputs = y.shape[1]
    value = (
        -0.5 * jnp.sum(white**2)
        - outputs * jnp.sum(jnp.log(jnp.diagonal(chol)))
        - 0.5 * n * outputs * math.log(2 * math.pi)
    )
    if is_concrete(value) and not np.isfinite(float(value)):
        raise ValueError(
            "K + noise I is not numerically positive definite (its Cholesky factorization "
            "failed); increase noise."
        )
    return value


class MarginalLikelihoodFit(NamedTuple):
    """The result of :func:`fit_marginal_likelihood`.

    Attributes:
      hyperparameters: the fitted hyperparameters (the structure of ``init``, positive): the
        iterate of highest evidence among the ``num_steps + 1`` visited, so the fit never ends
        below where it started (``max(log_likelihood)`` is theirs).
      noise: the fitted noise variance (of the same iterate).
      log_likelihood: ``(num_steps + 1,)`` the evidence before each step and after the last.

    >>> MarginalLikelihoodFit._fields
    ('hyperparameters', 'noise', 'log_likelihood')
    """

    hyperparameters: Any
    noise: jax.Array
    log_likelihood: jax.Array


def fit_marginal_likelihood(
    kernel: Callable[..., jax.Array],
    y_train: ArrayLike,
    init: Any,
    *,
    args: tuple = (),
    noise: float = 1e-2,
    fit_noise: bool = True,
    num_steps: int = 100,
    optimizer: optax.GradientTransformation | None = None,
) -> MarginalLikelihoodFit:
    """Maximizes :func:`gp_log_marginal_likelihood` over positive kernel hyperparameters.

    The optimizer (default ``optax.adam(0.05)``) runs on ``log`` of every hyperparameter and of
    the noise, so they stay positive and steps are relative; the whole loop is one compiled
    ``lax.scan``.

    Args:
      kernel: ``kernel(hyperparameters, *args) -> (n, n)`` training kernel, differentiable in
        the hyperparameters, e.g. ``lambda h, x: ntkjax.kernel_fn(MLP(..., w_std=h["w_std"],
        b_std=h["b_std"]))(x).nngp`` with ``args=(x_train,)``.
      y_train: ``(n,)`` or ``(n, C)`` targets.
      init: a pytree of positive initial hyperparameters (e.g. ``{"w_std": 1.4, "b_std": 0.1}``).
      args: arrays passed to ``kernel`` after the hyperparameters. Pass the training inputs
        here rather than closing over them: closed-over arrays become compile-time constants,
        which XLA may spend minutes constant-folding for a large training set.
      noise: the (initial) noise variance, ``> 0``.
      fit_noise: whether the noise is fitted too.
      num_steps: optimizer steps.
      optimizer: an optax transformation (it minimizes ``-log p(Y | X) / (n C)``).

    Returns:
      :class:`MarginalLikelihoodFit`.

    Raises:
      ValueError: non-positive or non-finite initial values or noise, initial values that
        overflow the dtype, or a kernel of the wrong shape.

    >>> x = jnp.linspace(-1.0, 1.0, 6)[:, None]
    >>> rbf = lambda h: jnp.exp(-0.5 * (x - x.T) ** 2 / h["scale"] ** 2)
    >>> fit = fit_marginal_likelihood(rbf, jnp.sin(3 * x[:, 0]), {"scale": 1.0}, num_steps=20)
    >>> bool(fit.log_likelihood[-1] > fit.log_likelihood[0])
    True
    """
    leaves = jax.tree_util.tree_leaves(init)
    if leaves and not all(np.all(np.isfinite(np.asarray(v, np.float64))) for v in leaves):
        raise ValueError(
            f"init must be a pytree of finite hyperparameters; got {init!r} (an infinite "
            "initial value makes the kernel and the evidence NaN)."
        )
    if not leaves or not all(np.all(np.asarray(v) > 0) for v in leaves):
        raise ValueError(f"init must be a pytree of positive hyperparameters; got {init!r}.")
    if not (np.isfinite(noise) and noise > 0):
        raise ValueError(f"noise must be a positive variance; got {noise!r}.")
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps must be a whole number >= 0; got {num_steps!r}.")
    dtype = float_dtype(y_train, *leaves)
    with np.errstate(over="ignore"):
        overflows = not all(np.all(np.isfinite(np.asarray(v, dtype))) for v in leaves)
    if overflows:
        raise ValueError(
            f"init holds a value that overflows {np.dtype(dtype).name}; got {init!r}."
        )
    y = jnp.asarray(y_train, dtype)
    size = y.size
    k0 = jax.eval_shape(
        kernel, jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), init), *args
    )
    if getattr(k0, "shape", None) != (y.shape[0], y.shape[0]):
        raise ValueError(f"kernel(hyperparameters) must return a ({y.shape[0]}, {y.shape[0]}) "
                         f"matrix for {y.shape[0]} targets; got {getattr(k0, 'shape', k0)}.")
    optimizer = optax.adam(0.05) if optimizer is None else optimizer
    log_params = (
        jax.tree_util.tree_map(lambda v: jnp.log(jnp.asarray(v, dtype)), init),
        jnp.log(jnp.asarray(noise, dtype)),
    )

    def evidence(logs, y, args):
        log_h, log_noise = logs
        if not fit_noise:
            log_noise = jax.lax.stop_gradient(log_noise)
        k = kernel(jax.tree_util.tree_map(jnp.exp, log_h), *args)
        return gp_log_marginal_likelihood(k, y, noise=jnp.exp(log_noise))

    value_and_grad = jax.value_and_grad(lambda logs, y, args: -evidence(logs, y, args) / size)

    @jax.jit
    def run(logs, y, args):
        def step(carry, i):
            logs, state, best, best_value, best_step = carry
            loss, grads = value_and_grad(logs, y, args)
            value = -loss * size  # the evidence of ``logs``, before this step's update
            better = value > best_value
            best = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), logs, best)
            best_value = jnp.where(better, value, best_value)
            best_step = jnp.where(better, i, best_step)
            updates, state = optimizer.update(grads, state, logs)
            return (optax.apply_updates(logs, updates), state, best, best_value,
                    best_step), value

        start = (logs, optimizer.init(logs), logs, jnp.asarray(-jnp.inf, dtype),
                 jnp.asarray(0))
        (logs, _, best, best_value, best_step), history = jax.lax.scan(
            step, start, jnp.arange(int(num_steps))
        )
        last = evidence(logs, y, args)
        best = jax.tree_util.tree_map(lambda a, b: jnp.where(last >= best_value, a, b), logs,
                                      best)
        best_step = jnp.where(last >= best_value, int(num_steps), best_step)
        return best, best_step, jnp.append(history, last)

    logs, best_step, history = run(log_params, y, tuple(args))
    # the start itself when no step beat it: exp(log(v)) may differ from v in the last bit,
    # and the fit is never below the evidence of the very values it started from
    at_start = best_step == 0
    return MarginalLikelihoodFit(
        hyperparameters=jax.tree_util.tree_map(
            lambda v, lg: jnp.where(at_start, jnp.asarray(v, dtype), jnp.exp(lg)), init,
            logs[0]),
        noise=jnp.where(at_start, jnp.asarray(noise, dtype), jnp.exp(logs[1])),
        log_likelihood=history,
    )
