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


def model_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [N, T], mask [N, T]): the positions of each row's model tokens, in order, packed to the left.
    A multi-turn reply has environment tokens between the model's turns (holes in the mask); GAE runs over
    the model's tokens alone, so an environment turn is one step between two of the model's, not an end."""
    lengths = mask.sum(-1).long()
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    order = torch.argsort((mask <= 0).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, (torch.arange(width, device=mask.device)[None] < lengths[:, None]).to(mask.dtype)


def ppo_advantages(batch: dict, cfg: RLConfig, kl_coef: float):
    full_mask = batch["mask"]
    index, mask = model_positions(full_mask)
    values = batch["old_values"].gather(1, index) * mask
    kl = kl_per_token(batch["old_logps"], batch["ref_logps"], cfg.kl_estimator).gather(1, index) \
        if "ref_logps" in batch else None
    rewards = token_rewards(batch["scores"], mask, kl, kl_coef)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    metrics = {"reward_with_kl": float((rewards * mask).sum(-1).mean()),
               "explained_variance": float(explained_variance(values, returns, mask))}
    spread = torch.zeros_like(full_mask)  # back to the reply's positions; 0 on environment tokens and padding
    return spread.scatter(1, index, advantages * mask), spread.scatter(1, index, returns * mask), metrics


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
