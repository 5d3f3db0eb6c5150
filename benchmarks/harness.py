"""Measurement helpers for benchmarks/: median after compilation, compile time, peak memory.

Every workload prints JSON lines through :func:`emit`, one per measurement, with at least:
``workload``, ``params``, ``median_s`` (median wall time after compilation, results blocked on),
``compile_s`` (first call minus median, i.e. tracing + compilation), ``peak_memory_mb``
(device peak where the backend reports it, else the process's peak resident set), ``accuracy``
(a dict of error measures), ``backend``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


def block(tree: Any) -> Any:
    """Waits until every array in ``tree`` is computed."""
    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, repeats: int = 5, min_time_s: float = 0.0,
              wait: Callable[[Any], Any] = block) -> dict:
    """Times ``fn()``: the first call (compile + run) and the median of ``repeats`` later calls.

    With ``min_time_s`` > 0, keeps repeating (beyond ``repeats``) until that much time is spent,
    so fast workloads get a stable median. ``wait(result)`` returns once the result is computed
    (JAX's asynchronous dispatch; the identity for synchronous frameworks).
    """
    t0 = time.perf_counter()
    out = wait(fn())
    first = time.perf_counter() - t0
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or spent < min_time_s:
        t0 = time.perf_counter()
        wait(fn())
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) > 200:
            break
    median = statistics.median(times)
    return {
        "median_s": median,
        "compile_s": max(first - median, 0.0),
        "repeats": len(times),
        "result": out,
    }


def peak_memory_mb() -> float:
    """Peak memory so far: the device's peak bytes where reported, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024


def emit(workload: str, params: dict, timing: dict, *, accuracy: dict | None = None,
         **extra: Any) -> dict:
    """Prints one JSON line for a measurement and returns it."""
    row = {
        "workload": workload,
        "params": params,
        "median_s": round(timing["median_s"], 6),
        "compile_s": round(timing["compile_s"], 4),
        "repeats": timing.get("repeats"),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "accuracy": accuracy or {},
        "backend": jax.default_backend(),
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def log(message: str) -> None:
    """Progress notes go to stderr so stdout stays pure JSON lines."""
    print(message, file=sys.stderr, flush=True)
