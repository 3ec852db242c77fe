"""PPO (Schulman et al. 2017) for RLHF as in InstructGPT (Ouyang et al. 2022).

The reward of a reply is paid at its last token; every token also pays a KL penalty toward the
reference (fixed or adaptive coefficient). GAE(γ, λ) over the critic's values gives per-token
advantages (whitened), and the clipped surrogate plus a clipped value loss train policy and critic.
"""

from __future__ import annotations

import torch

from lmforge.config.schema import RLConfig, StageConfig
from lmforge.losses.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
)
from lmforge.stages.online import Algorithm, reply_outputs, run_online


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float) -> torch.Tensor:
    """[N, R]: −kl_coef·KL on every reply token, plus the reply's score on its last token."""
    rewards = -kl_coef * kl * mask if kl is not None else torch.zeros_like(mask)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def ppo_advantages(batch: dict, cfg: RLConfig, kl_coef: float):
    mask = batch["mask"]
    kl = kl_per_token(batch["old_logps"], batch["ref_logps"], cfg.kl_estimator) if "ref_logps" in batch else None
    rewards = token_rewards(batch["scores"], mask, kl, kl_coef)
    advantages, returns = gae(rewards, batch["old_values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    metrics = {"reward_with_kl": float((rewards * mask).sum(-1).mean()),
               "explained_variance": float(explained_variance(batch["old_values"], returns, mask))}
    return advantages, returns, metrics


def ppo_loss(model, batch: dict, cfg: RLConfig):
    mask = batch["mask"]
    logits, values, logps = reply_outputs(model, batch, cfg)
    policy, policy_metrics = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cfg.clip_range)
    value, value_metrics = clipped_value_loss(values.float(), batch["old_values"], batch["returns"], mask,
                                              cfg.clip_range_value)
    loss = ((policy + cfg.value_coef * value) * mask).sum()
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.float()), mask)
    metrics = {**policy_metrics, **value_metrics, "policy_loss": masked_mean(policy.detach(), mask),
               "value_loss": masked_mean(value.detach(), mask), "entropy": entropy}
    return loss, mask.sum(), metrics


PPO = Algorithm("ppo", uses_critic=True, advantages=ppo_advantages, loss=ppo_loss)


def run(cfg: StageConfig) -> dict:
    return run_online(cfg, PPO)
