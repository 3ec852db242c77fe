"""RM and the DPO family end to end on a tiny model, on the demo world's preference pairs."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.stages import STAGE_RUNNERS

QUIET = ["log.report_to=[]", "log.progress=false"]


def pref_args(world_dir, out, *extra):
    return [f"data.train={world_dir}/pref/train.jsonl", f"data.eval={world_dir}/pref/eval.jsonl",
            "data.max_length=128", f"train.output_dir={out}", *QUIET, *extra]


def test_rm_learns_to_rank_and_saves_a_sequence_classifier(base, world_dir, tmp_path):
    out = tmp_path / "rm"
    cfg = load_config(None, [f"model.name_or_path={base}", *pref_args(world_dir, out), "train.max_steps=60",
                             "train.batch_size=8", "train.lr=3e-3", "rm.center_coef=0.01"], stage="rm")
    metrics = STAGE_RUNNERS["rm"](cfg)
    assert metrics["initial_eval_accuracy"] < 0.7
    assert metrics["eval_accuracy"] > 0.7  # rude, rambling and hedged answers are easy to rank
    assert metrics["eval_margin"] > metrics["initial_eval_margin"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and not (out / "adapter_config.json").exists()
    assert json.loads((out / "lmforge.json").read_text())["stage"] == "rm"
    # `lmforge score` on the eval pairs agrees with the accuracy the stage measured
    assert main(["score", str(out), "--data", f"{world_dir}/pref/eval.jsonl", "--out", str(tmp_path / "s.jsonl"),
                 "--max-length", "128"]) == 0
    scores = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    accuracy = sum(s["reward_chosen"] > s["reward_rejected"] for s in scores) / len(scores)
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=0.02)


def test_rm_with_lora_merges_into_a_plain_folder(base, world_dir, tmp_path):
    out = tmp_path / "rm_lora"
    cfg = load_config(None, [f"model.name_or_path={base}", "model.finetuning=lora", *pref_args(world_dir, out),
                             "train.max_steps=4"], stage="rm")
    STAGE_RUNNERS["rm"](cfg)
    assert not (out / "adapter_config.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(out).score.weight.shape[0] == 1


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_pairwise_loss_trains(base, world_dir, tmp_path, loss):
    extra = {"robust": ["dpo.label_smoothing=0.1"], "simpo": ["dpo.beta=2.0"]}.get(loss, [])
    cfg = load_config(None, [f"model.name_or_path={base}", f"dpo.loss={loss}", "dpo.eval_generate=0",
                             *pref_args(world_dir, tmp_path), "train.max_steps=25", "train.batch_size=8",
                             "train.lr=2e-3", *extra], stage="dpo")
    metrics = STAGE_RUNNERS["dpo"](cfg)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["eval_rewards/accuracy"] > 0.6
    if loss not in ("simpo", "orpo"):  # with a reference, implicit rewards start tied: accuracy 50%
        assert metrics["initial_eval_rewards/accuracy"] == pytest.approx(0.5)


def test_kto_trains_on_unpaired_records(base, world_dir, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={base}", "dpo.loss=kto", "dpo.eval_generate=0",
                             f"data.train={world_dir}/pref/kto_train.jsonl", "data.eval_split=0.1",
                             "data.max_length=128", "train.max_steps=25", "train.batch_size=8", "train.lr=2e-3",
                             f"train.output_dir={tmp_path}", *QUIET], stage="dpo")
    metrics = STAGE_RUNNERS["dpo"](cfg)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["eval_rewards/chosen"] > metrics["eval_rewards/rejected"]


def test_dpo_lora_uses_the_adapter_disabled_model_as_reference(base, world_dir, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={base}", "model.finetuning=lora", "dpo.eval_generate=4",
                             "dpo.max_new_tokens=8", *pref_args(world_dir, tmp_path), "train.max_steps=15",
                             "train.lr=5e-3"], stage="dpo")
    metrics = STAGE_RUNNERS["dpo"](cfg)
    assert metrics["initial_eval_rewards/accuracy"] == pytest.approx(0.5)
    assert metrics["eval_rewards/accuracy"] > 0.55
    assert metrics["eval_answered"] == 4
    assert (tmp_path / "adapter_config.json").is_file()


def test_precomputed_reference_gives_the_live_losses(base, world_dir, tmp_path):
    from lmforge.data.preference import collate_pairs
    from lmforge.models.reference import Reference, precompute
    from lmforge.stages.dpo import preference_loss

    def run(precompute_ref: bool):
        out = tmp_path / f"pre{precompute_ref}"
        cfg = load_config(None, [f"model.name_or_path={base}", "dpo.eval_generate=0", *pref_args(world_dir, out),
                                 "train.max_steps=6", "train.batch_size=4", f"dpo.precompute_ref={precompute_ref}",
                                 "train.lr=1e-3", "dpo.reference=copy"], stage="dpo")
        return STAGE_RUNNERS["dpo"](cfg), out

    live, live_dir = run(False)
    cached, cached_dir = run(True)
    assert list((cached_dir / "reference_cache").glob("train-*.safetensors"))
    for key in ("eval_loss", "eval_rewards/margin", "train_loss", "initial_eval_loss"):
        assert cached[key] == pytest.approx(live[key], abs=1e-5), key
    from safetensors.torch import load_file

    a, b = load_file(str(live_dir / "model.safetensors")), load_file(str(cached_dir / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # and batch by batch: the loss with cached columns equals the loss with the live reference
    from transformers import AutoModelForCausalLM

    from lmforge.config.schema import DataConfig, DatasetSpec, DPOConfig
    from lmforge.data.build import load_examples, tokenize_preference
    from lmforge.data.errors import ErrorLog

    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    errors = ErrorLog()
    pairs, _ = load_examples([DatasetSpec(path=f"{world_dir}/pref/eval.jsonl")], DataConfig(), errors,
                             str(tmp_path), kind="pair")
    rows = tokenize_preference(pairs.select(range(8)), tokenizer, DataConfig(max_length=128), errors, "pair")
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    reference = Reference("copy", AutoModelForCausalLM.from_pretrained(base))
    with_cache = precompute(reference, model, rows, collate, 4, "cpu", tmp_path / "c.safetensors",
                            ("ref_chosen", "ref_rejected"))
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01 * torch.randn_like(model.model.layers[0].mlp.up_proj.weight))
    with torch.no_grad():
        live_loss = preference_loss(model, collate(list(rows)), DPOConfig(), reference)[0]
        cached_loss = preference_loss(model, collate(list(with_cache)), DPOConfig(), None)[0]
    assert float(live_loss) == pytest.approx(float(cached_loss), abs=1e-6)


def test_sft_weight_adds_the_chosen_nll(base, world_dir):
    from transformers import AutoModelForCausalLM

    from lmforge.config.schema import DataConfig, DatasetSpec, DPOConfig
    from lmforge.data.build import load_examples, tokenize_preference
    from lmforge.data.errors import ErrorLog
    from lmforge.data.preference import collate_pairs
    from lmforge.losses.preference import sequence_logps
    from lmforge.models.reference import Reference
    from lmforge.stages.dpo import preference_loss

    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    errors = ErrorLog()
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        pairs, _ = load_examples([DatasetSpec(path=f"{world_dir}/pref/eval.jsonl")], DataConfig(), errors, cache,
                                 kind="pair")
        rows = tokenize_preference(pairs.select(range(4)), tokenizer, DataConfig(max_length=128), errors, "pair")
    batch = collate_pairs(list(rows), pad_id=tokenizer.pad_token_id)
    reference = Reference("copy", AutoModelForCausalLM.from_pretrained(base))
    with torch.no_grad():
        plain = preference_loss(model, batch, DPOConfig(), reference)[0]
        mixed, _, metrics = preference_loss(model, batch, DPOConfig(sft_weight=0.5), reference)
        sums, lengths = sequence_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        simpo = preference_loss(model, batch, DPOConfig(loss="simpo", beta=2.0), None)[0]
        cpo_simpo, _, simpo_metrics = preference_loss(model, batch, DPOConfig(loss="simpo", beta=2.0, sft_weight=2.0),
                                                      None)
    nll = float(-sums[:4].sum() / lengths[:4].sum())
    assert float(metrics["nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(mixed) / 4 == pytest.approx(float(plain) / 4 + 0.5 * nll, rel=1e-5)
    assert float(simpo_metrics["nll"]) == pytest.approx(nll, rel=1e-5)  # CPO-SimPO
    assert float(cpo_simpo) / 4 == pytest.approx(float(simpo) / 4 + 2.0 * nll, rel=1e-5)


def test_shared_prompt_trains_to_the_same_model(base, world_dir, tmp_path):
    """The stage with the prompt shared (the default here: sdpa) and with two rows per pair: same losses,
    the same pair count (a wrong count would scale the loss), the same weights after a few steps."""
    from safetensors.torch import load_file

    runs = {}
    for share in ("true", "false"):
        out = tmp_path / share
        cfg = load_config(None, [f"model.name_or_path={base}", "dpo.eval_generate=0", *pref_args(world_dir, out),
                                 "train.max_steps=3", "train.batch_size=4", "train.lr=1e-3",
                                 f"dpo.share_prompt={share}"], stage="dpo")
        runs[share] = STAGE_RUNNERS["dpo"](cfg), load_file(str(out / "model.safetensors"))
    (shared, shared_weights), (plain, plain_weights) = runs["true"], runs["false"]
    for key in ("train_loss", "train_pairs", "eval_loss", "eval_rewards/margin", "initial_eval_loss"):
        assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    assert shared["train_pairs"] == 4
    start = load_file(str(base / "model.safetensors"))
    # the steps moved the weights, so equal weights mean equal updates
    assert max(float((plain_weights[k] - start[k]).abs().max()) for k in plain_weights) > 1e-4
    assert all(torch.allclose(shared_weights[k], plain_weights[k], atol=1e-5) for k in plain_weights)
