"""The pre-allocated KV cache of the own decoder: `rows` sequences × `max_len` positions per layer.

Row r, position p holds the keys/values of the token at position p of the sequence that owns row r;
a sequence's tokens sit at positions 0..length-1 (no padding anywhere), so its rotary positions are its
real ones. The engine keeps the decoding rows packed at rows 0..B-1, so one decoding step reads plain
slices of the cache (`keys[:B, :, :span]`), never a gathered copy; moving a sequence between rows (when
one joins or leaves) copies that row once.

Position max_len - 1 of every row is never a token's (a request needs prompt + max_new_tokens <= max_len,
and the last token drawn is never fed): the padding rows of a captured decoding step write there.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (rows, kv_heads, max_len, head_dim)
        # One tensor per layer, not views of one: each layer's write then touches only its own storage.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.max_len = rows, max_len

    def write(self, layer: int, where: tuple, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [b, t, kv_heads, head_dim] at `where` = (rows [b, 1], :, positions [b, t]), the
        index every layer of a step shares."""
        self.keys[layer][where] = keys.to(self.keys[layer].dtype)
        self.values[layer][where] = values.to(self.values[layer].dtype)

    def copy_row(self, source: int, target: int, length: int) -> None:
        """A shared prefix: row `target` gets the first `length` positions of row `source`."""
        for stored in (*self.keys, *self.values):
            stored[target, :, :length] = stored[source, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of two rows (the longer of their two used lengths)."""
        if a == b or length == 0:
            return
        for stored in (*self.keys, *self.values):
            held = stored[a, :, :length].clone()
            stored[a, :, :length] = stored[b, :, :length]
            stored[b, :, :length] = held
