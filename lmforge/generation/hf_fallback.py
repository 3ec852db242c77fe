"""The fallback backend: any transformers causal LM, through its own forward and one DynamicCache per row.

It runs each row on its own (correct for every architecture the library supports, slower than the own
decoder), behind the same interface: prefill a row, decode rows 0..B-1, copy a shared prefix, swap rows.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch

from lmforge.generation.sampling import POSITION, TOKEN, DrawMode, draw_rows


class HFBackend:
    def __init__(self, model, rows: int, max_len: int):
        self.model = model
        self.caches: list = [None] * rows
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.pad_position = 0  # no padding rows: every step runs its live rows only
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name is deprecated).
        forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
        self.cache_argument = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    def prefill(self, rows: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        return torch.stack([self._feed(row, chunk, start) for row, chunk, start in zip(rows, chunks, starts)])

    def _feed(self, row: int, token_ids: list[int], start: int) -> torch.Tensor:
        tokens = torch.tensor([token_ids], device=self.device)
        # Positions follow from the row's cache length, which is `start` (rows are never padded).
        out = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1,
                         **{self.cache_argument: self.caches[row]})
        self.caches[row] = out[self.cache_argument]
        return out.logits[0, -1].float()

    def step_rows(self, count: int) -> int:
        return count

    def decode_step(self, packed: np.ndarray, count: int, mode: DrawMode | None
                    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each row on its own, then the fused draw (see `LlamaFamilyBackend.decode_step`)."""
        logits = torch.stack([self._feed(row, [int(token)], int(length)) for row, (token, length)
                              in enumerate(packed[:count, TOKEN:POSITION + 1])])
        if mode is None:
            return None, logits
        return draw_rows(logits, logits, torch.from_numpy(packed[:count]).to(self.device), mode), logits

    def copy_row(self, source: int, target: int, length: int) -> None:
        self.caches[target] = copy.deepcopy(self.caches[source])

    def swap_rows(self, a: int, b: int, length: int) -> None:
        self.caches[a], self.caches[b] = self.caches[b], self.caches[a]

    def clear_row(self, row: int) -> None:
        self.caches[row] = None
