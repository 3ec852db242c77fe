"""Online RL maths against numbers worked out by hand (or by a plain Python loop) in each test."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses import rl
from lmforge.losses.rl import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    gather_logps,
    group_advantages,
    kl_per_token,
    masked_mean,
    masked_whiten,
    rloo_advantages,
)

TOL = 1e-9
GARBAGE = 1e4  # what a padded entry may hold; it must never reach a real one


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_all_along_dim_and_empty():
    x = t([[1.0, 2.0, GARBAGE], [4.0, float("inf"), float("nan")]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(x, mask, dim=0).tolist() == pytest.approx([2.5, 2.0, 0.0])
    empty = torch.zeros_like(mask)
    x_leaf = x.clone().requires_grad_(True)
    out = masked_mean(x_leaf, empty)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x_leaf.grad, torch.zeros_like(x))


def test_masked_whiten_unbiased_and_padding():
    x = t([[1.0, 2.0, 3.0, GARBAGE], [4.0, GARBAGE, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # masked values 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std, 0.0], [1.5 / std, 0.0, 0.0, 0.0]]
    whitened = masked_whiten(x, mask)
    assert whitened.tolist() == [pytest.approx(row, abs=TOL) for row in expected]
    real = whitened[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=TOL)
    assert real.var().item() == pytest.approx(1.0, abs=1e-6)

    kept_mean = masked_whiten(x, mask, shift_mean=False)
    expected_kept = [[v + 2.5 if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(expected, mask.tolist())]
    assert kept_mean.tolist() == [pytest.approx(row, abs=TOL) for row in expected_kept]
    assert kept_mean[mask.bool()].mean().item() == pytest.approx(2.5, abs=TOL)


def test_masked_whiten_single_entry_is_not_nan():
    out = masked_whiten(t([[3.0, GARBAGE]]), t([[1, 0]]))
    assert out.tolist() == [[0.0, 0.0]]


# ---------------------------------------------------------------- GAE


def test_gae_hand_worked_with_padded_row():
    gamma, lam = 0.9, 0.8
    rewards = t([[1.0, 0.0, 2.0], [0.5, -1.0, GARBAGE]])
    values = t([[0.5, 1.0, 1.5], [0.2, -0.4, GARBAGE]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    inputs_before = (rewards.clone(), values.clone(), mask.clone())
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 0, backwards: delta2 = 2 - 1.5 = 0.5, A2 = 0.5
    #   delta1 = 0 + 0.9 * 1.5 - 1.0 = 0.35, A1 = 0.35 + 0.72 * 0.5 = 0.71
    #   delta0 = 1 + 0.9 * 1.0 - 0.5 = 1.4,  A0 = 1.4 + 0.72 * 0.71 = 1.9112
    # row 1 as if it had only its two real steps: delta1 = -1.0 - (-0.4) = -0.6, A1 = -0.6
    #   delta0 = 0.5 + 0.9 * (-0.4) - 0.2 = -0.06, A0 = -0.06 + 0.72 * (-0.6) = -0.492
    assert advantages.tolist() == [pytest.approx([1.9112, 0.71, 0.5]), pytest.approx([-0.492, -0.6, 0.0])]
    assert returns.tolist() == [pytest.approx([2.4112, 1.71, 2.0]), pytest.approx([-0.292, -1.0, 0.0])]
    for before, after in zip(inputs_before, (rewards, values, mask)):
        assert torch.equal(before, after)


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = [[0.1, -0.2, 0.0, 1.0], [0.3, 0.7, GARBAGE, GARBAGE]]
    values = [[0.4, 0.5, -0.3, 0.9], [1.0, -1.0, GARBAGE, GARBAGE]]
    lengths = [4, 2]
    mask = t([[1.0 if j < n else 0.0 for j in range(4)] for n in lengths])
    advantages, returns = gae(t(rewards), t(values), mask, gamma=1.0, lam=1.0)
    for row, n in enumerate(lengths):
        for step in range(4):
            to_go = sum(rewards[row][step:n]) if step < n else 0.0
            value = values[row][step] if step < n else 0.0
            assert advantages[row, step].item() == pytest.approx(to_go - value, abs=TOL)
            assert returns[row, step].item() == pytest.approx(to_go, abs=TOL)


# ---------------------------------------------------------------- PPO losses

RATIOS = [1.1, 1.2, 1.5, 0.8, 0.5]  # inside, at 1 + eps, beyond; at 1 - eps, beyond (eps = 0.2)


def test_clipped_policy_loss_by_hand_and_gradient():
    eps = 0.2
    # row 0 has advantage +2, row 1 advantage -2; the last column is padding with a log-prob that would
    # overflow exp if it were ever used.
    log_ratios = [math.log(r) for r in RATIOS]
    logps = t([log_ratios + [800.0], log_ratios + [800.0]]).requires_grad_(True)
    old_logps = torch.zeros(2, 6, dtype=torch.float64)
    advantages = t([[2.0] * 6, [-2.0] * 6])
    mask = t([[1] * 5 + [0]] * 2)
    per_token, metrics = clipped_policy_loss(logps, old_logps, advantages, mask, eps)
    # A = +2: max(-2r, -2 clip(r)) -> -2.2, -2.4, max(-3.0, -2.4) = -2.4 (clipped), -1.6, max(-1.0, -1.6) = -1.0
    # A = -2: max(2r, 2 clip(r))   ->  2.2,  2.4, max(3.0, 2.4) = 3.0, 1.6, max(1.0, 1.6) = 1.6 (clipped)
    assert per_token.tolist() == [
        pytest.approx([-2.2, -2.4, -2.4, -1.6, -1.0, 0.0]),
        pytest.approx([2.2, 2.4, 3.0, 1.6, 1.6, 0.0]),
    ]
    assert metrics["clipfrac"].item() == pytest.approx(2 / 10)
    assert metrics["ratio"].item() == pytest.approx(sum(RATIOS) / 5)
    assert metrics["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in RATIOS) / 5)
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())

    per_token.sum().backward()
    # d/dlogp of -A * exp(logp) is -A * r where the unclipped term is active; 0 where the clipped one is.
    # At exactly 1 +/- eps both terms are equal; only finiteness is asserted there.
    grad = logps.grad
    assert grad[0, 0].item() == pytest.approx(-2.0 * 1.1)
    assert grad[0, 2].item() == 0.0  # A > 0 and ratio past 1 + eps: pessimistic side, no gradient
    assert grad[1, 4].item() == 0.0  # A < 0 and ratio below 1 - eps: pessimistic side, no gradient
    assert grad[1, 2].item() == pytest.approx(2.0 * 1.5)
    assert grad[0, 4].item() == pytest.approx(-2.0 * 0.5)
    assert grad[:, 5].tolist() == [0.0, 0.0]
    assert torch.isfinite(grad).all()


def test_clipped_value_loss_inside_and_outside_range():
    c = 0.2
    values = t([[1.1, 1.5, 0.5, 2.5, GARBAGE]]).requires_grad_(True)
    old_values = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 2.0, 2.0, 2.0, 0.0]])
    mask = t([[1, 1, 1, 1, 0]])
    per_token, metrics = clipped_value_loss(values, old_values, returns, mask, c)
    # v = 1.1 inside: (1.1 - 2)^2 = 0.81 both ways -> 0.405
    # v = 1.5 towards R: unclipped 0.25, clipped to 1.2 -> 0.64; max 0.64 -> 0.32 (clipped)
    # v = 0.5 away from R: unclipped 2.25, clipped to 0.8 -> 1.44; max 2.25 -> 1.125
    # v = 2.5 overshoot: unclipped 0.25, clipped to 1.2 -> 0.64 -> 0.32 (clipped)
    assert per_token.tolist() == [pytest.approx([0.405, 0.32, 1.125, 0.32, 0.0])]
    assert metrics["vf_clipfrac"].item() == pytest.approx(2 / 4)
    per_token.sum().backward()
    # clipped tokens get no gradient; unclipped ones get v - R
    assert values.grad.tolist() == [pytest.approx([-0.9, 0.0, -1.5, 0.0, 0.0])]


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_on_known_numbers():
    logps, ref_logps = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])
    # r = ref - logp = -0.5, 1.0, 0.0
    assert kl_per_token(logps, ref_logps, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert kl_per_token(logps, ref_logps, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0])
    expected_k3 = [math.exp(-0.5) + 0.5 - 1.0, math.exp(1.0) - 2.0, 0.0]
    assert kl_per_token(logps, ref_logps, "k3").tolist() == pytest.approx(expected_k3)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(logps, ref_logps, "k4")


def test_k3_nonnegative_and_close_to_k2_for_tiny_differences():
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(1000, generator=gen, dtype=torch.float64)
    ref_logps = logps + 3.0 * torch.randn(1000, generator=gen, dtype=torch.float64)
    assert (kl_per_token(logps, ref_logps, "k3") >= 0).all()
    tiny = logps + 1e-4 * torch.randn(1000, generator=gen, dtype=torch.float64)
    k2, k3 = kl_per_token(logps, tiny, "k2"), kl_per_token(logps, tiny, "k3")
    assert (k3 >= 0).all()
    # k3 = r^2/2 + r^3/6 + ..., so for |r| ~ 1e-4 the two agree to about |r| / 3 relative
    assert torch.allclose(k3, k2, rtol=1e-3, atol=1e-15)
    # and both are second-order small, as the true KL of two nearly equal distributions is
    assert k3.max().item() < 1e-7


def test_k1_and_k3_means_estimate_kl_of_categoricals():
    p, q = [0.5, 0.3, 0.2], [0.3, 0.4, 0.3]
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    gen = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(t(p), 200_000, replacement=True, generator=gen)
    logps, ref_logps = t(p).log()[samples], t(q).log()[samples]
    assert kl_per_token(logps, ref_logps, "k1").mean().item() == pytest.approx(true_kl, abs=0.02)
    assert kl_per_token(logps, ref_logps, "k3").mean().item() == pytest.approx(true_kl, abs=0.02)


# ---------------------------------------------------------------- logits -> per-token quantities


def test_gather_logps_and_entropy_match_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(2, 4, 11, generator=gen)
    tokens = torch.randint(0, 11, (2, 4), generator=gen)
    reference = torch.log_softmax(logits.double(), dim=-1)
    expected = reference.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = gather_logps(logits, tokens)
    assert got.dtype == torch.float32 and got.shape == (2, 4)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32
    assert torch.allclose(entropy.double(), -(reference.exp() * reference).sum(-1), atol=1e-5)

    # bf16 logits are upcast before the logsumexp, so the result matches the float32 maths on them
    bf16 = logits.bfloat16()
    expected_bf16 = torch.log_softmax(bf16.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logps(bf16, tokens), expected_bf16, atol=1e-5)


def test_gather_logps_large_vocab_in_several_chunks(monkeypatch):
    vocab = 50_000
    # two rows per chunk, so the six rows of [2, 3] go through three chunks
    monkeypatch.setattr(rl, "LOGSOFTMAX_CHUNK_ELEMENTS", 2 * vocab)
    gen = torch.Generator().manual_seed(7)
    logits = 3.0 * torch.randn(2, 3, vocab, generator=gen)
    tokens = torch.randint(0, vocab, (2, 3), generator=gen)
    reference = torch.log_softmax(logits.double(), dim=-1)
    expected = reference.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logps(logits, tokens).double(), expected, atol=1e-4)
    assert torch.allclose(
        entropy_from_logits(logits).double(), -(reference.exp() * reference).sum(-1), atol=1e-4
    )


def test_gather_logps_gradient_matches_log_softmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 3), generator=gen)
    ours = logits.clone().requires_grad_(True)
    gather_logps(ours, tokens).sum().backward()
    theirs = logits.clone().requires_grad_(True)
    torch.log_softmax(theirs, -1).gather(-1, tokens.unsqueeze(-1)).sum().backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)


# ---------------------------------------------------------------- group baselines


def test_group_advantages_by_hand():
    rewards = t([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    eps = 1e-4
    # group 0: mean 3, deviations -2, -1, 3, unbiased var (4 + 1 + 9) / 2 = 7; group 1 all equal -> 0
    std = math.sqrt(7.0)
    scaled = group_advantages(rewards, group_size=3, eps=eps)
    assert scaled.tolist() == pytest.approx([-2 / (std + eps), -1 / (std + eps), 3 / (std + eps), 0.0, 0.0, 0.0])
    assert group_advantages(rewards, group_size=3, scale=False).tolist() == pytest.approx([-2, -1, 3, 0, 0, 0])
    assert not torch.isnan(scaled).any()
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, group_size=4)


def test_rloo_advantages_by_hand():
    rewards = t([1.0, 2.0, 6.0, 0.0, 4.0, 0.0])
    # group 0: 1 - (2 + 6)/2 = -3, 2 - (1 + 6)/2 = -1.5, 6 - (1 + 2)/2 = 4.5
    # group 1: 0 - (4 + 0)/2 = -2, 4 - 0 = 4, 0 - 2 = -2
    assert rloo_advantages(rewards, group_size=3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -2.0, 4.0, -2.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, group_size=1)
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(rewards, group_size=4)


# ---------------------------------------------------------------- explained variance


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    perfect = returns.clone()
    perfect[1, 1:] = -GARBAGE  # padding may disagree freely
    assert explained_variance(perfect, returns, mask).item() == pytest.approx(1.0)
    # residuals 0, 0, 0, -1: biased var 0.25 - 0.0625 = 0.1875; returns var 1.25 -> 1 - 0.15
    off_by_one = t([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    assert explained_variance(off_by_one, returns, mask).item() == pytest.approx(0.85)
    constant = t([[2.0, 2.0, 2.0], [2.0, 0.0, 0.0]])
    assert explained_variance(t([[0.0] * 3] * 2), constant, mask).item() == 0.0


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_sequence():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(3.0, n_steps=256)  # 3/6 - 1 = -0.5, clipped to -0.2: coef * (1 - 0.2 * 0.0256)
    assert ctl.coef == pytest.approx(0.1 * 0.99488)
    ctl.update(6.6, n_steps=256)  # 6.6/6 - 1 = 0.1, inside the clip: coef * (1 + 0.1 * 0.0256)
    assert ctl.coef == pytest.approx(0.1 * 0.99488 * 1.00256)
    ctl.update(torch.tensor(30.0), n_steps=1000)  # 30/6 - 1 = 4, clipped to 0.2: coef * (1 + 0.2 * 0.1)
    assert ctl.coef == pytest.approx(0.1 * 0.99488 * 1.00256 * 1.02)
    ctl.update(6.0, n_steps=1000)  # on target: unchanged
    assert ctl.coef == pytest.approx(0.1 * 0.99488 * 1.00256 * 1.02)


def test_fixed_kl_controller_and_state_round_trip():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=10_000)
    assert fixed.coef == 0.05

    ctl = AdaptiveKLController(init_coef=0.2, target=1.0, horizon=100)
    ctl.update(2.0, n_steps=10)
    state = ctl.state_dict()
    assert state == {"coef": pytest.approx(0.2 * 1.02)} and isinstance(state["coef"], float)
    resumed = AdaptiveKLController(init_coef=0.2, target=1.0, horizon=100)
    resumed.load_state_dict(state)
    ctl.update(0.5, n_steps=10)
    resumed.update(0.5, n_steps=10)
    assert resumed.coef == ctl.coef

    fixed_resumed = FixedKLController(0.0)
    fixed_resumed.load_state_dict(fixed.state_dict())
    assert fixed_resumed.coef == 0.05
