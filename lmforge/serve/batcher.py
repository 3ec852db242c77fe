"""The generation engine behind `lmforge serve`: one worker thread owns it and loops wait -> step -> route,
so a request joins the running batch at the next step and leaves it as soon as it ends (continuous
batching: nobody waits for a whole batch to finish). Requests past the free rows wait in the engine, at
most `queue_size` of them; more are refused (the server answers 503)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from lmforge.generation import Engine, Handle, Request, TokenEvent
from lmforge.serve.logprobs import TokenText, token_entry

log = logging.getLogger("lmforge.serve")

MAX_CONTEXT = 4096
"""Longest context served (prompt + reply): the KV cache of every row is allocated up front, so a model
with 128k positions would otherwise take `slots` times 128k positions of memory before the first request."""

Listener = Callable[[int, str, object], None]
"""Called on the worker thread with (sample index, "text", piece), (sample index, "logprob", token entry: see
serve.logprobs; before the token's text, for requests that asked) or (sample index, "done", (reason, tokens))."""


class QueueFull(Exception):
    """Too many requests are waiting for rows: the server answers 503."""


class Batcher:
    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch_size: int = 16, queue_size: int = 64,
                 max_len: int | None = None):
        positions = getattr(model.config, "max_position_embeddings", None) or MAX_CONTEXT
        self.engine = Engine(model, slots=max_batch_size, max_len=max_len or min(positions, MAX_CONTEXT),
                             eos_ids=stop_ids, tokenizer=tokenizer)
        self.queue_size = queue_size
        self.token_text = TokenText(tokenizer)
        self._listeners: dict[int, tuple[Handle, Listener]] = {}
        self._queued: set[int] = set()
        """Requests submitted whose rows the engine has not admitted yet."""
        self._free_rows = max_batch_size
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="lmforge-engine", daemon=True)
        self.steps = 0
        self.rows_decoded = 0
        """Samples that ended (stop, length, cancel or error)."""
        self.rows_cancelled = 0
        """Samples whose client left before they ended, while waiting or while decoding."""
        self.tokens_generated = 0

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request, listener: Listener) -> Handle:
        """Queue a request (RequestError when it cannot fit the engine, QueueFull past the bound)."""
        with self._lock:
            # The rows free at the last step take requests at once; beyond them, queue_size may wait.
            if len(self._queued) >= self.queue_size + self._free_rows:
                raise QueueFull(f"{len(self._queued)} requests are already waiting")
            handle = self.engine.submit(request)
            self._listeners[id(handle)] = (handle, listener)
            self._queued.add(id(handle))
        return handle

    def cancel(self, handle: Handle) -> None:
        """The client left: its unfinished samples end "cancelled" at the next step (any thread)."""
        self.engine.cancel(handle)

    def _work(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.wait_for_work(timeout=0.2):
                continue
            try:
                events = self.engine.step()
            except Exception as error:  # one failing step must not kill the server: end what it was running
                log.exception("generation failed")
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                self._fail_all(f"error: {type(error).__name__}: {first_line}")
                continue
            self.steps += 1
            for event in events:
                self._route(event)
            with self._lock:  # after the whole step: one step may end several samples of a request
                for handle in {id(e.handle): e.handle for e in events if e.handle.done}.values():
                    self._listeners.pop(id(handle), None)
                    self._queued.discard(id(handle))
            self._update_queue()

    def _route(self, event: TokenEvent) -> None:
        with self._lock:  # submit() registers the listener under this lock, after posting the request
            entry = self._listeners.get(id(event.handle))
        if entry is None:
            return
        handle, listener = entry
        if event.token_id is not None:
            self.tokens_generated += 1
            request = handle.request
            # A stop token ends the turn and is no part of the reply's text: it gets no entry either.
            if request.logprobs and event.token_id not in self.engine.eos_ids \
                    and event.token_id not in request.stop_token_ids:
                listener(event.sample, "logprob", token_entry(self.token_text, event.token_id, event.logprob,
                                                              event.top_logprobs))
        if event.text:
            listener(event.sample, "text", event.text)
        if event.finish_reason is not None:
            self.rows_decoded += 1
            self.rows_cancelled += event.finish_reason == "cancelled"
            listener(event.sample, "done", (event.finish_reason, len(handle.samples[event.sample].token_ids)))

    def _update_queue(self) -> None:
        with self._lock:
            for key in list(self._queued):
                handle = self._listeners[key][0] if key in self._listeners else None
                if handle is None or handle.done or any(s.row is not None for s in handle.sequences):
                    self._queued.discard(key)
            self._free_rows = sum(row is None for row in self.engine.rows)

    def _fail_all(self, reason: str) -> None:
        """After a failed step: reset the engine and end every request it held with the error (an event the
        app turns into an error message, never a traceback)."""
        with self._lock:
            entries, self._listeners = list(self._listeners.values()), {}
            self._queued.clear()
            unfinished = [(listener, i) for handle, listener in entries
                          for i in range(handle.request.n)
                          if i >= len(handle.samples) or handle.samples[i].finish_reason is None]
            try:
                self.engine.reset()
            except Exception:
                log.exception("resetting the engine failed")
            self._free_rows = sum(row is None for row in self.engine.rows)
        for listener, index in unfinished:
            self.rows_decoded += 1
            listener(index, "done", (reason, 0))
