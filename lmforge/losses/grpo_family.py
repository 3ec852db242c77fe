"""The GRPO loss family as pure tensor functions: advantage scaling, importance weights (token or
sequence level), asymmetric clipping, loss aggregation, overlong handling and the group-signal test of
dynamic sampling. The conventions of ``rl.py`` hold: per-token tensors are ``[B, T]`` over reply tokens,
right-padded, ``mask`` marks the real ones, and samples are laid out prompt-major.

Papers: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"),
DAPO (Yu et al. 2025: clip-higher, token-level loss, dynamic sampling, overlong shaping), GSPO (Zheng et
al. 2025: sequence-level importance ratio).
"""

from __future__ import annotations

import torch

from lmforge.config.schema_rl import IMPORTANCE_LEVELS, LOSS_TYPES, REWARD_SCALES
from lmforge.losses.rl import Metrics, by_group, group_advantages, masked_mean


def scaled_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Reward minus its group's mean, divided by (std + eps): the group's std (``group``, GRPO), the whole
    batch's std (``batch``; Hu et al. 2025, REINFORCE++ style, TRL's scale_rewards="batch") or not at all
    (``none``, Dr. GRPO: dividing by a group's std up-weights prompts that are nearly always right or wrong).
    Stds are unbiased, as in GRPO and TRL."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {scale!r}; valid: {', '.join(REWARD_SCALES)}")
    if scale != "batch":
        return group_advantages(rewards, group_size, scale=scale == "group", eps=eps)
    centred = group_advantages(rewards, group_size, scale=False)
    spread = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    return centred / (spread + eps)


def importance_log_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log of the importance ratio pi / pi_old: per token ``[B, T]`` (``token``, PPO/GRPO) or, for
    ``sequence`` (GSPO), the mean per-token log-ratio of each reply as ``[B, 1]`` — the log of the
    length-normalised sequence ratio, so one reply is clipped (and weighted) as a whole."""
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance sampling level {level!r}; valid: {', '.join(IMPORTANCE_LEVELS)}")
    real = mask.bool()
    # Zeroed on padding before any exp: a garbage padded log-prob must not become inf (and a NaN gradient).
    log_ratio = torch.where(real, logps - old_logps, torch.zeros_like(logps))
    if level == "token":
        return log_ratio
    lengths = mask.to(log_ratio.dtype).sum(-1, keepdim=True)
    return log_ratio.sum(-1, keepdim=True) / lengths.clamp(min=1.0)


def clipped_surrogate(log_weights: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, Metrics]:
    """max(-A * w, -A * clip(w, 1 - clip_low, 1 + clip_high)) per token, 0 on padding.

    ``log_weights`` is ``[B, T]`` or ``[B, 1]`` (a sequence-level weight, broadcast over the reply).
    ``clip_high > clip_low`` is DAPO's clip-higher: a token the policy made unlikely can still gain
    probability, which keeps entropy from collapsing. Metrics: ``clipfrac`` (tokens whose clipped term is
    strictly larger), ``clip_low_frac`` (w < 1 - clip_low with A < 0) and ``clip_high_frac``
    (w > 1 + clip_high with A > 0), TRL's clip_ratio/low_mean and high_mean; ``ratio`` (mean w).
    """
    real = mask.bool()
    ratio = torch.exp(log_weights)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.where(real, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        wide = ratio.expand_as(per_token)
        metrics: Metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(wide.dtype).expand_as(per_token), mask),
            "clip_low_frac": masked_mean(((wide < 1.0 - clip_low) & (advantages < 0)).to(wide.dtype), mask),
            "clip_high_frac": masked_mean(((wide > 1.0 + clip_high) & (advantages > 0)).to(wide.dtype), mask),
            "ratio": masked_mean(wide, mask),
        }
    return per_token, metrics


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) of one micro-batch; the step's loss is the sum of sums over the sum of counts:

    * ``grpo``: each reply's token mean, summed; count = replies (so: mean over the step's replies of
      per-reply means; GRPO, Shao et al. 2024). Long replies weigh less per token.
    * ``bnpo``: the micro-batch's token mean; count = 1 (mean over micro-batches of their token means).
    * ``dr_grpo``: token sum / max_new_tokens; count = replies (so: token sum / (replies x max_new_tokens),
      a constant normaliser: no length bias; Dr. GRPO, Liu et al. 2025).
    * ``dapo``: token sum; count = tokens (a token mean over the whole step; DAPO, Yu et al. 2025).

    A reply with no real token (masked as truncated, say) still counts as a reply under grpo and dr_grpo,
    as in TRL.
    """
    real = mask.bool()
    kept = torch.where(real, per_token, torch.zeros_like(per_token))
    weights = mask.to(kept.dtype)
    replies = torch.tensor(float(per_token.shape[0]), dtype=kept.dtype, device=kept.device)
    if loss_type == "grpo":
        return (kept.sum(-1) / weights.sum(-1).clamp(min=1.0)).sum(), replies
    if loss_type == "bnpo":
        return kept.sum() / weights.sum().clamp(min=1.0), torch.ones_like(replies)
    if loss_type == "dr_grpo":
        return kept.sum() / max_new_tokens, replies
    if loss_type == "dapo":
        return kept.sum(), weights.sum()
    raise ValueError(f"unknown loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def loss_count(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The ``count`` of :func:`aggregate` for a micro-batch, without its loss: what the training loop
    sums over a step's micro-batches before any backward pass, to scale each one."""
    if loss_type == "dapo":
        return mask.sum()
    if loss_type == "bnpo":
        return torch.ones((), device=mask.device)
    if loss_type in ("grpo", "dr_grpo"):
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    raise ValueError(f"unknown loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times ``penalty``: 0 up to
    max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens (and beyond).
    ``buffer`` 0 turns it off."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * over / buffer


def truncation_mask(mask: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
    """``mask`` with the rows of replies that never stopped (cut at max_new_tokens) zeroed: they carry no
    loss (DAPO's overlong filtering, TRL's mask_truncated_completions)."""
    return mask * stopped.to(mask.dtype)[:, None]


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool per group (prompt-major): whether its rewards differ. A group whose rewards are all equal has
    advantage 0 everywhere and teaches nothing; DAPO's dynamic sampling drops it and draws more prompts.
    A NaN reward makes its group count as no signal."""
    grouped = by_group(rewards, group_size)
    return grouped.amax(dim=1) > grouped.amin(dim=1)


def rows_of_groups(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices (prompt-major) of the groups where ``groups`` (bool per group) is set: what a rollout
    keeps of its samples after dynamic sampling dropped the groups without signal."""
    kept = torch.nonzero(groups, as_tuple=False).flatten()
    return (kept[:, None] * group_size + torch.arange(group_size, device=groups.device)).flatten()
