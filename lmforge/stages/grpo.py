"""GRPO (Shao et al. 2024, DeepSeekMath): no critic. Each prompt gets `rl.num_generations` replies;
a reply's advantage is its reward minus its group's mean, over the group's std, on every token.
The clipped surrogate is kept, and the KL to the reference is a k3 loss term of weight β
(`rl.kl_coef`, which may be 0) instead of a reward penalty. Losses are averaged over all reply
tokens of a step, so long replies are not down-weighted per token (as DAPO/Dr. GRPO advise).
"""

from __future__ import annotations

import torch

from lmforge.config.schema import RLConfig, StageConfig
from lmforge.losses.rl import (
    clipped_policy_loss,
    entropy_from_logits,
    group_advantages,
    kl_per_token,
    masked_mean,
)
from lmforge.stages.online import Algorithm, reply_outputs, run_online


def grpo_advantages(batch: dict, cfg: RLConfig, kl_coef: float):
    advantages = group_advantages(batch["scores"], cfg.num_generations)
    groups = batch["scores"].view(-1, cfg.num_generations)
    with_signal = (groups.std(-1) > 0).float().mean()  # groups whose rewards differ: the ones that teach
    return advantages[:, None] * batch["mask"], None, {"groups_with_signal": float(with_signal)}


def grpo_loss(model, batch: dict, cfg: RLConfig):
    mask = batch["mask"]
    logits, _, logps = reply_outputs(model, batch, cfg)
    old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()  # on-policy: see on_policy_step
    loss, metrics = clipped_policy_loss(logps, old_logps, batch["advantages"], mask, cfg.clip_range)
    if "ref_logps" in batch and cfg.kl_coef > 0:
        kl = kl_per_token(logps, batch["ref_logps"], "k3")
        loss = loss + cfg.kl_coef * kl
        metrics = {**metrics, "kl_loss": masked_mean(kl.detach(), mask)}
    with torch.no_grad():
        metrics["entropy"] = masked_mean(entropy_from_logits(logits.float()), mask)
    return (loss * mask).sum(), mask.sum(), metrics


GRPO = Algorithm("grpo", uses_critic=False, advantages=grpo_advantages, loss=grpo_loss)


def run(cfg: StageConfig) -> dict:
    return run_online(cfg, GRPO)
