"""neural-tangents (nt) timed in the same benchmark run, from its own virtualenv.

nt's last release (0.6.5) needs jax 0.4.x, which cannot be installed next to this project's jax.
So nt lives in a separate virtualenv, and a benchmark runs nt's side as a subprocess
(``benchmarks/nt_worker.py``) with that venv's python, on the very inputs of its ntkjax side
(handed over in an ``.npz`` file), timed by the same rule.

Create the venv once (python 3.11, about 150 MB, no TensorFlow)::

    python -m benchmarks.nt_reference          # creates .nt-venv/ (gitignored)
    python -m benchmarks.nt_reference --path DIR

It pins ``neural-tangents==0.6.5`` (installed without its TensorFlow dependencies, which only its
experimental TF bridge uses), ``jax==0.4.30`` / ``jaxlib==0.4.30`` (the jax nt's reference data
in this project were computed with), ``numpy<2``, ``frozendict`` and ``typing_extensions``.
The benchmarks find the venv's python through the environment variable ``NTKJAX_NT_PYTHON``, else
at ``.nt-venv/bin/python`` in the repository root; without it their JSON line keeps
``"nt": null`` with the reason and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".nt-venv"
ENV_VAR = "NTKJAX_NT_PYTHON"
SETUP_COMMAND = "python -m benchmarks.nt_reference"
REQUIREMENTS = ["jax==0.4.30", "jaxlib==0.4.30", "numpy<2", "frozendict>=2.3.8",
                "typing_extensions>=4.0"]
NT_REQUIREMENT = "neural-tangents==0.6.5"


def nt_python() -> Path | None:
    """The nt venv's python: ``$NTKJAX_NT_PYTHON``, else ``.nt-venv/bin/python``, else None."""
    given = os.environ.get(ENV_VAR)
    path = Path(given) if given else DEFAULT_VENV / "bin" / "python"
    return path if path.is_file() else None


def side_by_side(workload: str, inputs: dict[str, np.ndarray], config: dict[str, Any],
                 ours_median_s: float, reference: np.ndarray, *,
                 timeout_s: float = 1800.0) -> dict[str, Any]:
    """nt's timing of ``workload`` on ``inputs``, for the benchmark's JSON line.

    Returns the extra fields of the line: ``nt`` (nt's ``median_s``, ``compile_s``, ``repeats``,
    ``peak_memory_mb`` and versions, or None), ``speedup_vs_nt`` (nt's median over ours),
    ``nt_max_rel_diff`` (max |K_nt - K_ref| / max |K_ref| with ``reference`` ntkjax's float64
    kernel: a correctness check of both), or ``nt_reason`` (with the setup command) when nt could
    not run.
    """
    python = nt_python()
    if python is None:
        where = os.environ.get(ENV_VAR) or str(DEFAULT_VENV / "bin" / "python")
        return {"nt": None,
                "nt_reason": f"no neural-tangents venv at {where}; create it with "
                             f"`{SETUP_COMMAND}` (or set {ENV_VAR})"}
    with tempfile.TemporaryDirectory(prefix="ntkjax-nt-") as tmp:
        inputs_path, output_path = Path(tmp) / "inputs.npz", Path(tmp) / "nt.npz"
        np.savez(inputs_path, **inputs)
        cmd = [str(python), "-m", "benchmarks.nt_worker", workload, str(inputs_path),
               str(output_path), json.dumps(config)]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_ENABLE_X64")}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"nt": None, "nt_reason": f"nt's run exceeded {timeout_s:.0f} s"}
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            return {"nt": None,
                    "nt_reason": f"nt's worker failed (exit {proc.returncode}): {tail[0]}"}
        nt_row = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(output_path) as data:
            nt_kernel = np.asarray(data["ntk"], np.float64)
    if nt_kernel.shape != reference.shape:
        return {"nt": nt_row, "nt_reason": f"nt's kernel has shape {nt_kernel.shape}, ours "
                                           f"{reference.shape}"}
    diff = float(np.max(np.abs(nt_kernel - reference)) / np.max(np.abs(reference)))
    return {"nt": nt_row, "speedup_vs_nt": round(nt_row["median_s"] / ours_median_s, 2),
            "nt_max_rel_diff": diff}


def create(path: Path) -> int:
    """Creates the venv at ``path`` with nt and its jax, then checks that nt imports."""
    python = path / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", str(path)],
        [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", NT_REQUIREMENT],
        [str(python), "-c", "import sys, types; "
         "sys.modules['neural_tangents.experimental'] = types.ModuleType('x'); "
         "import neural_tangents as nt, jax; print('neural-tangents', nt.__version__, "
         "'jax', jax.__version__)"],
    ]
    for step in steps:
        print("+", " ".join(step), file=sys.stderr, flush=True)
        status = subprocess.call(step)
        if status:
            return status
    print(f"done: set {ENV_VAR}={python} or keep it at the default place", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create the neural-tangents venv the "
                                                 "side-by-side benchmarks run nt in.")
    parser.add_argument("--path", type=Path, default=DEFAULT_VENV,
                        help=f"where to create it (default {DEFAULT_VENV})")
    return create(parser.parse_args(argv).path)


if __name__ == "__main__":
    sys.exit(main())
