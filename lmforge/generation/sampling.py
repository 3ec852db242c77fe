"""Choosing the next token of many rows at once, each with its own settings: pure functions of tensors.

Randomness is counter-based: the draw of a row at a step is a hash of (the sample's seed, the number of
tokens it has generated), never a shared generator's state. A sample therefore gets the same tokens
whichever other rows share its batch, whenever it joined, and on whichever device — which is what makes
"a request that joins a running batch gets exactly the tokens it gets alone" hold for sampling, not only
for greedy decoding. The hash is integer arithmetic on the device (no host sync, capturable in a graph).

A token is drawn by inverting the CDF of the filtered distribution at that one uniform number.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x < 2**32 in int64, in two 16-bit halves so no product overflows."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row, a function of (seed, step) only. seeds, steps: int64 [B]."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    key = _mix32(low ^ _mix32(high ^ 0x9E3779B9))
    bits = _mix32(key ^ _mix32((steps & MASK32) ^ 0x7F4A7C15))
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32, always < 1


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
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).to(logits.dtype)
    filtered = filter_logits(logits / scale[:, None], top_k, top_p, min_p, truncating, flooring)
    drawn = draw_from(torch.softmax(filtered, -1), uniforms)
    return torch.where(greedy, best, drawn)


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
