"""CUDA graphs of the own decoder's decoding step, one per (batch bucket, span bucket).

A small model's decoding step is bound by kernel launches, not bytes: replaying a captured graph launches
the whole step at once. Shapes must be fixed for a graph, so the B live rows run as the next power-of-two
bucket of rows and the attention span as the next power of two of positions (at least `MIN_SPAN`). The
padding rows are rows B.. of the cache, which belong to other sequences or to nobody: they read position
`max_len - 1` and write their keys/values there, a position no sequence ever holds (a request needs
prompt + max_new_tokens <= max_len and its last token is never fed), so they disturb nothing.

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

import torch

MIN_SPAN = 64


def bucket(count: int, limit: int, smallest: int = 1) -> int:
    """The next power of two >= count (at least `smallest`), at most `limit`."""
    size = smallest
    while size < count:
        size *= 2
    return min(size, limit)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, backend, rows: int, max_len: int):
        self.backend, self.rows, self.max_len = backend, rows, max_len
        device = backend.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.lengths = torch.full((rows,), max_len - 1, dtype=torch.long, device=device)
        self.row_ids = torch.arange(rows, device=device)
        self.graphs: dict[tuple[int, int], Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()  # every bucket's graph shares one memory pool
        self.storage: tuple | None = None

    def run(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        count = len(tokens)
        rows = bucket(count, self.rows)
        span = bucket(max(lengths) + 1, self.max_len, MIN_SPAN)
        storage = tuple(p.data_ptr() for p in self.backend.parameters())
        if storage != self.storage:
            self.graphs.clear()
            self.storage = storage
        self.tokens[:count].copy_(torch.tensor(tokens), non_blocking=True)
        self.lengths[:count].copy_(torch.tensor(lengths), non_blocking=True)
        self.tokens[count:rows].zero_()
        self.lengths[count:rows].fill_(self.max_len - 1)
        mode = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        captured = self.graphs.get((rows, span, mode)) or self._capture(rows, span, mode)
        captured.graph.replay()
        return captured.logits[:count].clone()  # the next replay overwrites the graph's output

    def _step(self, rows: int, span: int) -> torch.Tensor:
        return self.backend.forward(self.tokens[:rows, None], self.lengths[:rows, None], self.row_ids[:rows],
                                    slice(0, rows), span)

    def _capture(self, rows: int, span: int, mode: tuple[bool, torch.dtype]) -> Captured:
        uncached = torch.autocast("cuda", dtype=mode[1], enabled=mode[0], cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), uncached:  # capture wants the kernels warmed up, off the default stream
            for _ in range(2):
                self._step(rows, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), uncached:
            logits = self._step(rows, span)
        self.graphs[(rows, span, mode)] = Captured(graph, logits)
        return self.graphs[(rows, span, mode)]
