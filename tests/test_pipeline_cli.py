"""The command line and the pipeline runner: skip what is done, set aside what is stale, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main

PIPELINE = {
    "run_dir": None,
    "demo_world": {"seed": 1},
    "tokenizer": {"train": ["${run_dir}/world/pt/train.txt"], "vocab_size": 600, "split_han_chars": True},
    "stages": [
        {"name": "pt", "stage": "pt", "config": {
            "model": {"scratch": "test", "tokenizer": "${run_dir}/tokenizer"},
            "data": {"train": ["${run_dir}/world/pt/train.txt"], "eval": ["${run_dir}/world/pt/eval.txt"]},
            "pt": {"block_size": 64},
            "train": {"max_steps": 12, "batch_size": 4, "lr": 3e-3},
            "log": {"report_to": [], "progress": False}}},
        {"name": "sft", "stage": "sft", "from": "pt", "config": {
            "data": {"train": ["${run_dir}/world/sft/train.jsonl"], "eval": ["${run_dir}/world/sft/eval.jsonl"],
                     "max_length": 96},
            "sft": {"eval_generate": 4, "max_new_tokens": 8},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3},
            "log": {"report_to": [], "progress": False}}},
    ],
}


def write_pipeline(tmp_path: Path, sft_lr: float = 3e-3) -> Path:
    spec = json.loads(json.dumps(PIPELINE))
    spec["run_dir"] = str(tmp_path / "run")
    spec["stages"][1]["config"]["train"]["lr"] = sft_lr
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "lmforge.json").read_text())


def test_pipeline_runs_skips_and_sets_aside_stale_stages(tmp_path, capsys):
    path = write_pipeline(tmp_path)
    run = tmp_path / "run"
    assert main(["run", str(path)]) == 0
    first_pt, first_sft = manifest(run, "pt"), manifest(run, "sft")
    assert first_sft["parent"] == str(run / "pt")
    assert first_pt["metrics"]["eval_loss"] < first_pt["metrics"]["initial_eval_loss"]

    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("done before with the same config, skipped") == 2
    assert manifest(run, "sft") == first_sft

    # A changed SFT config reruns SFT only; the old SFT folder is kept, not deleted.
    assert main(["run", str(write_pipeline(tmp_path, sft_lr=1e-3))]) == 0
    assert manifest(run, "pt") == first_pt
    assert manifest(run, "sft")["config"]["train"]["lr"] == 1e-3
    assert manifest(run / "sft.old-1", "")["config"]["train"]["lr"] == 3e-3


def test_pipeline_config_errors_before_anything_runs(tmp_path):
    spec = json.loads(json.dumps(PIPELINE))
    spec["run_dir"] = str(tmp_path / "run")
    spec["stages"][1]["config"]["train"]["lrate"] = 1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "run").exists()


def test_data_inspect_marks_loss_tokens(tmp_path, world_dir, world_tokenizer_dir, capsys):
    code = main(["data", "inspect", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                 f"data.train={world_dir}/sft/eval.jsonl", "--stage", "sft", "-n", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("tokens,") == 2
    assert "<|im_start|>" in out and "legend" in out
    assert "\ufffd" not in out  # Chinese characters split across byte-level tokens decode whole


def test_data_inspect_without_a_terminal_marks_loss_in_text_and_keeps_the_header_whole(tmp_path, world_dir,
                                                                                       world_tokenizer_dir, capsys):
    deep = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2) / "eval.jsonl"
    deep.parent.mkdir()
    deep.write_text((world_dir / "sft" / "eval.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    code = main(["data", "inspect", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                 f"data.train={deep}", "--stage", "sft", "-n", "1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()  # capsys is no terminal: as under nohup or a pipe
    assert lines[0].startswith(f"--- {deep}:line 1  ") and lines[0].endswith(" with loss")
    body = "\n".join(lines[1:-1])
    assert "<|im_start|>assistant\n[[" in body and body.rstrip().endswith("<|im_end|>]]")
    assert lines[-1] == "legend: [[...]] carries loss, the rest is masked (-100)"


def test_eval_shows_only_the_suites_asked_for_and_keeps_the_others_stored(base, world_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(base, model)
    assert main(["eval", str(model), "--answers", str(world_dir / "rl" / "eval.jsonl"), "--max-samples", "3",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", str(model), "--perplexity", str(world_dir / "pt" / "eval.txt"), "--max-samples", "3"]) == 0
    shown = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
             and not line.startswith("  saved")]
    assert shown == ["perplexity", "eval_tokens"]  # before: exact_match, contains, ... from the earlier run too
    stored = json.loads((model / "lmforge.json").read_text())["eval"]
    assert set(stored["suites"]) == {"answers", "perplexity"} and "exact_match" in stored["metrics"]


def test_bad_record_is_reported_with_file_and_line(tmp_path, world_tokenizer_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n', encoding="utf-8")
    code = main(["train", "sft", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                 f"data.train={data}", f"train.output_dir={tmp_path / 'out'}", "log.report_to=[]"])
    assert code == 2  # 1 bad record in 2 is more than data.max_bad_fraction (0.05) allows
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"error: {data}:file: 1 of 2 records are bad (50%, more than data.max_bad_fraction=0.05); the first: "
        "line 2: missing field 'output'; fix them or raise data.max_bad_fraction")


def test_streaming_pt_trains_to_max_steps(tmp_path, world_dir, world_tokenizer_dir):
    out = tmp_path / "out"
    code = main(["train", "pt", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                 f"data.train={world_dir}/pt/train.txt", f"data.eval={world_dir}/pt/eval.txt",
                 "data.streaming=true", "pt.block_size=64", "train.max_steps=8", "train.batch_size=4",
                 f"train.output_dir={out}", "log.report_to=[]", "log.progress=false"])
    assert code == 0
    metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]


def test_tokenizer_commands(tmp_path, world_dir):
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", f"{world_dir}/pt/train.txt", "--vocab-size", "500",
                 "--out", str(tok)]) == 0
    words = tmp_path / "words.txt"
    words.write_text("Zorblax\n量子纠缠\n", encoding="utf-8")
    assert main(["tokenizer", "extend", str(tok), "--tokens", str(words), "--out", str(tmp_path / "ext")]) == 0
    from transformers import AutoTokenizer

    extended = AutoTokenizer.from_pretrained(tmp_path / "ext")
    assert len(extended.encode("Zorblax", add_special_tokens=False)) == 1
    assert len(extended) == len(AutoTokenizer.from_pretrained(tok)) + 2


@pytest.mark.slow
def test_smollm2_short_name_imports_the_gguf_once(tmp_path_factory, monkeypatch):
    from lmforge.config.schema import ModelConfig
    from lmforge.models.load import load_model_and_tokenizer, resolve_model_path
    from lmforge.rollout.generate import generate

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    folder = Path(resolve_model_path(cfg))
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert Path(resolve_model_path(cfg)) == folder  # cached: the second call converts nothing
    model, tokenizer, _ = load_model_and_tokenizer(cfg)
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    assert "<|im_start|>" in tokenizer.chat_template
    reply = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                     max_new_tokens=20)[0]
    assert "Paris" in reply.text and reply.stopped


def test_resume_shorthand_and_extend_with_model(tmp_path, world_dir, world_tokenizer_dir):
    from lmforge.cli import _split_config

    assert _split_config("resume=true", ["train.lr=1"]) == (None, ["train.resume=true", "train.lr=1"])
    out = tmp_path / "pt"
    assert main(["train", "pt", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                 f"data.train={world_dir}/pt/eval.txt", "data.eval_split=0", "train.max_steps=2",
                 f"train.output_dir={out}", "log.report_to=[]", "log.progress=false"]) == 0
    words = tmp_path / "words.txt"
    words.write_text("Zorblax\n", encoding="utf-8")
    assert main(["tokenizer", "extend", str(out), "--tokens", str(words), "--model", str(out),
                 "--out", str(tmp_path / "ext")]) == 0
    import torch
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "ext").get_input_embeddings().weight
    assert after.shape[0] == before.shape[0] + 1
    assert torch.allclose(after[-1], before.mean(dim=0), atol=1e-6)


def test_data_inspect_shows_pairs_for_preference_stages(world_dir, world_tokenizer_dir, capsys):
    code = main(["data", "inspect", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                 f"data.train={world_dir}/pref/eval.jsonl", "--stage", "rm", "-n", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "rejected:" in out and out.count("<|im_start|>assistant") == 2


def test_pipeline_rl_stage_reads_its_reward_model_by_name_and_reruns_when_it_changes(tmp_path, capsys):
    spec = json.loads(json.dumps(PIPELINE))
    run = tmp_path / "run"
    spec["run_dir"] = str(run)
    quiet = {"report_to": [], "progress": False}
    spec["stages"] += [
        {"name": "rm", "stage": "rm", "from": "sft", "config": {
            "data": {"train": ["${run_dir}/world/pref/train.jsonl"], "max_length": 96},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3}, "log": quiet}},
        {"name": "ppo", "stage": "ppo", "from": "sft", "reward_model": "rm", "config": {
            "data": {"train": ["${run_dir}/world/rl/train.jsonl"], "eval": ["${run_dir}/world/rl/eval.jsonl"],
                     "max_length": 96},
            "rl": {"prompts_per_step": 4, "max_new_tokens": 8, "eval_prompts": 4},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4}, "log": quiet}},
    ]
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0
    ppo = manifest(run, "ppo")
    assert ppo["config"]["rl"]["reward_model"] == str(run / "rm")
    assert set(ppo["input_manifests"]) == {str(run / "rm")}
    assert "train_reward/model" in ppo["metrics"] and "eval_kl" in ppo["metrics"]

    spec["stages"][2]["config"]["train"]["lr"] = 2e-3  # a retrained reward model makes PPO stale
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    assert capsys.readouterr().out.count("done before with the same config, skipped") == 2  # pt and sft
    assert manifest(run, "ppo")["input_manifests"] != ppo["input_manifests"]

    spec["stages"][3]["reward_model"] = "ppo"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2  # not an earlier stage: refused before anything runs
