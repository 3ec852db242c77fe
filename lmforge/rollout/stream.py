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


WAIT_TOKENS = 8
"""Tokens a row's decoder waits for the rest of a character (a UTF-8 character is at most 4 bytes, so at
most 4 byte tokens): past this, bytes that never form one are text (U+FFFD), and the window stays small."""


class StopMatcher:
    """Finds stop strings in text that arrives piece by piece. Each stop string has a Knuth-Morris-Pratt
    automaton whose state is the length of the longest end of the text so far that begins that stop string,
    so each new character costs amortised O(1) per stop string, however long the reply or the strings, and
    the text to hold back (what may still become a stop string) is the largest state."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fallback = [_failure(s) for s in stops]
        self.states = [0] * len(stops)
        self.seen = 0
        """Characters fed so far."""
        self.steps = 0
        """Automaton moves made (forward and fall-back): the matching work, at most twice the characters fed
        per stop string."""

    def feed(self, piece: str) -> int | None:
        """Advance over `piece`; the offset (in all the text fed) where the earliest-starting stop string
        that ends inside `piece` begins, or None."""
        earliest = None
        for k, (stop, fallback) in enumerate(zip(self.stops, self.fallback)):
            state, steps = self.states[k], 0
            for i, char in enumerate(piece):
                while state and stop[state] != char:
                    state = fallback[state - 1]
                    steps += 1
                if stop[state] == char:
                    state += 1
                steps += 1
                if state == len(stop):
                    begin = self.seen + i + 1 - len(stop)
                    earliest = begin if earliest is None else min(earliest, begin)
                    state = fallback[state - 1]
            self.states[k] = state
            self.steps += steps
        self.seen += len(piece)
        return earliest

    @property
    def held(self) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        return max(self.states, default=0)


def _failure(stop: str) -> list[int]:
    """KMP's table: for each prefix of `stop`, the length of its longest proper border."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


class RowDecoder:
    """Turns one row's tokens into text pieces: never emits half a multi-byte character, holds back
    text that may be the start of a stop string, and cuts the reply at the first stop string.

    Work per token is bounded, not grown with the reply: only a window of the last few tokens is decoded
    (the text of the new ones is what decoding the window adds to decoding its first tokens, which keeps
    word-joining spaces right), and stop strings are matched by StopMatcher over the new characters only."""

    def __init__(self, tokenizer, row: Row, stop_ids: set[int]):
        self.tokenizer, self.row, self.stop_ids = tokenizer, row, stop_ids
        self.tokens: list[int] = []
        self.generated = 0
        """Tokens the model produced for this row, a final stop token included."""
        self.window = 0
        """First token of the decoding window: context for the tokens from `read` on."""
        self.read = 0
        """Tokens whose text has been taken."""
        self.pending = ""
        """Text taken but not emitted yet (it may start a stop string)."""
        self.emitted = 0
        self.matcher = StopMatcher(row.stop_texts)
        self.finish_reason: str | None = None

    def push(self, token: int) -> None:
        if self.finish_reason is not None:
            return
        self.generated += 1
        if token in self.stop_ids:
            self.end("stop")
            return
        self.tokens.append(token)
        if self._take(self._new_text(final=False)):
            return
        if self.generated >= self.row.max_new_tokens:
            self.end("length")
        else:
            self._emit(len(self.pending) - self.matcher.held)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def end(self, reason: str) -> None:
        """End the reply: the text held back goes out, and the text of the last tokens unless it is a cut
        character, or is cut at a stop string completed by them."""
        if not self._take(self._new_text(final=True)):
            self._finish(reason, len(self.pending))

    def _new_text(self, final: bool) -> str:
        if self.read == len(self.tokens):
            return ""
        before = self.tokenizer.decode(self.tokens[self.window:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.tokens[self.window:], skip_special_tokens=True)
        if final:
            text = text.rstrip("\ufffd")
        elif text.endswith("\ufffd") and len(self.tokens) - self.read < WAIT_TOKENS:
            return ""  # half a character: wait for the rest of its bytes
        self.window, self.read = self.read, len(self.tokens)
        return text[len(before):]

    def _take(self, piece: str) -> bool:
        """Add new text; True when it completed a stop string (the row is then finished)."""
        if not piece:
            return False
        begin = self.matcher.feed(piece)
        self.pending += piece
        if begin is None:
            return False
        self._finish("stop", begin - self.emitted)
        return True

    def _emit(self, count: int) -> None:
        if count > 0:
            self.row.on_text(self.pending[:count])
            self.pending = self.pending[count:]
            self.emitted += count

    def _finish(self, reason: str, count: int) -> None:
        self._emit(count)
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
def generate_rows(model, tokenizer, rows: list[Row], stop_ids: list[int]) -> list[tuple[str, int]]:
    """Decode all rows together; every row gets its pieces and exactly one on_done. Returns each row's
    finish reason and tokens generated."""
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
            decoder.end("length")
        elif decoder.finish_reason == "cancelled":
            decoder.row.on_done("cancelled", decoder.generated)
    return [(decoder.finish_reason, decoder.generated) for decoder in decoders]
