"""Every flag and argument of every lmforge command has help text, and the help shows defaults."""

from __future__ import annotations

import argparse
import os

import pytest

from lmforge.cli import _parser, main
from lmforge.cli_help import available_cores, leaf_parsers

PARSER = _parser()
COMMANDS = {parser.prog: parser for parser in leaf_parsers(PARSER)}


def test_the_walk_reaches_every_command():
    assert {"lmforge train", "lmforge run", "lmforge eval", "lmforge data inspect", "lmforge data demo",
            "lmforge tokenizer train", "lmforge tokenizer extend", "lmforge serve", "lmforge export"} <= set(COMMANDS)


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_flag_has_help(prog):
    missing = [action.dest for action in COMMANDS[prog]._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert missing == [], f"{prog}: no help for {missing}"


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_help_shows_the_defaults_of_flags_that_have_one(prog):
    text = COMMANDS[prog].format_help()
    for action in COMMANDS[prog]._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []):
            assert "default" in (action.help or "") or f"(default: {action.default})" in " ".join(text.split()), \
                f"{prog} {action.option_strings[0]}"


def test_threads_default_to_the_cores_this_process_may_use():
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))
    assert PARSER.parse_args(["report", "x"]).threads == available_cores()


def test_threads_are_applied_before_work(monkeypatch, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        main(["report", str(tmp_path), "--threads", "1"])  # the command fails (no run there); threads are set first
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_below_one_are_refused():
    with pytest.raises(SystemExit) as stop:
        main(["report", "x", "--threads", "0"])
    assert stop.value.code == 2
