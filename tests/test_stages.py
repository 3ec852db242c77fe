"""Each stage end to end on a tiny model built from a config, on the demo world."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.stages import STAGE_RUNNERS

QUIET = ["log.report_to=[]", "log.progress=false"]


@pytest.fixture(scope="module")
def pt_artifact(tmp_path_factory, world_dir, world_tokenizer_dir):
    out = tmp_path_factory.mktemp("pt")
    cfg = load_config(None, [
        "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}", f"data.train={world_dir}/pt/train.txt",
        f"data.eval={world_dir}/pt/eval.txt", "pt.block_size=128", "train.batch_size=8", "train.max_steps=60",
        "train.lr=5e-3", f"train.output_dir={out}", *QUIET], stage="pt")
    metrics = STAGE_RUNNERS["pt"](cfg)
    return out, metrics


def test_pt_cuts_heldout_perplexity_and_saves_a_hf_folder(pt_artifact):
    out, metrics = pt_artifact
    # from ~vocab-size perplexity (random init) to a fraction of it
    assert metrics["initial_eval_ppl"] > 500
    assert metrics["eval_ppl"] < metrics["initial_eval_ppl"] / 10
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    manifest = json.loads((out / "lmforge.json").read_text())
    assert manifest["stage"] == "pt" and manifest["parent"] == "scratch:test"
    assert manifest["metrics"]["eval_ppl"] == pytest.approx(metrics["eval_ppl"])
    assert len(manifest["data_fingerprint"]) == 16
    assert manifest["data"]["skipped_records"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0]  # the before-training evaluation
    assert max(r["step"] for r in rows) == 60


def test_sft_from_pt_learns_replies_and_stops(pt_artifact, world_dir, tmp_path):
    pt_dir, _ = pt_artifact
    cfg = load_config(None, [
        f"model.name_or_path={pt_dir}", f"data.train={world_dir}/sft/train.jsonl",
        f"data.eval={world_dir}/sft/eval.jsonl", "data.max_length=128", "data.packing=true",
        "train.batch_size=8", "train.max_steps=40", "train.lr=3e-3", "sft.eval_generate=16",
        "sft.max_new_tokens=24", f"train.output_dir={tmp_path}", *QUIET], stage="sft")
    metrics = STAGE_RUNNERS["sft"](cfg)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 1.0
    assert metrics["eval_answered"] == 16
    # after SFT the model ends its turn with <|im_end|> on its own
    assert metrics["eval_stopped_rate"] >= 0.75
    assert json.loads((tmp_path / "lmforge.json").read_text())["parent"] == str(pt_dir)


@pytest.mark.parametrize("method", ["lora", "dora", "freeze"])
def test_sft_methods_train_only_what_they_should(pt_artifact, world_dir, tmp_path, method):
    pt_dir, _ = pt_artifact
    cfg = load_config(None, [
        f"model.name_or_path={pt_dir}", f"model.finetuning={method}", "model.freeze_trainable_layers=1",
        f"data.train={world_dir}/sft/train.jsonl", "data.eval_split=0.05", "data.max_length=96",
        "train.batch_size=4", "train.max_steps=6", "train.lr=1e-2", "sft.eval_generate=0",
        f"train.output_dir={tmp_path}", *QUIET], stage="sft")
    metrics = STAGE_RUNNERS["sft"](cfg)
    manifest = json.loads((tmp_path / "lmforge.json").read_text())
    total, trainable = manifest["parameters"]["total"], manifest["parameters"]["trainable"]
    assert 0 < trainable < total / 2
    base = AutoModelForCausalLM.from_pretrained(pt_dir)
    if method == "freeze":
        tuned = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
        assert not torch.equal(tuned.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    else:
        adapter = json.loads((tmp_path / "adapter_config.json").read_text())
        assert adapter["use_dora"] is (method == "dora")
        assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
        # a later stage loads the adapter folder as a model: base + adapter, merged
        cfg2 = load_config(None, [f"model.name_or_path={tmp_path}"], stage="sft")
        from lmforge.models.load import load_model_and_tokenizer

        merged, _, _ = load_model_and_tokenizer(cfg2.model)
        assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                               base.model.layers[0].self_attn.q_proj.weight)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]


def test_qlora_on_cpu_is_a_clear_error(pt_artifact, tmp_path):
    pt_dir, _ = pt_artifact
    cfg = load_config(None, [f"model.name_or_path={pt_dir}", "model.finetuning=qlora", "data.train=x.jsonl",
                             f"train.output_dir={tmp_path}"], stage="sft")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU error path does not apply")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        STAGE_RUNNERS["sft"](cfg)


def test_missing_model_folder_never_downloads(tmp_path):
    cfg = load_config(None, ["model.name_or_path=meta-llama/Llama-3-8B", "data.train=x.jsonl",
                             f"train.output_dir={tmp_path}"], stage="sft")
    with pytest.raises(ConfigError, match="never downloads"):
        STAGE_RUNNERS["sft"](cfg)


def test_lora_after_vocabulary_growth_saves_and_reloads_new_rows(tmp_path, world_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.load import load_model_and_tokenizer
    from lmforge.models.tokenizer import train_tokenizer

    # A base whose tokenizer has no ChatML tokens: SFT adds them and the vocabulary grows.
    base = tmp_path / "base"
    tokenizer = train_tokenizer([world_dir / "pt" / "train.txt"], base, vocab_size=500,
                                special_tokens=["<|endoftext|>"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(base)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)).save_pretrained(base)
    out = tmp_path / "lora"
    cfg = load_config(None, [f"model.name_or_path={base}", "model.finetuning=lora", "model.template=chatml",
                             f"data.train={world_dir}/sft/eval.jsonl", "data.eval_split=0", "train.max_steps=4",
                             "train.lr=1e-2", "sft.eval_generate=0", f"train.output_dir={out}", *QUIET], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    merged, merged_tokenizer, _ = load_model_and_tokenizer(load_config(None, [f"model.name_or_path={out}"],
                                                                       stage="sft").model)
    assert len(merged_tokenizer) == len(tokenizer) + 2
    rows = merged.get_input_embeddings().weight
    assert rows.shape[0] == len(merged_tokenizer)
    old_mean = LlamaForCausalLM.from_pretrained(base).get_input_embeddings().weight.mean(dim=0)
    im_end = merged_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # trained away from their mean initialisation, and the trained rows came back from the adapter
    assert not torch.allclose(rows[im_end], old_mean, atol=1e-4)
    from safetensors.torch import load_file

    saved = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "embed_tokens" in k}
    assert any(torch.equal(v[im_end], rows[im_end]) for v in saved.values() if v.dim() == 2), list(saved)
