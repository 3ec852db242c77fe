"""The GRPO loss family (losses/grpo_family.py) against hand computations and TRL 1.16's GRPO loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_rl_losses import GARBAGE as G  # what a padded entry may hold; it must never reach a real one
from test_rl_losses import TOL, t

from lmforge.config.errors import ConfigError
from lmforge.config.schema import RLConfig
from lmforge.losses import rl
from lmforge.losses.grpo_family import (
    aggregate,
    clipped_surrogate,
    groups_with_signal,
    importance_log_weights,
    loss_count,
    overlong_penalty,
    rows_of_groups,
    scaled_advantages,
    truncation_mask,
)
from lmforge.losses.rl import clipped_policy_loss, entropy_from_logits, entropy_with_grad, kl_per_token
from lmforge.stages.grpo import grpo_advantages, grpo_loss

MASK = t([[1, 1, 1, 0], [1, 0, 0, 0]])  # replies of 3 and 1 tokens, right-padded to 4


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize("loss_type, loss, count", [
    ("grpo", (1 + 2 + 3) / 3 + 4 / 1, 2),  # reply means 2 and 4, over 2 replies -> 3
    ("bnpo", (1 + 2 + 3 + 4) / 4, 1),  # the micro-batch's token mean
    ("dr_grpo", (1 + 2 + 3 + 4) / 8, 2),  # token sum / max_new_tokens (8), over 2 replies -> 10 / 16
    ("dapo", 1 + 2 + 3 + 4, 4),  # token sum over 4 tokens
])
def test_aggregate_by_hand(loss_type, loss, count):
    per_token = t([[1.0, 2.0, 3.0, G], [4.0, float("inf"), G, G]])
    total, n = aggregate(per_token, MASK, loss_type, max_new_tokens=8)
    assert total.item() == pytest.approx(loss, abs=TOL) and n.item() == count
    assert loss_count(MASK, loss_type).item() == count


def test_aggregate_over_two_micro_batches_is_the_step_normaliser():
    # Step of 2 micro-batches: grpo = mean over all 3 replies of reply means; dr_grpo = sum / (3 x L).
    a, b = t([[1.0, 2.0, 3.0, 0.0], [4.0, 0, 0, 0]]), t([[6.0, 6.0, 0, 0]])
    ma, mb = MASK, t([[1, 1, 0, 0]])
    for loss_type, expected in [("grpo", (2 + 4 + 6) / 3), ("dr_grpo", 22 / (3 * 8)), ("dapo", 22 / 6),
                                ("bnpo", (10 / 4 + 12 / 2) / 2)]:
        (sa, ca), (sb, cb) = aggregate(a, ma, loss_type, 8), aggregate(b, mb, loss_type, 8)
        assert ((sa + sb) / (ca + cb)).item() == pytest.approx(expected, abs=TOL), loss_type


def test_a_fully_masked_reply_still_counts_under_grpo_and_gives_no_nan():
    per_token = t([[1.0, 1.0], [5.0, 5.0]]).requires_grad_(True)
    mask = t([[1, 1], [0, 0]])
    total, n = aggregate(per_token, mask, "grpo", 2)
    total.backward()
    assert (total / n).item() == pytest.approx(0.5) and per_token.grad[1].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- importance weights and clipping


def test_sequence_weight_is_the_mean_token_log_ratio():
    logps, old = t([[-1.0, -2.0, -0.5, 800.0], [-3.0, 800.0, 800.0, 800.0]]), t([[-1.1, -2.3, -0.5, 0.0]] * 2)
    seq = importance_log_weights(logps, old, MASK, "sequence")
    assert seq.shape == (2, 1)
    assert seq[:, 0].tolist() == pytest.approx([(0.1 + 0.3 + 0.0) / 3, -1.9 / 1], abs=TOL)
    token = importance_log_weights(logps, old, MASK, "token")
    assert token.tolist() == [pytest.approx([0.1, 0.3, 0.0, 0.0]), pytest.approx([-1.9, 0.0, 0.0, 0.0])]


def test_clip_higher_by_hand():
    # eps low 0.2, high 0.28: ratio 1.25 with A > 0 stays unclipped (symmetric 0.2 would clip it at 1.2).
    ratios = [1.25, 1.35, 0.75, 0.7]
    advantages = t([[1.0, 1.0, -1.0, -1.0]])
    log_w = t([[math.log(r) for r in ratios]]).requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.float64)
    per_token, m = clipped_surrogate(log_w, advantages, mask, 0.2, 0.28)
    # -min(rA, clip(r)A): 1.25 -> -1.25; 1.35 -> -1.28 (clipped); 0.75 -> +0.8 (A<0: max(-(-0.75), -(-0.8)));
    # 0.7 -> +0.8
    assert per_token[0].tolist() == pytest.approx([-1.25, -1.28, 0.8, 0.8], abs=TOL)
    per_token.sum().backward()
    assert log_w.grad[0].tolist() == pytest.approx([-1.25, 0.0, 0.0, 0.0], abs=TOL)  # clipped tokens: no gradient
    assert m["clip_high_frac"].item() == pytest.approx(0.25) and m["clip_low_frac"].item() == pytest.approx(0.5)
    assert m["clipfrac"].item() == pytest.approx(0.75)
    symmetric, _ = clipped_surrogate(log_w.detach(), advantages, mask, 0.2, 0.2)
    assert symmetric[0, 0].item() == pytest.approx(-1.2)


def test_sequence_level_clip_acts_on_the_whole_reply():
    log_w = t([[math.log(1.5)], [math.log(1.1)]])
    advantages = t([[2.0, 2.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    per_token, _ = clipped_surrogate(log_w, advantages, MASK, 0.2, 0.2)
    assert per_token.tolist() == [pytest.approx([-2.4, -2.4, -2.4, 0.0]), pytest.approx([-2.2, 0.0, 0.0, 0.0])]


# ---------------------------------------------------------------- advantages, overlong, dynamic sampling


def test_scaled_advantages_group_batch_none_by_hand():
    rewards = t([1.0, 0.0, 2.0, 2.0])  # groups of 2: means 0.5 and 2
    group = scaled_advantages(rewards, 2, "group")
    std0 = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert group.tolist() == pytest.approx([0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4), 0.0, 0.0])
    batch_std = torch.tensor([1.0, 0.0, 2.0, 2.0]).std().item()  # unbiased, over the whole rollout
    assert scaled_advantages(rewards, 2, "batch").tolist() == pytest.approx(
        [0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4), 0.0, 0.0])
    assert scaled_advantages(rewards, 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0]


def test_overlong_penalty_by_hand_and_against_trl():
    from trl.rewards import get_soft_overlong_punishment

    lengths = torch.tensor([5, 6, 8, 10])
    # limit 10, buffer 4: free up to 6 tokens, then -penalty * (length - 6) / 4
    assert overlong_penalty(lengths, 10, 4, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5])
    assert overlong_penalty(lengths, 10, 0, 0.5).tolist() == [0.0] * 4
    trl = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == pytest.approx(trl([[1] * n for n in lengths.tolist()]))


def test_truncation_mask_and_group_signal_on_hand_made_groups():
    mask = t([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert truncation_mask(mask, torch.tensor([True, False, True])).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    rewards = t([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, float("nan"), 1.0, 1.0])
    signal = groups_with_signal(rewards, 3)
    assert signal.tolist() == [False, True, False, False]  # all equal, differ, all equal, a NaN
    assert rows_of_groups(signal, 3).tolist() == [3, 4, 5]
    assert rows_of_groups(torch.tensor([True, False, True]), 2).tolist() == [0, 1, 4, 5]


# ---------------------------------------------------------------- entropy with its own backward


def test_entropy_with_grad_matches_autograd_in_several_chunks(monkeypatch):
    monkeypatch.setattr(rl, "LOGSOFTMAX_CHUNK_ELEMENTS", 7 * 2)  # 2 rows per chunk over 6 rows
    logits = torch.randn(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    weights = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 0.7):
        mine = logits.clone().requires_grad_(True)
        ours = entropy_with_grad(mine, temperature)
        (ours * weights).sum().backward()
        ref = logits.clone().requires_grad_(True)
        log_p = torch.log_softmax(ref / temperature, dim=-1)
        expected = -(log_p.exp() * log_p).sum(-1)
        (expected * weights).sum().backward()
        assert torch.allclose(ours.double(), expected, atol=1e-6)
        assert torch.allclose(mine.grad, ref.grad, atol=1e-6)
        assert torch.allclose(ours, entropy_from_logits(logits / temperature), atol=1e-6)


# ---------------------------------------------------------------- the stage's loss: default == before


class _Logits(torch.nn.Module):
    """A 'policy' whose reply logits are a parameter: reply_outputs(model, batch, cfg) calls it."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask, position_ids, width):
        return self.logits, None


def _batch(seed: int = 0, rows: int = 4, width: int = 5, vocab: int = 11) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, width, vocab, generator=gen)
    responses = torch.randint(0, vocab, (rows, width), generator=gen)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    batch = {"input_ids": responses, "attention_mask": torch.ones_like(responses), "position_ids": responses,
             "responses": responses, "mask": mask,
             "old_logps": (rl.gather_logps(logits, responses) + 0.3 * torch.randn(rows, width, generator=gen)) * mask,
             "ref_logps": (rl.gather_logps(logits, responses) - 0.2 * torch.rand(rows, width, generator=gen)) * mask,
             "advantages": torch.randn(rows, 1, generator=gen) * mask}
    return batch, logits


def test_default_loss_reproduces_the_previous_grpo_loss_exactly():
    cfg = RLConfig(kl_coef=0.05, num_generations=2)
    batch, logits = _batch()
    model = _Logits(logits)
    loss_sum, count, metrics = grpo_loss(model, batch, cfg)
    loss_sum.backward()

    # The loss as stages/grpo.py computed it before the family (clipped_policy_loss + k3, summed over tokens,
    # normalised by reply tokens).
    before = _Logits(logits)
    logps = rl.gather_logps(before.logits.float(), batch["responses"])
    old, metrics_before = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], batch["mask"], 0.2)
    old = old + 0.05 * kl_per_token(logps, batch["ref_logps"], "k3")
    old_sum = (old * batch["mask"]).sum()
    old_sum.backward()
    assert torch.equal(loss_sum, old_sum) and torch.equal(count, batch["mask"].sum())
    assert torch.equal(model.logits.grad, before.logits.grad)
    for key in ("clipfrac", "approx_kl", "ratio"):
        assert torch.equal(metrics[key], metrics_before[key]), key


def test_default_advantages_reproduce_the_previous_group_advantages_exactly():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0])
    mask = torch.ones(6, 3)
    advantages, _, metrics = grpo_advantages({"scores": scores, "mask": mask}, RLConfig(num_generations=2), 0.0)
    assert torch.equal(advantages, rl.group_advantages(scores, 2)[:, None] * mask)
    assert metrics["groups_without_signal"] == 1 and metrics["groups_with_signal"] == pytest.approx(2 / 3)


def test_overlong_penalty_and_truncation_reach_the_advantages_and_mask():
    cfg = RLConfig(num_generations=2, max_new_tokens=4, overlong_buffer=2, mask_truncated=True, scale_rewards="none")
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).float()
    batch = {"scores": torch.tensor([1.0, 1.0, 0.0, 0.0]), "mask": mask, "stopped": torch.tensor([True, True, False, True])}
    advantages, _, metrics = grpo_advantages(batch, cfg, 0.0)
    # penalties: lengths 4, 2, 4, 1 over a 2-token buffer before 4 -> -1, 0, -1, 0; scores 0, 1, -1, 0
    assert advantages[:, 0].tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.5])  # row 2 truncated: masked out
    assert batch["mask"][2].tolist() == [0, 0, 0, 0] and metrics["truncated_masked"] == 1
    assert metrics["overlong_penalty"] == pytest.approx(-0.5)
    with pytest.raises(ConfigError, match="rl.mask_truncated needs"):
        grpo_advantages({"scores": torch.zeros(2), "mask": torch.ones(2, 1)}, cfg, 0.0)


# ---------------------------------------------------------------- against TRL 1.16's GRPO loss


def _trl_loss(batch: dict, logps: torch.Tensor, entropies: torch.Tensor, loss_type: str, level: str,
              eps: float, eps_high: float, beta: float, entropy_coef: float, max_len: int) -> float:
    from trl import GRPOTrainer

    mask = batch["mask"].long()
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                  gather_for_metrics=lambda x: x, sync_gradients=True)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=accelerator, max_completion_length=max_len, _entropy_bonus_enabled=entropy_coef != 0,
        entropy_coef=entropy_coef, use_adaptive_entropy=False, _metrics={"train": defaultdict(list)},
    )
    inputs = {"prompt_ids": torch.zeros(mask.shape[0], 1, dtype=torch.long), "prompt_mask": torch.ones(mask.shape[0], 1),
              "completion_ids": batch["responses"], "completion_mask": mask, "advantages": batch["advantages"][:, 0],
              "old_per_token_logps": batch["old_logps"], "ref_per_token_logps": batch["ref_logps"],
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs).item()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_high, beta", [(0.2, 0.0), (0.28, 0.04)])
def test_matches_trl_grpo_loss(loss_type, level, eps_high, beta):
    batch, logits = _batch(seed=3)
    batch["advantages"] = batch["advantages"][:, :1].expand_as(batch["mask"]) * batch["mask"]
    cfg = RLConfig(loss_type=loss_type, importance_sampling=level, clip_range=0.2, clip_range_high=eps_high,
                   kl_coef=beta, max_new_tokens=6, num_generations=2)
    loss_sum, count, _ = grpo_loss(_Logits(logits), batch, cfg)
    logps = rl.gather_logps(logits, batch["responses"])
    expected = _trl_loss(batch, logps, entropy_from_logits(logits), loss_type, level, 0.2, eps_high, beta, 0.0, 6)
    assert abs((loss_sum / count).item() - expected) < 1e-6


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])  # where TRL's token-mean bonus equals our aggregation
def test_entropy_bonus_matches_trl(loss_type):
    batch, logits = _batch(seed=4)
    batch["advantages"] = batch["advantages"][:, :1].expand_as(batch["mask"]) * batch["mask"]
    cfg = RLConfig(loss_type=loss_type, entropy_coef=0.01, kl_coef=0.0, max_new_tokens=6, num_generations=2)
    loss_sum, count, _ = grpo_loss(_Logits(logits), batch, cfg)
    logps = rl.gather_logps(logits, batch["responses"])
    expected = _trl_loss(batch, logps, entropy_from_logits(logits), loss_type, "token", 0.2, 0.2, 0.0, 0.01, 6)
    assert abs((loss_sum / count).item() - expected) < 1e-6


# ---------------------------------------------------------------- config


def test_config_defaults_ranges_and_choices():
    cfg = RLConfig()
    assert (cfg.loss_type, cfg.importance_sampling, cfg.reward_scale(), cfg.clip_bounds()) == \
        ("dapo", "token", "group", (0.2, 0.2))
    assert RLConfig(loss_type="dr_grpo").reward_scale() == "none"
    assert RLConfig(loss_type="dr_grpo", scale_rewards="group").reward_scale() == "group"
    assert RLConfig(clip_range=0.1, clip_range_high=0.28).clip_bounds() == (0.1, 0.28)
    for bad, match in [({"loss_type": "gspo"}, r"rl.loss_type='gspo' is not one of grpo, bnpo, dr_grpo, dapo"),
                       ({"importance_sampling": "seq"}, "rl.importance_sampling"),
                       ({"scale_rewards": "std"}, "rl.scale_rewards"),
                       ({"clip_range_low": 1.5}, r"rl.clip_range_low=1.5: must be a finite number in \(0, 1\]"),
                       ({"clip_range_high": 0.0}, "rl.clip_range_high=0.0"),
                       ({"entropy_coef": -0.1}, "rl.entropy_coef"), ({"overlong_buffer": -1}, "rl.overlong_buffer"),
                       ({"overlong_penalty": float("nan")}, "rl.overlong_penalty"),
                       ({"overlong_buffer": 65}, "rl.overlong_buffer=65 is longer than rl.max_new_tokens=64")]:
        with pytest.raises(ConfigError, match=match):
            RLConfig(**bad)


def test_stage_config_refuses_family_knobs_where_they_do_nothing():
    from lmforge.config.load import load_config

    base = ["model.scratch=test", "rl.rewards=[{kind: answer_match}]", "rl.num_generations=2"]
    with pytest.raises(ConfigError, match="rl.loss_type, rl.entropy_coef apply to grpo and rloo, not ppo"):
        load_config(None, [*base, "rl.loss_type=grpo", "rl.entropy_coef=0.01"], stage="ppo")
    with pytest.raises(ConfigError, match="rl.scale_rewards applies to grpo"):
        load_config(None, [*base, "rl.scale_rewards=batch"], stage="rloo")
    assert load_config(None, [*base, "rl.scale_rewards=batch"], stage="grpo").rl.scale_rewards == "batch"


# ---------------------------------------------------------------- a tiny GRPO run learns with each variant

STARTS_WITH_DIGIT = r"^\s*\d"
VARIANTS = [["rl.importance_sampling=sequence"],  # GSPO
            ["rl.clip_range_high=0.28", "rl.entropy_coef=0.001"],  # clip-higher and an entropy bonus
            ["rl.overlong_buffer=4", "rl.overlong_penalty=0.5"],  # soft overlong penalty
            ["rl.loss_type=grpo"], ["rl.loss_type=bnpo"], ["rl.loss_type=dr_grpo"]]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0].removeprefix("rl."))
def test_a_tiny_grpo_run_learns_with_each_variant(base, world_dir, tmp_path, variant):
    import json

    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    out = tmp_path / "grpo"
    cfg = load_config(None, [
        f"model.name_or_path={base}", f"data.train={world_dir}/rl/arith_train.jsonl",
        f"data.eval={world_dir}/rl/arith_eval.jsonl", "data.max_length=96", "rl.max_new_tokens=8",
        "rl.prompts_per_step=8", "rl.eval_prompts=16", "rl.num_generations=8", "rl.kl_coef=0.0",
        "rl.rewards=[{kind: regex, pattern: '" + STARTS_WITH_DIGIT + "'}]", "rl.ppo_epochs=1",
        "train.max_steps=16", "train.lr=3e-3", "train.batch_size=16", "train.logging_steps=1",
        f"train.output_dir={out}", "log.progress=false", "log.report_to=[]", *variant], stage="grpo")
    metrics = STAGE_RUNNERS["grpo"](cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r]
    first, last = (sum(r["reward"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last > first + 0.1, (first, last)  # sampled replies (temperature 1) earn more
    if "rl.overlong_buffer=4" in variant:  # the penalty is half the reward: replies shorten, to the bone
        first_len, last_len = (sum(r["length"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
        assert last_len < first_len - 0.5 and rows[-1]["overlong_penalty"] > rows[0]["overlong_penalty"]
    else:
        assert metrics["eval_reward"] > metrics["initial_eval_reward"] + 0.3  # greedy replies too
    assert "groups_without_signal" in rows[0] and "clip_high_frac" in rows[0]
    # Each step is normalised by the loss's own count: 64 replies, 4 micro-batches of 16, or its reply tokens.
    count = {"rl.loss_type=grpo": 64, "rl.loss_type=dr_grpo": 64, "rl.loss_type=bnpo": 4}.get(variant[0])
    assert all(r["loss_count"] == (count or r["reply_tokens"]) for r in rows), [r["loss_count"] for r in rows]
    assert all(r["reply_tokens"] == pytest.approx(64 * r["length"]) for r in rows)
