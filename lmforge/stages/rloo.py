"""RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with a leave-one-out baseline. The KL
to the reference is subtracted from each reply's reward (summed over its tokens), each reply's
baseline is the mean reward of the other replies to the same prompt, and the advantage is applied
to every token of the reply under the same clipped surrogate as GRPO — with the GRPO loss family's
aggregation, importance level, clipping, entropy bonus and overlong handling (docs/grpo.md)."""

from __future__ import annotations

from lmforge.config.schema import RLConfig, StageConfig
from lmforge.losses.rl import kl_per_token, masked_whiten, rloo_advantages
from lmforge.stages.grpo import grpo_count, grpo_loss, shaped_scores
from lmforge.stages.online import Algorithm, run_online


def rloo_advantages_per_token(batch: dict, cfg: RLConfig, kl_coef: float):
    rewards, metrics = shaped_scores(batch, cfg)
    mask = batch["mask"]
    if "ref_logps" in batch and kl_coef > 0:
        kl = (kl_per_token(batch["old_logps"], batch["ref_logps"], cfg.kl_estimator) * mask).sum(-1)
        rewards = rewards - kl_coef * kl
    advantages = rloo_advantages(rewards, cfg.num_generations)[:, None] * mask
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, None, {**metrics, "reward_with_kl": float(rewards.mean())}


def rloo_loss(model, batch: dict, cfg: RLConfig):
    # The KL is already in the reward: the loss is the clipped surrogate alone.
    return grpo_loss(model, {k: v for k, v in batch.items() if k != "ref_logps"}, cfg)


RLOO = Algorithm("rloo", uses_critic=False, advantages=rloo_advantages_per_token, loss=rloo_loss, count=grpo_count)


def run(cfg: StageConfig) -> dict:
    return run_online(cfg, RLOO)
