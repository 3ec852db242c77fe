"""Rollouts for online RL: sample replies to chat prompts and return them as padded token tensors.

Generation sits behind a small backend interface (token ids in, token ids out) so that another
engine (vLLM on a GPU) can serve rollouts later without touching the RL stages. The plain backend
is transformers' `generate` with a KV cache and left padding.

Layout of a rollout of N samples: prompts left-padded to P tokens, replies right-padded to R
tokens. A reply keeps its end-of-turn token (the policy must learn to stop, and is scored for it)
and nothing after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.data.templates import end_of_turn_ids, render_prompt


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0


class GenerationBackend(Protocol):
    def generate(self, model, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                 pad_id: int) -> list[list[int]]:
        """The generated token ids of each prompt (possibly running past a stop token)."""


class HFBackend:
    """transformers `generate`: batched, KV-cached, left-padded prompts. `static_cache` pre-allocates the
    cache for the whole batch; on a GPU transformers then compiles the decoding step (CUDA graphs),
    which removes most of the per-token launch overhead that dominates small-model decoding."""

    def __init__(self, batch_size: int = 64, static_cache: bool = False):
        self.batch_size = batch_size
        self.static_cache = static_cache

    @torch.no_grad()
    def generate(self, model, prompts, params, stop_ids, pad_id):
        device = next(model.parameters()).device
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k} if params.temperature > 0 else {"do_sample": False}
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = left_pad(prompts[start:start + self.batch_size], pad_id)
            cache = {"cache_implementation": "static"} if self.static_cache else {}
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=params.max_new_tokens, eos_token_id=stop_ids,
                                       pad_token_id=pad_id, use_cache=True, **cache, **sampling)
            out += generated[:, ids.shape[1]:].tolist()
        return out



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


def encode_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    return [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]


def sample(backend: GenerationBackend, model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams,
           n: int = 1) -> Samples:
    """`n` replies per prompt, prompt-major (prompt 0's n samples, then prompt 1's, ...)."""
    stop_ids, pad = end_of_turn_ids(tokenizer), tokenizer.pad_token_id
    repeated = [p for p in prompt_ids for _ in range(n)]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        generated = backend.generate(model, repeated, params, stop_ids, pad)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    replies, stopped = zip(*(trim_at_stop(row, stop_ids) for row in generated))
    width = max(1, max(len(r) for r in replies))
    response_ids = torch.full((len(replies), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(replies), width))
    for i, reply in enumerate(replies):
        response_ids[i, :len(reply)] = torch.tensor(reply, dtype=torch.long)
        response_mask[i, :len(reply)] = 1.0
    texts = [decode_reply(tokenizer, r, s) for r, s in zip(replies, stopped)]
    prompt, prompt_mask = left_pad(repeated, pad)
    return Samples(prompt, prompt_mask, response_ids, response_mask, texts, torch.tensor(stopped), seconds)


def trim_at_stop(row: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The reply up to and including its first stop token, and whether there was one."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[:i + 1], True
    return row, False


def decode_reply(tokenizer, reply: list[int], stopped: bool) -> str:
    text = tokenizer.decode(reply[:-1] if stopped else reply, skip_special_tokens=True)
    # A reply cut at the length limit can end in half a multi-byte character: drop the fragment.
    return text if stopped else text.rstrip("\ufffd")
