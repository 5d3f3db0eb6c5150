"""Infinite-width kernels, float32, via ``jax.jit(kernel_fn(model))`` taking ``.ntk`` (as
neural-tangents' ``get='ntk'``). Accuracy: max |K32 - K64| / max |K64| against the same
computation in float64.

* ``analytic_relu_mlp``: ReLU MLP (w_std = sqrt 2, b_std = 0.1), x1 = x2 = 4000 x 64 standard
  normal, depth 3 and 10. Reference: neural-tangents 0.67 s / 2.77 s on the 2-core machine;
  target 4x faster.
* ``analytic_relu_cnn``: ReLU CNN, 3x3 SAME convolutions, depth 3 and 5, global average pooling
  then Dense(1) (the CNTK-GAP of Arora et al. 2019; every pair of positions is kept), 64 images
  of 8 x 8 x 3. No reference figure.
* ``analytic_deep_jit_compile``: a deep ReLU MLP (width 64, depth 10, 25, 50, 75 and 100;
  quick: 10 and 25) on 16 x 8 inputs, NNGP and NTK: the time to trace and compile
  ``jax.jit(kernel_fn(model))`` (``compile_s``, with the first run; ``trace_cpu_s`` and
  ``compile_cpu_s``, CPU-seconds of ``lower`` and ``compile``, comparable under load) against
  the first eager call of ``kernel_fn(model)`` (op by op, ``eager_first_s``). Issue 22
  measured 55 s against 4.5 s at depth 100. The compile grows faster than linearly with the
  depth: XLA:CPU's fusion emitter and LLVM on the two fused loops over the entries, each
  holding the whole network (``kernels._two_graphs``); a term shared by every layer of the loop
  made it much worse (``ScaledParts.stored_ones``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call

REFERENCE_S = {3: 0.67, 10: 2.77}


def analytic_relu_mlp(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models

    n, d = (500, 64) if quick else (4000, 64)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32)
    for depth in (3, 10):
        mlp = models.MLP((512,) * depth + (1,), "relu", w_std=float(np.sqrt(2)), b_std=0.1)
        fn = jax.jit(lambda a, m=mlp: ntkjax.kernel_fn(m)(a).ntk)
        timing = time_call(lambda f=fn: f(x), repeats=5)
        with jax.enable_x64(True):
            ref = jax.jit(lambda a, m=mlp: ntkjax.kernel_fn(m)(a).ntk)(
                jnp.asarray(np.asarray(x), jnp.float64)
            )
            ref = np.asarray(ref)
        got = np.asarray(timing["result"], np.float64)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        diag_err = float(np.max(np.abs(np.diagonal(got) - np.diagonal(ref)) / np.diagonal(ref)))
        target = REFERENCE_S[depth] / 4
        log(f"depth {depth}: {timing['median_s']:.3f} s (target {target:.3f} s), err {err:.1e}")
        emit(
            "analytic_relu_mlp",
            {"n": n, "d": d, "depth": depth, "dtype": "float32", "get": "ntk", "quick": quick},
            timing,
            accuracy={"max_rel_err_vs_float64": err, "diag_rel_err_vs_float64": diag_err,
                      "target": 1e-5},
            reference_s=REFERENCE_S[depth] if not quick else None,
            target_s=target if not quick else None,
            speedup_vs_reference=(REFERENCE_S[depth] / timing["median_s"]) if not quick else None,
        )


def analytic_relu_cnn(quick: bool = False) -> None:
    import ntkjax
    from ntkjax import models

    n, side = (16, 6) if quick else (64, 8)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, side, side, 3), jnp.float32)
    for depth in (3, 5):
        cnn = models.CNN(features=(64,) * depth + (1,), kernel_size=3, activation="relu",
                         readout="global_average_pool", w_std=float(np.sqrt(2)), b_std=0.1)
        fn = jax.jit(lambda a, m=cnn: ntkjax.kernel_fn(m)(a).ntk)
        timing = time_call(lambda f=fn: f(x), repeats=5)
        with jax.enable_x64(True):
            ref = np.asarray(jax.jit(lambda a, m=cnn: ntkjax.kernel_fn(m)(a).ntk)(
                jnp.asarray(np.asarray(x), jnp.float64)))
        got = np.asarray(timing["result"], np.float64)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        log(f"cnn depth {depth}: {timing['median_s']:.3f} s, err {err:.1e}")
        emit(
            "analytic_relu_cnn",
            {"n": n, "image": [side, side, 3], "depth": depth, "kernel_size": 3,
             "readout": "global_average_pool", "dtype": "float32", "get": "ntk", "quick": quick},
            timing,
            accuracy={"max_rel_err_vs_float64": err, "target": 1e-5},
        )


def analytic_deep_jit_compile(quick: bool = False) -> None:
    import resource
    import time

    import ntkjax
    from ntkjax import models

    def cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8), jnp.float32)
    for depth in (10, 25) if quick else (10, 25, 50, 75, 100):
        mlp = models.MLP((64,) * depth + (1,), "relu", w_std=float(np.sqrt(2)), b_std=0.1)
        # trace and compile alone, in CPU-seconds (a program of its own: not the one timed)
        staged = jax.jit(lambda a, m=mlp: (lambda k: (k.nngp, k.ntk))(ntkjax.kernel_fn(m)(a)))
        c0 = cpu_s()
        lowered = staged.lower(x)
        c1 = cpu_s()
        lowered.compile()
        c2 = cpu_s()
        t0 = time.perf_counter()
        eager = ntkjax.kernel_fn(mlp)(x)
        jax.block_until_ready((eager.nngp, eager.ntk))
        eager_s = time.perf_counter() - t0
        fn = jax.jit(lambda a, m=mlp: (lambda k: (k.nngp, k.ntk))(ntkjax.kernel_fn(m)(a)))
        timing = time_call(lambda f=fn: f(x), repeats=3)
        err = float(np.max(np.abs(np.asarray(timing["result"][1]) - np.asarray(eager.ntk)))
                    / np.max(np.abs(np.asarray(eager.ntk))))
        log(f"depth {depth}: jit compile + first run {timing['compile_s']:.1f} s, eager first "
            f"call {eager_s:.1f} s")
        emit(
            "analytic_deep_jit_compile",
            {"n": 16, "d": 8, "width": 64, "depth": depth, "dtype": "float32",
             "get": ["nngp", "ntk"], "quick": quick},
            timing,
            accuracy={"max_rel_diff_jit_vs_eager": err},
            eager_first_s=round(eager_s, 3),
            trace_cpu_s=round(c1 - c0, 2),
            compile_cpu_s=round(c2 - c1, 2),
        )


WORKLOADS = {"analytic_relu_mlp": analytic_relu_mlp, "analytic_relu_cnn": analytic_relu_cnn,
             "analytic_deep_jit_compile": analytic_deep_jit_compile}
