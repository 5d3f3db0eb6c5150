"""The ``ntkjax`` command line: ``ntkjax demo`` (the main job) and ``ntkjax sweep``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run_from_args(args) -> int``; this module only wires them together. Every help text is plain
text (no reST markup) and shows each option's default (``HelpFormatter``); an option the
subcommand does not know is reported with that subcommand's usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["DESCRIPTION", "SUBCOMMANDS", "HelpFormatter", "build_parser", "main"]

DESCRIPTION = """\
ntkjax: neural tangent kernels in JAX.

  ntkjax demo    reproduce the NTK study end to end (figures, report.md, results.json)
  ntkjax sweep   train widths x seeds with kernel tracking (resumable JSON lines)

Run 'ntkjax COMMAND --help' for a command's options."""

SUBCOMMANDS = {
    "demo": ("ntkjax.study.demo", "reproduce the NTK study end to end: figures, report, JSON"),
    "sweep": ("ntkjax.study.sweep_command",
              "train widths x seeds with kernel tracking; resumable JSON lines"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written (plain text, line breaks kept) and ends every
    option's help with its default: ``(default: VALUE)``, ``(default: off)`` for a flag. Help
    that already states its default (contains ``default``) is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)" if action.default is False else text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``ntkjax`` argument parser, one sub-command per entry of :data:`SUBCOMMANDS`."""
    from ntkjax import __version__

    parser = argparse.ArgumentParser(prog="ntkjax", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"ntkjax {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(
            name, help=help_text, formatter_class=HelpFormatter,
            description=getattr(module, "DESCRIPTION", help_text),
            epilog=getattr(module, "EPILOG", None))
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run_from_args, _parser=sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``ntkjax`` command: parses ``argv`` and runs the sub-command; its exit code.

    An option the chosen sub-command does not know exits with status 2 and that sub-command's
    usage (not the top-level one)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
