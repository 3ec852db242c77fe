"""Ctrl-C stops a training run like SIGTERM: the step ends, a checkpoint is saved, one line says how to
resume, the exit status is 130 and no traceback is printed; a pipeline records the stage as interrupted.
Each test runs `lmforge` in a real subprocess and sends it SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.loop.checkpoint import list_checkpoints

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(process: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """The output up to and including the first line holding `marker`."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    process.kill()
    pytest.fail(f"no {marker!r} in the output:\n{''.join(seen)}")


def finish(process: subprocess.Popen, before: str) -> tuple[int, str]:
    rest, _ = process.communicate(timeout=120)
    return process.returncode, before + rest


def train_args(tokenizer: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # Many steps: the run is still training whenever the signal comes.
    return ["train", "sft", "model.scratch=test", f"model.tokenizer={tokenizer}", f"data.train={data}",
            f"train.output_dir={out}", "train.max_steps=100000", "train.batch_size=2", "data.eval_split=0",
            "sft.eval_generate=0", "log.report_to=[]", *extra]


def test_ctrl_c_saves_says_how_to_resume_and_exits_130(tmp_path, world_tokenizer_dir, world_dir):
    out = tmp_path / "run"
    process = start(train_args(world_tokenizer_dir, world_dir / "sft" / "train.jsonl", out), tmp_path)
    before = read_until(process, "train step 1/")
    process.send_signal(signal.SIGINT)
    code, output = finish(process, before)
    assert code == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    stop = [line for line in output.splitlines() if line.startswith("Ctrl-C: stopped at step")]
    assert len(stop) == 1, output
    step = int(stop[0].split("step ")[1].split(" ")[0])
    saved = out / "checkpoints" / f"checkpoint-{step}"
    assert stop[0] == (f"Ctrl-C: stopped at step {step} and saved {saved}; to continue, run the same command "
                       "with train.resume=true (lmforge run resumes a stage by itself)")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [saved.name]

    # the advice works: the same command with train.resume=true goes on from that step
    args = train_args(world_tokenizer_dir, world_dir / "sft" / "train.jsonl", out, "train.resume=true")
    resumed = start([a.replace("max_steps=100000", f"max_steps={step + 2}") for a in args], tmp_path)
    code, output = finish(resumed, "")
    assert code == 0, output
    assert f"resumed from {saved} at step {step}" in output
    assert f"train step {step + 2}/{step + 2}" in output


def test_ctrl_c_twice_stops_at_once_without_saving(tmp_path, world_tokenizer_dir, world_dir):
    out = tmp_path / "run"
    process = start(train_args(world_tokenizer_dir, world_dir / "sft" / "train.jsonl", out), tmp_path)
    before = read_until(process, "train step 1/")
    process.send_signal(signal.SIGINT)
    before += read_until(process, "Ctrl-C: stopping after this step")
    process.send_signal(signal.SIGINT)
    code, output = finish(process, before)
    assert code == 130 and "Traceback" not in output, output
    assert "Ctrl-C again: stopped at step" in output or "Ctrl-C: stopped at step" in output, output


def test_ctrl_c_in_a_pipeline_marks_the_stage_interrupted_with_resume_advice(tmp_path, world_tokenizer_dir,
                                                                               world_dir):
    pipeline = tmp_path / "p.yaml"
    config = {"model": {"scratch": "test", "tokenizer": str(world_tokenizer_dir)},
              "data": {"train": [str(world_dir / "sft" / "train.jsonl")], "eval_split": 0},
              "train": {"max_steps": 100000, "batch_size": 2}, "sft": {"eval_generate": 0},
              "log": {"report_to": []}}
    pipeline.write_text(json.dumps({"run_dir": str(tmp_path / "runs"),
                                    "stages": [{"name": "sft", "stage": "sft", "config": config}]}))
    process = start(["run", str(pipeline)], tmp_path)
    before = read_until(process, "train step 1/")
    process.send_signal(signal.SIGINT)
    code, output = finish(process, before)
    assert code == 130 and "Traceback" not in output, output
    stage = json.loads((tmp_path / "runs" / "run.json").read_text())["stages"][0]
    assert stage["status"] == "interrupted"
    assert stage["note"] == f"stopped by Ctrl-C; lmforge run {pipeline} resumes it"
    summary = [line for line in output.splitlines() if line.startswith("sft ")]
    assert summary and "interrupted" in summary[-1] and f"lmforge run {pipeline} resumes it" in summary[-1], output
