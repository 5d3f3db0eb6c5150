"""First-order Taylor expansion of a network in its parameters (the linearized network).

``f_lin(theta, x) = f(theta_0, x) + J(theta_0, x) (theta - theta_0)``, the model whose gradient
descent dynamics are exactly the NTK dynamics (Lee et al. 2019, "Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", eq. 6). The Jacobian-vector product is
taken with ``jax.jvp``: one forward pass with tangents, no Jacobian is formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from ntkjax.jacobians import ApplyFn, split_params

__all__ = ["linearize"]


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
    """
    trainable0, _ = split_params(params0)

    def f_lin(params, x):
        trainable, rebuild = split_params(params)
        delta = optax.tree.sub(trainable, trainable0)
        y0, dy = jax.jvp(lambda p: apply_fn(rebuild(p), x), (trainable0,), (delta,))
        return optax.tree.add(y0, dy)

    return f_lin
