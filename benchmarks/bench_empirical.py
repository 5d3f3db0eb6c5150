"""Empirical NTK speed: the issue's three workloads, every method, float32, trace, x2=None.

Each line reports the median and compile time, peak memory, the error against the structured
kernel computed in float64, the neural-tangents reference seconds (its structured method, JAX
0.4.30, this machine), the target seconds and the ratio median / target. ``mlp_wide`` also
reports the arithmetic floor (one forward and one backward pass per sample plus the per-layer
Gram products at ~200 GFLOP/s: 0.012 s) and median / floor.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ntkjax
from benchmarks.harness import emit, log, time_call

METHODS = ("structured", "jacobian", "ntk_vp")


class _MLP(nn.Module):
    widths: tuple
    out: int

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.out)(x)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


# name: (model, input shape, N, neural-tangents structured s, NT jacobian s, target s)
_SPECS = {
    "mlp_wide": (lambda: _MLP((2048, 2048), 1), (64,), 128, 0.027, 4.5, 0.022),
    "mlp_deep_o10": (lambda: _MLP((1024, 1024, 1024), 10), (64,), 64, 0.046, 9.8, 0.037),
    "cnn": (lambda: _CNN(), (16, 16, 3), 32, 0.42, 0.54, 0.34),
}
_FLOOR_S = {"mlp_wide": 0.012}


def _run(name: str, quick: bool) -> None:
    make, shape, n, nt_structured, nt_jacobian, target = _SPECS[name]
    if quick:
        n = max(4, n // 8)
    model = make()
    x = jax.random.normal(jax.random.PRNGKey(0), (n, *shape), jnp.float32)
    params = model.init(jax.random.PRNGKey(1), x)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        ntk64 = ntkjax.empirical_ntk_fn(model.apply, ntk_method="structured")
        ref = np.asarray(ntk64(p64, np.asarray(x, np.float64)))
    methods = METHODS
    if quick:
        methods = ("structured", "jacobian")
    for method in methods:
        ntk = ntkjax.empirical_ntk_fn(model.apply, ntk_method=method)
        log(f"{name}: {method}")
        fast = method == "structured" and not quick  # the slow methods take seconds a call
        timing = time_call(lambda ntk=ntk: ntk(params, x), repeats=7 if fast else 3,
                           min_time_s=3.0 if fast else 0.0)
        err = float(np.max(np.abs(np.asarray(timing["result"], np.float64) - ref))
                    / np.max(np.abs(ref)))
        extra = {}
        if name in _FLOOR_S and not quick:
            extra = {"floor_s": _FLOOR_S[name],
                     "ratio_to_floor": round(timing["median_s"] / _FLOOR_S[name], 2)}
        emit(
            name,
            {"method": method, "n": n, "input_shape": list(shape), "outputs": "trace",
             "dtype": "float32", "x2": None, "quick": quick},
            timing,
            accuracy={"max_rel_err_vs_structured_float64": err},
            reference_s=None if quick else nt_structured,
            reference_jacobian_s=None if quick else nt_jacobian,
            target_s=None if quick else target,
            ratio=None if quick else round(timing["median_s"] / target, 3),
            **extra,
        )


WORKLOADS = {name: (lambda quick, name=name: _run(name, quick)) for name in _SPECS}
