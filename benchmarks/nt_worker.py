"""The neural-tangents side of a side-by-side benchmark. It runs in nt's OWN virtualenv (see
``benchmarks/nt_reference.py``), never in the project's: nt 0.6.5 needs jax 0.4.x.

``python -m benchmarks.nt_worker WORKLOAD INPUTS.npz OUTPUT.npz CONFIG_JSON`` (run from the
repository root with that venv's python) builds nt's ``stax`` network equal to the ntkjax
workload's model, reads the inputs the ntkjax side used from ``INPUTS.npz``, jits
``kernel_fn(x, None, "ntk", ...)`` and times it with the same :func:`benchmarks.harness.time_call`
rule (median after the first call, compile = first call minus median). It prints one JSON line
(``median_s``, ``compile_s``, ``repeats``, ``peak_memory_mb``: this process's own peak resident
set, and the versions) and saves nt's kernel as ``ntk`` in ``OUTPUT.npz``.

Workloads (the networks mirror ``ntkjax.models``; every Dense in the NTK parameterization):

* ``analytic_attention_masked``: ``models.Transformer`` -- Dense embedding; ``depth`` pre-norm
  blocks ``x + GlobalSelfAttention(LayerNorm(x))`` (softmax, linear scaling, every projection
  scale ``w_std``, bias ``b_std``) and ``x + Dense(Relu(Dense(LayerNorm(x))))``; LayerNorm,
  GlobalAvgPool, Dense(1). LayerNorm's epsilon is passed explicitly (nt's default 1e-12 differs
  from ntkjax's 1e-6). Inputs ``x`` (N, L, C) and the boolean ``mask`` (N, L); the masked
  positions are set to nt's ``mask_constant`` here, which is how nt takes masks.
* ``analytic_gntk``: ``models.GNN`` -- ``(Dense, Relu[, Aggregate])`` per hidden layer,
  GlobalSumPool, Dense(1); inputs ``x`` (N, V, C) and the dense adjacency ``pattern`` (N, V, V),
  passed as ``pattern=(A, A)``.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np

# nt's __init__ imports its experimental TensorFlow bridge (``empirical_tf``), which needs
# tensorflow and tf2jax; the kernels used here do not. A placeholder module stands in for it so
# the venv needs no TensorFlow.
sys.modules.setdefault("neural_tangents.experimental",
                       types.ModuleType("neural_tangents.experimental"))

import jax  # noqa: E402
import neural_tangents as nt  # noqa: E402  # pyright: ignore[reportMissingImports]
from neural_tangents import stax  # noqa: E402  # pyright: ignore[reportMissingImports]

from benchmarks.harness import time_call  # noqa: E402

# Any value absent from the inputs works: nt masks a position whose channels all equal it.
MASK_CONSTANT = -12345.0


def peak_rss_mb() -> float:
    """This process's own peak resident set (``VmHWM``). ``getrusage``'s ``ru_maxrss`` would not
    do: Linux carries it across ``fork`` + ``exec``, so it would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _residual(*layers):
    return stax.serial(stax.FanOut(2), stax.parallel(stax.serial(*layers), stax.Identity()),
                       stax.FanInSum())


def transformer(width: int, depth: int, heads: int, w_std: float, b_std: float,
                epsilon: float):
    """nt's equal of ``ntkjax.models.Transformer(width, depth=depth, num_heads=heads, ...)``."""
    dense = lambda f: stax.Dense(f, W_std=w_std, b_std=b_std)
    norm = lambda: stax.LayerNorm(axis=-1, eps=epsilon)
    layers = [dense(width)]
    for _ in range(depth):
        attention = stax.GlobalSelfAttention(
            n_chan_out=width, n_chan_key=width, n_chan_val=width, n_heads=heads,
            linear_scaling=True, W_key_std=w_std, W_value_std=w_std, W_query_std=w_std,
            W_out_std=w_std, b_std=b_std, attention_mechanism="SOFTMAX")
        layers += [_residual(norm(), attention),
                   _residual(norm(), dense(width), stax.Relu(), dense(width))]
    layers += [norm(), stax.GlobalAvgPool(), dense(1)]
    return stax.serial(*layers)


def gnn(features: list[int], aggregate_after: list[int], w_std: float, b_std: float):
    """nt's equal of ``ntkjax.models.GNN(features, aggregate_after, ...)`` (sum readout)."""
    layers = []
    for i, width in enumerate(features[:-1]):
        layers += [stax.Dense(width, W_std=w_std, b_std=b_std), stax.Relu()]
        if i in aggregate_after:
            layers.append(stax.Aggregate(aggregate_axis=1, batch_axis=0, channel_axis=-1))
    layers += [stax.GlobalSumPool(), stax.Dense(features[-1], W_std=w_std, b_std=b_std)]
    return stax.serial(*layers)


def build(workload: str, inputs, config: dict):
    """The jitted nt kernel function of ``workload`` and its arguments."""
    if workload == "analytic_attention_masked":
        _, _, kernel_fn = transformer(config["width"], config["depth"], config["heads"],
                                      config["w_std"], config["b_std"], config["epsilon"])
        x = np.where(inputs["mask"][..., None], MASK_CONSTANT, inputs["x"]).astype(np.float32)
        fn = jax.jit(lambda a: kernel_fn(a, None, "ntk", mask_constant=MASK_CONSTANT))
        return fn, (jax.numpy.asarray(x),)
    if workload == "analytic_gntk":
        _, _, kernel_fn = gnn(config["features"], config["aggregate_after"], config["w_std"],
                              config["b_std"])
        fn = jax.jit(lambda a, p: kernel_fn(a, None, "ntk", pattern=(p, p)))
        return fn, (jax.numpy.asarray(inputs["x"], np.float32),
                    jax.numpy.asarray(inputs["pattern"], np.float32))
    raise ValueError(f"nt_worker: unknown workload {workload!r}; known: "
                     "analytic_attention_masked, analytic_gntk.")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    workload, inputs_path, output_path, config_json = argv
    config = json.loads(config_json)
    with np.load(inputs_path) as data:
        inputs = {k: data[k] for k in data.files}
    fn, args = build(workload, inputs, config)
    timing = time_call(lambda: fn(*args), repeats=config.get("repeats", 5),
                       min_time_s=config.get("min_time_s", 2.0))
    np.savez(output_path, ntk=np.asarray(timing["result"]))
    print(json.dumps({"median_s": timing["median_s"], "compile_s": timing["compile_s"],
                      "repeats": timing["repeats"], "peak_memory_mb": round(peak_rss_mb(), 1),
                      "neural_tangents": nt.__version__, "jax": jax.__version__,
                      "backend": jax.default_backend()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
