"""A LoRA stage after a LoRA stage: the parent adapter merged (a new adapter on top), or continued."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.config.schema import ModelConfig
from lmforge.models.load import load_model_and_tokenizer
from lmforge.stages import STAGE_RUNNERS

QUIET = ["log.progress=false", "log.report_to=[]"]


def sft(parent, out, world_dir, *extra):
    cfg = load_config(None, [f"model.name_or_path={parent}", "model.finetuning=lora", "lora.r=4",
                             f"data.train={world_dir}/sft/train.jsonl", "data.eval_split=0", "data.max_length=96",
                             "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2", f"train.output_dir={out}",
                             *QUIET, *extra], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def first_adapter(base, world_dir, tmp_path_factory):
    return sft(base, tmp_path_factory.mktemp("sft1"), world_dir)


def test_continue_trains_the_parent_adapter_over_the_original_base(base, first_adapter, world_dir, tmp_path):
    second = sft(first_adapter, tmp_path / "sft2", world_dir, "model.parent_adapter=continue")
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)  # still a small adapter over the original base
    before, after = load_file(str(first_adapter / "adapter_model.safetensors")), \
        load_file(str(second / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # the same adapter, trained further
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_merge_puts_a_new_adapter_on_the_merged_parent(first_adapter, world_dir, tmp_path):
    second = sft(first_adapter, tmp_path / "sft2", world_dir, "train.lr=0")  # lr 0: the new adapter is a no-op
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    parent, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(first_adapter)))
    child, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(second)))
    assert torch.allclose(logits(parent, ids), logits(child, ids), atol=1e-5)  # the parent's adaptation kept
    base_only = AutoModelForCausalLM.from_pretrained(
        json.loads((first_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert not torch.allclose(logits(base_only, ids), logits(child, ids), atol=1e-3)


def test_continue_needs_lora_and_is_refused_for_a_reward_head(first_adapter, world_dir, tmp_path):
    with pytest.raises(ConfigError, match="parent_adapter=continue"):
        ModelConfig(name_or_path=str(first_adapter), parent_adapter="continue")
    cfg = load_config(None, [f"model.name_or_path={first_adapter}", "model.finetuning=lora",
                             "model.parent_adapter=continue", f"data.train={world_dir}/pref/train.jsonl",
                             f"train.output_dir={tmp_path / 'rm'}", *QUIET], stage="rm")
    with pytest.raises(ConfigError, match="reward model"):
        STAGE_RUNNERS["rm"](cfg)
