"""Progress of training and evaluation: a rich bar on a terminal, plain periodic lines otherwise.

The ETA is the time per step measured since this run started (or resumed) times the steps left, shown
from the first step on. rich's own estimate averages the last 30 seconds of updates and stays blank while
one step takes longer than that (a CPU LoRA run). Without a terminal (nohup, a scheduler's log file) a bar
prints nothing useful, so a line is printed at the first step, then every PLAIN_EVERY_S seconds, and at
the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PLAIN_EVERY_S = 30.0
"""Seconds between plain progress lines when output goes to a file."""
QUIET_S = 1.0
"""Data tokenization and evaluation suites show progress only once they have run this long."""


def clock_text(seconds: float | None) -> str:
    """H:MM:SS, or ? when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    """The training bar (and, while it runs, the evaluation bars under it)."""

    def __init__(self, total: int, done: int, enabled: bool = True, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = PLAIN_EVERY_S):
        self.enabled, self.total, self.first = enabled, total, done
        self.console = console or Console()
        self.plain = not self.console.is_terminal
        self.clock, self.every = clock, every
        self.started = clock()
        self.last_line = None  # when the last plain line was printed
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"), TextColumn("{task.fields[stats]}"), console=self.console,
            disable=not enabled or self.plain, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=done, stats="", eta="?")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def eta(self, step: int) -> float | None:
        """Seconds left at `step`, from the mean time of the steps this process has run."""
        if step <= self.first:
            return None
        return (self.clock() - self.started) / (step - self.first) * (self.total - step)

    def update(self, step: int, metrics: dict) -> None:
        stats = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        eta = clock_text(self.eta(step))
        self.progress.update(self.task, completed=step, stats=stats, eta=eta)
        if not self.enabled or not self.plain:
            return
        now = self.clock()
        if self.last_line is None or now - self.last_line >= self.every or step == self.total:
            self.last_line = now
            self.console.print(f"train step {step}/{self.total} ({step / max(self.total, 1):.0%})  {stats}  "
                               f"elapsed {clock_text(now - self.started)}  eta {eta}", highlight=False,
                               soft_wrap=True)

    def task_bar(self, label: str, total: int) -> TaskBar:
        """A bar for a sub-task (an evaluation) under the training bar."""
        return TaskBar(label, total, self.enabled, self.console, self.clock, self.every, self.progress)


class TaskBar:
    """Progress of a counted task (evaluation batches, records tokenized): its own bar, a line under the
    training bar while that one runs, or plain lines (start, every PLAIN_EVERY_S seconds, end) without a
    terminal. Used as a context manager; `advance()` after each unit. With `quiet_s`, nothing shows until the
    task has run that long: a small file's tokenization says nothing."""

    def __init__(self, label: str, total: int, enabled: bool = True, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = PLAIN_EVERY_S,
                 progress: Progress | None = None, quiet_s: float = 0.0):
        self.label, self.total, self.enabled, self.quiet_s = label, total, enabled, quiet_s
        self.shown = False
        self.console = console or Console()
        self.plain = not self.console.is_terminal
        self.clock, self.every = clock, every
        self.done = 0
        self.shared = progress is not None and progress.live.is_started
        self.progress = progress if self.shared else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=not enabled or self.plain, transient=True)
        self.task = None

    def __enter__(self) -> TaskBar:
        self.started = self.last_line = self.clock()
        if self.quiet_s <= 0:
            self._show()
        return self

    def _show(self) -> None:
        self.shown = True
        if self.enabled and self.plain:
            self.console.print(f"{self.label}: {self.done}/{self.total}", highlight=False, soft_wrap=True)
        if not self.shared:
            self.progress.__enter__()
        self.task = self.progress.add_task(self.label, total=self.total, completed=self.done, eta="", stats="")

    def advance(self, units: int = 1) -> None:
        self.done += units
        now = self.clock()
        if not self.shown:
            if now - self.started < self.quiet_s:
                return
            self.last_line = now
            self._show()
        self.progress.update(self.task, completed=self.done)
        if self.enabled and self.plain and now - self.last_line >= self.every and self.done < self.total:
            self.last_line = now
            self.console.print(f"{self.label}: {self.done}/{self.total} ({clock_text(now - self.started)})",
                               highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if not self.shown:
            return
        self.progress.remove_task(self.task)
        if not self.shared:
            self.progress.__exit__(*exc)
        if self.enabled and self.plain and exc[0] is None:
            self.console.print(f"{self.label}: {self.done}/{self.total} done in "
                               f"{clock_text(self.clock() - self.started)}", highlight=False, soft_wrap=True)
