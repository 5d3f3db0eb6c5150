"""The ``ntkjax`` command line: plain-text help with every option's default, ``--version``, and
a mistyped option answered with the usage of the subcommand it was typed to."""

from __future__ import annotations

import re

import pytest

import ntkjax
from ntkjax.study import cli

RST_MARKUP = re.compile(r"``|:(func|data|mod|class|meth|attr):`|`")


def subparsers():
    parser = cli.build_parser()
    return parser, {name: parser.parse_known_args([name])[0]._parser for name in cli.SUBCOMMANDS}


def option_entries(help_text: str) -> dict[str, str]:
    """The text of each option's entry in an argparse help, keyed by its first option."""
    entries: dict[str, str] = {}
    current = None
    options = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    for line in options.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in entries.items()}


def test_help_is_plain_text():
    parser, subs = subparsers()
    for text in [parser.format_help(), *(p.format_help() for p in subs.values())]:
        assert not RST_MARKUP.search(text), RST_MARKUP.search(text)


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    _, subs = subparsers()
    sub = subs[command]
    entries = option_entries(sub.format_help())
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        entry = entries[action.option_strings[0]]
        assert "default" in entry, f"{command}: no default shown in {entry!r}"
        if action.default not in (None, False) and action.nargs != 0:
            assert f"(default: {action.default}" in entry, (entry, action.default)


def test_demo_help_states_the_cost_of_each_mode():
    _, subs = subparsers()
    text = subs["demo"].format_help().split("\ncost on", 1)[1]
    for mode in ("--quick", "default", "--full"):
        line = next(line for line in text.splitlines() if line.strip().startswith(mode + " "))
        assert "CPU" in line and "GB" in line, line


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ntkjax {ntkjax.__version__}"


@pytest.mark.parametrize("argv, usage", [
    (["demo", "--quik"], "usage: ntkjax demo"),
    (["sweep", "--widht", "64"], "usage: ntkjax sweep"),
    (["demo", "--sections", "nope"], "usage: ntkjax demo"),
])
def test_a_mistyped_option_shows_the_subcommands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert argv[1] in err  # the message names what was mistyped


def test_quick_and_full_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick", "--full"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
