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

from lmforge.config.errors import ConfigError
from lmforge.webui.forms import (
    TrainForm,
    checked_path,
    config_to_form,
    form_to_config,
    from_yaml,
    to_yaml,
)
from lmforge.webui.preview import preview_html
from lmforge.webui.runs import Launcher, list_runs
from lmforge.webui.watch import metric_series, read_metrics


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


def test_preview_of_a_pair_whose_prompt_leaves_no_room_shows_it_dropped(world_dir, world_tokenizer_dir, root):
    pairs = root / "long-prompt-pairs.jsonl"
    long = {"prompt": "tell me " * 400, "chosen": "yes", "rejected": "no"}
    short = {"prompt": "hi", "chosen": "hello there", "rejected": "go away"}
    pairs.write_text("\n".join(json.dumps(r) for r in (long, short)) + "\n", encoding="utf-8")
    form = tiny_sft_form(world_dir, world_tokenizer_dir, root, "webui-runs/pairs")
    config = form_to_config(TrainForm(**{**form.__dict__, "stage": "dpo", "data": pairs.name}), root)
    page = preview_html(config, root, limit=2)
    assert page.count("dropped:") == 1 and "no room" in page  # the stage would drop it and count it
    assert page.count('class="record"') == 2  # the short pair: chosen and rejected


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
    assert "loss" in metric_series(read_metrics(run))

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
    series = metric_series(read_metrics(stage))
    assert list(series) == ["loss", "eval_loss", "rewards/accuracy", "rewards/margin", "eval_rewards/accuracy"]
    assert series["rewards/accuracy"] == [(10.0, 0.5), (20.0, 0.8)]
    assert report_for(stage) is None
    (tmp_path / "pipeline" / "report.html").write_text("<html></html>")
    assert report_for(stage) == tmp_path / "pipeline" / "report.html"


# The web UI against a visitor who wants to run code (issue 19, point 1): the rules, without a server.
# tests/chaos/test_webui_hostile.py sends the same cases over HTTP to a running app.

PIPELINE = "run_dir: runs/p\nstages:\n  - name: sft\n    stage: sft\n    config:\n      model: {scratch: test, tokenizer: tok}\n" \
           "      data: {train: data/ok.jsonl}\n"


@pytest.fixture
def served(tmp_path) -> tuple[Path, Path]:
    """tmp/root is served; tmp/outside holds a secret that a dataset_info.json entry points at."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in ("model", "data", "info", "tok", "runs/r1", "pipelines"):
        (root / folder).mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    (root / "model" / "config.json").write_text("{}")
    (root / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "data" / "ok.jsonl").write_text('{"text": "hello"}\n')
    (root / "info" / "dataset_info.json").write_text(json.dumps({"escape": {"file_name": "../../outside/secret.jsonl"},
                                                                "ok": {"file_name": "../data/ok.jsonl"}}))
    (root / "runs" / "r1" / "webui-config.yaml").write_text("stage: sft\n")
    (root / "notes.yaml").write_text("todo: [write, tests]\n")
    return root.resolve(), outside


def test_save_writes_only_checked_pipelines_to_names_it_controls(served):
    from lmforge.webui.confine import Rules
    from lmforge.webui.saving import save_pipeline

    root, outside = served
    rules = Rules(root)
    refusals = {"modeling_x.py": "not a .yaml", "model/config.json": "not a .yaml", "model/x.yaml": "model's or a run's",
                "runs/r1/webui-config.yaml": "lmforge writes", "runs/r1/x.yaml": "model's or a run's",
                "notes.yaml": "not a pipeline", ".hidden.yaml": "hidden", "no/such/x.yaml": "no folder",
                "../x.yaml": "outside", "data/ok.jsonl": "not a .yaml", "": "type a file name"}
    for name, reason in refusals.items():
        with pytest.raises(ConfigError, match=reason):
            save_pipeline(name, PIPELINE, rules)
    assert (root / "notes.yaml").read_text() == "todo: [write, tests]\n"
    assert save_pipeline("pipelines/mine.yaml", PIPELINE, rules) == Path("pipelines/mine.yaml")
    changed = PIPELINE.replace("runs/p", "runs/q")
    assert save_pipeline("pipelines/mine.yaml", changed, rules) == Path("pipelines/mine.yaml")  # its own: replaced
    assert (root / "pipelines" / "mine.yaml").read_text() == changed
    for text, reason in [(PIPELINE.replace("tokenizer: tok}", "tokenizer: tok, trust_remote_code: true}"),
                          "trust_remote_code"), (PIPELINE.replace("runs/p", "../p"), "run_dir"),
                         ("a: &x [1]\nb: *x\n", "alias"), ("stages: [\n", "does not parse at line 2"),
                         ("x" * (300 << 10), "KiB")]:
        with pytest.raises(ConfigError, match=reason):
            save_pipeline("pipelines/mine.yaml", text, rules)
    assert (root / "pipelines" / "mine.yaml").read_text() == changed
    assert sorted(p.name for p in (root / "pipelines").iterdir()) == ["mine.yaml"]  # no scratch file left


STAGE = {"stage": "sft", "model": {"scratch": "test", "tokenizer": "tok"}, "data": {"train": "data/ok.jsonl"},
         "train": {"output_dir": "runs/new"}}


@pytest.mark.parametrize("change, key", [
    ({"model": {"name_or_path": "../outside"}}, "model.name_or_path"),
    ({"model": {"name_or_path": "model", "gguf_file": "../../outside/x.gguf"}}, "model.gguf_file"),
    ({"model": {"scratch": "test", "tokenizer": "/etc"}}, "model.tokenizer"),
    ({"model": {"name_or_path": "model", "trust_remote_code": True}}, "trust_remote_code"),
    ({"model": {"name_or_path": "model", "attn_implementation": "kernels-community/flash-attn"}}, "attn_implementation"),
    ({"model": {"name_or_path": "model", "template": "../../../x"}}, "model.template"),
    ({"data": {"train": "../outside/secret.jsonl"}}, "data.train"),
    ({"data": {"train": "data/../../outside/*.jsonl"}}, "data.train"),
    ({"data": {"train": "data/ok.jsonl", "eval": "../outside/secret.jsonl"}}, "data.eval"),
    ({"data": {"train": {"name": "escape"}, "dataset_dir": "info"}}, "file_name of 'escape'"),
    ({"data": {"train": {"name": "ok"}, "dataset_dir": "../outside"}}, "data.dataset_dir"),
    ({"train": {"output_dir": "../escaped"}}, "train.output_dir"),
    ({"train": {"output_dir": "."}}, "train.output_dir: the served folder"),
    ({"train": {"output_dir": "model"}}, "holds a model that no lmforge run wrote"),
    ({"train": {"output_dir": "runs/x", "resume_from": "/tmp"}}, "train.resume_from"),
    ({"stage": "ppo", "rl": {"reward_model": "../outside"}}, "rl.reward_model"),
    ({"stage": "distill", "distill": {"teacher": "../outside"}}, "distill.teacher"),
    ({"stage": "ppo", "rl": {"reward_model": "model", "critic_path": "/"}}, "rl.critic_path"),
    ({"stage": "grpo", "rl": {"num_generations": 2, "rewards": [{"kind": "model", "path": "../x"}]}}, "path"),
    ({"stage": "grpo", "rl": {"num_generations": 2, "rewards": [{"kind": "function", "function": "os:system"}]}},
     "function reward"),
])
def test_a_run_from_the_ui_stays_under_root_and_runs_no_code(served, change, key):
    from lmforge.config.load import from_dict
    from lmforge.config.schema import StageConfig
    from lmforge.webui.confine import Rules, check_stage

    root, _ = served
    raw = {**STAGE, **change}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        check_stage(from_dict(StageConfig, json.loads(json.dumps(raw)), where="x"), Rules(root), "x")


def test_remote_code_only_with_the_flag_and_the_plain_config_passes(served):
    from lmforge.config.load import from_dict
    from lmforge.config.schema import StageConfig
    from lmforge.webui.confine import Rules, check_stage

    root, _ = served
    plain = from_dict(StageConfig, {**STAGE, "data": {"train": {"name": "ok"}, "dataset_dir": "info"}}, where="x")
    assert check_stage(plain, Rules(root), "x") is plain
    remote = from_dict(StageConfig, {**STAGE, "model": {"name_or_path": "model", "trust_remote_code": True}}, where="x")
    with pytest.raises(ConfigError, match="--allow-remote-code"):
        check_stage(remote, Rules(root), "x")
    assert check_stage(remote, Rules(root, allow_code=True), "x") is remote


def test_host_names_the_web_ui_answers():
    from lmforge.webui.hosts import allowed_names, host_name

    assert [host_name(h) for h in (b"localhost:7860", b"[::1]:7860", b"LOCALHOST", b"evil.example:80", b"a b",
                                   b"x:y", b"127.0.0.1:123456", b"")] == \
        ["localhost", "::1", "localhost", "evil.example", None, None, None, None]
    assert allowed_names("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_names("0.0.0.0", ["lab.example.org"]) == {"localhost", "127.0.0.1", "::1", "lab.example.org"}
    assert "10.1.2.3" in allowed_names("10.1.2.3")
    with pytest.raises(ConfigError, match="allowed-host"):
        allowed_names("0.0.0.0", ["http://evil/"])


def test_a_root_holding_gradios_upload_folder_is_refused(tmp_path, monkeypatch):
    from lmforge.webui.app import launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "served" / "uploads"))
    with pytest.raises(ConfigError, match="upload folder"):  # before anything listens
        launch(root=str(tmp_path / "served"), port=1)
    with pytest.raises(ConfigError, match="--auth"):
        launch(root=str(tmp_path), host="0.0.0.0", port=1)


def test_runs_table_survives_damaged_and_hostile_run_folders(tmp_path):
    from lmforge.webui.runs import recorded_stage

    runs = tmp_path / "runs"
    cases = {
        "good-manifest": ("lmforge.json", '{"stage": "dpo"}'),
        "good-config": ("config.yaml", "stage: sft\ntrain: {lr: 0.001}\n"),
        "bad-json": ("lmforge.json", '{"stage": '),
        "list-json": ("lmforge.json", '["stage"]'),
        "deep-yaml": ("config.yaml", "[" * 5000),
        "laughs": ("config.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))),
        "not-utf8": ("config.yaml", b"\xff\xfe stage: sft"),
        "stage-not-text": ("config.yaml", "stage: [1, 2]\n"),
    }
    for name, (file, text) in cases.items():
        (runs / name).mkdir(parents=True)
        target = runs / name / file
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
    stages = {name: recorded_stage(runs / name) for name in cases}
    assert stages == {"good-manifest": "dpo", "good-config": "sft", **{n: "?" for n in list(cases)[2:]}}
    listed = sorted(r.stage for r in list_runs(runs, Launcher()))  # the whole table, not one error
    assert listed == sorted(stages.values())


def test_a_run_stopped_from_outside_the_ui_shows_as_stopped_not_failed(tmp_path):
    from lmforge.webui.runs import Launcher

    launcher = Launcher()
    for code, state in ((130, "stopped"), (143, "stopped"), (1, "failed"), (0, "done")):
        run = tmp_path / str(code)
        launcher.processes[run.resolve()] = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
        launcher.processes[run.resolve()].wait()
        assert launcher.state(run) == state
