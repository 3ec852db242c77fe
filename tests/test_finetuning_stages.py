"""Every fine-tuning method through the SFT stage end to end: the optimizer the loop builds, what the
artifact holds, and that it reloads."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config.schema import ModelConfig
from lmforge.models.galore import GaLoreAdamW
from lmforge.models.optimizers import build_optimizer


# -- every method through the SFT stage -----------------------------------------------------------------------
@pytest.fixture
def built_optimizers(monkeypatch):
    """The optimizers the loop built (through build_optimizer), in order."""
    from lmforge.loop import trainer as loop

    built = []

    def recording(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_optimizer", recording)
    return built


def sft_run(base, world_dir, out, *overrides) -> dict:
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    cfg = load_config(None, [f"model.name_or_path={base}", f"data.train={world_dir}/sft/train.jsonl",
                             "data.eval_split=0", "data.max_length=96", "data.packing=true", "train.max_steps=3",
                             "train.batch_size=4", "train.lr=1e-3", "train.warmup_ratio=0", "sft.eval_generate=0",
                             f"train.output_dir={out}", "log.progress=false", "log.report_to=[]", *overrides],
                      stage="sft")
    return STAGE_RUNNERS["sft"](cfg)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_sft_with_lora_plus_and_galore(base, world_dir, tmp_path, built_optimizers):
    sft_run(base, world_dir, tmp_path / "plus", "model.finetuning=lora", "lora.plus_ratio=8")
    sft_run(base, world_dir, tmp_path / "galore", "model.finetuning=galore", "galore.rank=4",
            "galore.update_interval=2", "galore.target_modules=[q_proj,v_proj,down_proj]")
    plus, galore = built_optimizers
    assert [g["initial_lr"] for g in plus.param_groups] == pytest.approx([1e-3, 8e-3])
    assert isinstance(galore, GaLoreAdamW) and galore.param_groups[0]["rank"] == 4
    projected = galore.param_groups[0]["params"]
    assert len(projected) == 3 * 2 and all(galore.state[p]["projector"].shape[1] == 4 for p in projected)
    before, after = weights(base), weights(tmp_path / "galore")
    assert all(not torch.equal(before[k], after[k]) for k in before if "layers.0.self_attn.q_proj" in k)


def test_sft_with_pissa_saves_a_merged_model(base, world_dir, tmp_path, built_optimizers):
    sft_run(base, world_dir, tmp_path / "pissa", "model.finetuning=lora", "lora.init=pissa_niter_2", "lora.r=4")
    assert not (tmp_path / "pissa" / "adapter_config.json").exists()  # residual base + adapter, folded back
    before, after = weights(base), weights(tmp_path / "pissa")
    assert before.keys() == after.keys()
    change = after["model.layers.0.self_attn.q_proj.weight"] - before["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < change.abs().max() < 0.1  # a small trained change, not the residual's large one


def test_sft_with_mod_saves_routers_that_reload(base, world_dir, tmp_path, built_optimizers):
    from lmforge.models.load import load_model_and_tokenizer

    sft_run(base, world_dir, tmp_path / "mod", "model.finetuning=mod", "mod.capacity=0.5")
    saved = json.loads((tmp_path / "mod" / "config.json").read_text())
    assert saved["lmforge_mod"] == {"capacity": 0.5, "layers": [1]}  # the test preset has 2 layers
    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "mod")))
    layer = model.model.layers[1]
    assert type(layer).__name__ == "RoutedLlamaDecoderLayer"
    router = weights(tmp_path / "mod")["model.layers.1.mod_router.weight"]
    assert router.abs().sum() > 0 and torch.equal(layer.mod_router.weight, router)  # it learned, and came back
    assert layer.mod_threshold.item() != 0.0


def test_sft_with_llama_pro_trains_only_the_new_blocks(base, world_dir, tmp_path, built_optimizers):
    sft_run(base, world_dir, tmp_path / "pro", "model.finetuning=llama_pro", "expand.num_new_blocks=2")
    assert json.loads((tmp_path / "pro" / "config.json").read_text())["num_hidden_layers"] == 4
    before, after = weights(base), weights(tmp_path / "pro")
    # Old blocks 0 and 1 sit at 0 and 2 now, untouched; the new blocks 1 and 3 trained away from zero.
    for old, new in ((0, 0), (1, 2)):
        for key in [k for k in before if k.startswith(f"model.layers.{old}.")]:
            assert torch.equal(after[key.replace(f"layers.{old}.", f"layers.{new}.")], before[key])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert after["model.layers.1.self_attn.o_proj.weight"].abs().sum() > 0
    assert after["model.layers.3.mlp.down_proj.weight"].abs().sum() > 0


def test_sft_with_neftune_trains_on_noisy_embeddings(base, world_dir, tmp_path, built_optimizers):
    clean = sft_run(base, world_dir, tmp_path / "clean")
    noisy = sft_run(base, world_dir, tmp_path / "noisy", "sft.neftune_alpha=5")
    assert noisy["train_loss"] != pytest.approx(clean["train_loss"], abs=1e-6)
    assert abs(noisy["train_loss"] - clean["train_loss"]) < 0.5  # noise, not a different task
