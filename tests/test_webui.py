"""The web UI's logic: the Train form as config and YAML, path checks, the masked-token preview, and runs
started from the UI equal to the same YAML run from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmforge.config.schema import ConfigError
from lmforge.webui.forms import (
    TrainForm,
    checked_path,
    config_to_form,
    form_to_config,
    from_yaml,
    preview_html,
    to_yaml,
)
from lmforge.webui.runs import Launcher, curves, list_runs


@pytest.fixture
def root(world_dir) -> Path:
    return world_dir.parent  # the session's temporary folder: world, tokenizer and runs under it


def tiny_sft_form(world_dir, world_tokenizer_dir, root, out: str) -> TrainForm:
    return TrainForm(stage="sft", model="scratch:test", tokenizer=str(world_tokenizer_dir.relative_to(root)),
                     data=str((world_dir / "sft" / "train.jsonl").relative_to(root)), method="full", lr=3e-3,
                     epochs=0.05, batch_size=4, max_length=128, output_dir=out, seed=7)


def test_form_config_yaml_round_trip_and_errors(world_dir, world_tokenizer_dir, root):
    form = tiny_sft_form(world_dir, world_tokenizer_dir, root, "webui-runs/a")
    config = form_to_config(form, root)
    assert config["model"] == {"scratch": "test", "tokenizer": form.tokenizer}
    assert config_to_form(from_yaml(to_yaml(config))) == form
    lora = form_to_config(TrainForm(**{**form.__dict__, "method": "lora", "lora_r": 4}), root)
    assert lora["model"]["finetuning"] == "lora" and lora["lora"] == {"r": 4}
    with pytest.raises(ConfigError, match="no such file"):
        form_to_config(TrainForm(**{**form.__dict__, "data": "missing.jsonl"}), root)
    with pytest.raises(ConfigError, match="batch_size"):
        form_to_config(TrainForm(**{**form.__dict__, "batch_size": 0}), root)
    with pytest.raises(ConfigError, match="does not parse"):
        from_yaml("stage: [sft")


def test_typed_paths_cannot_leave_the_served_folder(root):
    with tempfile.TemporaryDirectory() as elsewhere:
        outside = Path(elsewhere)
        (outside / "secret.txt").write_text("no")
        link = root / "link-out"
        link.unlink(missing_ok=True)
        link.symlink_to(outside)
        for bad in ("../../etc/passwd", "/etc/passwd", str(outside / "secret.txt"), "link-out/secret.txt"):
            with pytest.raises(ConfigError, match="outside the folder"):
                checked_path(bad, root)
        link.unlink()
    assert checked_path("webui-runs/new", root, must_exist=False) == "webui-runs/new"


def test_preview_marks_the_tokens_that_carry_loss(world_dir, world_tokenizer_dir, root):
    config = form_to_config(tiny_sft_form(world_dir, world_tokenizer_dir, root, "webui-runs/p"), root)
    page = preview_html(config, root, limit=2)
    first = json.loads((world_dir / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    reply = first["messages"][-1]["content"]
    assert page.count('class="record"') == 2
    marked = page.split('<mark class="loss">')[1].split("</mark>")[0]
    assert reply.split()[0] in marked  # the reply carries loss
    masked = page.split('<span class="masked">')[1].split("</span>")[0]
    assert first["messages"][0]["content"].split()[0] in masked  # the question does not


def final_loss(run: Path) -> float:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]["loss"]


@pytest.mark.slow
def test_a_run_started_in_the_ui_equals_the_cli_run(world_dir, world_tokenizer_dir, root):
    form = tiny_sft_form(world_dir, world_tokenizer_dir, root, "webui-runs/ui")
    config = form_to_config(form, root)
    launcher = Launcher()
    run = launcher.start("sft", to_yaml(config), root / config["train"]["output_dir"], root)
    assert launcher.state(run) == "running"
    deadline = time.time() + 300
    while launcher.state(run) == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert launcher.state(run) == "done", (run / "webui-train.log").read_text()[-2000:]
    listed = {r.name: r for r in list_runs(root / "webui-runs", launcher)}
    assert listed["ui"].status == "done" and listed["ui"].stage == "sft" and listed["ui"].step > 0
    assert any(p["metric"] == "loss" for p in curves(run))

    cli_yaml = root / "cli.yaml"
    cli_yaml.write_text(to_yaml({**config, "train": {**config["train"], "output_dir": "webui-runs/cli"}}))
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", "sft", str(cli_yaml), "log.progress=false"],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final_loss(run) == final_loss(root / "webui-runs" / "cli")  # same code, same seed: the same loss


def test_stopping_a_run_started_in_the_ui(world_dir, world_tokenizer_dir, root):
    form = tiny_sft_form(world_dir, world_tokenizer_dir, root, "webui-runs/stopped")
    form.epochs = 50.0
    config = form_to_config(form, root)
    launcher = Launcher()
    run = launcher.start("sft", to_yaml(config), root / config["train"]["output_dir"], root)
    time.sleep(2)
    assert launcher.stop(run) and launcher.state(run) == "stopped"
    assert not launcher.stop(run)  # already stopped


def test_pipeline_tab_reads_each_stage_state_from_run_json(tmp_path):
    from lmforge.webui.runs import pipeline_stages

    pipeline = tmp_path / "demo.yaml"
    text = (Path(__file__).resolve().parent.parent / "examples" / "demo.yaml").read_text(encoding="utf-8")
    pipeline.write_text(text, encoding="utf-8")
    before = pipeline_stages(pipeline, tmp_path)
    assert [row[0] for row in before][:3] == ["pt", "sft", "rm"] and {row[2] for row in before} == {"pending"}
    import yaml

    run_dir = tmp_path / yaml.safe_load(text)["run_dir"]
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"stages": [{"name": "pt", "status": "done", "seconds": 12.34},
                                                            {"name": "sft", "status": "running", "seconds": 3.0}]}))
    after = {row[0]: row for row in pipeline_stages(pipeline, tmp_path)}
    assert after["pt"][2:] == ["done", 12.3] and after["sft"][2] == "running" and after["rm"][2] == "pending"


def test_datasets_by_dataset_info_entry(root):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory"
    target = root / "llamafactory"
    if not target.exists():
        shutil.copytree(shared, target)  # inside the served folder, as a user's data folder would be
    form = TrainForm(stage="sft", model="smollm2-135m-instruct", data="alpaca_en_demo, identity",
                     dataset_dir="llamafactory", output_dir="webui-runs/named")
    config = form_to_config(form, root)
    assert config["data"]["train"] == [{"name": "alpaca_en_demo"}, {"name": "identity"}]
    assert config["data"]["dataset_dir"] == "llamafactory"
    assert config_to_form(from_yaml(to_yaml(config))).data == "alpaca_en_demo, identity"
    with pytest.raises(ConfigError, match="nor an entry"):
        form_to_config(TrainForm(**{**form.__dict__, "data": "no_such_entry"}), root)


def test_curves_and_report_of_a_pipeline_stage(tmp_path):
    from lmforge.webui.runs import report_for

    stage = tmp_path / "pipeline" / "dpo"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 0.69, "rewards/accuracy": 0.5, "rewards/margin": 0.0},
        {"step": 20, "loss": 0.41, "rewards/accuracy": 0.8, "rewards/margin": 1.2},
        {"step": 20, "eval_loss": 0.45, "eval_rewards/accuracy": 0.75}]) + "\n{\"step\": 30, \"lo")  # a line being written
    points = curves(stage)
    assert {p["metric"] for p in points} == {"loss", "rewards/accuracy", "rewards/margin", "eval_loss",
                                             "eval_rewards/accuracy"}
    assert [p["value"] for p in points if p["metric"] == "rewards/accuracy"] == [0.5, 0.8]
    assert report_for(stage) is None
    (tmp_path / "pipeline" / "report.html").write_text("<html></html>")
    assert report_for(stage) == tmp_path / "pipeline" / "report.html"
