"""Entry point: ``python -m benchmarks.run [WORKLOAD ...] [--quick] [--list]``.

Each workload runs in its own Python process, so its peak-memory figure is its own, and prints
one JSON line per measurement on stdout (see ``benchmarks/harness.py``). Workloads are collected
from the ``WORKLOADS`` dicts of the modules in ``MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

MODULES = [
    "benchmarks.bench_analytic",
    "benchmarks.bench_attention",
    "benchmarks.bench_cnn",
    "benchmarks.bench_demo",
    "benchmarks.bench_devices",
    "benchmarks.bench_empirical",
    "benchmarks.bench_entk_guide",
    "benchmarks.bench_entk_real",
    "benchmarks.bench_features",
    "benchmarks.bench_graphs",
    "benchmarks.bench_predict",
    "benchmarks.bench_solvers",
    "benchmarks.bench_sweep",
    "benchmarks.bench_torch",
]


def collect() -> dict:
    workloads = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        workloads.update(module.WORKLOADS)
    return workloads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workloads", nargs="*", help="names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--list", action="store_true", help="list workloads and exit")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workloads = collect()
    if args.list:
        for name in workloads:
            print(name)
        return 0
    names = args.workloads or list(workloads)
    unknown = [n for n in names if n not in workloads]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {sorted(workloads)}")
    if args.in_process:
        for name in names:
            workloads[name](quick=args.quick)
        return 0
    status = 0
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.run", name, "--in-process"]
        if args.quick:
            cmd.append("--quick")
        status |= subprocess.call(cmd, env=os.environ.copy())
    return status


if __name__ == "__main__":
    sys.exit(main())
