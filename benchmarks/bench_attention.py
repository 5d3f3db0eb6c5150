"""Infinite-width kernels of self-attention networks, float32, via
``jax.jit(kernel_fn(model))`` taking ``.ntk``. Accuracy: max |K32 - K64| / max |K64| against the
same computation in float64.

* ``analytic_attention``: :class:`ntkjax.models.Transformer` -- a Dense embedding, 2 pre-norm
  encoder blocks (LayerNorm, softmax SelfAttention with linear scaling, residual; LayerNorm,
  ReLU MLP, residual), a final LayerNorm, global average pooling and Dense(1) -- on N = 64
  sequences of length 16 with 8 channels (every pair of positions is kept: kernels of shape
  (64, 64, 16, 16)). No reference figure.
* ``analytic_attention_masked``: the same Transformer on N = 64 sequences padded to L = 32
  (8 channels), half of them (the odd ones) shorter -- lengths drawn from [8, 32) -- and
  masked (``kernel_fn(net)(x, mask1=mask)``: masked keys excluded, global average over the
  unmasked positions). Target (issue 24): >= 2x neural-tangents, whose
  ``GlobalSelfAttention`` with ``mask_constant`` is the reference. nt is timed in the same run
  from its own venv on the same inputs (``benchmarks/nt_reference.py``; create the venv with
  ``python -m benchmarks.nt_reference``): the line carries nt's median, compile time and peak
  memory, ``speedup_vs_nt`` and ``nt_max_rel_diff`` (nt's float32 kernel against ours in
  float64). Without the venv it carries ``"nt": null`` and the reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call
from benchmarks.nt_reference import side_by_side


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


def analytic_attention_masked(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models

    n, length, channels, depth = (16, 8, 8, 2) if quick else (64, 32, 8, 2)
    rng = np.random.default_rng(0)
    lengths = np.full(n, length)
    lengths[1::2] = rng.integers(length // 4, length, size=n // 2)  # half padded
    mask = np.arange(length)[None, :] >= lengths[:, None]
    x = np.array(jax.random.normal(jax.random.PRNGKey(0), (n, length, channels)), np.float32)
    x[mask] = 0.0
    width, heads, w_std, b_std = 64, 4, float(np.sqrt(2)), 0.1
    net = models.Transformer(width, depth=depth, num_heads=heads, activation="relu",
                             w_std=w_std, b_std=b_std)
    fn = jax.jit(lambda a, m: ntkjax.kernel_fn(net)(a, mask1=m).ntk)
    xj, mj = jnp.asarray(x), jnp.asarray(mask)
    timing = time_call(lambda: fn(xj, mj), repeats=5, min_time_s=2.0)
    with jax.enable_x64(True):
        ref = np.asarray(jax.jit(lambda a, m: ntkjax.kernel_fn(net)(a, mask1=m).ntk)(
            jnp.asarray(x, jnp.float64), mj))
    got = np.asarray(timing["result"], np.float64)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    log(f"masked attention, {depth} blocks: {timing['median_s']:.3f} s, err {err:.1e}")
    nt = side_by_side(
        "analytic_attention_masked", {"x": x, "mask": mask},
        {"width": width, "depth": depth, "heads": heads, "w_std": w_std, "b_std": b_std,
         "epsilon": net.epsilon},
        timing["median_s"], ref)
    log(f"  nt: {nt}")
    emit(
        "analytic_attention_masked",
        {"n": n, "length": length, "channels": channels, "blocks": depth,
         "padded": int(np.sum(lengths < length)), "attention": "softmax, linear scaling",
         "readout": "global_average_pool (unmasked positions)", "dtype": "float32",
         "get": "ntk", "quick": quick},
        timing,
        accuracy={"max_rel_err_vs_float64": err, "target": 1e-5},
        target="speedup >= 2x nt",
        **nt,
    )


WORKLOADS = {"analytic_attention": analytic_attention,
             "analytic_attention_masked": analytic_attention_masked}
