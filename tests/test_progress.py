"""What a run says while it runs: the ETA from the first step on slow steps, plain periodic lines when output
goes to a file, evaluation progress, the plan before step 1, and the config that reaches the trackers."""

from __future__ import annotations

import glob
import importlib.util
import io
from functools import partial

import datasets
import pytest
from rich.console import Console
from test_loop import random_rows, tiny_model

from lmforge.config.errors import ConfigError
from lmforge.config.schema import LogConfig, TrainConfig
from lmforge.data.packing import collate
from lmforge.loop.progress import ProgressDisplay, TaskBar
from lmforge.loop.summary import example_row, start_lines, token_totals
from lmforge.loop.trackers import flatten, make_accelerator
from lmforge.loop.trainer import Trainer
from lmforge.models.heads import lm_loss

METRICS = {"loss": 2.5, "lr": 1e-4, "tokens_per_s": 12.0}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def file_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80), out


def test_eta_shows_from_the_first_step_when_a_step_takes_minutes():
    clock = Clock()
    display = ProgressDisplay(10, 0, console=Console(file=io.StringIO(), force_terminal=True), clock=clock)
    with display:
        clock.now += 95  # one CPU LoRA step
        display.update(1, METRICS)
        assert display.progress.tasks[0].fields["eta"] == "0:14:15"  # 9 steps left x 95 s
        clock.now += 105
        display.update(2, METRICS)
        assert display.progress.tasks[0].fields["eta"] == "0:13:20"  # 8 x the mean of 100 s


def test_a_resumed_run_times_only_its_own_steps():
    clock = Clock()
    display = ProgressDisplay(10, 6, console=file_console()[0], clock=clock)
    assert display.eta(6) is None
    clock.now += 40
    assert display.eta(7) == 3 * 40


def test_without_a_terminal_progress_is_plain_lines_at_the_first_step_every_30_s_and_the_last():
    clock = Clock()
    console, out = file_console()
    display = ProgressDisplay(10, 0, console=console, clock=clock)
    with display:
        for step in range(1, 11):
            clock.now += 10
            display.update(step, METRICS)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[0] == ("train step 1/10 (10%)  loss 2.5000  lr 1.00e-04  12 tok/s  elapsed 0:00:10  eta 0:01:30")
    assert lines[-1].endswith("elapsed 0:01:40  eta 0:00:00")
    assert "\x1b" not in out.getvalue()  # no bar, no escape codes in a log file


def test_progress_off_prints_nothing():
    console, out = file_console()
    display = ProgressDisplay(3, 0, enabled=False, console=console)
    with display:
        display.update(1, METRICS)
    with TaskBar("eval", 2, enabled=False, console=console) as bar:
        bar.advance()
    assert out.getvalue() == ""


def test_evaluation_progress_without_a_terminal():
    clock = Clock()
    console, out = file_console()
    with TaskBar("eval", 100, console=console, clock=clock) as bar:
        for _ in range(100):
            clock.now += 1
            bar.advance()
    assert out.getvalue().splitlines() == ["eval: 0/100", "eval: 30/100 (0:00:30)", "eval: 60/100 (0:01:00)",
                                           "eval: 90/100 (0:01:30)", "eval: 100/100 done in 0:01:40"]


def test_a_slow_last_unit_is_said_once():
    clock = Clock()
    console, out = file_console()
    with TaskBar("eval", 1, console=console, clock=clock) as bar:
        clock.now += 66
        bar.advance()
    assert out.getvalue().splitlines() == ["eval: 0/1", "eval: 1/1 done in 0:01:06"]


def test_an_evaluation_during_training_shows_under_the_training_bar():
    console = Console(file=io.StringIO(), force_terminal=True)
    display = ProgressDisplay(5, 0, console=console)
    with display:
        with display.task_bar("eval", 4) as bar:
            assert bar.progress is display.progress and len(display.progress.tasks) == 2
            bar.advance(4)
            assert display.progress.tasks[1].completed == 4
        assert len(display.progress.tasks) == 1


class Tokens:
    """A stand-in tokenizer: token i reads as chr(65 + i)."""

    def decode(self, ids):
        return "".join(chr(65 + i) for i in ids)


def test_token_totals_and_the_example_row_of_a_table():
    rows = datasets.Dataset.from_list([
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [7, 8], "labels": [-100, -100]},  # shortest, but nothing to learn: not the example
    ])
    assert token_totals(rows) == {"rows": 3, "tokens": 10, "loss_tokens": 5}
    assert token_totals(list(rows)) == {"rows": 3, "tokens": 10, "loss_tokens": 5}
    assert example_row(rows) == ([1, 2, 3], [-100, 2, 3])


def test_preference_rows_count_the_prompt_once_and_mark_the_chosen_reply():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}]
    assert token_totals(rows) == {"rows": 1, "tokens": 6, "loss_tokens": 4}
    assert example_row(rows) == ([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5])


def test_the_plan_before_step_1(tmp_path):
    rows = random_rows(40)  # rows of 6-19 tokens, the first third of each masked
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=4, grad_accum=2, epochs=3)
    trainer = Trainer(tiny_model(), rows, partial(collate, pad_id=0), lm_loss, cfg,
                      LogConfig(report_to=[], progress=False), tokenizer=Tokens())
    lines = start_lines(trainer)
    assert lines[0] == "train rows: 40, 494 tokens, 344 with loss (70%), 12 per row"  # summed in the test below
    assert (494, 344) == (sum(len(r["input_ids"]) for r in rows), sum(x != -100 for r in rows for x in r["labels"]))
    assert lines[1] == ("optimizer steps: 5 per epoch, 15 in all (8 rows per step: batch_size 4 x grad_accum 2 "
                        "x 1 processes)")
    ids, labels = min(((r["input_ids"], r["labels"]) for r in rows), key=lambda r: len(r[0]))
    cut = len(ids) // 3
    text = f"{Tokens().decode(ids[:cut])}[[{Tokens().decode(ids[cut:])}]]"
    assert lines[2] == f"example row ({len(ids)} tokens; [[...]] carries loss): {text!r}"


def test_flatten_gives_trackers_scalars_only():
    assert flatten({"train": {"lr": 1e-4, "resume_from": None}, "data": {"train": ["a.jsonl"], "x": {}},
                    "stage": "sft"}) == {"train.lr": 1e-4, "train.resume_from": "None",
                                         "data.train": "['a.jsonl']", "data.x": "{}", "stage": "sft"}


def test_tensorboard_receives_the_run_config_as_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (tmp_path / "config.yaml").write_text("stage: sft\ntrain:\n  lr: 0.001\n  resume_from: null\n"
                                          "data:\n  train: [a.jsonl]\n", encoding="utf-8")
    accelerator = make_accelerator(TrainConfig(), LogConfig(report_to=["tensorboard"]), str(tmp_path))
    accelerator.end_training()
    found = {}
    for path in glob.glob(str(tmp_path / "logs" / "**" / "events.out*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        try:
            contents = events.PluginTagToContent("hparams").values()
        except KeyError:  # the scalars' file: the hparams go to a file of their own
            continue
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                found = {k: v.number_value if v.HasField("number_value") else v.string_value
                         for k, v in data.session_start_info.hparams.items()}
    assert found == {"stage": "sft", "train.lr": 0.001, "train.resume_from": "None", "data.train": "['a.jsonl']"}


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_key(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as caught:  # accelerate would only warn, and the run would track nothing
        make_accelerator(TrainConfig(), LogConfig(report_to=["tensorboard", "wandb"]), str(tmp_path))
    assert str(caught.value) == ("log.report_to: wandb is not installed (pip install wandb), "
                                 "or leave it out of log.report_to")
