"""Graph NTK (GNTK) of a message-passing network, float32, via
``jax.jit(kernel_fn(gnn))(x, pattern=A).ntk``. Accuracy: max |K32 - K64| / max |K64| against the
same computation in float64.

* ``analytic_gntk``: :class:`ntkjax.models.GNN` with 2 aggregation layers (Dense(64), ReLU,
  Aggregate, Dense(64), ReLU, Aggregate, Dense(64), ReLU, global sum pool over nodes, Dense(1))
  on 64 random undirected graphs of 30 nodes with self loops (dense adjacency (64, 30, 30)),
  8 node features; the kernel keeps every pair of nodes ((64, 64, 30, 30) before the readout).
  neural-tangents (``stax.Aggregate``, dense) is timed in the same run from its own venv on the
  same inputs (``benchmarks/nt_reference.py``; create the venv with
  ``python -m benchmarks.nt_reference``): the line carries nt's median, compile time and peak
  memory, ``speedup_vs_nt`` (target >= 2x) and ``nt_max_rel_diff`` (nt's float32 kernel
  against ours in float64). Without the venv it carries ``"nt": null`` and the reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call
from benchmarks.nt_reference import side_by_side


def _graphs(n: int, v: int, c: int) -> tuple[jax.Array, jax.Array]:
    kx, ka = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (n, v, c), jnp.float32)
    upper = jnp.triu(jax.random.uniform(ka, (n, v, v)) < 0.15, 1)
    adjacency = (upper | jnp.swapaxes(upper, 1, 2) | jnp.eye(v, dtype=bool)).astype(jnp.float32)
    return x, adjacency


def analytic_gntk(quick: bool = False) -> None:
    import ntkjax

    n, v, c = (16, 10, 8) if quick else (64, 30, 8)
    x, adjacency = _graphs(n, v, c)
    features, after, w_std, b_std = (64, 64, 64, 1), (0, 1), float(np.sqrt(2)), 0.1
    gnn = ntkjax.models.GNN(features, aggregate_after=after, w_std=w_std, b_std=b_std)
    fn = jax.jit(lambda a, p: ntkjax.kernel_fn(gnn)(a, pattern=p).ntk)
    timing = time_call(lambda: fn(x, adjacency), repeats=5, min_time_s=2.0)
    with jax.enable_x64(True):
        ref = np.asarray(jax.jit(lambda a, p: ntkjax.kernel_fn(gnn)(a, pattern=p).ntk)(
            jnp.asarray(np.asarray(x), jnp.float64), jnp.asarray(np.asarray(adjacency),
                                                                  jnp.float64)))
    got = np.asarray(timing["result"], np.float64)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    log(f"gntk, {n} graphs of {v} nodes, 2 aggregations: {timing['median_s']:.3f} s, "
        f"err {err:.1e}")
    nt = side_by_side(
        "analytic_gntk", {"x": np.asarray(x), "pattern": np.asarray(adjacency)},
        {"features": list(features), "aggregate_after": list(after), "w_std": w_std,
         "b_std": b_std},
        timing["median_s"], ref)
    log(f"  nt: {nt}")
    emit(
        "analytic_gntk",
        {"n": n, "nodes": v, "channels": c, "aggregations": 2, "adjacency": "dense",
         "readout": "global_sum_pool", "dtype": "float32", "get": "ntk", "quick": quick},
        timing,
        accuracy={"max_rel_err_vs_float64": err, "target": 1e-5},
        target="speedup >= 2x nt",
        **nt,
    )


WORKLOADS = {"analytic_gntk": analytic_gntk}
