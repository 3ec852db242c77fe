"""The RL rollout engine's cache rows are capped (rl.rollout_rows, a memory budget): a capped rollout queues
its samples for rows and draws exactly what an uncapped one draws."""

from __future__ import annotations

import pytest
import torch
from test_generation_engine import model_of, prompts

from lmforge.config.errors import ConfigError
from lmforge.config.schema import RLConfig
from lmforge.generation import Sampling
from lmforge.rollout.rollouts import RolloutEngine, kv_bytes_per_row


def test_a_capped_rollout_queues_for_rows_and_draws_the_same_samples(tok):
    model = model_of("llama")
    asked = prompts()[:4]
    sampling = Sampling(temperature=1.0, top_k=40)
    runs = {}
    for cap in (0, 3):
        engine = RolloutEngine(model, tok, 8, max(map(len, asked)), 10, max_rows=cap)
        torch.manual_seed(5)  # each prompt's seed is drawn from torch's generator
        runs[cap] = (engine.get().slots, engine.sample(asked, sampling, 10, n=2, logprobs=True))
    (full_rows, full), (capped_rows, capped) = runs[0], runs[3]
    assert (full_rows, capped_rows) == (8, 3)
    assert full.response_ids.shape == (8, 10) and torch.equal(capped.response_ids, full.response_ids)
    assert torch.allclose(capped.logps, full.logps, atol=1e-5)
    assert len({tuple(r) for r in full.response_ids.tolist()}) == 8  # eight distinct draws


def test_the_memory_budget_sets_the_rows_from_the_caches_real_size(tok):
    model = model_of("llama")
    engine = RolloutEngine(model, tok, 8, 33, 10)
    cache = engine.get().backend.cache
    real = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values)) // cache.rows
    assert kv_bytes_per_row(model, engine.max_len) == real == 2 * 2 * 2 * 16 * 43 * 4
    budgeted = RolloutEngine(model, tok, 8, 33, 10, memory_budget=int(real * 4.5))
    assert budgeted.get().slots == 4 and budgeted.get().backend.cache.rows == 4
    assert RolloutEngine(model, tok, 8, 33, 10, memory_budget=real // 2).get().slots == 1  # at least one row


def test_a_group_larger_than_the_rows_is_refused_in_one_line_and_bad_caps_by_the_config(tok):
    engine = RolloutEngine(model_of("llama"), tok, 8, 33, 10, max_rows=3)
    with pytest.raises(ConfigError, match=r"rl.num_generations=4 needs 4 cache rows at once, but the rollout "
                                          r"engine holds 3 of 43 positions") as caught:
        engine.sample(prompts()[:2], Sampling(), 10, n=4)
    assert "\n" not in str(caught.value)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ConfigError, match="rl.rollout_rows="):
            RLConfig(rollout_rows=bad)
