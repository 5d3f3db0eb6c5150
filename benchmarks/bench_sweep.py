"""Workload ``sweep``: kernel-tracked vs plain SGD training, seeds vmapped, per width.

3-hidden-layer ReLU MLP (NTK parameterization, w_std = sqrt 2), 256 Gaussian training points
of 16 dimensions, widths 64/256/1024/4096, 8 seeds vmapped in one compiled program, 1,000
full-batch SGD steps, the empirical NTK (``ntk_method="auto"``, structured for MLPs) tracked
every 100 steps on 64 probe points. For each width: seconds of plain training (loss records
only) and of tracked training, and the overhead ``tracked / plain - 1`` (target <= 25 % at
width 4096).

On a CPU the full sizes take hours at the larger widths (about 50 GFLOP per step per seed at
width 4096). Runs expected to exceed ``SWEEP_BENCH_BUDGET_S`` seconds (env, default 120) per
program are measured at fewer steps (and, below 200 steps, one record at the end) and also
extrapolated to 1,000 steps: plain = seconds per step x 1,000, tracked = plain + 11 x the
measured cost of one probe-kernel record ((tracked - plain) / records measured). Every line
says which steps were measured (``measured_steps``, ``extrapolated``). The environment
variable ``SWEEP_BENCH_WIDTHS`` (e.g. ``4096``) restricts the widths.

The seeds are split over all local devices as in ``ntkjax sweep`` (:func:`ntkjax.sweep.shard_seeds`:
a one-axis mesh over ``jax.local_devices()``, seeds padded to a multiple of the device count);
each line records ``devices``. The width-4096 figure on a GPU:
``SWEEP_BENCH_WIDTHS=4096 python -m benchmarks.run sweep`` (one H200: one device; with
``CUDA_VISIBLE_DEVICES`` naming several GPUs, the 8 seeds are split over them).
``--quick``: widths 32/128, 2 seeds, 64 points, 100 steps, tracked every 20 on 16 probe points.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import emit, log, time_call
from ntkjax.models import MLP
from ntkjax.sweep import shard_seeds
from ntkjax.training import make_train_fn

LEARNING_RATE = 0.5


def _data(num_train: int, input_dim: int, num_probe: int):
    k_x, k_u, k_p = jax.random.split(jax.random.PRNGKey(0), 3)
    u = jax.random.normal(k_u, (input_dim,))
    x = jax.random.normal(k_x, (num_train, input_dim))
    y = jnp.sin(x @ (u / jnp.linalg.norm(u)))[:, None]
    probe = jax.random.normal(k_p, (num_probe, input_dim))
    return x, y, probe


def _program(model, seeds: int, num_steps: int, record_every: int, track: bool, x, y, probe):
    train = make_train_fn(
        model.apply, optimizer=optax.sgd(LEARNING_RATE), num_steps=num_steps,
        record_every=record_every, track_kernel=track, ntk_method="auto",
    )
    keys = jnp.stack([jax.random.PRNGKey(s) for s in range(seeds)])
    params = jax.vmap(lambda k: model.init(k, x[:1]))(keys)

    def one_seed(p, data):
        x, y, probe = data
        return train(p, x, y, probe_x=probe if track else None)._replace(
            final_params=None, train_predictions=None)

    # the seed axis split over all local devices, the data replicated on each
    run = shard_seeds(jax.vmap(one_seed, in_axes=(0, None)))
    return lambda: run(params, (x, y, probe))


def run(quick: bool = False) -> None:
    if quick:
        widths, seeds, num_train, num_probe, steps, every = (32, 128), 2, 64, 16, 100, 20
    else:
        widths, seeds, num_train, num_probe = (64, 256, 1024, 4096), 8, 256, 64
        steps, every = 1000, 100
    input_dim, depth = 16, 3
    budget = float(os.environ.get("SWEEP_BENCH_BUDGET_S", "120"))
    if os.environ.get("SWEEP_BENCH_WIDTHS"):
        widths = tuple(int(w) for w in os.environ["SWEEP_BENCH_WIDTHS"].split(","))
    x, y, probe = _data(num_train, input_dim, num_probe)
    for width in widths:
        model = MLP(features=(width,) * depth + (1,), activation="relu", w_std=math.sqrt(2.0),
                    b_std=0.0, parameterization="ntk")
        # Calibrate: one short plain program tells the seconds per step.
        calibration_steps = 2
        calibrate = _program(model, seeds, calibration_steps, calibration_steps, False, x, y,
                             probe)
        jax.block_until_ready(calibrate())
        t0 = time.perf_counter()
        jax.block_until_ready(calibrate())
        per_step = (time.perf_counter() - t0) / calibration_steps
        measured_steps, measured_every = steps, every
        if per_step * steps > budget:
            # fewer steps: a multiple of `every`, or below it a divisor of it (then one record)
            affordable = int(budget / per_step)
            if affordable >= 2 * every:
                measured_steps = every * (affordable // every)
            else:
                divisors = [d for d in range(1, every + 1) if every % d == 0 and d <= affordable]
                measured_steps = max([*divisors, 1])
                measured_every = measured_steps
        log(f"sweep: width {width}: {per_step * 1e3:.2f} ms/step for {seeds} seeds; "
            f"measuring {measured_steps} of {steps} steps (record every {measured_every})")
        repeats = 3 if per_step * measured_steps < 10 else 1
        timings = {}
        results = {}
        for track in (False, True):
            fn = _program(model, seeds, measured_steps, measured_every, track, x, y, probe)
            timing = time_call(fn, repeats=repeats)
            timings[track] = timing
            results[track] = timing.pop("result")
        plain_s, tracked_s = timings[False]["median_s"], timings[True]["median_s"]
        kernel_s = (tracked_s - plain_s) / (measured_steps // measured_every + 1)
        plain_full = plain_s * steps / measured_steps
        tracked_full = plain_full + kernel_s * (steps // every + 1)
        loss_plain = np.asarray(results[False].loss, dtype=np.float64)
        loss_tracked = np.asarray(results[True].loss, dtype=np.float64)
        accuracy = {
            # tracking must not change training: same losses with and without it
            "loss_tracked_vs_plain_max_rel": float(
                np.max(np.abs(loss_tracked - loss_plain)) / np.max(np.abs(loss_plain))),
            "final_loss_mean": float(np.mean(loss_tracked[:, -1])),
            "initial_loss_mean": float(np.mean(loss_tracked[:, 0])),
            "final_kernel_change_mean": float(np.mean(results[True].kernel_change[:, -1])),
            "diverged_runs": int(np.sum(results[True].diverged)),
        }
        emit(
            "sweep",
            {"width": width, "depth": depth, "seeds": seeds, "num_train": num_train,
             "input_dim": input_dim, "num_probe": num_probe, "steps": steps,
             "record_every": every, "measured_steps": measured_steps,
             "measured_record_every": measured_every,
             "learning_rate": LEARNING_RATE, "quick": quick,
             "devices": jax.local_device_count()},
            timings[True],
            accuracy=accuracy,
            plain_s=round(plain_s, 4),
            tracked_s=round(tracked_s, 4),
            overhead=round(tracked_s / plain_s - 1.0, 4),
            plain_s_at_full_steps=round(plain_full, 3),
            tracked_s_at_full_steps=round(tracked_full, 3),
            overhead_at_full_steps=round(tracked_full / plain_full - 1.0, 4),
            extrapolated=measured_steps != steps,
            target_overhead=0.25 if width == 4096 else None,
            plain_compile_s=round(timings[False]["compile_s"], 3),
        )


WORKLOADS = {"sweep": run}
