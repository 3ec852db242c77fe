"""CUDA graphs of the own decoder's decoding step, one per (batch bucket, span bucket, draw mode).

A small model's decoding step is bound by kernel launches, not bytes: replaying a captured graph launches
the whole step at once. Shapes must be fixed for a graph, so the B live rows run as the next power-of-two
bucket of rows and the attention span as the next power of two of positions (at least `MIN_SPAN`). The
padding rows are rows B.. of the cache, which belong to other sequences or to nobody: they read position
`max_len - 1` and write their keys/values there, a position no sequence ever holds (a request needs
prompt + max_new_tokens <= max_len and its last token is never fed), so they disturb nothing.

A graph holds the whole step: the forward pass and the fused draw (`sampling.draw_rows`), reading the
step's packed per-row inputs (tokens, positions, sampling settings, uniforms) from one static buffer and
writing tokens, the finite check and log-probs to its output: one copy in, one replay, one copy out. Rows
with repetition/presence penalties replay a forward-only graph (draw mode None) and are drawn outside it.

Every run of the step writes the same keys/values at the same positions for the same inputs, so the
warm-up runs that capture needs are harmless. Graphs hold the addresses of the parameters: when the
parameter storage changes (a reload, not an in-place optimizer step) they are captured again.

Under autocast (RL rollouts in mixed precision) a step is captured with autocast's weight cache off, so the
graph holds the casts of the parameters, not a cached copy that would outlive the autocast region (and go
stale at the next optimizer step); the autocast state is part of a graph's key, so a step run without
autocast (held-out evaluation) never replays one captured with it, or the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.generation.sampling import INPUT_COLUMNS, POSITION, DrawMode

MIN_SPAN = 64


def bucket(count: int, limit: int, smallest: int = 1) -> int:
    """The next power of two >= count (at least `smallest`), at most `limit`."""
    size = smallest
    while size < count:
        size *= 2
    return min(size, limit)


def storage_of(holders: list[dict]) -> tuple[int, ...]:
    """Where every parameter's data lives (see `LlamaFamilyBackend.parameter_holders`)."""
    return tuple(p.data_ptr() for held in holders for p in held.values() if p is not None)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor | None
    """The fused draw's outputs [rows, 3] (None for a forward-only step: rows with penalties)."""
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, backend, rows: int, max_len: int):
        self.backend, self.rows, self.max_len = backend, rows, max_len
        self.inputs = torch.zeros((rows, INPUT_COLUMNS), dtype=torch.int32, device=backend.device)
        """The static input buffer every graph reads: the step's packed per-row inputs, padding included."""
        self.staging = torch.zeros((rows, INPUT_COLUMNS), dtype=torch.int32).pin_memory()
        self.graphs: dict[tuple, Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()  # every bucket's graph shares one memory pool
        self.storage: tuple | None = None
        self.holders = backend.parameter_holders()

    def run(self, packed: np.ndarray, count: int, mode: DrawMode | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Replay the step for `packed` (its rows a bucket, padding rows last): one host-to-device copy in,
        the graph, and the outputs of rows 0..count-1, valid until the next replay."""
        rows = packed.shape[0]
        span = bucket(int(packed[:count, POSITION].max()) + 1, self.max_len, MIN_SPAN)
        storage = storage_of(self.holders)
        if storage != self.storage:
            self.graphs.clear()
            self.storage = storage
        # The previous step's results were read back (a sync), so its copy out of the staging buffer is done.
        self.staging[:rows].numpy()[:] = packed
        self.inputs[:rows].copy_(self.staging[:rows], non_blocking=True)
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (rows, span, autocast, mode)
        captured = self.graphs.get(key) or self._capture(key)
        captured.graph.replay()
        return (None if captured.out is None else captured.out[:count]), captured.logits[:count]

    def _capture(self, key: tuple) -> Captured:
        rows, span, (enabled, dtype), mode = key
        uncached = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), uncached:  # capture wants the kernels warmed up (and compiled) first
            for _ in range(2):
                self.backend.step_fn(self.inputs[:rows], span, mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), uncached:
            out, logits = self.backend.step_fn(self.inputs[:rows], span, mode)
        self.graphs[key] = Captured(graph, out, logits)
        return self.graphs[key]
