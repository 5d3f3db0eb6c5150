"""The ``ntkjax`` command line: ``ntkjax demo`` (the main job) and ``ntkjax sweep``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run_from_args(args) -> int``; this module only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = {
    "demo": ("ntkjax.study.demo", "reproduce the NTK study end to end: figures, report, JSON"),
    "sweep": ("ntkjax.study.sweep_command",
              "train widths x seeds with kernel tracking; resumable JSON lines"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``ntkjax`` argument parser, one sub-command per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="ntkjax", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``ntkjax`` command: parses ``argv`` and runs the sub-command; its exit code."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
