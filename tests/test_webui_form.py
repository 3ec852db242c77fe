"""The Train form generated from the config schema (issue 24, the web UI against LlamaBoard): every schema
field is in the form, a field added to the schema appears with no code change, and what the user types
turns into a YAML config that the schema accepts and that loads back into the same form."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pytest
import yaml

from lmforge.config import schema
from lmforge.config.errors import ConfigError
from lmforge.config.schema import StageConfig
from lmforge.webui.confine import Rules
from lmforge.webui.forms import (
    COMMON_KEYS,
    FORM_FIELDS,
    TrainForm,
    config_to_form,
    form_to_config,
    from_yaml,
    grouped_fields,
    read_form,
    to_yaml,
    validate,
)
from lmforge.webui.schema_fields import schema_fields, to_widget


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of every leaf field, walked here independently of the form's own walk."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def train_tab_ids(root: Path) -> set[str]:
    """The elem_ids of the Train tab's widgets, built alone (the whole app takes longer)."""
    from lmforge.webui.tab_train import train_tab
    from lmforge.webui.ui import Context

    with gr.Blocks() as blocks:
        train_tab(Context(root, root / "runs", Rules(root)))
    return {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_every_schema_field_is_in_the_form_once(tmp_path):
    up_front = [key for keys in COMMON_KEYS.values() for key in keys]
    grouped = [f.key for f in grouped_fields()]
    assert sorted(up_front + grouped) == sorted(schema_keys(StageConfig))  # each field exactly once
    assert len(grouped) > 100 and {"train.scheduler", "rl.loss_type", "dpo.beta", "lora.alpha"} <= set(grouped)
    ids = train_tab_ids(tmp_path)
    assert {"field-" + key.replace(".", "-") for key in grouped} <= ids
    kinds = {f.key: f for f in grouped_fields()}
    assert kinds["train.scheduler"].choices == schema.SCHEDULERS and kinds["train.scheduler"].kind == "choice"
    assert kinds["rl.loss_type"].choices == ("grpo", "bnpo", "dr_grpo", "dapo")
    assert kinds["log.report_to"].kind == "multichoice" and kinds["train.fused_loss"].kind == "tristate"
    assert kinds["rl.rewards"].kind == "yaml" and kinds["data.eval"].kind == "datasets"
    assert "Micro-batch size" in {f.key: f for f in schema_fields(StageConfig)}["train.batch_size"].help
    assert "must be" not in kinds["train.warmup_ratio"].help and "[0, 1]" in kinds["train.warmup_ratio"].help
    template = {f.key: f for f in schema_fields(StageConfig)}["model.template"]
    assert {"llama3", "qwen", "qwen3", "glm4", "mistral", "gemma", "deepseek", "yi", "baichuan2", "phi", "chatml",
            "plain", "auto"} <= set(template.choices)


@dataclass
class TrainWithKnob(schema.TrainConfig):
    fake_knob: int = 3
    """A knob added to the schema by this test."""


def test_a_field_added_to_the_schema_appears_in_the_form(monkeypatch, tmp_path):
    monkeypatch.setattr(schema, "TrainConfig", TrainWithKnob)  # StageConfig's `train: TrainConfig` now has it
    knob = {f.key: f for f in grouped_fields()}["train.fake_knob"]
    assert (knob.kind, knob.default, knob.help) == ("int", 3, "A knob added to the schema by this test.")
    assert "field-train-fake_knob" in train_tab_ids(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    values = [getattr(TrainForm(model="scratch:test", tokenizer=".", data="d.jsonl"), n) for n in FORM_FIELDS]
    widgets = [to_widget(f, 5 if f.key == "train.fake_knob" else f.default) for f in grouped_fields()]
    config = form_to_config(read_form(values + widgets), tmp_path)
    assert config["train"]["fake_knob"] == 5 and validate(config).train.fake_knob == 5


TYPED = {  # what a user sets across the groups, as the YAML should say it
    "stage": "dpo",
    "model": {"scratch": "test", "tokenizer": "tok", "template": "llama3", "finetuning": "lora", "dtype": "bf16",
              "gradient_checkpointing": True},
    "data": {"train": [{"path": "d.jsonl", "formatting": "alpaca", "columns": {"prompt": "q"}}], "max_length": 256,
             "packing": True, "eval": "e.jsonl", "text_split": "blank"},
    "train": {"output_dir": "runs/x", "lr": 5e-05, "epochs": 2.0, "batch_size": 4, "seed": 7, "max_steps": 30,
              "scheduler": "linear", "warmup_ratio": 0.1, "fused_loss": False, "adam_beta2": 0.999},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "log": {"report_to": [], "run_name": "mine"},
    "dpo": {"loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0},
    "rl": {"rewards": [{"kind": "regex", "pattern": "^ok"}], "top_k": 5},
}


def test_typed_values_round_trip_through_yaml_and_pass_the_schema(tmp_path):
    for name in ("d.jsonl", "e.jsonl"):
        (tmp_path / name).write_text('{"instruction": "hi", "output": "ho"}\n')
    (tmp_path / "tok").mkdir()
    form = config_to_form(TYPED)
    values = [getattr(form, n) for n in FORM_FIELDS] + \
        [to_widget(f, form.extra.get(f.key, f.default)) for f in grouped_fields()]
    config = form_to_config(read_form(values), tmp_path)  # the widgets' contents, as the browser sends them
    assert yaml.safe_load(to_yaml(config)) == TYPED  # nothing lost, nothing added, defaults left out
    cfg = validate(from_yaml(to_yaml(config)))
    assert (cfg.train.scheduler, cfg.lora.target_modules, cfg.rl.rewards[0].pattern) == ("linear", ["q_proj", "v_proj"], "^ok")
    assert config_to_form(from_yaml(to_yaml(config))) == form


@pytest.mark.parametrize("key, value, message", [
    ("train.warmup_ratio", 5, r"train\.warmup_ratio=5\.0: must be a finite number in \[0, 1\]"),
    ("train.scheduler", "fast", r"train\.scheduler='fast' is not one of cosine, linear, constant"),
    ("rl.rewards", "[{kind: regex", r"rl\.rewards: the YAML does not parse"),
    ("lora.target_modules", "&a [x, *a]", r"lora\.target_modules: YAML aliases"),
    ("train.fused_loss", "maybe", r"train\.fused_loss='maybe': one of default, true, false"),
    ("train.logging_steps", "ten", r"train\.logging_steps='ten': must be a number"),
    ("rl.rewards", "[{kind: function, function: 'os:system'}]", None),  # the schema takes it; the run checks refuse it
])
def test_bad_grouped_values_are_refused_naming_the_key(tmp_path, key, value, message):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    values = [getattr(TrainForm(model="scratch:test", tokenizer=".", data="d.jsonl"), n) for n in FORM_FIELDS]
    widgets = [value if f.key == key else to_widget(f, f.default) for f in grouped_fields()]
    if message is None:
        from lmforge.webui.confine import check_stage

        config = form_to_config(read_form(values + widgets), tmp_path)
        with pytest.raises(ConfigError, match="function reward runs Python code"):
            check_stage(validate({**config, "stage": "grpo", "rl": {**config["rl"], "num_generations": 2}}),
                        Rules(tmp_path.resolve()), "the form")
        return
    with pytest.raises(ConfigError, match=message):
        form_to_config(read_form(values + widgets), tmp_path)


def test_the_old_api_form_of_fourteen_values_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"the form sent 14 values for \d+ fields; reload the page"):
        read_form(["sft", "scratch:test", "tok", "d", "", "full", 1e-4, 1, 8, 128, 8, "sigmoid", "runs/x", 1])
