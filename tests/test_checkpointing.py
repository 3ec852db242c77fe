"""Activation checkpointing per block (model.gradient_checkpointing): which blocks it selects, the same
gradients as without it (full fine-tuning and LoRA, plain and chunked loss, compiled blocks), and fewer
saved activation bytes the more blocks recompute."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.config.schema import LoraConfig, ModelConfig
from lmforge.data.packing import collate
from lmforge.models.adapters import apply_finetuning
from lmforge.models.checkpointing import checkpointable_blocks, enable_checkpointing
from lmforge.models.heads import lm_loss
from tests.test_fast_paths import rows

LAYERS = 4
GRAD_ATOL = 1e-6
"""Recomputing a block in eager mode repeats the same fp32 operations: equal gradients (to the bit, here)."""
COMPILED_TOL = 1e-5
"""Compiled blocks fuse and reorder reductions: equal to eager within 1e-5, absolute and relative."""


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model


def prepared(method: str, setting) -> torch.nn.Module:
    cfg = ModelConfig(scratch="test", finetuning=method, gradient_checkpointing=setting)
    model = apply_finetuning(tiny(), cfg, LoraConfig(r=4, alpha=8), seed=0).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero, which leaves A without gradient on the first step
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def saved_bytes_and_grads(model, batch: dict, fused: bool) -> tuple[int, dict]:
    """Bytes of the distinct non-parameter storages autograd saved in the forward pass (as
    bench/dpo_activations.py counts them), and the gradients of the trainable parameters."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _, _ = lm_loss(model, batch, fused=fused)
    loss.backward()
    return sum(seen.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setting, blocks", [(False, []), (0, []), (True, [0, 1, 2, 3]), (1, [0]), (3, [0, 1, 2]),
                                             (4, [0, 1, 2, 3]), ("every-2", [0, 2]), ("every-3", [0, 3]),
                                             ("every-1", [0, 1, 2, 3])])
def test_setting_selects_blocks(setting, blocks):
    model = tiny()
    assert enable_checkpointing(model, setting) == blocks
    assert [b.gradient_checkpointing for b in checkpointable_blocks(model)] == [i in blocks for i in range(LAYERS)]


def read(value: str):
    """The setting as a command-line override gives it (parsed as YAML, like a config file's value)."""
    overrides = ["model.scratch=test", f"model.gradient_checkpointing={value}"]
    return load_config(None, overrides, stage="sft").model.gradient_checkpointing


@pytest.mark.parametrize("value", ["-1", "every-0", "every", "some", "every-2x", "1.5", "[1, 2]", "{a: 1}"])
def test_bad_settings_are_one_line_errors_naming_the_key(value):
    with pytest.raises(ConfigError) as error:
        read(value)
    assert "model.gradient_checkpointing" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):  # a group built in Python checks it too
        ModelConfig(gradient_checkpointing=-1)


def test_values_read_as_users_write_them():
    assert [read(v) for v in ("true", "false", "2", "2.0", "every-2", "0")] == [True, False, 2, 2, "every-2", 0]


def test_more_blocks_than_the_model_has_is_refused():
    with pytest.raises(ConfigError, match=r"gradient_checkpointing=5: the model has 4 blocks"):
        enable_checkpointing(tiny(), 5)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("fused", [False, True])
def test_checkpointed_gradients_equal_plain_and_saved_bytes_fall_per_block(method, fused):
    batch = collate(rows(6, seed=3), pad_id=0)
    # keyed by name: True == 1 as a dict key
    settings = {"off": False, "first 1": 1, "first 2": 2, "every-2": "every-2", "all": True}
    saved, grads = {}, {}
    for name, setting in settings.items():
        saved[name], grads[name] = saved_bytes_and_grads(prepared(method, setting), batch, fused)
    plain = grads["off"]
    if method == "lora":  # only the adapters train, and they get gradients through checkpointed blocks
        assert all("lora_" in name for name in plain) and len(plain) == LAYERS * 7 * 2
    for setting, got in grads.items():
        assert got.keys() == plain.keys()
        for name, grad in plain.items():
            assert grad.abs().sum() > 0, name
            assert torch.allclose(got[name], grad, atol=GRAD_ATOL, rtol=0), (setting, name)
    # A checkpointed block keeps nothing for backward but its input, held by the checkpoint itself. The
    # blocks are alike, so each one checkpointed saves about the same bytes (block 0 differs a little: under
    # LoRA its input, the embedding, needs no gradient), and every-2 saves what 2 blocks do.
    saving = {name: saved["off"] - saved[name] for name in settings}
    per_block = saving["first 1"]
    assert per_block > 0.15 * saved["off"]
    assert saving["first 2"] == pytest.approx(2 * per_block, rel=0.1)
    assert saving["every-2"] == pytest.approx(saving["first 2"], rel=0.1)
    assert saving["all"] == pytest.approx(LAYERS * per_block, rel=0.1)
    assert saved["all"] < 0.15 * saved["off"]


@pytest.mark.slow
def test_checkpointing_inside_compiled_blocks_gives_the_same_gradients():
    from lmforge.loop.compile import compile_blocks

    batch = collate(rows(6, seed=3), pad_id=0)
    _, eager = saved_bytes_and_grads(prepared("lora", False), batch, fused=True)
    results = {}
    for setting in (False, True):
        model = prepared("lora", setting)
        assert compile_blocks(model) == LAYERS
        results[setting] = saved_bytes_and_grads(model, batch, fused=True)
    for _, grads in results.values():
        for name, grad in eager.items():
            assert torch.allclose(grads[name], grad, atol=COMPILED_TOL, rtol=COMPILED_TOL), name
    assert results[True][0] < 0.15 * results[False][0]  # the checkpoint is traced into the block's graph
