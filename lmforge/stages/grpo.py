"""GRPO (Shao et al. 2024, DeepSeekMath): no critic. Each prompt gets `rl.num_generations` replies;
a reply's advantage is its reward minus its group's mean, over the group's std (`rl.scale_rewards`), on
every token. The clipped surrogate is kept (asymmetric with `rl.clip_range_low/high`, per token or per
reply with `rl.importance_sampling`), the KL to the reference is a k3 loss term of weight β
(`rl.kl_coef`, which may be 0) instead of a reward penalty, and `rl.entropy_coef` adds an entropy bonus.
`rl.loss_type` chooses how per-token losses become one number; the default (dapo) averages over all
reply tokens of a step, so long replies are not down-weighted per token. The maths is in
lmforge/losses/grpo_family.py; docs/grpo.md maps each knob to its paper and to TRL's name.
"""

from __future__ import annotations

import torch

from lmforge.config.errors import ConfigError
from lmforge.config.schema import RLConfig, StageConfig
from lmforge.losses.grpo_family import (
    aggregate,
    clipped_surrogate,
    groups_with_signal,
    importance_log_weights,
    loss_count,
    overlong_penalty,
    scaled_advantages,
    truncation_mask,
)
from lmforge.losses.rl import entropy_with_grad, kl_per_token, masked_mean
from lmforge.stages.online import Algorithm, reply_outputs, run_online


def shaped_scores(batch: dict, cfg: RLConfig) -> tuple[torch.Tensor, dict]:
    """The rollout's scores with DAPO's overlong handling applied, shared by GRPO and RLOO: the soft
    overlong penalty added to each score (from the reply lengths), and with rl.mask_truncated the rows of
    replies cut at max_new_tokens dropped from batch["mask"] (so from the loss and its token count)."""
    mask = batch["mask"]
    lengths = mask.sum(-1)
    penalty = overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    scores = batch["scores"] + penalty.to(batch["scores"].dtype)
    metrics = {"overlong_penalty": float(penalty.mean())} if cfg.overlong_buffer else {}
    if cfg.mask_truncated:
        if "stopped" not in batch:
            raise ConfigError("rl.mask_truncated needs each reply's stop flag in the rollout batch (batch['stopped'])")
        stopped = batch["stopped"].bool()
        batch["mask"] = truncation_mask(mask, stopped)
        metrics["truncated_masked"] = int((~stopped).sum())
    return scores, metrics


def grpo_advantages(batch: dict, cfg: RLConfig, kl_coef: float):
    scores, metrics = shaped_scores(batch, cfg)
    advantages = scaled_advantages(scores, cfg.num_generations, cfg.reward_scale())
    signal = groups_with_signal(scores, cfg.num_generations)  # groups whose rewards differ: the ones that teach
    metrics.update(groups_with_signal=float(signal.float().mean()), groups_without_signal=int((~signal).sum()))
    return advantages[:, None] * batch["mask"], None, metrics


def grpo_loss(model, batch: dict, cfg: RLConfig):
    """(loss sum, count, metrics) of one micro-batch, aggregated as rl.loss_type says."""
    mask = batch["mask"]
    logits, _, logps = reply_outputs(model, batch, cfg)
    old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()  # on-policy: see on_policy_step
    low, high = cfg.clip_bounds()
    log_weights = importance_log_weights(logps, old_logps, mask, cfg.importance_sampling)
    loss, metrics = clipped_surrogate(log_weights, batch["advantages"], mask, low, high)
    with torch.no_grad():  # per token at either level: what rl.target_approx_kl reads
        metrics["approx_kl"] = masked_mean(0.5 * importance_log_weights(logps, old_logps, mask) ** 2, mask)
    if "ref_logps" in batch and cfg.kl_coef > 0:
        kl = kl_per_token(logps, batch["ref_logps"], "k3")
        loss = loss + cfg.kl_coef * kl
        metrics["kl_loss"] = masked_mean(kl.detach(), mask)
    if cfg.entropy_coef > 0:
        entropy = entropy_with_grad(logits, cfg.temperature)
        loss = loss - cfg.entropy_coef * entropy
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
    else:
        with torch.no_grad():
            metrics["entropy"] = masked_mean(entropy_with_grad(logits, cfg.temperature), mask)
    loss_sum, count = aggregate(loss, mask, cfg.loss_type, cfg.max_new_tokens)
    return loss_sum, count, metrics


def grpo_count(batch: dict, cfg: RLConfig) -> torch.Tensor:
    """What grpo_loss's sum is over (rl.loss_type): replies, micro-batches or reply tokens."""
    return loss_count(batch["mask"], cfg.loss_type)


GRPO = Algorithm("grpo", uses_critic=False, advantages=grpo_advantages, loss=grpo_loss, count=grpo_count)


def run(cfg: StageConfig) -> dict:
    return run_online(cfg, GRPO)
