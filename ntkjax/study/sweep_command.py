"""``ntkjax sweep``: the command line of :func:`ntkjax.sweep.sweep`, with named presets.

The ``study`` preset is the NTK study's section 6 set-up: sin regression with 50 training
points, one hidden ReLU layer with He initialization (``w_std = sqrt 2``, zero biases), widths
50/200/1000/5000, 500 full-batch SGD steps, kernel tracked every 100 steps on 20 N(0, 1) probe
inputs, and the study's ``lr = 0.01`` on ``mean((f - y)**2)``, which is ``lr = 0.02`` on
ntkjax's ``1/(2n) sum (f - y)**2``. In the NTK parameterization it converges and the kernel
change falls like width^(-1/2); in the standard parameterization (the study's) the initial NTK
grows with width, ``2n/lambda_max`` falls below 0.02 from width ~200 on, and those runs diverge:
flagged before training by the stability check and reported with the step where they diverged.
The ``benchmark`` preset is the ``sweep`` benchmark's set-up.

``--shard K/N`` runs shard K (0-based) of N of the (width, learning rate) groups, appending to
``<stem>.shard-K-of-N<suffix>`` beside ``--out`` (under ``jax.distributed`` the default is the
process index of the process count). The summary and figures always read the whole sweep: the
``--out`` file and all its shard files, merged; a sharded run reports how many of the requested
rows are present so far, and a run without ``--shard`` after all shards finished trains nothing
and summarizes everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from ntkjax.empirical import NTK_METHODS
from ntkjax.nn.dense import PARAMETERIZATIONS
from ntkjax.sweep import (
    DATASETS,
    OPTIMIZERS,
    SweepConfig,
    load_rows,
    parse_shard,
    summarize,
    sweep,
    write_plots,
)

__all__ = ["DESCRIPTION", "EPILOG", "PRESETS", "add_arguments", "run_from_args"]

PRESETS: dict[str, dict[str, Any]] = {
    # The NTK study's section 6 (see the module docstring).
    "study": {
        "widths": (50, 200, 1000, 5000),
        "seeds": 4,
        "learning_rates": (0.02,),
        "config": SweepConfig(),
    },
    # The `sweep` benchmark's set-up: 3 hidden ReLU layers, 256 x 16 Gaussian data.
    "benchmark": {
        "widths": (64, 256, 1024, 4096),
        "seeds": 8,
        "learning_rates": (0.5,),
        "config": SweepConfig(
            dataset="gaussian", num_train=256, input_dim=16, num_test=256, num_probe=64, depth=3,
            num_steps=1000, record_every=100,
        ),
    },
}



DESCRIPTION = """\
Train networks of several widths and seeds (seeds vmapped in one compiled program per width)
with the empirical NTK tracked during training; one JSON line per run, appended to --out, so an
interrupted sweep resumes where it stopped. Options left unset take the value of --preset:

  study      the NTK study's section 6: sin regression, 50 points, one hidden ReLU layer,
             He init, widths 50/200/1000/5000, 4 seeds, 500 full-batch SGD steps, lr 0.02
             (the study's 0.01 on mean((f - y)^2)); in the standard parameterization the
             runs from width ~200 on are above the stability edge and diverge
  benchmark  the sweep benchmark: 3 hidden ReLU layers, 256 x 16 Gaussian inputs, widths
             64/256/1024/4096, 8 seeds, 1000 steps, lr 0.5

The summary and figures read the whole sweep, every shard file merged."""

EPILOG = """\
example:
  ntkjax sweep --preset study --parameterization standard --plot --out runs/study.jsonl"""


# options of SweepConfig fields: flag, type, choices, help (the default is the preset's value)
_CONFIG_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--depth", int, None, "hidden layers"),
    ("--activation", str, None, "activation name of ntkjax.models.MLP (e.g. relu, erf, tanh)"),
    ("--w-std", float, None, "weight standard deviation"),
    ("--b-std", float, None, "bias standard deviation"),
    ("--dataset", str, DATASETS, "training task"),
    ("--num-train", int, None, "training points"),
    ("--input-dim", int, None, "input dimension (gaussian dataset)"),
    ("--num-probe", int, None, "probe inputs of the tracked NTK"),
    ("--optimizer", str, OPTIMIZERS, "optax optimizer"),
    ("--ntk-method", str, NTK_METHODS, "empirical NTK method of the tracking"),
)


def _preset_help(text: str, field: str | None = None) -> str:
    """``text`` with the values of both presets as its default."""
    if field is None:
        return f"{text} (default: from --preset)"
    values = []
    for name, preset in sorted(PRESETS.items()):
        value = preset[field] if field in preset else getattr(preset["config"], field)
        if isinstance(value, tuple):
            value = " ".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:.4g}"
        values.append(f"{name}: {value}")
    return f"{text} (default: {'; '.join(values)})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ntkjax sweep``; unset options take the preset's value."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="study",
                        help="base set-up that every unset option is taken from (default: "
                             "study = the notebook's section 6)")
    parser.add_argument("--widths", type=int, nargs="+", metavar="M",
                        help=_preset_help("hidden widths", "widths"))
    parser.add_argument("--seeds", type=int, metavar="K",
                        help=_preset_help("number of seeds (0..K-1), vmapped per width",
                                          "seeds"))
    parser.add_argument("--learning-rates", "--lr", type=float, nargs="+", dest="learning_rates",
                        metavar="LR",
                        help=_preset_help("learning rates on ntkjax's 1/(2n) sum (f-y)^2 loss",
                                          "learning_rates"))
    parser.add_argument("--steps", type=int, dest="num_steps",
                        help=_preset_help("optimizer steps", "num_steps"))
    parser.add_argument("--record-every", type=int, metavar="STEPS",
                        help=_preset_help("steps between loss/kernel records (made a divisor "
                                          "of --steps when left unset)", "record_every"))
    parser.add_argument("--batch-size", type=int,
                        help="minibatch size (default: the full batch)")
    parser.add_argument("--parameterization", choices=PARAMETERIZATIONS,
                        help=_preset_help("ntk (NTK parameterization) or standard",
                                          "parameterization"))
    for flag, kind, choices, text in _CONFIG_FLAGS:
        field = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=kind, choices=choices, help=_preset_help(text, field))
    parser.add_argument("--no-kernel", action="store_true",
                        help="do not track the NTK (loss only)")
    parser.add_argument("--out", default="runs/sweep.jsonl", metavar="FILE",
                        help="JSON-lines results file (appended to; a re-run resumes)")
    parser.add_argument("--plot", action="store_true", help="write PNG figures beside --out")
    parser.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    parser.add_argument(
        "--shard", metavar="K/N",
        help="run only shard K (0-based) of N of the (width, lr) groups, into "
             "<out stem>.shard-K-of-N<suffix>, e.g. --shard $SLURM_ARRAY_TASK_ID/4 (default: "
             "all groups; under jax.distributed: process index/count)")


_CONFIG_OPTIONS = ("num_steps", "record_every", "batch_size", "parameterization", "depth",
                   "activation", "w_std", "b_std", "dataset", "num_train", "input_dim", "num_probe",
                   "optimizer", "ntk_method")


def run_from_args(args: argparse.Namespace) -> int:
    """Runs ``ntkjax sweep`` with parsed ``args``; prints the summary; returns the exit code."""
    preset = PRESETS[args.preset]
    overrides = {name: getattr(args, name) for name in _CONFIG_OPTIONS
                 if getattr(args, name, None) is not None}
    if args.no_kernel:
        overrides["track_kernel"] = False
    config = dataclasses.replace(preset["config"], **overrides)
    if "record_every" not in overrides and config.num_steps % config.record_every:
        config = dataclasses.replace(config, record_every=math.gcd(config.num_steps,
                                                                   config.record_every))
    widths = args.widths or preset["widths"]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    learning_rates = args.learning_rates or preset["learning_rates"]
    try:
        shard = None if args.shard is None else parse_shard(args.shard)
        sweep(
            widths=widths,
            seeds=seeds,
            learning_rates=learning_rates,
            out_path=args.out,
            config=config,
            show_progress=not args.no_progress,
            shard=shard,
        )
    except ValueError as err:
        print(f"ntkjax sweep: error: {err}", file=sys.stderr)
        return 2
    # the whole sweep so far, every shard merged: the requested rows of this configuration
    config_id = config.config_id()
    seed_list = range(seeds) if isinstance(seeds, int) else seeds
    wanted = {(config_id, int(w), int(s), float(lr))
              for lr in learning_rates for w in widths for s in seed_list}
    rows = [r for r in load_rows(args.out)
            if isinstance(r, dict) and (r.get("config_id"), r.get("width"), r.get("seed"),
                                        r.get("learning_rate")) in wanted]
    print(summarize(rows))
    print(f"rows: {args.out}" + (f" ({len(rows)} of {len(wanted)} present, all shards merged)"
                                 if len(rows) < len(wanted) else ""))
    if args.plot:
        for path in write_plots(rows, Path(args.out).parent, prefix=Path(args.out).stem):
            print(f"figure: {path}")
    return 0
