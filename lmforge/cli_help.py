"""The command line's shared parts: help that shows defaults, the commands' parsers, the thread count."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class DefaultsFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless it has none or its help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS, []) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every command that runs something (`lmforge data inspect`, not `lmforge data`)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for action in subs for child in dict.fromkeys(action.choices.values()) for leaf in leaf_parsers(child)]


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup CPU quota (a container's
    --cpus). torch's default thread count is the machine's core count, which oversubscribes both."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
