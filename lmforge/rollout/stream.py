"""Streaming batched generation: many independent requests decoded together in one `generate` call,
each with its own sampling settings, token limit and stop rules, each told its new text as it comes.

This is the engine behind `lmforge serve`. One call to `generate_rows` runs one batch: rows are
left-padded together, a logits processor applies every row's own temperature and top-p (a greedy
row keeps only its arg-max, so sampling it is exact greedy decoding), a streamer hands each row's
new token to its text decoder, and a stopping criterion ends each row on its own (stop token, stop
string, token limit, or the client going away) while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lmforge.rollout.sample import left_pad


@dataclass
class Row:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    stop_texts: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] = lambda piece: None
    """Called (on the generating thread) with each new piece of the reply's text."""
    on_done: Callable[[str, int], None] = lambda finish_reason, tokens: None
    """Called once with "stop" or "length" and the number of tokens generated."""
    cancelled: bool = False
    """Set from outside (the client went away): the row stops at the next step."""


class RowDecoder:
    """Turns one row's tokens into text pieces: never emits half a multi-byte character, holds back
    text that may be the start of a stop string, and cuts the reply at the first stop string."""

    def __init__(self, tokenizer, row: Row, stop_ids: set[int]):
        self.tokenizer, self.row, self.stop_ids = tokenizer, row, stop_ids
        self.tokens: list[int] = []
        self.generated = 0
        """Tokens the model produced for this row, a final stop token included."""
        self.emitted = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> None:
        if self.finish_reason is not None:
            return
        self.generated += 1
        if token in self.stop_ids:
            self._finish("stop", self._text())
            return
        self.tokens.append(token)
        text = self._text()
        found = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.row.stop_texts) if i >= 0]
        if found:
            self._finish("stop", text[:min(found)])
        elif self.generated >= self.row.max_new_tokens:
            self._finish("length", text.rstrip("\ufffd"))
        else:
            safe = text.rstrip("\ufffd")
            held = max((k for s in self.row.stop_texts for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
            self._emit(safe[:len(safe) - held])

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _emit(self, upto: str) -> None:
        if len(upto) > self.emitted:
            self.row.on_text(upto[self.emitted:])
            self.emitted = len(upto)

    def _finish(self, reason: str, text: str) -> None:
        self._emit(text)
        self.finish_reason = reason
        self.row.on_done(reason, self.generated)


class _PerRowSampling(LogitsProcessor):
    def __init__(self, rows: list[Row], device):
        self.temperature = torch.tensor([max(r.temperature, 1e-6) for r in rows], device=device)[:, None]
        self.greedy = torch.tensor([r.temperature == 0 for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device)[:, None]

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if (self.top_p < 1).any():  # a sort of the whole vocabulary per step: only when a row asks for it
            ordered, order = scores.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            # Nucleus: keep the most likely tokens until their mass reaches top_p (the first always stays).
            drop_sorted = probs.cumsum(-1) - probs > self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        if self.greedy.any():
            only_best = torch.full_like(scores, float("-inf")).scatter(-1, scores.argmax(-1, keepdim=True), 0.0)
            scores = torch.where(self.greedy[:, None], only_best, scores)
        return scores


class _RowStreamer(BaseStreamer):
    def __init__(self, decoders: list[RowDecoder]):
        self.decoders, self.prompt_seen = decoders, False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        for decoder, token in zip(self.decoders, value.view(-1).tolist()):
            if decoder.row.cancelled:
                decoder.cancel()
            decoder.push(token)

    def end(self):
        pass


class _RowsFinished(StoppingCriteria):
    def __init__(self, decoders: list[RowDecoder]):
        self.decoders = decoders

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([d.finish_reason is not None for d in self.decoders], device=input_ids.device)


@torch.no_grad()
def generate_rows(model, tokenizer, rows: list[Row], stop_ids: list[int]) -> None:
    """Decode all rows together; every row gets its pieces and exactly one on_done."""
    decoders = [RowDecoder(tokenizer, row, set(stop_ids)) for row in rows]
    device = next(model.parameters()).device
    ids, mask = left_pad([r.prompt_ids for r in rows], tokenizer.pad_token_id)
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                   max_new_tokens=max(r.max_new_tokens for r in rows), do_sample=True, temperature=1.0,
                   top_p=1.0, top_k=0, logits_processor=LogitsProcessorList([_PerRowSampling(rows, device)]),
                   stopping_criteria=StoppingCriteriaList([_RowsFinished(decoders)]),
                   streamer=_RowStreamer(decoders), eos_token_id=stop_ids,
                   pad_token_id=tokenizer.pad_token_id, use_cache=True)
    for decoder in decoders:  # rows cut by the batch's step limit, or cancelled ones, still get an end
        if decoder.finish_reason is None:
            decoder._finish("length", decoder._text().rstrip("\ufffd"))
        elif decoder.finish_reason == "cancelled":
            decoder.row.on_done("cancelled", decoder.generated)
