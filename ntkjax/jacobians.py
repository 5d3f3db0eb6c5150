"""Jacobian building blocks shared by the empirical-NTK methods (:mod:`ntkjax.empirical`,
:mod:`ntkjax.structured`).

For a network ``f(theta, x) in R^O`` with per-sample Jacobians ``J(x) = df/dtheta`` the
empirical NTK is ``Theta(x, x') = J(x) J(x')^T`` (Jacot et al. 2018). Here: which part of the
parameters is differentiated (:func:`split_params`), the network on one sample or a batch with
outputs flattened, validation of a model against its inputs, and the contractions of
per-sample Jacobians into kernels in the three output layouts:

* ``"trace"``: the SUM over the O outputs, ``sum_i Theta_ii``, shape ``(N1, N2)``;
* ``"mean"``: the MEAN over the O outputs, ``(1/O) sum_i Theta_ii``, shape ``(N1, N2)`` --
  neural-tangents' ``trace_axes=(-1,)``, and the per-output kernel that
  :func:`ntkjax.kernel_fn` gives (the contractions below take ``"trace"`` and the callers
  divide by O);
* ``"diagonal"``: ``Theta_ii`` per output, shape ``(N1, N2, O)``;
* ``"full"``: shape ``(N1, N2, O, O)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from ntkjax._checks import check_pair

__all__ = [
    "OUTPUTS",
    "PRECISION",
    "ApplyFn",
    "ModelRefused",
    "Outputs",
    "batched_fn",
    "check_model_inputs",
    "contract_jacobians",
    "contract_leaf_jacobians",
    "full_to",
    "is_variables_dict",
    "leaf_jacobian_kernel",
    "per_sample_fn",
    "split_params",
    "symmetrize",
]

ApplyFn = Callable[..., Any]
"""A model ``apply_fn(params, x) -> (N, *out)``, e.g. a flax linen ``module.apply``."""

Outputs = Literal["trace", "mean", "full", "diagonal"]
OUTPUTS: tuple[Outputs, ...] = ("trace", "mean", "full", "diagonal")
PRECISION = jax.lax.Precision.HIGHEST


class ModelRefused(ValueError):
    """A model the kernel functions refuse for a reason of their own (e.g. a train-mode
    dropout): raised while the model is applied, it passes through
    :func:`check_model_inputs` unwrapped, as it is not a mismatch of params and inputs."""


# ---------------------------------------------------------------------------------------------
# params: which part is differentiated
# ---------------------------------------------------------------------------------------------


def is_variables_dict(params: Any) -> bool:
    """True when ``params`` is a flax linen variables dict (a mapping with a ``"params"`` key)."""
    return isinstance(params, Mapping) and "params" in params


def split_params(params: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Splits ``params`` into the differentiated part and a function rebuilding the whole.

    For a linen variables dict the differentiated part is ``params["params"]`` and the rebuilt
    dict keeps every other collection unchanged; any other pytree is differentiated whole.
    """
    if is_variables_dict(params):
        others = {k: v for k, v in params.items() if k != "params"}

        def rebuild(trainable):
            return {**others, "params": trainable}

        return params["params"], rebuild
    return params, lambda trainable: trainable


def _shapes_summary(tree: Any, limit: int = 600) -> str:
    shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)
    text = str(shapes)
    return text if len(text) <= limit else text[:limit] + " ..."


def check_model_inputs(
    apply_fn: Callable, params: Any, x1: Any, x2: Any = None
) -> jax.ShapeDtypeStruct:
    """Validates inputs and params against the model; returns the output shape of ``x1``.

    Raises:
      ValueError: inputs without a batch axis, x1/x2 of different per-example shapes, params
        the model cannot be applied with (names the param shapes and input shape), or outputs
        without the batch axis.
    """
    check_pair(x1, x2)
    try:
        out = jax.eval_shape(apply_fn, params, x1)
    except ModelRefused:
        raise
    except Exception as err:  # re-raised with the shapes involved
        raise ValueError(
            f"apply_fn could not be applied to params with shapes {_shapes_summary(params)} and "
            f"x1 of shape {tuple(np.shape(x1))} (do the params match the model and the "
            f"inputs?): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(
            "apply_fn must return one array of shape (N, *out); got a "
            f"{type(out).__name__} ({jax.tree_util.tree_structure(out)}). Wrap apply_fn to "
            "return only the network output."
        )
    if out.ndim < 1 or out.shape[0] != np.shape(x1)[0]:
        raise ValueError(
            f"apply_fn output has shape {out.shape}, which lacks the batch axis of x1 "
            f"(shape {tuple(np.shape(x1))}); outputs must have shape (N, *out)."
        )
    return out


def per_sample_fn(apply_fn: Callable, rebuild: Callable) -> Callable:
    """``f(trainable, x_single) -> (O,)``: the network on one example, outputs flattened."""

    def f(trainable, x):
        return jnp.reshape(apply_fn(rebuild(trainable), x[None]), (-1,))

    return f


def batched_fn(apply_fn: Callable, rebuild: Callable) -> Callable:
    """``f(trainable, x) -> (N, O)``: the network on a batch, outputs flattened per example."""

    def f(trainable, x):
        out = apply_fn(rebuild(trainable), x)
        return jnp.reshape(out, (out.shape[0], -1))

    return f


# ---------------------------------------------------------------------------------------------
# contractions
# ---------------------------------------------------------------------------------------------


def contract_jacobians(j1: jax.Array, j2: jax.Array, outputs: Outputs) -> jax.Array:
    """Contracts per-sample Jacobians ``(N1, O, P)`` and ``(N2, O, P)`` into a kernel."""
    if outputs == "trace":
        n1, n2 = j1.shape[0], j2.shape[0]
        return jnp.matmul(
            j1.reshape(n1, -1), j2.reshape(n2, -1).T, precision=PRECISION
        )
    if outputs == "diagonal":
        return jnp.einsum("aip,bip->abi", j1, j2, precision=PRECISION)
    return jnp.einsum("aip,bjp->abij", j1, j2, precision=PRECISION)


def symmetrize(kernel: jax.Array, outputs: Outputs) -> jax.Array:
    """Makes K(x, x) exactly symmetric: K_{ab,ij} = K_{ba,ji}."""
    if outputs == "trace":
        return 0.5 * (kernel + kernel.T)
    if outputs == "diagonal":
        return 0.5 * (kernel + jnp.transpose(kernel, (1, 0, 2)))
    return 0.5 * (kernel + jnp.transpose(kernel, (1, 0, 3, 2)))


def full_to(kernel_full: jax.Array, outputs: Outputs) -> jax.Array:
    """Reduces a ``(..., O, O)`` kernel (``(N1, N2, O, O)``, or ``(N, O, O)`` batch-diagonal)
    to the requested ``outputs`` form."""
    if outputs == "full":
        return kernel_full
    diag = jnp.diagonal(kernel_full, axis1=-2, axis2=-1)
    return diag if outputs == "diagonal" else jnp.sum(diag, axis=-1)


def contract_leaf_jacobians(j1: Any, j2: Any, outputs: Outputs) -> jax.Array | None:
    """Sum over parameter leaves of :func:`contract_jacobians`: ``j1``, ``j2`` are pytrees of
    per-sample Jacobians with leaves ``(N, O, *leaf.shape)``; each leaf is contracted on its own
    (never concatenated into one ``N x P`` matrix). None when no leaf has a parameter."""
    total = None
    for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2), strict=True):
        if a.size == 0:
            continue
        term = contract_jacobians(
            a.reshape(a.shape[0], a.shape[1], -1), b.reshape(b.shape[0], b.shape[1], -1), outputs
        )
        total = term if total is None else total + term
    return total


def leaf_jacobian_kernel(
    f_single: Callable, trainable: Any, x1: jax.Array, x2: jax.Array | None, outputs: Outputs
) -> jax.Array | None:
    """Jacobian-contraction kernel with respect to the pytree ``trainable``.

    ``f_single(trainable, x_single) -> (O,)``; per-sample Jacobians by ``vmap(jacrev)``,
    contracted by :func:`contract_leaf_jacobians`.
    """
    jac = jax.vmap(jax.jacrev(f_single), in_axes=(None, 0))
    j1 = jac(trainable, x1)
    j2 = j1 if x2 is None else jac(trainable, x2)
    return contract_leaf_jacobians(j1, j2, outputs)
