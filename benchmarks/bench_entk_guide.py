"""The cost table of the guide "The eNTK of your own model": every route on one model.

A linen MLP 64-512-512-10 (301,066 parameters), ``N = 512`` float32 inputs, each route timed
after compilation (median) in the same process, so the ratios between routes are measured in
one run:

- ``empirical_ntk_fn`` with ``outputs="mean"``, structured and ``ntk_method="jacobian"``;
- the head only (``params_filter``), exact for its 5,130 parameters;
- ``outputs="pseudo"`` (Mohamadi et al. 2023), with its relative Frobenius distance from the
  mean eNTK;
- ``projected_ntk_features`` at ``dim`` 384 and 1,536 features per output (TRAK / LoGra
  projections into one space shared by the parameter leaves; 3,840 and 15,360 features per
  example for the 10 outputs), with the relative Frobenius error of ``phi phi^T`` against the
  trace eNTK.

``--quick`` uses ``N = 64``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ntkjax
from benchmarks.harness import emit, log, time_call


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(512, name="hidden1")(x))
        x = nn.relu(nn.Dense(512, name="hidden2")(x))
        return nn.Dense(10, name="head")(x)


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _routes(quick: bool = False) -> None:
    n = 64 if quick else 512
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (n, 64), jnp.float32)
    params = model.init(jax.random.key(1), x)
    size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    base = {"model": "mlp 64-512-512-10", "parameters": int(size), "n": n, "dtype": "float32",
            "quick": quick}

    # Called as returned (they are jitted inside). Under an outer jax.jit, batch="auto" cannot
    # probe the model first, so the program holds both the per-example and the whole-batch
    # kernel (lax.cond), and the latter's (N O, P) Jacobian needs 27 GB here.
    mean_fn = ntkjax.empirical_ntk_fn(model.apply, outputs="mean")
    trace_fn = ntkjax.empirical_ntk_fn(model.apply)
    mean = np.asarray(mean_fn(params, x))
    trace = np.asarray(trace_fn(params, x))

    kernels = {
        "structured_mean": mean_fn,
        "jacobian_mean": ntkjax.empirical_ntk_fn(model.apply, outputs="mean",
                                                 ntk_method="jacobian"),
        "head_only_mean": ntkjax.empirical_ntk_fn(
            model.apply, outputs="mean", params_filter=lambda path, leaf: path[0] == "head"),
        "pseudo": ntkjax.empirical_ntk_fn(model.apply, outputs="pseudo"),
    }
    for route, fn in kernels.items():
        log(f"entk_guide_routes: {route}")
        timing = time_call(lambda fn=fn: fn(params, x), repeats=5, min_time_s=1.0)
        accuracy = {}
        if route == "jacobian_mean":
            accuracy = {"rel_frobenius_vs_structured_mean": _relative(timing["result"], mean)}
        if route == "pseudo":
            accuracy = {"rel_frobenius_vs_mean_entk": _relative(timing["result"], mean)}
        emit("entk_guide_routes", {**base, "route": route}, timing, accuracy=accuracy)

    for dim in (384, 1536):
        def features(dim=dim):
            return ntkjax.projected_ntk_features(model.apply, params, x, dim=dim,
                                                 key=jax.random.key(dim))
        log(f"entk_guide_routes: projected dim={dim}")
        timing = time_call(features, repeats=5, min_time_s=1.0)
        phi = np.asarray(timing["result"], np.float64).reshape(n, -1)
        emit("entk_guide_routes",
             {**base, "route": "projected_features", "dim": dim,
              "features_per_example": int(phi.shape[1])},
             timing, accuracy={"rel_frobenius_vs_trace_entk": _relative(phi @ phi.T, trace)})


WORKLOADS = {"entk_guide_routes": _routes}
