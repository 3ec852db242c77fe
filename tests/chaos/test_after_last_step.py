"""SIGTERM after the last training step: in the final evaluation, the held-out answers, the final save or
the model write. The trained weights are in a checkpoint before any of these starts, so the signal stops
the run at once (exit 143, one line saying where the weights are) and `train.resume=true` evaluates and
writes the model without a single training step, bit for bit the model of an uninterrupted run.

A real `lmforge train dpo` process gets a real SIGTERM. To land it inside a given phase, the child
(test-only code below, never in lmforge) announces the phase on stdout and waits there; the wait only
holds the phase open, it computes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_harness import FULL, REPO, child_env
from safetensors.torch import load_file

from lmforge.loop.checkpoint import list_checkpoints, verify_checksums

PHASE = "PHASE "
TEST_ONLY_CHILD = r'''
import sys, time

def announce_and_hold(phase):
    print("PHASE " + phase, flush=True)
    time.sleep(120)  # the parent's SIGTERM ends it

phase = sys.argv[1]
if phase == "final_eval":
    from lmforge.loop.trainer import Trainer
    real_evaluate = Trainer.evaluate
    def evaluate(self):
        if self.state.step == self.total_steps:
            announce_and_hold(phase)
        return real_evaluate(self)
    Trainer.evaluate = evaluate
elif phase == "answers":
    import lmforge.stages.dpo as dpo
    real_answers, calls = dpo.held_out_answers, []
    def held_out_answers(*args):
        calls.append(1)
        if len(calls) == 2:  # the first call answers with the starting model, before training
            announce_and_hold(phase)
        return real_answers(*args)
    dpo.held_out_answers = held_out_answers
elif phase == "final_save":
    from lmforge.loop import checkpoint
    real_write = checkpoint._write
    def write(path, writer):
        real_write(path, writer)
        if path.parent.name.startswith(".tmp-checkpoint-4-") and path.name == "optimizer.pt":
            print("PHASE " + phase, flush=True)
            time.sleep(1)  # the signal arrives with the save half done; it must finish, then stop
    checkpoint._write = write
elif phase == "model_write":
    import lmforge.stages.common as common
    real_files = common.write_model_files
    def write_model_files(out, need, write):
        def held(folder):
            write(folder)
            announce_and_hold(phase)
        return real_files(out, need, held)
    common.write_model_files = write_model_files
from lmforge.cli import main
sys.exit(main(sys.argv[2:]))
'''


def dpo_args(world: Path, base: Path, out: Path) -> list[str]:
    return ["train", "dpo", f"model.name_or_path={base}", f"data.train={world}/pref/train.jsonl",
            "data.eval_split=0.2", "data.max_length=96", "dpo.eval_generate=2", "dpo.max_new_tokens=8",
            "train.batch_size=4", "train.max_steps=4", "train.save_steps=0", "train.lr=1e-3", "train.logging_steps=1",
            "log.report_to=[]", "log.progress=false", f"train.output_dir={out}"]


def run_child(phase: str, args: list[str], signal_at_phase: bool) -> tuple[int, str]:
    process = subprocess.Popen([sys.executable, "-c", TEST_ONLY_CHILD, phase, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=REPO)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if signal_at_phase and line.startswith(PHASE):
            process.send_signal(signal.SIGTERM)
    return process.wait(timeout=600), "".join(lines)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, world_dir, base) -> Path:
    out = tmp_path_factory.mktemp("straight")
    code, printed = run_child("none", dpo_args(world_dir, base, out), signal_at_phase=False)
    assert code == 0, printed
    return out


def train_lines(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


PHASES = ["final_eval", *(["model_write", "answers", "final_save"] if FULL else [])]  # CI: one; full: every phase


@pytest.mark.parametrize("phase", PHASES)
def test_sigterm_after_the_last_step_loses_nothing(tmp_path, world_dir, base, straight, phase):
    out = tmp_path / "dpo"
    args = dpo_args(world_dir, base, out)
    code, printed = run_child(phase, args, signal_at_phase=True)
    final = out / "checkpoints" / "checkpoint-4"
    assert code == 143, printed
    assert (f"SIGTERM after the last step: the trained weights are saved in {final}; train.resume=true "
            "evaluates and writes the model without training again") in printed, printed
    assert "Traceback" not in printed, printed
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]
    verify_checksums(final)
    assert not (out / "lmforge.json").exists() and not list(out.glob(".tmp-*"))
    assert not (out / "model.safetensors").exists()  # no half model that looks complete

    code, printed = run_child("none", [*args, "train.resume=true"], signal_at_phase=False)
    assert code == 0, printed
    assert f"resumed from {final} at step 4" in printed
    assert train_lines(out) == [1, 2, 3, 4]  # no step trained again, none logged twice
    expected, got = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
    reference = json.loads((straight / "lmforge.json").read_text())["metrics"]
    assert metrics.keys() == reference.keys()  # train_*, initial_* and eval_* all reported after the resume
    assert {k: v for k, v in metrics.items() if "tokens_per_s" not in k} == \
        {k: v for k, v in reference.items() if "tokens_per_s" not in k}
