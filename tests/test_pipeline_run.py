"""The pipeline as a whole: evaluation after each stage, run.json, the report, --from/--only, and a
run killed in the middle of PPO that resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_pipeline_cli import PIPELINE, manifest

from lmforge.cli import main
from lmforge.loop.checkpoint import list_checkpoints

QUIET = {"report_to": [], "progress": False}


def rl_pipeline(run: Path, ppo_steps: int = 2) -> dict:
    spec = json.loads(json.dumps(PIPELINE))
    spec["run_dir"] = str(run)
    spec["stages"] += [
        {"name": "rm", "stage": "rm", "from": "sft", "config": {
            "data": {"train": ["${run_dir}/world/pref/train.jsonl"], "max_length": 96},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3}, "log": QUIET}},
        {"name": "ppo", "stage": "ppo", "from": "sft", "reward_model": "rm", "config": {
            "data": {"train": ["${run_dir}/world/rl/train.jsonl"], "max_length": 96},
            "rl": {"prompts_per_step": 4, "max_new_tokens": 8},
            "train": {"max_steps": ppo_steps, "batch_size": 4, "lr": 1e-4, "save_steps": 1}, "log": QUIET}},
        {"name": "dpo", "stage": "dpo", "from": "sft", "config": {
            "data": {"train": ["${run_dir}/world/pref/train.jsonl"], "max_length": 96},
            "dpo": {"eval_generate": 0},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4}, "log": QUIET}},
    ]
    spec["eval"] = {"perplexity": "${run_dir}/world/pt/eval.txt", "answers": "${run_dir}/world/rl/eval.jsonl",
                    "pairs": "${run_dir}/world/pref/eval_seen.jsonl", "reward_model": "rm", "baseline": "sft",
                    "max_samples": 8, "max_new_tokens": 8, "block_size": 64}
    return spec


def write(tmp_path: Path, spec: dict, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def test_pipeline_evaluates_every_stage_reports_and_reruns_parts(tmp_path, capsys):
    run = tmp_path / "run"
    path = write(tmp_path, rl_pipeline(run))
    assert main(["run", str(path)]) == 0
    state = json.loads((run / "run.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 5
    assert yaml.safe_load((run / "pipeline.yaml").read_text())["stages"][4]["config"]["data"]["train"] == \
        [f"{run}/world/pref/train.jsonl"]  # resolved: ${run_dir} filled in
    evals = {name: manifest(run, name)["eval"]["metrics"] for name in ("pt", "sft", "rm", "ppo", "dpo")}
    assert set(evals["rm"]) == {"rm_accuracy", "rm_margin"}
    assert {"perplexity", "exact_match", "reward"} <= set(evals["sft"])  # reward added once the RM existed
    for policy in ("ppo", "dpo"):
        assert {"kl", "win_rate", "gt_win_rate", "reward"} <= set(evals[policy])
        assert evals[policy]["wins"] + evals[policy]["ties"] + evals[policy]["losses"] == 8
    assert state["start_eval"]["metrics"]["perplexity"] == pytest.approx(
        manifest(run, "pt")["metrics"]["initial_eval_ppl"])
    report = (run / "report.html").read_text()
    assert all(name in report for name in ("ppo", "dpo", "win_rate"))
    out = capsys.readouterr().out
    assert "summary" in out and "report:" in out

    # Nothing changed: every stage is skipped and nothing is evaluated again.
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") >= 5 and "evaluating" not in out
    sft_manifest = manifest(run, "sft")

    # --only reruns one stage (its old folder kept); the others stay as they were.
    assert main(["run", str(path), "--only", "dpo"]) == 0
    assert (run / "dpo.old-1" / "lmforge.json").is_file()
    assert manifest(run, "sft") == sft_manifest
    # --from reruns a stage and everything after it.
    assert main(["run", str(path), "--from", "ppo"]) == 0
    assert (run / "ppo.old-1").is_dir() and (run / "dpo.old-2").is_dir()
    assert main(["run", str(path), "--only", "nope"]) == 2


def test_pipeline_killed_in_ppo_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    spec = rl_pipeline(straight, ppo_steps=8)
    spec.pop("eval")
    spec["stages"] = spec["stages"][:4]
    assert main(["run", str(write(tmp_path, spec, "straight.yaml")), "--no-report"]) == 0

    spec["run_dir"] = str(killed)
    path = write(tmp_path, spec, "killed.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "run", str(path), "--no-report"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(killed / "ppo" / "checkpoints") and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list_checkpoints(killed / "ppo" / "checkpoints") and not (killed / "ppo" / "lmforge.json").exists(), \
        "the run was meant to be killed in the middle of PPO"

    capsys.readouterr()
    assert main(["run", str(path), "--no-report"]) == 0
    assert "resumed from" in capsys.readouterr().out  # continued from the checkpoint, not from the start
    state = json.loads((killed / "run.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["skipped", "skipped", "skipped", "done"]
    resumed = load_file(str(killed / "ppo" / "model.safetensors"))
    expected = load_file(str(straight / "ppo" / "model.safetensors"))
    assert resumed.keys() == expected.keys()
    assert all((resumed[k] == expected[k]).all() for k in expected)


def test_a_field_added_since_a_stage_ran_does_not_make_it_stale():
    import copy

    from lmforge.artifacts import comparable_config as _comparable
    from lmforge.config.load import load_config, to_dict

    recorded = to_dict(load_config(None, ["model.scratch=test", "model.tokenizer=tok", "data.train=x.jsonl"],
                                   stage="sft"))
    older = copy.deepcopy(recorded)
    del older["train"]["compile"]  # written by an lmforge that did not have this field yet
    assert _comparable(older) == _comparable(recorded)
    changed = copy.deepcopy(older)
    changed["train"]["lr"] = recorded["train"]["lr"] * 2
    assert _comparable(changed) != _comparable(recorded)
