"""Infinite-width kernels of convolutional networks, float32, NNGP and NTK with ``x2 = None``,
via ``jax.jit(kernel_fn(model))``. Accuracy: max |K32 - K64| / max |K64| against the same
computation in float64.

Reference figures: neural-tangents (nt) on the 2-core development machine, and the targets of
issue 11:

* ``analytic_cnn_flatten``: ReLU CNN, three 3x3 SAME convolutions (w_std = sqrt 2,
  b_std = 0.1), flatten then Dense(1) -- only same-position pairs are needed. 256 images of
  8 x 8 x 3 and 128 of 16 x 16 x 3: nt 0.21 s, target 0.10 s.
* ``analytic_cnn_gap``: the same with global average pooling (all pairs of positions): 64
  images of 8 x 8 x 3: nt 4.24 s, target 0.85 s.
* ``myrtle5``: Myrtle-5 (:class:`ntkjax.models.Myrtle`, nt's notebook architecture), 16 images
  of 32 x 32 x 3: nt 46.3 s, target 4.6 s. The output also states the arithmetic and
  memory-traffic floor of the machine for this workload (issue 11's estimate of 1e8 flops and
  30 MB per pair of images, over this machine's measured matmul rate and copy bandwidth) and
  how far the measured time is from it.

Run with nothing else on the machine: other processes on the 2 cores inflate every figure.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import emit, log, time_call

REFERENCE_S = {("flatten", 8): 0.21, ("flatten", 16): 0.21, ("gap", 8): 4.24, "myrtle5": 46.3}
TARGET_S = {("flatten", 8): 0.10, ("flatten", 16): 0.10, ("gap", 8): 0.85, "myrtle5": 4.6}


def _kernels(model):
    import ntkjax

    return jax.jit(lambda a: (lambda k: (k.nngp, k.ntk))(ntkjax.kernel_fn(model)(a)))


def _max_rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _cnn(readout: str):
    from ntkjax import models

    return models.CNN(features=(64, 64, 64, 1), kernel_size=3, padding="SAME",
                      activation="relu", readout=readout, w_std=float(np.sqrt(2)), b_std=0.1)


def _run_cnn(workload: str, readout: str, key: str, cases, quick: bool) -> None:
    model = _cnn(readout)
    for n, side in cases:
        x = jax.random.normal(jax.random.PRNGKey(0), (n, side, side, 3), jnp.float32)
        fn = _kernels(model)
        timing = time_call(lambda f=fn, a=x: f(a), repeats=5, min_time_s=2.0)
        nngp, ntk = timing["result"]
        with jax.enable_x64(True):
            ref_nngp, ref_ntk = _kernels(model)(jnp.asarray(np.asarray(x), jnp.float64))
        err = max(_max_rel_err(nngp, ref_nngp), _max_rel_err(ntk, ref_ntk))
        ref_key = (key, side)
        reference, target = REFERENCE_S.get(ref_key), TARGET_S.get(ref_key)
        log(f"{workload} N={n} {side}x{side}x3: {timing['median_s']:.3f} s "
            f"(nt {reference} s, target {target} s), err {err:.1e}")
        emit(
            workload,
            {"n": n, "image": [side, side, 3], "depth": 3, "kernel_size": 3, "padding": "SAME",
             "readout": readout, "dtype": "float32", "get": ["nngp", "ntk"], "x2": None,
             "quick": quick},
            timing,
            accuracy={"max_rel_err_vs_float64": err, "target": 1e-5},
            reference_s=None if quick else reference,
            target_s=None if quick else target,
            speedup_vs_reference=None if quick else reference / timing["median_s"],
        )


def analytic_cnn_flatten(quick: bool = False) -> None:
    cases = [(32, 8), (16, 16)] if quick else [(256, 8), (128, 16)]
    _run_cnn("analytic_cnn_flatten", "flatten", "flatten", cases, quick)


def analytic_cnn_gap(quick: bool = False) -> None:
    cases = [(16, 8)] if quick else [(64, 8)]
    _run_cnn("analytic_cnn_gap", "global_average_pool", "gap", cases, quick)


def _machine_rates() -> tuple[float, float]:
    """(float32 matmul flop/s, copy bytes/s) measured here: the arithmetic and memory rates
    the floor is computed with."""
    a = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    mm = jax.jit(lambda m: m @ m)
    jax.block_until_ready(mm(a))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(mm(a))
    flops = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    big = jnp.ones((64 * 2**20 // 4,), jnp.float32)
    cp = jax.jit(lambda v: v * 2)
    jax.block_until_ready(cp(big))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(cp(big))
    bandwidth = 5 * 2 * big.nbytes / (time.perf_counter() - t0)  # read + write
    return flops, bandwidth


FLOPS_PER_PAIR = 1e8  # issue 11's estimate for Myrtle-5 on a pair of 32 x 32 images
BYTES_PER_PAIR = 30e6


def myrtle5(quick: bool = False) -> None:
    from ntkjax import models

    n, side = (4, 16) if quick else (16, 32)
    model = models.Myrtle(5)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, side, side, 3), jnp.float32)
    fn = _kernels(model)
    timing = time_call(lambda: fn(x), repeats=3)
    nngp, ntk = timing["result"]
    # float64 check on the first 4 images (the kernel of a subset is the subset of the kernel)
    with jax.enable_x64(True):
        ref_nngp, ref_ntk = _kernels(model)(jnp.asarray(np.asarray(x[:4]), jnp.float64))
    err = max(_max_rel_err(np.asarray(nngp)[:4, :4], ref_nngp),
              _max_rel_err(np.asarray(ntk)[:4, :4], ref_ntk))
    pairs = n * (n + 1) // 2
    flops, bandwidth = _machine_rates()
    scale = (side / 32) ** 4  # per-pair work grows with the square of the number of positions
    floor_compute = pairs * FLOPS_PER_PAIR * scale / flops
    floor_memory = pairs * BYTES_PER_PAIR * scale / bandwidth
    floor = max(floor_compute, floor_memory)
    reference, target = REFERENCE_S["myrtle5"], TARGET_S["myrtle5"]
    log(f"myrtle5 N={n} {side}x{side}x3: {timing['median_s']:.2f} s (nt {reference} s, target "
        f"{target} s), err {err:.1e}; floor {floor:.3f} s (arithmetic {floor_compute:.3f} s at "
        f"{flops / 1e9:.0f} GFLOP/s, memory {floor_memory:.3f} s at {bandwidth / 1e9:.1f} GB/s)"
        f": {timing['median_s'] / floor:.0f}x the floor")
    emit(
        "myrtle5",
        {"n": n, "image": [side, side, 3], "depth": 5, "dtype": "float32",
         "get": ["nngp", "ntk"], "x2": None, "quick": quick},
        timing,
        accuracy={"max_rel_err_vs_float64_first_4": err, "target": 1e-5},
        reference_s=None if quick else reference,
        target_s=None if quick else target,
        speedup_vs_reference=None if quick else reference / timing["median_s"],
        floor={"pairs": pairs, "flops_per_pair": FLOPS_PER_PAIR * scale,
               "bytes_per_pair": BYTES_PER_PAIR * scale, "matmul_flop_per_s": flops,
               "copy_bytes_per_s": bandwidth, "compute_s": floor_compute,
               "memory_s": floor_memory, "floor_s": floor,
               "times_floor": timing["median_s"] / floor},
    )


WORKLOADS = {
    "analytic_cnn_flatten": analytic_cnn_flatten,
    "analytic_cnn_gap": analytic_cnn_gap,
    "myrtle5": myrtle5,
}
