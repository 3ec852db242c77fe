"""Rollouts for online RL (and the greedy replies of evaluation) from the one generation engine.

Each prompt is one engine `Request` with `n` samples (its prompt prefilled once, the cache shared by the
group), sampled at the run's temperature/top-p/top-k, ended by the tokenizer's end-of-turn tokens or the
token limit, with each sampled token's log-prob under the tempered policy when asked. The result is laid
out as the RL stages train on it (`Samples`): prompts left-padded to P tokens, replies right-padded to R
tokens. A reply keeps its end-of-turn token (the policy must learn to stop, and is scored for it) and
nothing after it.

`RolloutEngine` owns a run's engine: built at the first rollout (under whatever parameter gathering the
caller holds, so a sharded model's real shapes are seen), sized once for a rollout's rows and the longest
prompt plus its reply, and reused every iteration. The weights change in place between rollouts; the
engine reads the model's modules live each step (its CUDA graphs re-capture when a parameter's storage
moves), so nothing it keeps goes stale.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from lmforge.config.errors import ConfigError
from lmforge.data.templates import end_of_turn_ids
from lmforge.generation import Engine, Request, Sampling
from lmforge.rollout.generate import fitted, model_positions, run_all, to_generation


@dataclass
class Samples:
    prompt_ids: torch.Tensor
    """[N, P] left-padded."""
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    """[N, R] right-padded; a stopped reply ends with its end-of-turn token."""
    response_mask: torch.Tensor
    """[N, R] float, 1 on reply tokens (the stop token included)."""
    texts: list[str]
    stopped: torch.Tensor
    """[N] bool: the reply ended its turn itself instead of hitting max_new_tokens."""
    seconds: float
    logps: torch.Tensor | None = None
    """[N, R] float: each reply token's log-prob under the policy that sampled it, at the sampling
    temperature (the engine's own, 0 on padding); None when not asked for."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def model_inputs(self) -> dict:
        """Prompt and reply as one sequence, with positions that skip the left padding."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], 1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask.long()], 1)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


KV_MEMORY_SHARE = 0.5
"""Of the GPU memory free when the engine is built (the first rollout, before the optimizer has allocated its
states), the share its KV cache may take: the rest is for the training step that follows."""


def kv_bytes_per_row(model, max_len: int) -> int:
    """Bytes of one cache row: keys and values of every layer for `max_len` positions, in the weights' dtype."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    element = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * max_len * element


class RolloutEngine:
    """A run's generation engine for rollouts and held-out replies, built once and reused."""

    def __init__(self, policy, tokenizer, rows: int, longest_prompt: int, max_new_tokens: int,
                 backend: str = "auto", compile: bool | None = None, max_rows: int = 0,
                 memory_budget: int | None = None):
        """`rows`: the most samples one rollout decodes at once (prompts per step × generations); more are
        queued and join as rows free up. The cache holds `longest_prompt + max_new_tokens` positions, within
        the model's own; a longer prompt is cut from the left (see `rollout.generate.fitted`). The rows are
        capped by `max_rows` (0: no cap) and by what `memory_budget` bytes of cache hold (None: on a GPU,
        `KV_MEMORY_SHARE` of its free memory when the engine is built; no bound on the CPU), so a large
        model's rollout of many samples queues them instead of running out of memory. `compile` is the
        engine's (None: on a GPU)."""
        positions = model_positions(policy)
        needed = longest_prompt + max_new_tokens
        self.policy, self.tokenizer = policy, tokenizer
        self.rows, self.max_len = max(1, rows), min(needed, positions) if positions else needed
        self.max_rows, self.memory_budget, self.compile = max_rows, memory_budget, compile
        self.backend = "own" if backend == "lmforge" else backend  # the old name of the own decoder
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.engine: Engine | None = None

    def get(self) -> Engine:
        """The engine, built on first use (call it with the parameters gathered, if they are sharded)."""
        if self.engine is None:
            self.engine = Engine(self.policy, slots=self.cache_rows(), max_len=self.max_len, eos_ids=self.stop_ids,
                                 backend=self.backend, compile=self.compile)
        return self.engine

    def cache_rows(self) -> int:
        """The engine's rows: the rollout's, within `max_rows` and the memory budget (at least one)."""
        rows = min(self.rows, self.max_rows) if self.max_rows > 0 else self.rows
        budget = self.memory_budget
        device = next(self.policy.parameters()).device
        if budget is None and device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * KV_MEMORY_SHARE)
        if budget is not None:
            rows = min(rows, budget // kv_bytes_per_row(self.policy, self.max_len))
        return max(1, rows)

    def sample(self, prompt_ids: list[list[int]], sampling: Sampling, max_new_tokens: int, n: int = 1,
               logprobs: bool = False) -> Samples:
        """`n` replies per prompt, prompt-major (prompt 0's n samples, then prompt 1's, ...). Without a seed
        in `sampling`, each prompt's seed is drawn from torch's generator, so a seeded (or resumed) run
        draws the same rollouts."""
        engine = self.get()
        if n > engine.slots:
            raise ConfigError(f"rl.num_generations={n} needs {n} cache rows at once, but the rollout engine holds "
                              f"{engine.slots} of {engine.max_len} positions (rl.rollout_rows, or the GPU memory "
                              "left): lower rl.num_generations, rl.max_new_tokens or the prompt length")
        requests = []
        for prompt, limit in fitted(prompt_ids, max_new_tokens, engine.max_len):
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
            requests.append(Request(prompt, dataclasses.replace(sampling, seed=seed), limit, n=n,
                                    logprobs=logprobs, tempered_logprobs=logprobs))
        started = time.perf_counter()
        results = run_all(engine, requests)
        seconds = time.perf_counter() - started
        samples = [s for r in results for s in r.samples]
        prompts = [r.prompt_ids for r in requests for _ in range(n)]
        return layout(self.tokenizer, prompts, samples, seconds, logprobs)


def layout(tokenizer, prompts: list[list[int]], samples: list, seconds: float, logprobs: bool) -> Samples:
    """Engine samples (one per prompt in `prompts`) as padded tensors; reply texts decoded as a whole."""
    pad = tokenizer.pad_token_id
    replies = [s.token_ids for s in samples]
    stopped = [s.finish_reason == "stop" for s in samples]
    width = max(1, max(len(r) for r in replies))
    response_ids = torch.full((len(replies), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(replies), width))
    logps = torch.zeros((len(replies), width)) if logprobs else None
    for i, (reply, sample) in enumerate(zip(replies, samples)):
        response_ids[i, :len(reply)] = torch.tensor(reply, dtype=torch.long)
        response_mask[i, :len(reply)] = 1.0
        if logps is not None:
            logps[i, :len(reply)] = torch.tensor(sample.logprobs, dtype=torch.float32)
    texts = [to_generation(tokenizer, s.token_ids, s.finish_reason).text for s in samples]
    prompt, prompt_mask = left_pad(prompts, pad)
    return Samples(prompt, prompt_mask, response_ids, response_mask, texts, torch.tensor(stopped), seconds, logps)

