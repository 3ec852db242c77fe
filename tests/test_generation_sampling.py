"""The engine's sampling functions: counter-based noise, filters, penalties and draws, against arithmetic
written out here and against transformers' logits processors."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from lmforge.generation.sampling import (
    INPUT_COLUMNS,
    OUT_LOGPROB,
    OUT_SPREAD,
    OUT_TOKEN,
    TEMPERATURE,
    DrawMode,
    choose_tokens,
    draw_from,
    draw_rows,
    filter_logits,
    noise_keys,
    penalise,
    token_logprobs,
    uniforms,
)


def column(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The noise as the engine draws it (on the host), for tensors of seeds and steps."""
    return torch.from_numpy(uniforms(noise_keys(seeds.tolist()), steps.tolist()))


def torch_mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser written out in int64 torch arithmetic, 16-bit halves so nothing overflows: the
    device-side hash the engine used before the noise moved to the host (seeded outputs must not change)."""
    def mul32(x, constant):
        return ((x & 0xFFFF) * constant + ((((x >> 16) * constant) & 0xFFFF) << 16)) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def test_host_noise_is_bit_identical_to_the_device_hash_it_replaces():
    g = torch.Generator().manual_seed(1)
    edges = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**62, 2**63 - 1])
    seeds = torch.cat([torch.randint(0, 2**62, (20000,), generator=g), edges])
    steps = torch.cat([torch.randint(0, 2**40, (20000,), generator=g), torch.tensor([0, 5, 2**32 - 1, 2**32, 7, 2**33 + 1])])
    low, high = seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF
    key = torch_mix32(low ^ torch_mix32(high ^ 0x9E3779B9))
    bits = torch_mix32(key ^ torch_mix32((steps & 0xFFFFFFFF) ^ 0x7F4A7C15))
    expected = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
    assert torch.equal(counter_uniform(seeds, steps), expected)
    # Per-sequence keys computed once give the same numbers as a batch of keys.
    assert np.array_equal(noise_keys([2**63 - 1])[0], noise_keys(seeds.tolist())[-1])


def packed_inputs(temperature, top_k, top_p, min_p, scale, u) -> torch.Tensor:
    rows = len(temperature)
    packed = np.zeros((rows, INPUT_COLUMNS), dtype=np.int32)
    packed[:, 2] = top_k
    packed[:, TEMPERATURE:].view(np.float32)[:] = np.stack([temperature, top_p, min_p, scale, u], -1)
    return torch.from_numpy(packed)


def test_the_fused_draw_equals_choosing_then_reading_logprobs_row_by_row():
    """draw_rows (what a captured step runs) against the draw it replaced: choose_tokens on the settings as
    float32/long columns, then log_softmax of the tempered logits at the chosen token; greedy, plain, top-k,
    top-p and min-p rows side by side."""
    torch.manual_seed(3)
    rows, vocab = 12, 50
    logits = torch.randn(rows, vocab) * 3
    temperature = [0.0, 1.0, 0.7, 1.3, 0.9, 0.0, 1.0, 2.0, 0.5, 1.0, 0.8, 1.1]
    top_k = [0, 0, 5, 0, 0, 3, 10**9, 0, 2, 0, 7, 0]
    top_p = [1.0, 1.0, 1.0, 0.8, 1.0, 0.5, 1.0, 0.9, 1.0, 0.3, 0.95, 1.0]
    min_p = [0.0, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0, 0.05, 0.0, 0.0, 0.1, 0.5]
    scale = [1.0, 1.0, 0.7, 1.3, 1.0, 1.0, 1.0, 2.0, 0.5, 1.0, 0.8, 1.0]
    u = counter_uniform(torch.arange(rows) * 977, torch.arange(rows)).numpy()
    inputs = packed_inputs(temperature, [min(k, 2**31 - 1) for k in top_k], top_p, min_p, scale, u)
    out = draw_rows(logits, logits, inputs, DrawMode(False, True, True, True))
    expected = choose_tokens(logits, column(temperature), column(top_k, torch.long), column(top_p), column(min_p),
                             torch.from_numpy(u))
    assert out[:, OUT_TOKEN].long().tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 6  # the rows really drew different tokens
    logps = torch.log_softmax(logits / column(scale)[:, None], -1).gather(-1, expected[:, None]).squeeze(-1)
    assert torch.equal(out[:, OUT_LOGPROB].float(), logps)
    # Greedy-only mode skips the softmax and returns the arg-max; without log-probs there is no third column.
    greedy = draw_rows(logits, logits, inputs, DrawMode(True, False, False, False))
    assert greedy.shape == (rows, 2) and greedy[:, OUT_TOKEN].long().tolist() == logits.argmax(-1).tolist()


def test_the_finite_check_flags_nan_and_inf_and_passes_huge_finite_logits():
    logits = torch.zeros(5, 4)
    logits[1, 2], logits[2, 0], logits[3, 3] = math.nan, math.inf, -math.inf
    logits[4] = torch.tensor([3.0e38, -3.0e38, 0.0, 1.0])  # max - min overflows float32, not float64
    inputs = packed_inputs([0.0] * 5, [0] * 5, [1.0] * 5, [0.0] * 5, [1.0] * 5, [0.0] * 5)
    spread = draw_rows(logits, logits, inputs, DrawMode(True, False, False, False))[:, OUT_SPREAD].tolist()
    assert [math.isfinite(s) for s in spread] == [True, False, False, False, True]


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
