"""Preference losses against hand computations, TRL, and autograd.

TRL is a declared test dependency (``trl==1.16.0``, the version that installs cleanly next to
transformers 5.23 / accelerate 1.15 without moving any other package). It is imported inside the
parity tests so a missing TRL fails those tests loudly instead of skipping them, while the
hand-computed tests still run. In TRL 1.16 the DPO and KTO losses are no longer separate methods:
they live inside ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``, which call the model.
The parity tests therefore call those unbound methods with a stub ``self`` and a stub "model" whose
per-token log-probs are read from a table indexed by token id, so the summed log-probs TRL sees are
exactly the numbers given to our functions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lmforge.losses.preference import (
    bradley_terry_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

TOL = 1e-6


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Three pairs of summed log-probs: policy chosen / rejected, reference chosen / rejected.
PC, PR, RC, RR = [-1.0, -2.5, -4.0], [-1.5, -2.0, -3.0], [-1.2, -2.2, -3.5], [-1.1, -2.1, -3.9]
H = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------- hand computations


@pytest.mark.parametrize(
    "loss_type, eps, beta, per_pair",
    [
        ("sigmoid", 0.0, 0.5, lambda h, b, e: -logsig(b * h)),
        ("sigmoid", 0.2, 0.5, lambda h, b, e: -(1 - e) * logsig(b * h) - e * logsig(-b * h)),
        ("robust", 0.2, 0.5, lambda h, b, e: (-(1 - e) * logsig(b * h) + e * logsig(-b * h)) / (1 - 2 * e)),
        ("ipo", 0.0, 0.5, lambda h, b, e: (h - 1 / (2 * b)) ** 2),
        ("hinge", 0.0, 2.0, lambda h, b, e: max(0.0, 1 - b * h)),
    ],
)
def test_dpo_matches_hand_computation(loss_type, eps, beta, per_pair):
    loss, m = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert loss.item() == pytest.approx(_mean([per_pair(h, beta, eps) for h in H]), abs=TOL)
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR)]
    assert m["rewards/chosen"].item() == pytest.approx(_mean(chosen), abs=TOL)
    assert m["rewards/rejected"].item() == pytest.approx(_mean(rejected), abs=TOL)
    assert m["rewards/margin"].item() == pytest.approx(_mean(chosen) - _mean(rejected), abs=TOL)
    assert m["rewards/accuracy"].item() == pytest.approx(_mean([float(c > r) for c, r in zip(chosen, rejected)]))
    assert m["logps/chosen"].item() == pytest.approx(_mean(PC), abs=TOL)
    assert m["logps/rejected"].item() == pytest.approx(_mean(PR), abs=TOL)


def test_simpo_matches_hand_computation():
    ac, ar, beta, gamma, eps = [-0.8, -1.6], [-1.1, -1.2], 2.0, 0.5, 0.1
    z = [beta * (c - r) - gamma for c, r in zip(ac, ar)]
    expected = _mean([-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z])
    loss, m = simpo_loss(t(ac), t(ar), beta=beta, gamma=gamma, label_smoothing=eps)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert m["rewards/chosen"].item() == pytest.approx(beta * _mean(ac), abs=TOL)
    assert m["rewards/accuracy"].item() == pytest.approx(0.5)


def test_orpo_matches_hand_computation():
    ac, ar, nll, lam = [-0.3, -1.7], [-0.9, -0.4], 0.75, 0.1
    log_odds = [(c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r))) for c, r in zip(ac, ar)]
    expected = nll + lam * _mean([-logsig(x) for x in log_odds])
    loss, m = orpo_loss(t(ac), t(ar), torch.tensor(nll, dtype=torch.float64), lam=lam)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert m["log_odds_ratio"].item() == pytest.approx(_mean(log_odds), abs=TOL)
    assert m["nll"].item() == pytest.approx(nll)
    assert m["rewards/rejected"].item() == pytest.approx(lam * _mean(ar), abs=TOL)


def test_kto_matches_hand_computation():
    pol, ref, des = [-2.0, -3.0, -1.5], [-2.4, -2.5, -1.0], [True, False, False]
    pol_kl, ref_kl, beta, wd, wu = [-5.0, -6.0], [-5.5, -5.9], 0.5, 1.0, 1.5
    z = max(0.0, _mean([p - r for p, r in zip(pol_kl, ref_kl)]))
    per = [
        wd * (1 - sig(beta * ((p - r) - z))) if d else wu * (1 - sig(beta * (z - (p - r))))
        for p, r, d in zip(pol, ref, des)
    ]
    kl = kto_kl_estimate(t(pol_kl), t(ref_kl))
    loss, m = kto_loss(t(pol), t(ref), torch.tensor(des), kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert kl.item() == pytest.approx(z, abs=TOL)
    assert loss.item() == pytest.approx(_mean(per), abs=TOL)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (pol[0] - ref[0]), abs=TOL)
    assert m["rewards/rejected"].item() == pytest.approx(beta * _mean([pol[1] - ref[1], pol[2] - ref[2]]), abs=TOL)
    assert m["kl"].item() == pytest.approx(z, abs=TOL)


def test_kto_kl_estimate_is_clamped_and_detached():
    policy = t([-3.0, -4.0]).requires_grad_()
    kl = kto_kl_estimate(policy, t([-2.0, -3.5]))
    assert kl.item() == 0.0 and not kl.requires_grad


def test_bradley_terry_matches_hand_computation():
    rc, rr, margin, coef = [1.0, -0.5, 0.2], [0.3, 0.1, 0.4], [0.5, 0.0, 1.0], 0.01
    expected = _mean([-logsig(c - r - mg) for c, r, mg in zip(rc, rr, margin)])
    expected += coef * _mean([(c + r) ** 2 for c, r in zip(rc, rr)])
    loss, m = bradley_terry_loss(t(rc), t(rr), margin=t(margin), center_coef=coef)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert m["accuracy"].item() == pytest.approx(1 / 3)
    assert m["margin"].item() == pytest.approx(_mean([c - r for c, r in zip(rc, rr)]), abs=TOL)
    assert m["reward/chosen"].item() == pytest.approx(_mean(rc), abs=TOL)
    assert m["reward/rejected"].item() == pytest.approx(_mean(rr), abs=TOL)
    plain, _ = bradley_terry_loss(t(rc), t(rr))
    assert plain.item() == pytest.approx(_mean([-logsig(c - r) for c, r in zip(rc, rr)]), abs=TOL)


# ---------------------------------------------------------------- sequence_logps


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_loop(average):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 1, 4, -100], [-100, 2, 0, -100, 1, 1]])
    logps, lengths = sequence_logps(logits, labels, average=average)
    for b in range(2):
        total, count = 0.0, 0
        for pos in range(1, 6):  # logits at pos - 1 predict the label at pos
            if labels[b, pos] == -100:
                continue
            row = logits[b, pos - 1].tolist()
            total += row[labels[b, pos]] - math.log(sum(math.exp(x) for x in row))
            count += 1
        assert lengths[b].item() == count
        assert logps[b].item() == pytest.approx(total / count if average else total, abs=1e-5)


def test_sequence_logps_upcasts_and_handles_empty_rows():
    logits = torch.randn(2, 4, 3).bfloat16()
    labels = torch.tensor([[-100, 1, 2, 0], [-100, -100, -100, -100]])
    logps, lengths = sequence_logps(logits, labels, average=True)
    assert logps.dtype == torch.float32
    assert lengths.tolist() == [3, 0] and logps[1].item() == 0.0


# ---------------------------------------------------------------- gradients and edge cases


def test_dpo_sigmoid_gradient_is_analytic():
    beta = 0.3
    pc = t(PC).requires_grad_()
    loss, _ = dpo_loss(pc, t(PR), t(RC), t(RR), beta=beta)
    loss.backward()
    expected = torch.tensor([-beta * sig(-beta * h) / len(H) for h in H], dtype=torch.float64)
    torch.testing.assert_close(pc.grad, expected, atol=1e-12, rtol=0)


def test_unknown_dpo_loss_type_names_valid_ones():
    with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge"):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="nope")


@pytest.mark.parametrize(
    "kwargs", [{"loss_type": "robust", "label_smoothing": 0.5}, {"loss_type": "ipo", "label_smoothing": 0.1}]
)
def test_dpo_rejects_bad_label_smoothing(kwargs):
    with pytest.raises(ValueError):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), **kwargs)


def test_kto_requires_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t([-1.0]), t([-1.0]), torch.tensor([1]), torch.tensor(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_is_finite_when_avg_logp_is_near_zero(dtype):
    chosen = torch.tensor([-1e-8, 0.0, -2.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-0.5, -1e-8, -30.0], dtype=dtype, requires_grad=True)
    loss, m = orpo_loss(chosen, rejected, torch.tensor(1.0, dtype=dtype))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(m["log_odds_ratio"])
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    if dtype == torch.float64:  # no clamp applies at -1e-8 in float64: check the value itself
        c, r = -1e-8, -0.5
        expected = (c - r) - (math.log(-math.expm1(c)) - math.log(-math.expm1(r)))
        _, m1 = orpo_loss(chosen[:1].detach(), rejected[:1].detach(), torch.tensor(0.0, dtype=dtype))
        assert m1["log_odds_ratio"].item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- parity with TRL


def _encode(per_token: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of per-token log-probs -> (input_ids, completion_mask, table) for the stub model.

    Each sequence is one prompt token (id 0) followed by one fresh id per completion token, right
    padded with id 0 / mask 0; table[id] is that token's log-prob.
    """
    width = 1 + max(len(row) for row in per_token)
    ids = torch.zeros(len(per_token), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    table = [0.0]
    for i, row in enumerate(per_token):
        for j, value in enumerate(row):
            ids[i, 1 + j], mask[i, 1 + j] = len(table), 1
            table.append(value)
    return ids, mask, torch.tensor(table, dtype=torch.float64)


def _stub_model(table: torch.Tensor):
    def forward(input_ids, labels, **_):
        logps = table[input_ids[:, 1:]] * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def _stub_trainer(**attrs) -> SimpleNamespace:
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        precompute_ref_logps=True, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, **attrs,
    )


def _random(n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return -scale * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    # TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid" (only robust/EXO read it); cDPO is
    # checked against its CPO loss below instead.
    "loss_type, eps", [("sigmoid", 0.0), ("robust", 0.1), ("robust", 0.3), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_matches_trl(loss_type, eps):
    from trl import DPOTrainer

    beta, lengths = 0.2, [3, 1, 2, 4, 2, 5, 1, 3]  # 4 chosen then 4 rejected, as TRL batches them
    policy, ref = _random(8, 1, 30.0), _random(8, 2, 30.0)
    # Spread each sum over its tokens, so IPO's per-token averaging inside TRL is exercised too.
    ids, mask, table = _encode([[float(s) / n] * n for s, n in zip(policy, lengths)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:4], "ref_rejected_logps": ref[4:]}
    trainer = _stub_trainer(
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=eps, ld_alpha=None,
        f_divergence_type="reverse_kl", use_weighting=False,
    )
    expected = DPOTrainer._compute_loss(trainer, _stub_model(table), inputs, return_outputs=False)

    if loss_type == "ipo":  # our IPO takes per-token averages from the caller
        n = torch.tensor(lengths, dtype=torch.float64)
        policy, ref = policy / n, ref / n
    loss, m = dpo_loss(policy[:4], policy[4:], ref[:4], ref[4:], beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert abs(loss.item() - expected.item()) < TOL
    if loss_type != "ipo":
        logged = trainer._metrics["train"]
        for ours, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                             ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                             ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]:
            assert m[ours].item() == pytest.approx(logged[theirs][-1], abs=TOL), ours


@pytest.mark.parametrize("kl_shift", [0.8, -0.8])  # positive KL estimate, and one clamped to 0
def test_kto_matches_trl(kl_shift):
    from trl import KTOTrainer

    beta, wd, wu = 0.3, 1.0, 1.33
    desirable = torch.tensor([True, False, True, False, False])
    policy, ref = _random(5, 3, 20.0), _random(5, 4, 20.0)
    ref_kl = _random(5, 5, 20.0)
    policy_kl = ref_kl + kl_shift
    ids, mask, table = _encode([[float(s)] for s in policy])
    kl_ids, kl_mask, kl_table = _encode([[float(s)] for s in policy_kl])
    kl_ids = kl_ids + kl_mask * (len(table) - 1)  # KL tokens read the entries appended after the main table
    table = torch.cat([table, kl_table[1:]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
              "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl}
    trainer = _stub_trainer(beta=beta, loss_type="kto", desirable_weight=wd, undesirable_weight=wu, calculate_KL=True)
    trainer._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, trainer)  # TRL's own KL forward
    expected = KTOTrainer._compute_loss(trainer, _stub_model(table), inputs, return_outputs=False)

    kl = kto_kl_estimate(policy_kl, ref_kl)
    loss, m = kto_loss(policy, ref, desirable, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert abs(loss.item() - expected.item()) < TOL
    logged = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert m[key].item() == pytest.approx(logged[key][-1], abs=TOL), key


def _experimental(monkeypatch, name: str):
    """Import a trainer from trl.experimental without its "unstable API" warning."""
    import importlib

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(importlib.import_module(f"trl.experimental.{name.lower()}"), f"{name}Trainer")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_cdpo_matches_trl_cpo_loss(monkeypatch, eps):
    # CPO's sigmoid loss is the label-smoothed logistic loss of β·(a − b); with a, b the policy/reference
    # log-ratios it is exactly cDPO (TRL's own DPOTrainer no longer applies label smoothing to sigmoid).
    cpo = _experimental(monkeypatch, "CPO")
    beta, policy, ref = 0.2, _random(8, 6, 30.0), _random(8, 7, 30.0)
    stub = SimpleNamespace(alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=eps,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, _, _ = cpo.cpo_loss(stub, policy[:4] - ref[:4], policy[4:] - ref[4:])
    loss, _ = dpo_loss(policy[:4], policy[4:], ref[:4], ref[4:], beta=beta, label_smoothing=eps)
    assert abs(loss.item() - losses.mean().item()) < TOL


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_loss(monkeypatch, eps):
    cpo = _experimental(monkeypatch, "CPO")
    beta, gamma, avg = 2.0, 0.5, _random(8, 8, 2.0)
    stub = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(stub, avg[:4], avg[4:])
    loss, m = simpo_loss(avg[:4], avg[4:], beta=beta, gamma=gamma, label_smoothing=eps)
    assert abs(loss.item() - losses.mean().item()) < TOL
    assert m["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert m["rewards/rejected"].item() == pytest.approx(rejected_rewards.mean().item(), abs=TOL)


def test_orpo_matches_trl_odds_ratio_loss(monkeypatch):
    orpo = _experimental(monkeypatch, "ORPO")
    lam, nll = 0.1, torch.tensor(1.3, dtype=torch.float64)
    avg = torch.cat([_random(6, 9, 2.0), torch.tensor([-1e-3, -0.69, -0.70, -5.0], dtype=torch.float64)])
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    # TRL returns λ·log σ(log odds) per pair and subtracts its mean from the NLL; it also works in float32.
    losses, _, _, _, log_odds = orpo.odds_ratio_loss(stub, avg[:5], avg[5:])
    loss, m = orpo_loss(avg[:5], avg[5:], nll, lam=lam)
    assert abs(loss.item() - (nll - losses.mean()).item()) < TOL
    assert m["log_odds_ratio"].item() == pytest.approx(log_odds.item(), abs=TOL)
