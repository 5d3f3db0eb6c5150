"""Workload ``demo_default``: the README's main command, ``ntkjax demo --out DIR``, end to end.

The demo runs in a child process (``python -m ntkjax.study.cli demo --no-progress``), as a
user would run it, so that its imports, compilation and figures are all counted. One JSON line:
``median_s`` is the wall time of the one run (``repeats`` 1, ``compile_s`` 0: compilation is
part of the job), ``cpu_s`` the child's user + system CPU seconds, ``peak_memory_mb`` its peak
resident set (``ru_maxrss`` of the waited-for child), ``section_seconds`` the wall time of each
section from its ``results.json``; ``accuracy`` holds figures of the run to compare between runs
(the fitted slopes of sections 2 and 4 and the digits accuracies of sections 7 and 8).

Targets on the 2-core CPU: <= 3 min wall and <= 4 GB (about 240 CPU-seconds on a loaded
machine). ``--quick`` runs ``ntkjax demo --quick`` (sections 1-7, about 40 CPU-seconds) to check
that the workload works. The default run takes minutes: run it once, not in a loop.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import emit, log


def _accuracy(result: dict) -> dict:
    sections = result["sections"]
    pick = {
        "slope_empirical_ntk_param": ("empirical", "slope_ntk_param"),
        "slope_ntk_drift": ("drift", "slope"),
        "digits_accuracy_ntk": ("digits", "accuracy_ntk"),
        "digits_accuracy_cnn_gap_ntk": ("digits_images", "accuracy_cnn_gap_ntk"),
    }
    return {name: sections[section]["numbers"][key] for name, (section, key) in pick.items()
            if section in sections and key in sections[section]["numbers"]}


def demo_default(quick: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as folder:
        out = Path(folder) / "demo_out"
        command = [sys.executable, "-m", "ntkjax.study.cli", "demo", "--out", str(out),
                   "--no-progress", *(["--quick"] if quick else [])]
        log(f"demo_default: {' '.join(command[1:])}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads((out / "results.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    emit("demo_default", {"mode": "quick" if quick else "default",
                          "sections": list(result["sections"])},
         {"median_s": wall, "compile_s": 0.0, "repeats": 1},
         accuracy=_accuracy(result),
         cpu_s=round(cpu, 1),
         peak_memory_mb=round(after.ru_maxrss / 1024, 1),  # the child's peak resident set
         section_seconds={k: v["seconds"] for k, v in result["sections"].items()})


WORKLOADS = {"demo_default": demo_default}
