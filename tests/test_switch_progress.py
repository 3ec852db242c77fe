"""Issue 24: a counted task's progress (tokenization, an evaluation suite) stays quiet when it ends within a second,
and once past it shows its count, on a terminal or as plain lines in a log file."""

from __future__ import annotations

import io

from rich.console import Console

from lmforge.loop.progress import QUIET_S, TaskBar


class Clock:
    def __init__(self):
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_a_task_done_within_a_second_says_nothing():
    clock, out = Clock(), io.StringIO()
    with TaskBar("tokenizing 300 records", 300, console=Console(file=out, width=80), clock=clock,
                 quiet_s=QUIET_S) as bar:
        for _ in range(3):
            clock.now += 0.3
            bar.advance(100)
    assert out.getvalue() == ""


def test_a_slow_task_shows_its_count_from_the_first_second_in_a_log_file():
    clock, out = Clock(), io.StringIO()
    with TaskBar("tokenizing 4,000 records", 4000, console=Console(file=out, width=80), clock=clock,
                 quiet_s=QUIET_S, every=30) as bar:
        for _ in range(40):
            clock.now += 0.9
            bar.advance(100)
    assert out.getvalue().splitlines() == ["tokenizing 4,000 records: 200/4000",
                                           "tokenizing 4,000 records: 3600/4000 (0:00:32)",
                                           "tokenizing 4,000 records: 4000/4000 done in 0:00:36"]


def test_on_a_terminal_the_bar_appears_after_the_quiet_second_with_the_count_so_far():
    clock = Clock()
    with TaskBar("eval answers", 10, console=Console(file=io.StringIO(), force_terminal=True), clock=clock,
                 quiet_s=QUIET_S) as bar:
        clock.now += 0.5
        bar.advance(2)
        assert not bar.shown and not bar.progress.tasks
        clock.now += 0.6
        bar.advance(3)
        assert bar.shown and bar.progress.tasks[0].completed == 5 and bar.progress.tasks[0].total == 10
