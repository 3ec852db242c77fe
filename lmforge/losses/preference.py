"""Preference losses (DPO family, SimPO, ORPO, KTO, Bradley-Terry) as pure tensor functions.

Every loss takes per-sequence log-probs (or rewards) that the caller has already computed and returns
``(loss, metrics)``. Keeping the model calls out means one stage can run the policy and the reference
however it likes (one concatenated forward, cached reference log-probs, a disabled LoRA adapter) and the
maths stays testable on hand-written numbers.

Metrics are detached 0-dim tensors rather than Python floats so that logging does not force a
device-to-host sync on every step; the caller calls ``.item()`` when it actually logs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.losses.lm import IGNORE

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
Metrics = dict[str, torch.Tensor | float]


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum (or mean) of next-token log-probs over positions whose label is not IGNORE.

    Gathering the target logit and subtracting the logsumexp never keeps a second [B, T, V] tensor of
    log-probs alive, which matters at real vocabulary sizes. Float32 because summing hundreds of bf16
    log-probs loses the differences that the preference losses are built on.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE
    # IGNORE is not a valid index for gather; any in-range id works since those positions are dropped.
    safe_labels = shift_labels.masked_fill(~mask, 0)
    picked = torch.gather(shift_logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(shift_logits, dim=-1)
    # where (not a multiply by the mask) so a -inf at a masked position cannot turn into NaN.
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    lengths = mask.sum(dim=-1)
    logps = token_logps.sum(dim=-1)
    if average:
        # clamp: an all-masked row (e.g. a prompt truncated away) gives 0 rather than NaN.
        logps = logps / lengths.clamp(min=1)
    return logps, lengths


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    """The metrics every pairwise loss reports, so the logs of DPO, SimPO and ORPO runs line up."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        # A tie counts half: before training the policy equals its reference, every implicit reward
        # is 0, and the honest accuracy of "no preference yet" is 50%, not 0%.
        "rewards/accuracy": ((chosen_rewards > rejected_rewards).float()
                             + 0.5 * (chosen_rewards == rejected_rewards).float()).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε)·log σ(x) - ε·log σ(-x): the logistic loss with a fraction ε of labels assumed flipped (cDPO)."""
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO and its close variants on per-sequence log-probs of shape [B].

    All four are functions of h = (πc − rc) − (πr − rr), the difference of the implicit rewards:
    ``sigmoid`` (Rafailov et al. 2023; cDPO when label_smoothing > 0), ``robust`` (Chowdhury et al.
    2024, unbiased under a known label-flip rate ε), ``ipo`` (Azar et al. 2023) and ``hinge`` (SLiC).

    IPO's squared target 1/(2β) does not scale with length, so summed log-probs would make long answers
    dominate; the caller passes per-token *averages* for ``ipo`` (``sequence_logps(..., average=True)``)
    and this function uses whatever it is given.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        # silently ignoring it would make a config look like it does something it does not.
        raise ValueError(f"label_smoothing is only used by 'sigmoid' and 'robust', not {loss_type!r}")
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * h, label_smoothing)
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
        # The flipped-label term enters with a + sign and the 1/(1-2ε) rescale makes the loss an unbiased
        # estimate of the clean-label loss (Chowdhury et al. 2024, eq. 8).
        eps = label_smoothing
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios, policy_chosen, policy_rejected)
    return losses.mean(), metrics


def simpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024): −log σ(β(ac − ar) − γ) on per-token *average* log-probs.

    No reference model: the length-normalised log-prob is itself the reward, and the margin γ asks the
    chosen answer to win by a fixed amount rather than merely win.
    """
    logits = beta * (policy_chosen_avg - policy_rejected_avg) - gamma
    losses = _smoothed_logistic(logits, label_smoothing)
    metrics = _pair_metrics(
        beta * policy_chosen_avg, beta * policy_rejected_avg, policy_chosen_avg, policy_rejected_avg
    )
    return losses.mean(), metrics


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012).

    Near 0, 1 − exp(x) cancels catastrophically, so use −expm1(x); far below, exp(x) is tiny and log1p
    is the accurate one. Each branch gets its input clamped to its own side so the branch torch.where
    discards cannot produce an inf gradient, which would otherwise turn into NaN (0 · inf).
    """
    # An average log-prob within float rounding of 0 is noise (p == 1 is not representable as odds);
    # clamping to −eps keeps the odds finite instead of returning inf.
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    nll_chosen: torch.Tensor,
    lam: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong et al. 2024): SFT NLL on the chosen answer plus λ·(−log σ(log odds ratio)).

    odds(p) = p / (1 − p) with log p the per-token *average* log-prob, so the log odds ratio is
    (ac − ar) − (log(1 − e^ac) − log(1 − e^ar)). ``nll_chosen`` is the caller's mean per-token NLL of
    the chosen responses (a scalar; a [B] tensor is averaged), kept outside because the caller may
    normalise it over the tokens of a whole accumulated batch.
    """
    log_odds = (policy_chosen_avg - policy_rejected_avg) - (
        _log1m_exp(policy_chosen_avg) - _log1m_exp(policy_rejected_avg)
    )
    nll = nll_chosen.mean()
    loss = nll + lam * (-F.logsigmoid(log_odds)).mean()
    metrics = _pair_metrics(lam * policy_chosen_avg, lam * policy_rejected_avg, policy_chosen_avg, policy_rejected_avg)
    metrics["log_odds_ratio"] = log_odds.detach().mean()
    metrics["nll"] = nll.detach()
    return loss, metrics


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: mean policy/reference log-ratio on mismatched (prompt, answer) pairs.

    Mismatched pairs estimate KL(π‖π_ref) without favouring any real answer. Clamped at 0 (a KL
    cannot be negative; a negative estimate is sampling noise) and detached, as in the paper, so no
    gradient flows through the baseline.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples marked desirable (True) or undesirable.

    r = policy − ref; desirable: 1 − σ(β(r − z)), undesirable: 1 − σ(β(z − r)), with z = max(kl, 0).
    Weights apply per example and the mean runs over the whole batch, so the weights (not the batch
    mix) set how much each side counts. Group metrics are NaN when the batch has no example of that
    side, so a nanmean over steps is not dragged towards 0.
    """
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z = kl.detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    metrics: Metrics = {
        "rewards/chosen": rewards[desirable].mean(),
        "rewards/rejected": rewards[~desirable].mean(),
        "logps/chosen": policy_logps.detach()[desirable].mean(),
        "logps/rejected": policy_logps.detach()[~desirable].mean(),
        "kl": z,
    }
    return losses.mean(), metrics


def bradley_terry_loss(
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Reward-model loss −log σ(rc − rr − margin), plus center_coef · mean((rc + rr)²).

    The BT likelihood only sees reward differences, so the absolute level drifts freely; the centring
    term pins it near zero, which keeps rewards comparable across checkpoints and well-scaled for PPO.
    ``margin`` (per pair) demands a larger gap for pairs annotated as clearly better (Llama 2).
    """
    diff = reward_chosen - reward_rejected
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((reward_chosen + reward_rejected) ** 2).mean()
    diff = diff.detach()
    metrics: Metrics = {
        "accuracy": (diff > 0).float().mean(),
        "margin": diff.mean(),
        "reward/chosen": reward_chosen.detach().mean(),
        "reward/rejected": reward_rejected.detach().mean(),
    }
    return loss, metrics
