"""Infinite-width kernels of self-attention networks, float32, via
``jax.jit(kernel_fn(model))`` taking ``.ntk``. Accuracy: max |K32 - K64| / max |K64| against the
same computation in float64.

* ``analytic_attention``: :class:`ntkjax.models.Transformer` -- a Dense embedding, 2 pre-norm
  encoder blocks (LayerNorm, softmax SelfAttention with linear scaling, residual; LayerNorm,
  ReLU MLP, residual), a final LayerNorm, global average pooling and Dense(1) -- on N = 64
  sequences of length 16 with 8 channels (every pair of positions is kept: kernels of shape
  (64, 64, 16, 16)). No reference figure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call


def analytic_attention(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models

    n, length, channels, depth = (16, 8, 8, 2) if quick else (64, 16, 8, 2)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, length, channels), jnp.float32)
    net = models.Transformer(64, depth=depth, num_heads=4, activation="relu",
                             w_std=float(np.sqrt(2)), b_std=0.1)
    fn = jax.jit(lambda a: ntkjax.kernel_fn(net)(a).ntk)
    timing = time_call(lambda: fn(x), repeats=5, min_time_s=2.0)
    with jax.enable_x64(True):
        ref = np.asarray(jax.jit(lambda a: ntkjax.kernel_fn(net)(a).ntk)(
            jnp.asarray(np.asarray(x), jnp.float64)))
    got = np.asarray(timing["result"], np.float64)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    log(f"attention, {depth} blocks: {timing['median_s']:.3f} s, err {err:.1e}")
    emit(
        "analytic_attention",
        {"n": n, "length": length, "channels": channels, "blocks": depth,
         "attention": "softmax, linear scaling", "readout": "global_average_pool",
         "dtype": "float32", "get": "ntk", "quick": quick},
        timing,
        accuracy={"max_rel_err_vs_float64": err, "target": 1e-5},
    )


WORKLOADS = {"analytic_attention": analytic_attention}
