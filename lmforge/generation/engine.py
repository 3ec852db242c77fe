"""The generation engine: continuous batching of requests on a pre-allocated KV cache.

A request flows: `submit` (validated, queued; thread-safe) -> admitted when its `n` rows are free ->
its prompt prefilled into the first sample's row, `prefill_chunk` tokens per step -> that row's cache
copied to the other samples' rows (the shared prefix is computed once) -> first tokens drawn -> each
sample decoded one token per step together with every other live row -> it leaves the batch at once when
it ends (stop token, stop string, token limit, cancel); a session keeps its row for `continue_session`.

Decoding rows are kept packed at rows 0..B-1 of the cache, so a step reads plain slices of it.
One thread drives `step()`; `submit`, `cancel`, `continue_session` and `release` may be called from any
thread (they post to an inbox the next step applies).
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from lmforge.generation.draw import decode_tokens, draw_tokens
from lmforge.generation.hf_fallback import HFBackend
from lmforge.generation.llama import LlamaFamilyBackend, UnsupportedModel
from lmforge.generation.request import Request, RequestError, Result, check_token_ids
from lmforge.generation.rows import RowTable
from lmforge.generation.sequence import DECODING, DONE, PARKED, PREFILL, SIBLING, Handle, Sequence, TokenEvent

BACKENDS = ("auto", "own", "hf")
DEFAULT_MAX_LEN = 2048
SEED_RANGE = 2**63


def make_backend(model, rows: int, max_len: int, kind: str = "auto", cuda_graphs: bool = True,
                 compile: bool | str = False):
    """The own decoder where it runs the model exactly, else (under "auto") the HF fallback."""
    if kind not in BACKENDS:
        raise ValueError(f"generation backend {kind!r}: choose one of {', '.join(BACKENDS)}")
    if kind == "hf":
        return HFBackend(model, rows, max_len)
    try:
        return LlamaFamilyBackend(model, rows, max_len, cuda_graphs, compile)
    except UnsupportedModel:
        if kind == "own":
            raise
        return HFBackend(model, rows, max_len)


class Engine:
    def __init__(self, model, slots: int = 16, max_len: int | None = None, prefill_chunk: int = 512,
                 eos_ids: Iterable[int] | None = None, tokenizer=None, backend: str = "auto",
                 cuda_graphs: bool = True, compile: bool | str | None = None):
        """`compile`: torch.compile the own decoder's decoding step (before it is captured); None is on when
        the model is on a GPU, off on the CPU (compiling is slow there); a string names a torch.compile
        backend other than inductor."""
        positions = next((getattr(model.config, k) for k in ("max_position_embeddings", "n_positions")
                          if isinstance(getattr(model.config, k, None), int)), None)
        if max_len is None:  # the model's positions, at most DEFAULT_MAX_LEN (the cache is allocated up front)
            max_len = min(DEFAULT_MAX_LEN, positions or DEFAULT_MAX_LEN)
        for name, value in (("slots", slots), ("max_len", max_len), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"generation engine {name}: must be a positive integer, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_len, self.prefill_chunk = slots, max_len, prefill_chunk
        if positions is not None and max_len > positions:
            raise ValueError(f"generation engine max_len={max_len} is past the model's {positions} positions: "
                             f"lower it to at most {positions}")
        if eos_ids is None:
            eos = getattr(model.config, "eos_token_id", None)
            eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        self.eos_ids = set(eos_ids)
        if compile is None:
            compile = next(model.parameters()).device.type == "cuda"
        if not isinstance(compile, (bool, str)) or compile == "":
            raise ValueError(f"generation engine compile: must be true, false or a torch.compile backend name, "
                             f"got {compile!r}")
        if isinstance(compile, str) and compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"generation engine compile={compile!r}: not a torch.compile backend; choose true, "
                             f"false or one of {', '.join(torch._dynamo.list_backends())}")
        self.backend = make_backend(model, slots, max_len, backend, cuda_graphs, compile)
        self.rows: list[Sequence | None] = [None] * slots
        self.table = RowTable(slots)
        """The decoding rows' step inputs, written when a row changes hands (see rows.py)."""
        self.decoding = 0
        """Rows 0..decoding-1 are the decoding sequences."""
        self.waiting: deque[Handle] = deque()
        self.prefilling: list[Sequence] = []
        self._inbox: list[tuple] = []
        self._lock = threading.Lock()
        self._posted = threading.Event()

    # -- the caller's side (any thread) ---------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        self._check_fits(request)
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(62)
        handle = Handle(request, seed)
        # Sample i draws with seed + i, wrapped into the int64 range the noise is computed in.
        handle.sequences = [Sequence(handle, i, (seed + i) % SEED_RANGE, self.tokenizer, self.eos_ids)
                            for i in range(request.n)]
        self._post("submit", handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        """End the request's unfinished samples ("cancelled") at the next step and free their rows."""
        self._post("cancel", handle)

    def release(self, handle: Handle) -> None:
        """Free the rows a finished session keeps."""
        self._post("release", handle)

    def continue_session(self, handle: Handle, extra_ids: list[int], max_new_tokens: int | None = None,
                         sample: int = 0) -> Handle:
        """Extend a finished sample of a session request by `extra_ids` (a tool result, the next turn) and
        decode on from the cache it holds. The continuation is a new handle (itself a session)."""
        request = handle.request
        if not request.session:
            raise RequestError("continue_session: the request was not submitted with session=True")
        if not 0 <= sample < len(handle.sequences) or handle.samples[sample].finish_reason in (None, "cancelled"):
            raise RequestError(f"continue_session: sample {sample} is not a finished, kept session")
        sequence = handle.sequences[sample]
        extra_ids = check_token_ids("extra_ids", extra_ids)
        continuation = dataclasses.replace(request, prompt_ids=[sequence.last, *extra_ids], n=1,
                                           max_new_tokens=request.max_new_tokens if max_new_tokens is None
                                           else max_new_tokens)
        needed = sequence.cached + len(continuation.prompt_ids) + continuation.max_new_tokens
        if needed > self.max_len:
            raise RequestError(f"continue_session: the session would need {needed} positions, over the engine's "
                               f"max_len={self.max_len}; release it and start a shorter one")
        self._check_ids(extra_ids, "extra_ids")
        new = Handle(continuation, sequence.seed)
        self._post("continue", new, handle, sample)
        return new

    # -- driving it (one thread) ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One tick: apply posted calls, one decoding step over the live rows, admit waiting requests,
        prefill up to `prefill_chunk` prompt tokens. Returns the new tokens and endings."""
        events: list[TokenEvent] = []
        was_training = self.model.training
        if was_training:
            self.model.eval()  # dropout (LoRA's included) must be off for the tokens to be the model's
        try:
            self._apply_inbox(events)
            if self.decoding:
                self._decode(events)
            self._admit()
            self._prefill(events)
        finally:
            if was_training:
                self.model.train()
        return events

    def reset(self) -> list[Handle]:
        """Drop every request (after a failed step, say): unfinished samples end "cancelled", kept sessions
        are released, every row is freed. Returns the handles that were still running, for the caller to
        tell their clients."""
        with self._lock:
            ops, self._inbox = self._inbox, []
        handles = {id(h): h for h in [*self.waiting, *(s.handle for s in self.rows + self.prefilling if s)]}
        handles.update((id(op[1]), op[1]) for op in ops if op[0] in ("submit", "continue"))
        running = [h for h in handles.values() if not h.done]
        for handle in handles.values():
            for sample in handle.samples:
                sample.finish_reason = sample.finish_reason or "cancelled"
            handle.released = True
            handle.finished.set()
        for row in range(self.slots):
            self.backend.clear_row(row)
        self.rows, self.decoding = [None] * self.slots, 0
        self.waiting.clear()
        self.prefilling.clear()
        return running

    @property
    def idle(self) -> bool:
        """Nothing to step: no posted call, waiting request, prefill or decoding row (sessions may be kept)."""
        with self._lock:
            return not (self._inbox or self.waiting or self.prefilling or self.decoding)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block a serving loop's thread until a call is posted (True) or `timeout` passes (False)."""
        if not self.idle:
            return True
        posted = self._posted.wait(timeout)
        self._posted.clear()
        return posted

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run every request to its end; results in the order given."""
        for request in requests:  # all or nothing: a bad request leaves none of the others running
            self._check_fits(request)
        handles = [self.submit(r) for r in requests]
        while not all(h.done for h in handles):
            self.step()
        return [h.result() for h in handles]

    def stream(self, request: Request | Handle) -> Iterator[TokenEvent]:
        """Drive the engine, yielding one request's events: a Request is submitted first; a Handle (say a
        session's continuation) is followed as it is. Closing the iterator early cancels the request. Events
        of other requests stepped meanwhile are not returned (their handles still get their results)."""
        handle = request if isinstance(request, Handle) else self.submit(request)
        try:
            while not handle.done:
                yield from (e for e in self.step() if e.handle is handle)
        finally:
            if not handle.done:
                self.cancel(handle)
                self.step()

    # -- checks ---------------------------------------------------------------------------------------
    def _check_fits(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise RequestError(f"submit: expected a Request, got {type(request).__name__}")
        needed = len(request.prompt_ids) + request.max_new_tokens
        if needed > self.max_len:
            raise RequestError(f"request.max_new_tokens: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                               f"({request.max_new_tokens}) = {needed} > the engine's max_len={self.max_len}")
        if request.n > self.slots:
            raise RequestError(f"request.n: {request.n} samples need {request.n} rows; the engine has slots={self.slots}")
        if request.stop_strings and self.tokenizer is None:
            raise RequestError("request.stop_strings: the engine has no tokenizer to read text with")
        self._check_ids(request.prompt_ids, "prompt_ids")

    def _check_ids(self, ids: list[int], name: str) -> None:
        vocab = self.backend.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise RequestError(f"request.{name}: token id {bad} is outside the model's vocabulary of {vocab}")

    def _post(self, *op) -> None:
        with self._lock:
            self._inbox.append(op)
        self._posted.set()

    # -- scheduling -----------------------------------------------------------------------------------
    def _apply_inbox(self, events: list[TokenEvent]) -> None:
        with self._lock:
            ops, self._inbox = self._inbox, []
        for kind, handle, *rest in ops:
            if kind == "submit":
                self.waiting.append(handle)
            elif kind == "cancel":
                self._cancel(handle, events)
            elif kind == "release":
                self._release(handle)
            else:
                self._continue(handle, *rest)

    def _cancel(self, handle: Handle, events: list[TokenEvent]) -> None:
        if handle in self.waiting:
            self.waiting.remove(handle)
        for sequence in handle.sequences:
            if sequence.out.finish_reason is None:
                sequence.end("cancelled")
                events.append(TokenEvent(handle, sequence.index, None, None, "", "cancelled"))
                self._leave(sequence, keep=False)
        self._release(handle)
        handle.check_done()

    def _release(self, handle: Handle) -> None:
        handle.released = True  # a sample still running is freed when it ends instead of kept
        for sequence in handle.sequences:
            if sequence.phase == PARKED and sequence.handle is handle:
                self._free_row(sequence)
                sequence.phase = DONE

    def _continue(self, new: Handle, old: Handle, sample: int) -> None:
        sequence = old.sequences[sample]
        if sequence.phase != PARKED or sequence.handle is not old:  # released or continued meanwhile
            new.samples.append(dataclasses.replace(sequence.out, token_ids=[], finish_reason="cancelled"))
            new.check_done()
            return
        sequence.start_segment(new, new.request.prompt_ids)
        sequence.index = 0
        new.sequences = [sequence]
        sequence.phase = PREFILL
        self.prefilling.append(sequence)

    def _admit(self) -> None:
        """Waiting requests take free rows in arrival order, all n samples at once."""
        while self.waiting:
            handle = self.waiting[0]
            free = [row for row in range(self.slots) if self.rows[row] is None]
            if len(free) < handle.request.n:
                return
            self.waiting.popleft()
            for sequence, row in zip(handle.sequences, free):
                sequence.row, self.rows[row] = row, sequence
                sequence.phase = SIBLING
            handle.sequences[0].phase = PREFILL
            self.prefilling.append(handle.sequences[0])

    def _prefill(self, events: list[TokenEvent]) -> None:
        """Feed up to `prefill_chunk` tokens this step, oldest sequence first, every chunk in one forward; a
        sequence whose feed is done draws its first token(s) and joins the decoding rows."""
        budget, batch = self.prefill_chunk, []
        for sequence in self.prefilling:
            if budget <= 0:
                break
            batch.append((sequence, sequence.feed[:budget]))
            budget -= len(batch[-1][1])
        if not batch:
            return
        logits = self.backend.prefill([s.row for s, _ in batch], [chunk for _, chunk in batch],
                                      [s.cached for s, _ in batch])
        for sequence, chunk in batch:  # all lengths first: a row joining the decoding rows moves others
            sequence.cached += len(chunk)
            sequence.feed = sequence.feed[len(chunk):]
        for (sequence, _), row_logits in zip(batch, logits):
            if not sequence.feed:
                self.prefilling.remove(sequence)
                self._start_decoding(sequence, row_logits, events)

    def _start_decoding(self, leader: Sequence, logits: torch.Tensor, events: list[TokenEvent]) -> None:
        group = [leader] + [s for s in leader.handle.sequences if s.phase == SIBLING]
        for sibling in group[1:]:  # the shared prompt: computed once, copied
            self.backend.copy_row(leader.row, sibling.row, leader.cached)
            sibling.cached = leader.cached
        draw_tokens(group, logits[None].expand(len(group), -1), events)
        for sequence in group:
            if sequence.out.finish_reason is None:
                self._join(sequence)
            else:
                self._leave(sequence, keep=self._keeps(sequence))

    def _decode(self, events: list[TokenEvent]) -> None:
        live = self.rows[:self.decoding]
        decode_tokens(self.backend, self.table, live, events)
        for sequence in live:
            if sequence.out.finish_reason is not None:
                self._leave(sequence, keep=self._keeps(sequence))

    @staticmethod
    def _keeps(sequence: Sequence) -> bool:
        """A finished sample keeps its row when it is a session the caller has not released."""
        return sequence.request.session and not sequence.handle.released

    # -- rows -----------------------------------------------------------------------------------------
    def _join(self, sequence: Sequence) -> None:
        """Move the sequence to row `decoding` (the end of the packed decoding rows)."""
        self._swap(sequence.row, self.decoding)
        self.table.set(self.decoding, sequence)  # also when it was there already: its inputs are new
        self.decoding += 1
        sequence.phase = DECODING

    def _leave(self, sequence: Sequence, keep: bool) -> None:
        """A finished or cancelled sequence leaves the decoding rows (the last decoding row fills its
        place); it keeps its row as a session, or frees it."""
        if sequence.phase == DECODING:
            self.decoding -= 1
            self._swap(sequence.row, self.decoding)
        if sequence in self.prefilling:
            self.prefilling.remove(sequence)
        if keep:
            sequence.phase = PARKED
        else:
            self._free_row(sequence)
            sequence.phase = DONE

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        first, second = self.rows[a], self.rows[b]
        length = max(s.cached if s is not None else 0 for s in (first, second))
        self.backend.swap_rows(a, b, length)
        self.rows[a], self.rows[b] = second, first
        for row, sequence in ((a, second), (b, first)):
            if sequence is not None:
                sequence.row = row
            self.table.set(row, sequence)

    def _free_row(self, sequence: Sequence) -> None:
        if sequence.row is not None:
            self.backend.clear_row(sequence.row)
            self.rows[sequence.row] = None
            sequence.row = None
