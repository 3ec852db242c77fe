"""The engine's bookkeeping per request (`Handle`) and per sample (`Sequence`), and the events a step emits."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from lmforge.generation.request import Request, Result, Sample
from lmforge.generation.sampling import noise_keys
from lmforge.generation.text import ReplyText

WAITING, PREFILL, SIBLING, DECODING, PARKED, DONE = "waiting", "prefill", "sibling", "decoding", "parked", "done"
"""A sequence's phases: waiting for rows; prefilling its prompt (or a continuation); holding a row until its
request's leader has prefilled the shared prompt; decoding; finished but keeping its row (a session);
finished and rowless."""


@dataclass
class TokenEvent:
    handle: Handle
    sample: int
    token_id: int | None
    """The new token; None on an end without one (a cancel)."""
    logprob: float | None
    text: str
    """Text this token released ("" while held back, or without a tokenizer)."""
    finish_reason: str | None
    """Set on a sample's last event."""
    top_logprobs: list[tuple[int, float]] | None = None
    """(token id, log-prob) of the most likely tokens at this step, when the request asked for them."""


class Sequence:
    """One sample: its cache row, what it must still feed, what it generated."""

    def __init__(self, handle: Handle, index: int, seed: int, tokenizer, stop_ids: set[int]):
        self.handle, self.index, self.seed = handle, index, seed
        self.noise_key = int(noise_keys([seed])[0])
        """The seed's half of the sampling noise's hash, computed once."""
        self.stop_ids = stop_ids
        self.phase = WAITING
        self.row: int | None = None
        self.cached = 0
        """Positions of the row that hold this sequence's keys/values."""
        self.feed: list[int] = []
        """Tokens to prefill before the next draw."""
        self.last: int | None = None
        """The last token drawn: decoded next, not yet in the cache."""
        self.steps = 0
        """Tokens drawn over the whole session: the sampling noise's counter, so a continuation never
        reuses the noise of an earlier turn."""
        self.history: list[int] = []
        """Prompt and every token since (kept for repetition/presence penalties)."""
        self.reply_start = 0
        self.seen: tuple | None = None
        """Penalty masks (in context, in reply, history length marked), made when a penalty first needs them."""
        self.tokenizer = tokenizer
        self.start_segment(handle, handle.request.prompt_ids)

    def start_segment(self, handle: Handle, feed: list[int]) -> None:
        """Begin a reply (a new request, or a session's continuation) after feeding `feed`."""
        self.handle = handle
        self.feed = list(feed)
        self.history += feed
        self.reply_start = len(self.history)
        if self.seen is not None:  # a new reply: presence counts its own tokens only
            self.seen[1].zero_()
        request = handle.request
        self.out = Sample(logprobs=[] if request.logprobs else None,
                          top_logprobs=[] if request.top_logprobs else None)
        self.text = ReplyText(self.tokenizer, request.stop_strings) if self.tokenizer is not None else None
        handle.samples.append(self.out)
        sampling = request.sampling
        self.top_k = min(sampling.top_k, 2**31 - 1)  # top-k past the vocabulary keeps all: int32 is plenty
        scale = sampling.temperature if request.tempered_logprobs and sampling.temperature > 0 else 1.0
        self.float_settings = (sampling.temperature, sampling.top_p, sampling.min_p, scale)
        """The step inputs' float columns (temperature, top-p, min-p, log-prob temperature), fixed per segment."""
        self.sampled = not sampling.greedy
        self.truncating = self.sampled and (sampling.top_k > 0 or sampling.top_p < 1)
        self.flooring = self.sampled and sampling.min_p > 0
        self.asks_logprobs = request.logprobs or request.top_logprobs > 0
        self.penalised = sampling.penalised

    @property
    def request(self) -> Request:
        return self.handle.request

    def accept(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> TokenEvent:
        """Record a drawn token; finish the sample when it ends it."""
        request, out = self.request, self.out
        self.last, self.steps = token, self.steps + 1
        self.history.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(logprob)
        if out.top_logprobs is not None:
            out.top_logprobs.append(top)
        text, finish = "", None
        if token in self.stop_ids or token in request.stop_token_ids:
            finish = "stop"  # its text is not part of the reply
        elif self.text is not None:
            text = self.text.push(token)
            finish = "stop" if self.text.stop_string is not None else None
        if finish is None and len(out.token_ids) >= request.max_new_tokens:
            finish = "length"
        if finish is not None and self.text is not None:
            text += self.text.finish()
            finish = "stop" if self.text.stop_string is not None else finish
        if finish is not None:
            self.end(finish)
        return TokenEvent(self.handle, self.index, token, logprob, text, finish, top)

    def end(self, reason: str) -> None:
        self.out.finish_reason = reason
        if self.text is not None:
            self.out.text = self.text.text
            self.out.stop_string = self.text.stop_string


class Handle:
    """A submitted request: the caller's ticket to its events, its result, a cancel or a continuation."""

    def __init__(self, request: Request, seed: int):
        self.request, self.seed = request, seed
        self.sequences: list[Sequence] = []
        self.samples: list[Sample] = []
        """What this request returns, one per sample (a session's continuation gets a new handle)."""
        self.cancel_requested = False
        self.released = False
        self.finished = threading.Event()

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def result(self) -> Result:
        if not self.done:
            raise RuntimeError("the request has not finished: step the engine (or use Engine.generate)")
        return Result(list(self.samples), len(self.request.prompt_ids), self.seed)

    def check_done(self) -> None:
        if self.samples and all(s.finish_reason is not None for s in self.samples):
            self.finished.set()
