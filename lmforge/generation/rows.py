"""The decoding rows' step inputs, kept on the host in numpy arrays indexed by cache row.

Building a step's inputs from the sequences (a Python tuple per row, every step) costs microseconds per
row: at 128 rows more than a small model's whole step on a GPU. The table instead holds each row's token,
position, settings, noise key and step counter; a step packs them with a few array slices and advances
them with three vectorised updates. A row is written from its sequence only when it changes hands (a
sequence joins the decoding rows, or moves to another row when one leaves).
"""

from __future__ import annotations

import numpy as np

from lmforge.generation.sampling import (
    INPUT_COLUMNS,
    SCALE,
    TEMPERATURE,
    TOKEN,
    TOP_K,
    UNIFORM,
    DrawMode,
    uniforms,
)
from lmforge.generation.sequence import Sequence

PADDING_FLOATS = (0.0, 1.0, 0.0, 1.0)
"""A padding row of a captured step: greedy, no filter, log-probs at scale 1 (its outputs are dropped)."""


class RowTable:
    @classmethod
    def of(cls, sequences: list[Sequence]) -> RowTable:
        """A table of these sequences in rows 0..len-1 (a prefill's first draw)."""
        table = cls(len(sequences))
        for row, sequence in enumerate(sequences):
            table.set(row, sequence)
        return table

    def __init__(self, slots: int):
        self.ints = np.zeros((slots, TOP_K + 1), dtype=np.int32)
        """Per row: the token to feed, its position, top-k."""
        self.floats = np.zeros((slots, SCALE - TEMPERATURE + 1), dtype=np.float32)
        """Per row: temperature, top-p, min-p, the log-probs' temperature."""
        self.keys = np.zeros(slots, dtype=np.uint32)
        self.steps = np.zeros(slots, dtype=np.int64)
        self.flags = np.zeros((slots, 5), dtype=bool)
        """Per row: sampled, truncating, flooring, asks for log-probs, penalised."""

    def set(self, row: int, sequence: Sequence | None) -> None:
        """Row `row` now holds `sequence` (None: nobody; its entries are then never read)."""
        if sequence is None:
            return
        self.ints[row] = (sequence.last or 0, sequence.cached, sequence.top_k)
        self.floats[row] = sequence.float_settings
        self.keys[row], self.steps[row] = sequence.noise_key, sequence.steps
        self.flags[row] = (sequence.sampled, sequence.truncating, sequence.flooring, sequence.asks_logprobs,
                           sequence.penalised)

    def mode(self, count: int) -> tuple[DrawMode, bool]:
        """The draw mode of rows 0..count-1, and whether any of them has penalties."""
        sampled, truncating, flooring, logprobs, penalised = self.flags[:count].any(0).tolist()
        return DrawMode(not sampled, truncating, flooring, logprobs), penalised

    def pack(self, count: int, rows: int, pad_position: int) -> np.ndarray:
        """int32 [rows, INPUT_COLUMNS] (see `sampling.TOKEN`...): rows 0..count-1's last token, position,
        settings and this step's uniform; rows past them are padding rows feeding token 0 at `pad_position`."""
        packed = np.empty((rows, INPUT_COLUMNS), dtype=np.int32)
        floats = packed[:, TEMPERATURE:].view(np.float32)
        packed[:count, TOKEN:TOP_K + 1] = self.ints[:count]
        floats[:count, :SCALE - TEMPERATURE + 1] = self.floats[:count]
        floats[:count, UNIFORM - TEMPERATURE] = uniforms(self.keys[:count], self.steps[:count])
        packed[count:, TOKEN:TOP_K + 1] = (0, pad_position, 0)
        floats[count:, :SCALE - TEMPERATURE + 1] = PADDING_FLOATS
        floats[count:, UNIFORM - TEMPERATURE] = 0.0
        return packed

    def advance(self, tokens: np.ndarray) -> None:
        """After a step of rows 0..len(tokens)-1: each feeds its drawn token next, one position on."""
        count = len(tokens)
        self.ints[:count, TOKEN] = tokens
        self.ints[:count, TOKEN + 1] += 1
        self.steps[:count] += 1
