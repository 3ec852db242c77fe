"""Online RL maths (PPO, GRPO, RLOO) as pure tensor functions: advantages, KL estimates, clipped losses.

Conventions shared by every function here:

* Per-token tensors are ``[B, T]`` over *response* tokens only, right-padded: each row's real tokens are
  a prefix and ``mask`` is 1.0/True on them and 0 on padding. Padded entries of every per-token output
  are 0, and nothing computed on a padded entry (which may hold garbage, even inf) reaches a real one.
* Sampled completions are laid out prompt-major: prompt 0's ``group_size`` samples, then prompt 1's, and
  so on. ``group_advantages`` and ``rloo_advantages`` rely on that order.
* Losses are returned per token, never reduced, so the caller chooses the aggregation (token-level mean
  over the batch as in DAPO, per-sequence mean then batch mean as in the original GRPO, or a fixed
  constant as in Dr. GRPO) and can normalise over a whole accumulated batch.
* Metrics are detached 0-dim tensors, as in ``preference.py``, so logging does not sync the device.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
Metrics = dict[str, torch.Tensor]

# Rows of a [*, V] chunk are picked so one float32 chunk holds about this many elements (64 MiB).
LOGSOFTMAX_CHUNK_ELEMENTS = 1 << 24


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is set, over everything or along ``dim``.

    An all-zero mask gives 0 rather than NaN: an empty batch slice should add nothing to a loss.
    """
    # where (not x * mask) so an inf or NaN sitting on a padded entry cannot leak into the sum.
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    weights = mask.to(x.dtype)
    total = kept.sum() if dim is None else kept.sum(dim=dim)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    # Dividing by 1 where the count is 0 (instead of dividing then masking) keeps the backward NaN-free.
    return total / torch.where(count > 0, count, torch.ones_like(count))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all masked entries, with the unbiased (n / (n - 1)) variance.

    With ``shift_mean=False`` the mean is added back, so only the scale changes (what PPO does to
    rewards). Padded entries come out as 0. With fewer than two masked entries the variance is taken as
    0 instead of dividing by n - 1 = 0: a single value whitens to 0 (or to itself without the shift).
    """
    real = mask.bool()
    mean = masked_mean(x, mask)
    centred = torch.where(real, x - mean, torch.zeros_like(x))
    n = mask.to(x.dtype).sum()
    biased_var = masked_mean(centred**2, mask)
    correction = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    whitened = centred * torch.rsqrt(biased_var * correction + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, torch.zeros_like(whitened))


def _map_row_chunks(logits: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` (float32 [rows, V] -> [rows]) to a few rows of ``logits`` at a time.

    The float32 upcast and the softmax-sized intermediates then exist for one chunk at a time, which
    is what keeps rollout-time scoring of a 150k vocabulary in memory. Under autograd each chunk's
    intermediates are still saved for backward; the saving is for no_grad passes (old and reference
    log-probs), which are the large ones.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    rows_per_chunk = max(1, LOGSOFTMAX_CHUNK_ELEMENTS // vocab)
    pieces = [fn(chunk.float()) for chunk in flat.split(rows_per_chunk, dim=0)]
    out = torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


def gather_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) from ``logits`` [B, T, V] and ``tokens`` [B, T], as float32 [B, T].

    logit[token] - logsumexp(logits) in row chunks, so a full [B, T, V] float32 log-softmax is never
    built. ``tokens`` must be valid ids everywhere (put any id on padding; the caller masks it).
    """
    vocab = logits.shape[-1]
    flat_tokens = tokens.reshape(-1, 1)
    picked = torch.gather(logits.reshape(-1, vocab), -1, flat_tokens).squeeze(-1).float()
    return picked.reshape(tokens.shape) - _map_row_chunks(logits, lambda c: torch.logsumexp(c, dim=-1))


def _chunk_entropy(chunk: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(chunk, dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, float32 [B, T]: logsumexp(l) - sum(softmax(l) * l).

    That form needs no log-softmax tensor and is exact for any shift of the logits.
    """
    return _map_row_chunks(logits, _chunk_entropy)


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(logits / temperature) per row, forward and backward in row chunks.

    Autograd through softmax would keep a float32 [tokens x vocab] probability tensor for backward, as
    large as the logits again; this keeps only the logits (which exist anyway) and the [tokens] entropies,
    and recomputes each chunk's probabilities in backward: dH/dz = -p (log p + H) for z = logits / T.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        entropy = _map_row_chunks(logits, lambda c: _chunk_entropy(c / temperature))
        ctx.save_for_backward(logits, entropy)
        ctx.temperature = temperature
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor):
        logits, entropy = ctx.saved_tensors
        vocab = logits.shape[-1]
        rows = max(1, LOGSOFTMAX_CHUNK_ELEMENTS // vocab)
        grad = torch.empty_like(logits).reshape(-1, vocab)
        pairs = zip(logits.reshape(-1, vocab).split(rows), entropy.reshape(-1, 1).split(rows),
                    grad_entropy.reshape(-1, 1).split(rows), grad.split(rows))
        for chunk, h, g, out in pairs:
            log_p = torch.log_softmax(chunk.float() / ctx.temperature, dim=-1)
            out.copy_(-g * log_p.exp() * (log_p + h) / ctx.temperature)
        return grad.reshape(logits.shape), None


def entropy_with_grad(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature), float32 [B, T], differentiable (an entropy bonus) without
    a [B, T, V] tensor beyond the logits themselves and their gradient."""
    return _Entropy.apply(logits, float(temperature) if temperature > 0 else 1.0)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from log-probs of tokens sampled from the policy.

    With r = ref_logps - logps (Schulman, "Approximating KL Divergence", 2020): ``k1`` = -r is unbiased
    but can be negative; ``k2`` = r^2 / 2 is low-variance but biased; ``k3`` = exp(r) - r - 1 is unbiased
    and never negative (exp(r) >= 1 + r), which is why GRPO uses it.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    # expm1 rather than exp(r) - 1: for the tiny r of a policy near its reference, exp(r) - r - 1 would
    # cancel to rounding noise (and can then dip below 0).
    return torch.expm1(log_ratio) - log_ratio


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's real (masked) steps.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, returns = A + V. The
    value and advantage after a row's last real token are 0 (the response ended), so padded steps never
    feed into real ones; padded advantages and returns are 0. Inputs are read, not modified, and the
    results are detached: they are targets, not something to backpropagate through.
    """
    real = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(real, rewards.detach(), zeros)
    values = torch.where(real, values.detach(), zeros)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(real[:, t], delta + gamma * lam * next_advantage, zeros[:, t])
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    ratio = exp(logps - old_logps). Taking the larger (pessimistic) loss means a token whose ratio has
    already moved past the clip range in the direction its advantage favours gets no gradient.
    Metrics: ``clipfrac`` (share of real tokens where the clipped term is strictly larger),
    ``approx_kl`` (mean of (logps - old_logps)^2 / 2) and ``ratio`` (mean ratio).
    """
    real = mask.bool()
    # Zero the log-ratio on padding before exp: a garbage padded log-prob would give inf there and a
    # NaN gradient (0 * inf) even though the loss is masked afterwards.
    log_ratio = torch.where(real, logps - old_logps, torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.where(real, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        metrics: Metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return per_token, metrics


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, Metrics]:
    """0.5 * max((v - R)^2, (old + clip(v - old, -c, c) - R)^2) per token, 0 on padding.

    The clipped term stops one update from moving a value estimate far from the one the advantages were
    computed with. ``vf_clipfrac``: share of real tokens where the clipped term is strictly larger.
    """
    real = mask.bool()
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    per_token = torch.where(real, 0.5 * torch.maximum(unclipped_sq, clipped_sq), torch.zeros_like(values))
    with torch.no_grad():
        metrics: Metrics = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask)}
    return per_token, metrics


def by_group(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards as [N / group_size, group_size], one row per prompt (prompt-major layout)."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (one sample has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): reward minus its group's mean, over (group std + eps) if scale.

    The std is unbiased (torch.std's default, as in GRPO and TRL). A group whose rewards are all equal
    gets advantage 0: it carries no signal about which answer is better. ``scale=False`` is Dr. GRPO's
    choice (Liu et al. 2025), which avoids up-weighting prompts that are nearly always right or wrong.
    """
    grouped = by_group(rewards, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(rewards.shape)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al. 2024): r_i minus the mean reward of the other samples of its group.

    Leaving the sample out keeps the baseline independent of r_i, so the policy gradient stays unbiased.
    """
    grouped = by_group(rewards, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(rewards.shape)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked entries, as a detached 0-dim tensor.

    1 is a perfect value head, 0 is no better than predicting the mean, negative is worse than that.
    When the returns do not vary (or nothing is masked in) the ratio is undefined; this returns 0 so a
    logged curve stays NaN-free and never claims a fit that cannot be measured.
    """
    with torch.no_grad():
        returns_var = _masked_var(returns, mask)
        residual_var = _masked_var(returns - values, mask)
        safe_var = torch.where(returns_var > 0, returns_var, torch.ones_like(returns_var))
        return torch.where(returns_var > 0, 1.0 - residual_var / safe_var, torch.zeros_like(returns_var))


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased variance over masked entries; the correction would cancel in explained_variance's ratio."""
    real = mask.bool()
    centred = torch.where(real, x - masked_mean(x, mask), torch.zeros_like(x))
    return masked_mean(centred**2, mask)


class FixedKLController:
    """A KL coefficient that never changes; same interface as AdaptiveKLController."""

    def __init__(self, coef: float) -> None:
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt: the coefficient is fixed by the config."""

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target`` (Ziegler et al. 2019).

    error = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + error * n_steps / horizon. The clip bounds the
    change per update so one noisy KL estimate cannot swing the coefficient; ``horizon`` (in samples)
    sets how fast it reacts.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # Only the coefficient: target and horizon come from the config of the resumed run.
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
