"""A rich progress bar with the numbers people watch: loss, lr, tokens/s."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressDisplay:
    def __init__(self, total: int, done: int, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        stats = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        self.progress.update(self.task, completed=step, stats=stats)
