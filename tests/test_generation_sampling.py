"""The engine's sampling functions: counter-based noise, filters, penalties and draws, against arithmetic
written out here and against transformers' logits processors."""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from lmforge.generation.sampling import (
    choose_tokens,
    counter_uniform,
    draw_from,
    filter_logits,
    penalise,
    token_logprobs,
)


def column(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_noise_depends_on_seed_and_step_only_and_is_uniform():
    seeds = torch.arange(50000, dtype=torch.long) * 7919 + 2**40
    steps = torch.arange(50000, dtype=torch.long) % 97
    u = counter_uniform(seeds, steps)
    assert u.min() >= 0 and u.max() < 1
    # Row order and batch make no difference: each value is a function of its own (seed, step).
    shuffled = torch.randperm(50000)
    assert torch.equal(counter_uniform(seeds[shuffled], steps[shuffled]), u[shuffled])
    assert torch.equal(counter_uniform(seeds[:3], steps[:3]), u[:3])
    # Uniform: each tenth holds 10% (5 standard errors of 5000 in 50000 is 0.7%), and successive steps of one
    # seed are uncorrelated.
    tenths = torch.bincount((u * 10).long(), minlength=10).float() / 50000
    assert torch.all((tenths - 0.1).abs() < 0.007), tenths
    one_seed = counter_uniform(torch.full((20000,), 5, dtype=torch.long), torch.arange(20000))
    assert abs(torch.corrcoef(torch.stack([one_seed[:-1], one_seed[1:]]))[0, 1]) < 0.03
    assert counter_uniform(column([1, 2], torch.long), column([0, 0], torch.long)).unique().numel() == 2


def test_filters_keep_what_top_k_top_p_and_min_p_say():
    logits = torch.log(column([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4))
    kept = filter_logits(logits, column([0, 2, 0, 0], torch.long), column([1.0, 1.0, 0.8, 1.0]),
                         column([0.0, 0.0, 0.0, 0.25])).isfinite()
    assert kept.tolist() == [
        [True] * 5,
        [True, True, False, False, False],  # top_k=2
        [True, True, True, False, False],  # top_p=0.8: 0.5 + 0.2 < 0.8, so the 0.15 token stays, then stop
        [True, True, True, False, False],  # min_p=0.25: at least 0.125
    ]
    # The best token always stays, however small top_p.
    assert filter_logits(logits[:1], column([0], torch.long), column([1e-9]), column([0.0])).isfinite().sum() == 1


def test_draws_follow_the_filtered_tempered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(8) * 2
    rows = 20000
    uniforms = counter_uniform(torch.arange(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long))
    for temperature, top_k in ((1.0, 0), (0.6, 0), (1.3, 3)):
        probs = torch.softmax(logits / temperature, -1)
        if top_k:
            probs = torch.where(probs >= probs.topk(top_k).values[-1], probs, 0)
            probs = probs / probs.sum()
        tokens = choose_tokens(logits.expand(rows, 8), column([temperature] * rows), column([top_k] * rows, torch.long),
                               column([1.0] * rows), column([0.0] * rows), uniforms)
        seen = torch.bincount(tokens, minlength=8).float() / rows
        assert seen[probs == 0].sum() == 0
        tolerance = 5 * torch.sqrt(probs * (1 - probs) / rows) + 1e-4
        assert torch.all((seen - probs).abs() <= tolerance), (temperature, top_k, seen, probs)


def test_greedy_rows_take_the_arg_max_beside_sampled_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    tokens = choose_tokens(logits, column([0.0, 1.0]), column([0, 0], torch.long), column([1.0, 1.0]),
                           column([0.0, 0.0]), column([0.999, 0.999]))
    assert tokens.tolist() == [1, 2]  # u near 1 lands on the last token with mass


def test_a_draw_never_picks_a_token_without_mass():
    probs = column([[0.0, 0.5, 0.5, 0.0, 0.0]])
    for u in (0.0, 0.25, 0.5, 0.75, 1 - 2**-24):
        assert draw_from(probs, column([u])).item() in (1, 2)
    assert draw_from(probs, column([1 - 2**-24])).item() == 2


def test_repetition_penalty_matches_transformers_and_presence_subtracts():
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    context = [[1, 4, 4, 7], [0, 9]]
    in_context = torch.zeros(2, 10, dtype=torch.bool)
    for row, ids in enumerate(context):
        in_context[row, ids] = True
    in_reply = torch.zeros_like(in_context)
    in_reply[0, 7] = True
    got = penalise(logits, in_context, in_reply, column([1.3, 1.3]), column([0.5, 0.0]))
    reference = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 4, 4, 7], [0, 9, 9, 9]]), logits.clone())
    reference[0, 7] -= 0.5
    assert torch.allclose(got, reference)


def test_logprobs_come_from_the_raw_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    chosen, ids, values = token_logprobs(logits, torch.tensor([2]), top=2)
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(chosen, expected[:, 2])
    assert ids.tolist() == [[0, 1]] and torch.allclose(values, expected[:, :2])
