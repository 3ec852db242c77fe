"""metrics.jsonl: one JSON line per logged event, each step's lines written once even across resumes.

A checkpoint records how many lines the file had when it was written. A resumed run replays the steps
after that checkpoint, so it first cuts the file back to that many lines (a checkpoint from before this
was recorded: to the lines of steps up to its own); the replayed steps are then logged by the run that
produced the weights being kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LINES_KEY = "metrics_lines"
"""The key in a checkpoint's LoopState.extra holding the file's line count at the save."""


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.lines = self._count()

    def _count(self) -> int:
        if not self.path.is_file():
            return 0
        with open(self.path, "rb") as handle:
            return sum(1 for _ in handle)

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self.lines += 1

    def rewind(self, step: int, recorded: int | None) -> int:
        """Drop what was logged after the checkpoint a run resumes from; the lines dropped."""
        if not self.path.is_file():
            self.lines = 0
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = lines[:recorded] if recorded is not None else [line for line in lines if _step(line) <= step]
        kept = [line if line.endswith("\n") else line + "\n" for line in kept]  # a torn last line, ended
        if kept != lines:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)  # whole or not at all: a kill here leaves the old file
        self.lines = len(kept)
        return len(lines) - len(kept)


def _step(line: str) -> float:
    """A line's step; a line that does not parse (torn by a kill) sorts after every step."""
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return float("inf")
