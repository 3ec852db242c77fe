"""Typed config: YAML + dotted overrides, errors that name the key, and every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config, to_dict
from lmforge.config.schema import STAGES, DatasetSpec, StageConfig
from lmforge.pipeline.run import load_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_win(tmp_path):
    path = write(tmp_path, "stage: sft\nmodel: {scratch: tiny}\ntrain: {lr: 1.0e-3, batch_size: 4}\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.max_length=512", "data.packing=true"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4
    assert cfg.data.max_length == 512 and cfg.data.packing is True


def test_unknown_key_names_it_and_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key .*train\.learning_rat.*did you mean 'lr'|learning_rat"):
        load_config(None, ["model.scratch=tiny", "train.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"unknown key .*train\.bach_size; did you mean 'batch_size'\?"):
        load_config(None, ["model.scratch=tiny", "train.bach_size=1"])
    with pytest.raises(ConfigError, match=r"unknown key .*\.modle; did you mean 'model'\?"):
        load_config(write(tmp_path, "modle: {scratch: tiny}\n"))


def test_wrong_types_and_choices_are_named():
    with pytest.raises(ConfigError, match=r"train\.batch_size='big': must be an integer in \[1, "):
        load_config(None, ["model.scratch=tiny", "train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"model\.finetuning='lorra' is not one of"):
        load_config(None, ["model.scratch=tiny", "model.finetuning=lorra"])
    with pytest.raises(ConfigError, match="data.on_error"):
        load_config(None, ["model.scratch=tiny", "data.on_error=ignore"])
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="group.key=value"):
        load_config(None, ["model.scratch"])


def test_dataset_shorthand_paths_and_names():
    cfg = load_config(None, ["model.scratch=tiny", "data.train=[data/a.jsonl, identity]"])
    assert cfg.data.train == [DatasetSpec(path="data/a.jsonl"), DatasetSpec(name="identity")]


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.scratch=tiny", "data.train=[x.txt]", "lora.r=4"])
    from lmforge.config.load import from_dict

    assert from_dict(StageConfig, to_dict(cfg), "again") == cfg


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_yaml_loads(path):
    text = path.read_text()
    if "stages:" in text:
        pipeline = load_pipeline(path)
        assert pipeline.stages
    else:
        cfg = load_config(path)
        assert cfg.stage in STAGES and cfg.stage == path.name.split("_")[0]


def test_examples_exist():
    assert len(list(EXAMPLES.glob("*.yaml"))) >= 3


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo"])
def test_sft_weight_accepted_where_it_has_a_meaning(loss):
    assert load_config(None, ["stage=dpo", "model.scratch=test", f"dpo.loss={loss}", "dpo.sft_weight=1"]).dpo.sft_weight == 1.0


@pytest.mark.parametrize("loss", ["orpo", "kto"])
def test_sft_weight_refused_where_it_does_not_apply(loss):
    with pytest.raises(ConfigError, match=f"sft_weight applies to .* not {loss}"):
        load_config(None, ["stage=dpo", "model.scratch=test", f"dpo.loss={loss}", "dpo.sft_weight=1"])


@pytest.mark.parametrize("reference", ["dpo.reference=adapter", "rl.reference=adapter"])
def test_a_pissa_adapter_cannot_be_its_own_reference(reference):
    with pytest.raises(ConfigError, match="PiSSA"):
        load_config(None, ["model.scratch=tiny", "model.finetuning=lora", "lora.init=pissa", reference,
                           "rl.rewards=[{kind: answer_match}]", "rl.num_generations=2"], stage="grpo")


@pytest.mark.parametrize("text", ["a: [1, 2\n", "a: b: c\n", "a:\n\tb: 1\n", "a: \"x\x00\"\n", "- [\n", "{a: 1\n"])
def test_a_yaml_syntax_error_is_one_line(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'c.yaml'}: invalid YAML")
