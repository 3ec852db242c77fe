"""The request queue in front of the model: requests wait in a bounded queue, and one worker thread
takes as many as fit in a batch and decodes them together (static batching: requests arriving
during a batch form the next one). With max_batch_size=1 every request runs alone."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from lmforge.rollout.stream import Row, generate_rows

log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    """Too many requests are waiting: the server answers 503."""


@dataclass
class Job:
    rows: list[Row]
    """One request: its n choices, always decoded in the same batch."""


class Batcher:
    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch_size: int = 16, queue_size: int = 64,
                 gather_seconds: float = 0.005):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.max_batch_size, self.gather_seconds = max_batch_size, gather_seconds
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._carry: Job | None = None
        self._thread = threading.Thread(target=self._work, name="lmforge-batcher", daemon=True)
        self.batches = 0
        self.rows_decoded = 0
        self.rows_cancelled = 0
        """Rows whose client left before they ended, while waiting or while decoding."""
        self.tokens_generated = 0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._waiting.put(None)
        self._thread.join(timeout=30)

    def submit(self, rows: list[Row]) -> None:
        try:
            self._waiting.put_nowait(Job(rows))
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting") from None

    def _next_batch(self) -> list[Job] | None:
        first = self._carry or self._waiting.get()
        self._carry = None
        if first is None:
            return None
        jobs, size = [first], len(first.rows)
        deadline = time.monotonic() + self.gather_seconds
        while size < self.max_batch_size:
            try:
                job = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None or size + len(job.rows) > self.max_batch_size:
                self._carry = job
                break
            jobs.append(job)
            size += len(job.rows)
        return jobs

    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            rows = []
            for row in (r for job in jobs for r in job.rows):
                if row.cancelled:  # the client left while it waited
                    row.on_done("cancelled", 0)
                    self.rows_cancelled += 1
                else:
                    rows.append(row)
            if not rows:
                continue
            try:
                ends = generate_rows(self.model, self.tokenizer, rows, self.stop_ids)
            except Exception as error:  # one failing batch must not kill the server
                log.exception("generation failed")
                for row in rows:
                    row.on_done(f"error: {type(error).__name__}: {error}", 0)
            else:
                self.rows_cancelled += sum(reason == "cancelled" for reason, _ in ends)
                self.tokens_generated += sum(tokens for _, tokens in ends)
            self.batches += 1
            self.rows_decoded += len(rows)
