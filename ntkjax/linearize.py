"""Taylor expansions of a network in its parameters: the linearized network and any degree.

``f_lin(theta, x) = f(theta_0, x) + J(theta_0, x) (theta - theta_0)``, the model whose gradient
descent dynamics are exactly the NTK dynamics (Lee et al. 2019, "Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", eq. 6). The Jacobian-vector product is
taken with ``jax.jvp``: one forward pass with tangents, no Jacobian is formed.

The degree-k expansion (:func:`taylor_expand`; Dyer & Gur-Ari 2020 and Huang & Yau 2020 study
its training dynamics) is ``sum_{j <= k} (1/j!) D^j f(theta_0)[delta, ..., delta]`` with
``delta = theta - theta_0``: the j-th derivative of ``s -> f(theta_0 + s delta)`` at ``s = 0``,
by j nested forward-mode derivatives in the scalar ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ntkjax.jacobians import ApplyFn, split_params

__all__ = ["linearize", "taylor_expand"]


def linearize(
    apply_fn: ApplyFn, params0: Any
) -> Callable[[Any, jax.Array], jax.Array]:
    """Returns ``f_lin(params, x) = f(params0, x) + J(params0, x) (params - params0)``.

    Args:
      apply_fn: ``(params, x) -> outputs``, e.g. a linen ``module.apply``.
      params0: the expansion point (any pytree). For a linen variables dict only the
        ``"params"`` collection is expanded; the other collections of the ``params`` passed
        to ``f_lin`` are used as they are.

    Returns:
      ``f_lin(params, x)``, a pure function of the same signature as ``apply_fn``,
      differentiable in ``params`` (so optax can train it), jit- and vmap-compatible. It is
      exactly linear in ``params``.

    >>> import jax.numpy as jnp, ntkjax
    >>> f_lin = ntkjax.linearize(lambda p, x: jnp.sin(p * x), 0.0)
    >>> print(f_lin(0.5, jnp.array([1.0, 2.0])))  # sin(0) + cos(0) x (0.5 - 0)
    [0.5 1. ]
    """
    trainable0, _ = split_params(params0)

    def f_lin(params, x):
        trainable, rebuild = split_params(params)
        delta = optax.tree.sub(trainable, trainable0)
        y0, dy = jax.jvp(lambda p: apply_fn(rebuild(p), x), (trainable0,), (delta,))
        return optax.tree.add(y0, dy)

    return f_lin


def taylor_expand(
    apply_fn: ApplyFn, params0: Any, degree: int
) -> Callable[[Any, jax.Array], jax.Array]:
    """Returns the degree-``degree`` Taylor expansion of ``apply_fn`` in its parameters.

    ``f_k(params, x) = sum_{j=0}^{k} (1/j!) d^j/ds^j f(params0 + s (params - params0), x)|_0``:
    degree 0 is ``f(params0, x)``, degree 1 :func:`linearize`, degree 2 adds
    ``(1/2) delta^T H delta`` (H the Hessian in the parameters), and so on -- any degree. The
    derivatives are nested ``jax.jvp`` calls in one scalar, so no Jacobian or Hessian is
    formed; the cost grows like ``2^degree`` forward passes (meant for small degrees).

    Args:
      apply_fn: ``(params, x) -> outputs``, e.g. a linen ``module.apply``.
      params0: the expansion point (for a linen variables dict only ``"params"`` is expanded,
        as in :func:`linearize`).
      degree: a whole number ``>= 0``.

    Returns:
      ``f_k(params, x)``, a pure function of the same signature as ``apply_fn``, exact for a
      model that is a polynomial of degree ``<= degree`` in its parameters; jit, vmap and
      grad compatible.

    >>> f = taylor_expand(lambda p, x: jnp.exp(p * x), 0.0, degree=2)
    >>> float(f(1.0, 1.0))  # 1 + 1 + 1/2
    2.5
    """
    if isinstance(degree, bool) or int(degree) != degree or degree < 0:
        raise ValueError(f"degree must be a whole number >= 0; got {degree!r}.")
    degree = int(degree)
    trainable0, _ = split_params(params0)

    def f_taylor(params, x):
        trainable, rebuild = split_params(params)
        delta = jax.tree_util.tree_map(lambda p, p0: p - p0, trainable, trainable0)
        leaves = jax.tree_util.tree_leaves(trainable0)
        dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(float)

        def along(s):
            moved = jax.tree_util.tree_map(lambda p0, d: p0 + s * d, trainable0, delta)
            return (apply_fn(rebuild(moved), x),)

        derivatives: Callable[[jax.Array], tuple] = along
        for _ in range(degree):
            derivatives = _one_more_derivative(derivatives)
        terms = derivatives(jnp.zeros((), dtype))  # (f, f', ..., f^(degree)) at s = 0
        total = terms[0]
        for j in range(1, degree + 1):
            scale = 1.0 / math.factorial(j)
            total = jax.tree_util.tree_map(lambda a, b, c=scale: a + c * b, total, terms[j])
        return total

    return f_taylor


def _one_more_derivative(fn: Callable[[jax.Array], tuple]) -> Callable[[jax.Array], tuple]:
    """From ``s -> (g, g', ..., g^(j))`` to ``s -> (g, g', ..., g^(j+1))``: one ``jvp`` in s
    gives the derivatives of every entry; the last one is the new highest derivative."""

    def next_fn(s):
        primals, tangents = jax.jvp(fn, (s,), (jnp.ones_like(s),))
        return (*primals, tangents[-1])

    return next_fn
