"""DPO's shared prompt: one packed row [prompt, chosen, rejected] gives the two-row forward's log-probs,
losses and gradients (fp32, 1e-5), with LoRA, checkpointing, the chunked log-probs and the reference."""

from __future__ import annotations

import pytest
import torch
from test_fast_paths import tiny  # the same 2-layer Llama (vocabulary 64)

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DPOConfig
from lmforge.data.preference import collate_kto, collate_pairs, pad_shared
from lmforge.models.heads import policy_logps
from lmforge.models.shared_prompt import segment_ids, shared_mask, unsupported_reason
from lmforge.stages.dpo import preference_count, preference_loss

# (prompt, chosen, rejected) lengths: uneven so rows pad differently; a 1-token prompt and reply; an
# empty prompt (its first reply token is unscored in both layouts).
SHAPES = ((4, 6, 9), (7, 3, 2), (1, 11, 1), (0, 2, 5))


def records(kind: str = "pair", seed: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, 64, (n,), generator=g).tolist()

    if kind == "pair":
        return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in SHAPES]
    return [{"prompt_ids": ids(p), "completion_ids": ids(c), "kl_completion_ids": ids(r), "label": i % 2 == 0}
            for i, (p, c, r) in enumerate(SHAPES)]


def collate(rows, kind: str, share: bool, ref: bool = True) -> dict:
    batch = (collate_pairs if kind == "pair" else collate_kto)(rows, pad_id=0, share_prompt=share)
    if ref:  # fixed reference log-probs, so the loss does not need a second model
        low = torch.linspace(-40.0, -20.0, len(rows))
        batch.update({"ref_chosen": low, "ref_rejected": low - 3.0} if kind == "pair"
                     else {"ref_logps": low, "ref_kl_logps": low - 1.0})
    return batch


def loss_and_grads(model, batch, cfg: DPOConfig, fused: bool) -> tuple[float, dict]:
    model.zero_grad()
    loss, _, _ = preference_loss(model, batch, cfg, reference=None, fused=fused)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert float((got[name] - grad).abs().max() / scale) < 1e-5, name


def test_mask_and_positions_share_the_prompt_only():
    batch = pad_shared([[5, 6]], [[7, 8]], [[9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # the rejected reply restarts after the prompt
    padded = pad_shared([[5, 6], [1]], [[7, 8], [2]], [[9], [3]], pad_id=0)
    assert padded["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert segment_ids(padded["segments"], 5).tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 3, 3]]
    visible = (shared_mask(padded["segments"], 5, torch.float32) == 0)[:, 0].int().tolist()
    assert visible[0] == [[1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],
                          [1, 1, 1, 1, 0],
                          [1, 1, 0, 0, 1]]  # rejected: the prompt and itself, never the chosen reply
    assert visible[1][3] == [1, 0, 0, 1, 0] and visible[1][4] == [1, 0, 0, 1, 1]  # padding: never an empty row


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [False, True])
def test_shared_logps_equal_two_rows_with_gradients(attention, fused):
    rows = records()
    results = []
    for share in (False, True):
        model = tiny(attention=attention, tied=True)
        sums, lengths = policy_logps(model, collate(rows, "pair", share, ref=False), fused)
        # distinct weights per sequence, so a log-prob credited to the wrong sequence changes the gradients
        (sums * torch.arange(1.0, 1.0 + len(sums))).sum().backward()
        results.append((sums.detach(), lengths, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_len, plain_grads), (shared, shared_len, shared_grads) = results
    assert shared_len.tolist() == plain_len.tolist() == [6, 3, 11, 1, 9, 2, 1, 4]
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert_same_grads(shared_grads, plain_grads)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "orpo", "kto"])
def test_every_loss_is_unchanged_by_sharing(loss):
    kind = "kto" if loss == "kto" else "pair"
    cfg = DPOConfig(loss=loss, beta=2.0 if loss == "simpo" else 0.1, sft_weight=0.5 if loss == "sigmoid" else 0.0)
    rows = records(kind)
    plain = loss_and_grads(tiny(seed=1), collate(rows, kind, False), cfg, fused=True)
    shared = loss_and_grads(tiny(seed=1), collate(rows, kind, True), cfg, fused=True)
    assert shared[0] == pytest.approx(plain[0], rel=1e-5)
    assert_same_grads(shared[1], plain[1])


def test_lora_and_its_adapter_reference_match():
    from peft import LoraConfig, get_peft_model

    from lmforge.models.reference import Reference

    rows = records()
    results = []
    for share in (False, True):
        model = get_peft_model(tiny(seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        torch.manual_seed(9)  # B starts at zero: move it, or the adapter would not change anything
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        batch = collate(rows, "pair", share, ref=False)
        results.append((loss_and_grads(model, batch, DPOConfig(loss="simpo", beta=2.0), fused=False),
                        Reference("copy", tiny(seed=3).eval()).logps(model, batch),
                        Reference("adapter").logps(model, batch), policy_logps(model, batch, False)[0].detach()))
    (plain, plain_copy, plain_off, plain_on), (shared, shared_copy, shared_off, shared_on) = results
    assert shared[0] == pytest.approx(plain[0], rel=1e-5)
    assert plain[1] and all("lora_" in name for name in plain[1])
    assert_same_grads(shared[1], plain[1])
    assert torch.allclose(shared_copy, plain_copy, atol=1e-5, rtol=0)
    assert torch.allclose(shared_off, plain_off, atol=1e-5, rtol=0)
    assert torch.allclose(shared_off, shared_copy, atol=1e-5, rtol=0)  # adapter off is the base model
    assert not torch.allclose(shared_on, shared_off, atol=1e-2)  # and the adapter did change the policy


def test_activation_checkpointing_gives_the_same_gradients():
    rows = records()
    plain = loss_and_grads(tiny(seed=4), collate(rows, "pair", False), DPOConfig(), fused=True)
    model = tiny(seed=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    shared = loss_and_grads(model, collate(rows, "pair", True), DPOConfig(), fused=True)
    assert shared[0] == pytest.approx(plain[0], rel=1e-5)
    assert_same_grads(shared[1], plain[1])


def test_precomputed_reference_is_the_same_in_both_layouts(tmp_path):
    import datasets

    from lmforge.models.reference import Reference, precompute

    rows = datasets.Dataset.from_list(records())
    reference = Reference("copy", tiny(seed=6).eval())
    cached = [precompute(reference, tiny(seed=7), rows, lambda b, s=share: collate_pairs(b, 0, share_prompt=s), 3,
                         "cpu", tmp_path / f"{share}.safetensors", ("ref_chosen", "ref_rejected"))
              for share in (False, True)]
    for name in ("ref_chosen", "ref_rejected"):
        assert cached[1][name] == pytest.approx(cached[0][name], abs=1e-5)
    # and the shared batch carries them to the loss as the two-row batch does
    batch = collate_pairs(list(cached[1]), 0, share_prompt=True)
    assert batch["ref_chosen"].tolist() == pytest.approx(cached[0]["ref_chosen"], abs=1e-5)


def test_pairs_are_counted_in_both_layouts():
    rows = records()
    assert int(preference_count(collate(rows, "pair", False))) == int(preference_count(collate(rows, "pair", True))) == 4
    assert int(preference_count(collate(records("kto"), "kto", True))) == 4


def test_models_that_cannot_share_are_refused_or_left_alone():
    from types import SimpleNamespace

    from lmforge.config.load import load_config
    from lmforge.stages.dpo import share_prompt

    config = tiny().config
    assert unsupported_reason(config, 512) is None
    flash = SimpleNamespace(_attn_implementation="flash_attention_2")
    assert "flash_attention_2" in unsupported_reason(flash, 512)
    window = SimpleNamespace(_attn_implementation="sdpa", sliding_window=256)
    assert "sliding" in unsupported_reason(window, 512)
    assert unsupported_reason(window, 256) is None  # positions never reach the window
    assert unsupported_reason(SimpleNamespace(_attn_implementation="sdpa", sliding_window=256,
                                              use_sliding_window=False), 512) is None
    auto = load_config(None, ["model.scratch=tiny", "train.output_dir=x"], stage="dpo")
    assert share_prompt(auto, config) is True
    assert share_prompt(auto, flash) is False  # unset: off where it would not be exact
    mod = load_config(None, ["model.scratch=tiny", "train.output_dir=x", "model.finetuning=mod"], stage="dpo")
    assert share_prompt(mod, config) is False
    forced = load_config(None, ["model.scratch=tiny", "train.output_dir=x", "dpo.share_prompt=true"], stage="dpo")
    with pytest.raises(ConfigError, match=r"dpo\.share_prompt=true .*flash_attention_2.*dpo\.share_prompt=false"):
        share_prompt(forced, flash)


@pytest.mark.parametrize("share", [False, True])
def test_only_scored_positions_reach_the_output_layer(monkeypatch, share):
    """From hidden states, the [tokens × vocab] projection runs over reply tokens only, in both layouts:
    the prompt's positions carry no label."""
    import lmforge.models.shared_prompt as shared_prompt

    seen = []
    real = shared_prompt.token_logps_from_hidden

    def counting(hidden, weight, targets):
        seen.append(hidden.shape[0])
        return real(hidden, weight, targets)

    monkeypatch.setattr(shared_prompt, "token_logps_from_hidden", counting)
    batch = collate(records(), "pair", share, ref=False)
    fused_sums, lengths = policy_logps(tiny(seed=8), batch, fused=True)
    plain_sums, _ = policy_logps(tiny(seed=8), batch, fused=False)
    assert seen == [int(lengths.sum())] == [37]
    assert torch.allclose(fused_sums, plain_sums, atol=1e-5, rtol=0)
