"""Choosing the next token of many rows at once, each with its own settings: pure functions of tensors.

Randomness is counter-based: the draw of a row at a step is a hash of (the sample's seed, the number of
tokens it has generated), never a shared generator's state. A sample therefore gets the same tokens
whichever other rows share its batch, whenever it joined, and on whichever device — which is what makes
"a request that joins a running batch gets exactly the tokens it gets alone" hold for sampling, not only
for greedy decoding. The hash is integer arithmetic on the host: the uniforms go to the device with the rest
of a step's per-row inputs, one transfer (a graph-captured step reads them from its input buffer).

A token is drawn by inverting the CDF of the filtered distribution at that one uniform number.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_SEED_SALT, _STEP_SALT = 0x9E3779B9, 0x7F4A7C15


def _mix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint32 arrays (products wrap mod 2**32): every input bit flips about
    half the output bits."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def noise_keys(seeds) -> np.ndarray:
    """uint32 [B]: each seed (0 <= seed < 2**63) hashed once; `uniforms` then mixes in the step."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    low = (seeds & np.uint64(MASK32)).astype(np.uint32)
    high = (seeds >> np.uint64(32)).astype(np.uint32)
    return _mix32(low ^ _mix32(high ^ np.uint32(_SEED_SALT)))


def uniforms(keys: np.ndarray, steps) -> np.ndarray:
    """One uniform number in [0, 1) per row, a function of (seed, step) only: float32 [B] from the rows'
    `noise_keys` and step counters. 24 bits: exact in float32, always < 1. Computed on the host (a few
    vectorised operations on B numbers) and sent with the other per-row inputs of a step."""
    steps = (np.asarray(steps, dtype=np.int64) & MASK32).astype(np.uint32)
    bits = _mix32(np.asarray(keys, dtype=np.uint32) ^ _mix32(steps ^ np.uint32(_STEP_SALT)))
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def penalise(logits: torch.Tensor, in_context: torch.Tensor, in_reply: torch.Tensor, repetition: torch.Tensor,
             presence: torch.Tensor) -> torch.Tensor:
    """Repetition penalty on tokens seen in prompt or reply, presence penalty on tokens seen in the reply.
    logits [B, V] float; in_context, in_reply bool [B, V]; repetition, presence [B]."""
    factor = repetition[:, None].to(logits.dtype)
    repeated = torch.where(logits > 0, logits / factor, logits * factor)
    logits = torch.where(in_context, repeated, logits)
    return logits - presence[:, None].to(logits.dtype) * in_reply


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  truncating: bool | None = None, flooring: bool | None = None) -> torch.Tensor:
    """Set to -inf what top-k, then top-p, then min-p drop (each row its own settings; 0/1/0 keep all).
    The most likely token always stays. `truncating` (any row's top-k or top-p on) and `flooring` (any
    row's min-p on) may be given by a caller that knows them on the host, sparing a device sync each."""
    vocab = logits.shape[-1]
    if truncating is None:
        truncating = bool((top_k > 0).any()) or bool((top_p < 1).any())
    if flooring is None:
        flooring = bool((min_p > 0).any())
    if truncating:
        ordered, order = logits.sort(-1, descending=True)
        keep_count = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        drop = torch.arange(vocab, device=logits.device)[None] >= keep_count[:, None]
        probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), -1)
        # A token goes when the ones above it already hold top_p of the mass; rows at top_p = 1 skip the test,
        # where rounding in the running sum could otherwise drop a tail token.
        beyond_mass = (probs.cumsum(-1) - probs) > top_p[:, None]
        drop |= beyond_mass & (top_p < 1)[:, None]
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    if flooring:
        probs = torch.softmax(logits, -1)
        floor = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def draw_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose running mass exceeds u * total. A zero-probability token
    is never chosen, even when rounding puts u * total at the very end."""
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(-1)
    last_possible = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(drawn, last_possible)


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, uniforms: torch.Tensor, all_greedy: bool | None = None,
                  truncating: bool | None = None, flooring: bool | None = None) -> torch.Tensor:
    """The next token of each row: arg-max where temperature is 0, else a draw at `uniforms` from
    softmax(logits / temperature) after top-k/top-p/min-p. logits [B, V] float (already penalised).
    The optional flags are what the tensors say, passed from the host to spare device syncs."""
    greedy = temperature == 0
    best = logits.argmax(-1)
    if bool(greedy.all()) if all_greedy is None else all_greedy:
        return best
    scale = temperature.masked_fill(greedy, 1.0).to(logits.dtype)
    filtered = filter_logits(logits / scale[:, None], top_k, top_p, min_p, truncating, flooring)
    drawn = draw_from(torch.softmax(filtered, -1), uniforms)
    return torch.where(greedy, best, drawn)


TOKEN, POSITION, TOP_K, TEMPERATURE, TOP_P, MIN_P, SCALE, UNIFORM = range(8)
INPUT_COLUMNS = 8
"""A decoding step's per-row inputs, one int32 [B, 8] tensor (one transfer, or a graph's input buffer): the
token fed, its position and top-k as integers, then the float32 bits of temperature, top-p, min-p, the
log-probs' temperature and the step's uniform number."""
OUT_TOKEN, OUT_SPREAD, OUT_LOGPROB = range(3)


class DrawMode(NamedTuple):
    """What a step's draw must compute, known on the host from the rows' settings (no device sync to find
    out); part of a captured graph's key."""

    greedy: bool
    """Every row greedy: the arg-max, no softmax."""
    truncating: bool
    """Some sampled row has top-k or top-p on."""
    flooring: bool
    """Some sampled row has min-p on."""
    logprobs: bool
    """Some row asks for log-probs: computed for every row (one log-softmax), the others' are dropped."""


def draw_rows(scores: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor, mode: DrawMode) -> torch.Tensor:
    """The fused draw of a step, capturable in a graph: float64 [B, 3] of each row's token, the spread of its
    raw logits (max - min in float64: finite exactly when every logit is) and, under `mode.logprobs`, the
    token's log-prob under logits / the row's log-prob temperature. `scores` [B, V] are the (penalised)
    logits the token is chosen from, `logits` the raw ones; `inputs` the step's int32 [B, 8] row inputs."""
    settings = inputs[:, TEMPERATURE:].view(torch.float32)  # same element size: a view, any strides
    temperature, top_p, min_p = settings[:, 0], settings[:, TOP_P - TEMPERATURE], settings[:, MIN_P - TEMPERATURE]
    tokens = choose_tokens(scores, temperature, inputs[:, TOP_K].long(), top_p, min_p,
                           settings[:, UNIFORM - TEMPERATURE], mode.greedy, mode.truncating, mode.flooring)
    low, high = torch.aminmax(logits, dim=-1)  # NaN propagates; an inf makes the spread inf
    columns = [tokens.double(), high.double() - low.double()]
    if mode.logprobs:  # x / 1 is x exactly: a row at scale 1 gets its raw log-probs
        tempered = logits / settings[:, SCALE - TEMPERATURE, None]
        columns.append(torch.log_softmax(tempered, -1).gather(-1, tokens[:, None]).squeeze(-1).double())
    return torch.stack(columns, -1)


def token_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, top: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log_softmax of the raw (unpenalised, untempered) logits at each row's token, and the `top` most
    likely (ids, log-probs) per row when top > 0: the policy's own log-probs."""
    logprobs = torch.log_softmax(raw_logits.float(), -1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    if top <= 0:
        return chosen, None, None
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return chosen, ids, values
