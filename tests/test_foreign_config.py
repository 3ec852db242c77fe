"""LLaMA-Factory and TRL configs read as they are (`lmforge train CONFIG.yaml`) and converted (`lmforge convert`):
every key that maps lands on the right lmforge key, the tool's own defaults are kept, and what cannot map is
listed in one message."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA

import lmforge
from lmforge.cli import main
from lmforge.config.errors import ConfigError
from lmforge.config.foreign import detect_format, load_stage_config
from lmforge.config.foreign_docs import mapping_markdown
from lmforge.config.foreign_keys import COMMON, LLAMAFACTORY, TRL, Special, Target
from lmforge.config.load import load_config, schema_dataclasses, to_dict
from lmforge.config.schema import StageConfig

ROOT = Path(__file__).resolve().parents[1]
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="LLaMA-Factory's demo data is not beside the repo")

# LLaMA-Factory's examples/train_lora/llama3_lora_{sft,dpo,kto}.yaml, as its docs give them (dataset_dir added).
LF_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
dataset_dir: {data}
template: {template}
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""
LF_DPO = LF_SFT.replace("stage: sft", "stage: dpo").replace("lora_target: all", "lora_target: all\npref_beta: 0.1\n"
                        "pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]").replace(
    "dataset: identity,alpaca_en_demo", "dataset: dpo_en_demo").replace("learning_rate: 1.0e-4", "learning_rate: 5.0e-6")
LF_KTO = LF_SFT.replace("stage: sft", "stage: kto").replace("lora_target: all", "lora_target: all\npref_beta: 0.1").replace(
    "dataset: identity,alpaca_en_demo", "dataset: kto_en_demo").replace("learning_rate: 1.0e-4", "learning_rate: 5.0e-6") \
    + "\n### eval\nval_size: 0.1\nper_device_eval_batch_size: 1\neval_strategy: steps\neval_steps: 500\n"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def lf(tmp_path: Path, text: str = LF_SFT, **fields) -> Path:
    values = {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "data": SHARED_DATA, "template": "llama3",
              "out": tmp_path / "saves", **fields}
    return write(tmp_path, text.format(**values), "lf.yaml")


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "Traceback" not in text and text.startswith("error:") and "\n" not in text, text
    return text


@needs_shared
def test_llamafactory_sft_example_converts_field_by_field(tmp_path, capsys):
    source, out = lf(tmp_path), tmp_path / "lmforge.yaml"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    assert "run it: lmforge train" in capsys.readouterr().out
    cfg = load_config(out)
    assert cfg.stage == "sft"
    assert (cfg.model.name_or_path, cfg.model.trust_remote_code) == ("meta-llama/Meta-Llama-3-8B-Instruct", True)
    assert (cfg.model.finetuning, cfg.model.template, cfg.model.gradient_checkpointing) == ("lora", "llama3", True)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16, 0.0, "all-linear")
    assert [(d.name, d.max_samples) for d in cfg.data.train] == [("identity", 1000), ("alpaca_en_demo", 1000)]
    assert (cfg.data.dataset_dir, cfg.data.max_length, cfg.data.eval_split) == (str(SHARED_DATA), 2048, 0.0)
    t = cfg.train
    assert (t.output_dir, t.logging_steps, t.save_steps) == (str(tmp_path / "saves"), 10, 500)
    assert (t.batch_size, t.grad_accum, t.lr, t.epochs, t.max_steps) == (1, 8, 1e-4, 3.0, -1)
    assert (t.scheduler, t.min_lr_ratio, t.warmup_ratio, t.mixed_precision) == ("cosine", 0.0, 0.1, "bf16")
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay) == (0.9, 0.999, 0.0)  # transformers' AdamW defaults
    text = out.read_text(encoding="utf-8")
    for ignored in ("do_train", "overwrite_cache", "preprocessing_num_workers", "plot_loss", "overwrite_output_dir",
                    "ddp_timeout"):
        assert f"#   {ignored}: " in text
    # Reading the LLaMA-Factory file directly gives the same config as the converted file.
    direct, conversion = load_stage_config(source, [], None)
    assert conversion is not None and to_dict(direct) == to_dict(cfg)


@needs_shared
def test_llamafactory_dpo_and_kto_examples_convert(tmp_path):
    dpo, _ = load_stage_config(lf(tmp_path, LF_DPO), [], None)
    assert (dpo.stage, dpo.dpo.loss, dpo.dpo.beta, dpo.train.lr) == ("dpo", "sigmoid", 0.1, 5e-6)
    assert [d.name for d in dpo.data.train] == ["dpo_en_demo"]
    kto, _ = load_stage_config(lf(tmp_path, LF_KTO), [], None)
    assert (kto.stage, kto.dpo.loss, kto.dpo.beta) == ("dpo", "kto", 0.1)
    assert (kto.data.eval_split, kto.train.eval_steps) == (0.1, 500)
    orpo, _ = load_stage_config(lf(tmp_path, LF_DPO.replace("pref_loss: sigmoid", "pref_loss: orpo")), [], None)
    assert (orpo.dpo.loss, orpo.dpo.orpo_lambda) == ("orpo", 0.1)


def test_units_and_choices_convert(tmp_path):
    """warmup_steps is a share of max_steps; transformers' schedules decay to 0; LLaMA-Factory's cutoff_len is
    the block size in PT; its defaults apply where the file is silent."""
    path = write(tmp_path, "model_name_or_path: m\nstage: pt\nfinetuning_type: full\nmax_steps: 200\n"
                           "warmup_steps: 50\nlr_scheduler_type: cosine_with_min_lr\n"
                           "lr_scheduler_kwargs: {min_lr_rate: 0.2}\ncutoff_len: 1024\nreport_to: none\nseed: 7\n"
                           "save_strategy: 'no'\nflash_attn: fa2\nquantization_bit: null\n")
    cfg, conversion = load_stage_config(path, [], None)
    assert (cfg.stage, cfg.model.finetuning, cfg.train.max_steps) == ("pt", "full", 200)
    assert (cfg.train.warmup_ratio, cfg.train.scheduler, cfg.train.min_lr_ratio) == (0.25, "cosine", 0.2)
    assert (cfg.pt.block_size, cfg.data.max_length, cfg.log.report_to) == (1024, 512, [])
    assert (cfg.train.seed, cfg.data.seed, cfg.train.save_steps) == (7, 7, 0)
    assert cfg.model.attn_implementation == "flash_attention_2"
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.scheduler) == (5e-5, 3.0, 8, "cosine")
    assert ("train.lr", 5e-5) in conversion.defaults and ("data.eval_split", 0.0) in conversion.defaults
    lora, _ = load_stage_config(write(tmp_path, "model_name_or_path: m\nstage: sft\nlora_rank: 4\nuse_dora: true\n"
                                                "lora_target: q_proj, v_proj\n"), [], None)
    assert (lora.model.finetuning, lora.lora.r, lora.lora.alpha, lora.lora.target_modules) == \
        ("dora", 4, 8, ["q_proj", "v_proj"])  # LLaMA-Factory's finetuning_type default is lora; alpha 2 x rank


def test_unmappable_keys_are_listed_in_one_message(tmp_path, capsys):
    path = write(tmp_path, "model_name_or_path: m\nstage: sft\ndeepspeed: ds_z3.json\nuse_badam: true\n"
                           "rope_scaling: linear\nval_size: 100\ntemplate: vicuna\nmy_own_key: 1\n"
                           "lr_scheduler_type: polynomial\nlearning_rate: 1.0e-4\n")
    text = one_line_error(capsys, ["train", str(path)])
    assert "7 LLaMA-Factory settings that lmforge cannot take" in text
    for key, advice in (("deepspeed", "accelerate launch"), ("use_badam", "finetuning"), ("rope_scaling", "remove"),
                        ("val_size", "fraction"), ("template", "leave `template` out"), ("my_own_key", "remove"),
                        ("lr_scheduler_type", "cosine")):
        assert f"{key}: " in text and advice in text.split(f"{key}: ", 1)[1], key
    assert "learning_rate" not in text
    assert one_line_error(capsys, ["convert", str(path)]) == text  # convert lists the same


@pytest.mark.parametrize("body, words", [
    ("model_name_or_path: m\nstage: sft\nlearning_rate: fast\n", ["train.lr", "learning_rate"]),
    ("model_name_or_path: m\nstage: sft\nlora_rank: [8]\n", ["lora.r", "lora_rank"]),
    ("model_name_or_path: m\nstage: sft\ndataset: 5\n", ["dataset", "comma-separated"]),
    ("model_name_or_path: m\nstage: sft\nbf16: 'yes'\n", ["bf16", "true/false"]),
    ("model_name_or_path: m\nstage: grpo\n", ["stage", "not a LLaMA-Factory stage", "lmforge train grpo"]),
    ("model_name_or_path: m\nstage: [sft]\n", ["stage", "not a LLaMA-Factory stage"]),
    ("model_name_or_path: m\nstage: sft\nflash_attn: {a: 1}\n", ["flash_attn", "is not one of"]),
    ("stage: sft\nmodel: {scratch: test}\nlearning_rate: 1.0e-4\n", ["mixes lmforge groups (model)",
                                                                     "learning_rate (lmforge: train.lr)"]),
    ("- model_name_or_path: m\n- stage: sft\n", ["top level must be a mapping, got list"]),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: oft\n", ["finetuning_type", "lora, full or freeze"]),
])
def test_hostile_configs_fail_in_one_line(tmp_path, capsys, body, words):
    text = one_line_error(capsys, ["train", str(write(tmp_path, body))])
    for word in words:
        assert word in text, (word, text)


def test_an_lmforge_config_is_never_taken_for_a_foreign_one(tmp_path, capsys):
    for example in sorted((ROOT / "examples").glob("*_*.yaml")):
        raw = yaml.safe_load(example.read_text(encoding="utf-8"))
        assert detect_format(raw, str(example)) is None, example
    # Only `stage` and groups, with `stage` like LLaMA-Factory's: lmforge's.
    cfg, conversion = load_stage_config(write(tmp_path, "stage: dpo\nmodel: {scratch: test}\n"), [], None)
    assert conversion is None and cfg.stage == "dpo" and cfg.train.lr == 3e-4
    assert "already an lmforge config" in one_line_error(capsys, ["convert", str(tmp_path / "config.yaml")])
    text = one_line_error(capsys, ["train", str(write(tmp_path, "model: {scratch: test}\n", "nostage.yaml"))])
    assert "names no stage" in text and "stage: sft" in text


def test_the_stage_on_the_command_line_wins_and_old_form_works(tmp_path):
    path = write(tmp_path, "stage: sft\nmodel: {scratch: test}\n")
    cfg, _ = load_stage_config(path, ["train.lr=1e-3"], "dpo")
    assert (cfg.stage, cfg.train.lr) == ("dpo", 1e-3)
    kto, _ = load_stage_config(lf(tmp_path, LF_KTO), ["learning_rate=1e-5", "train.batch_size=2"], "dpo")
    assert (kto.stage, kto.dpo.loss, kto.train.lr, kto.train.batch_size) == ("dpo", "kto", 1e-5, 2)


def test_trl_sft_and_dpo_configs(tmp_path, capsys, world_dir):
    data = world_dir / "sft" / "train.jsonl"
    path = write(tmp_path, f"model_name_or_path: m\ndataset_name: {data}\nlearning_rate: 2.0e-4\n"
                           "num_train_epochs: 1\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 8\n"
                           "max_length: 256\npacking: true\nuse_peft: true\nlora_r: 32\nlora_alpha: 16\n"
                           "lora_target_modules: [q_proj, v_proj]\noutput_dir: out\nlogging_steps: 25\n"
                           "save_steps: 100\nbf16: false\ngradient_checkpointing: true\neval_strategy: 'no'\n")
    assert detect_format(yaml.safe_load(path.read_text()), "x") == "trl"
    assert "TRL configs name no stage" in one_line_error(capsys, ["train", str(path)])
    cfg, _ = load_stage_config(path, [], "sft")
    assert [d.path for d in cfg.data.train] == [str(data)]
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (2e-4, 1.0, 2, 8)
    assert (cfg.data.max_length, cfg.data.packing, cfg.train.eval_steps) == (256, True, 0)
    assert (cfg.model.finetuning, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("lora", 32, 16, 0.05)
    assert (cfg.lora.target_modules, cfg.model.gradient_checkpointing, cfg.train.mixed_precision) == \
        (["q_proj", "v_proj"], True, "no")
    dpo = write(tmp_path, f"model_name_or_path: m\ndataset_name: {data}\nbeta: 0.3\nloss_type: ipo\n"
                          "max_seq_length: 300\n", "dpo.yaml")
    assert main(["convert", str(dpo), "--stage", "dpo", "-o", str(tmp_path / "out.yaml")]) == 0
    assert "5 TRL keys mapped" in capsys.readouterr().out
    cfg = load_config(tmp_path / "out.yaml")
    assert (cfg.stage, cfg.dpo.beta, cfg.dpo.loss, cfg.data.max_length, cfg.train.lr) == ("dpo", 0.3, "ipo", 300, 1e-6)
    missing = write(tmp_path, "model_name_or_path: m\ndataset_name: trl-lib/Capybara\n", "hub.yaml")
    assert "never downloads" in one_line_error(capsys, ["train", "sft", str(missing)])


def test_foreign_names_get_the_lmforge_key_as_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate; learning_rate .* in lmforge it is train\.lr$"):
        load_config(None, ["model.scratch=test", "train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"config\.per_device_train_batch_size; .* train\.batch_size$"):
        load_config(None, ["model.scratch=test", "per_device_train_batch_size=4"])
    with pytest.raises(ConfigError, match=r"deepspeed; .* no lmforge equivalent: .*accelerate launch"):
        load_config(write(tmp_path, "stage: sft\nmodel: {scratch: test}\ntrain: {deepspeed: z3.json}\n"))


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lmforge {lmforge.__version__}"


def _field_exists(dotted: str) -> bool:
    tp: typing.Any = StageConfig
    for part in dotted.split("."):
        part = part.split("[")[0]
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
        args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        tp = args[0] if args else tp
    return True


def test_every_target_is_an_lmforge_key_and_the_docs_table_is_the_code_table():
    assert schema_dataclasses()  # the schema is importable and walked the same way as the hint
    for table in (COMMON, LLAMAFACTORY, TRL):
        for key, rule in table.items():
            if isinstance(rule, (Target, Special)):
                for dotted in rule.keys:
                    assert _field_exists(dotted), (key, dotted)
    page = (ROOT / "docs" / "switching.md").read_text(encoding="utf-8")
    assert mapping_markdown() in page, "regenerate the tables: python -m lmforge.config.foreign_docs"


@needs_shared
@pytest.mark.parametrize("text, dataset, extra", [
    (LF_SFT, None, "max_steps: 3\nper_device_train_batch_size: 4\n"),
    (LF_DPO, ("dpo_en_demo", "demo_pref"), "max_steps: 2\nper_device_train_batch_size: 2\n"),
    (LF_KTO, ("kto_en_demo", "demo_kto"), "max_steps: 2\nper_device_train_batch_size: 4\n"),
], ids=["sft", "dpo", "kto"])
def test_llamafactory_configs_train_unchanged(tmp_path, capsys, base, world_dir, text, dataset, extra):
    """The documented examples with a tiny local model, small data and a few steps: the file is read as it is.
    SFT reads LLaMA-Factory's own demo data; DPO and KTO the demo world's pairs through its dataset_info.json
    (LLaMA-Factory's English pairs are longer than the tiny model's 1,024 positions in its tiny vocabulary)."""
    text = (text.replace("cutoff_len: 2048", "cutoff_len: 128").replace("max_samples: 1000", "max_samples: 24")
            .replace("bf16: true", "bf16: false").replace("per_device_train_batch_size: 1\n", "")
            .replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1")
            .replace("val_size: 0.1", "val_size: 0.0") + extra + "report_to: none\ndisable_gradient_checkpointing: true\n")
    data = SHARED_DATA
    if dataset:
        text, data = text.replace(*dataset), world_dir
    path = lf(tmp_path, text, model=base, template="chatml", data=data)
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "as a LLaMA-Factory config" in out and "ignored (no effect in lmforge): do_train" in out
    saved = yaml.safe_load((tmp_path / "saves" / "config.yaml").read_text(encoding="utf-8"))
    assert (saved["model"]["finetuning"], saved["lora"]["r"], saved["lora"]["alpha"]) == ("lora", 8, 16)
    assert (saved["train"]["lr"], saved["train"]["scheduler"], saved["train"]["warmup_ratio"]) == \
        (1e-4 if not dataset else 5e-6, "cosine", 0.1)
    assert saved["stage"] == ("dpo" if dataset else "sft")
    assert saved["dpo"]["loss"] == ("kto" if dataset and "kto" in dataset[1] else "sigmoid")
    steps = [json.loads(line)["step"] for line in (tmp_path / "saves" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps and max(steps) == saved["train"]["max_steps"], steps
