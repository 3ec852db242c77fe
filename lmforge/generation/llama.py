"""The engine's own forward pass for Llama-family models (Llama, Qwen2/2.5, Qwen3, Mistral).

It runs the model's own modules layer by layer — embedding, norms, projections, MLP, output layer — so a
peft LoRA wrapper's layers still apply and updated weights are read live; only the attention is its own:
keys/values go into the pre-allocated `KVCache`, and each row attends over its used length only (a slice
of the cache up to the longest live row, the rest masked). Query heads of a group share their key/value
head by a reshape, never a copy of the cache. Rotary positions are the tokens' real positions.

One forward serves both prefill (one row, a chunk of t tokens) and decode (B rows, one token each):
the token at position p sees cache positions 0..p.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.generation.cache import KVCache
from lmforge.generation.graphs import MIN_SPAN, DecodeGraphs, bucket
from lmforge.generation.sampling import POSITION, TOKEN, DrawMode, draw_rows

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
log = logging.getLogger("lmforge.generation")


class UnsupportedModel(ValueError):
    """The own decoder cannot run this model exactly; the engine then uses the HF fallback."""


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(model, max_len: int) -> None:
    config = base_model(model).config
    if config.model_type not in SUPPORTED:
        raise UnsupportedModel(f"the own decoder runs {', '.join(SUPPORTED)} models, not {config.model_type!r}")
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", config.model_type == "mistral")
    # A window at least as long as the cache never cuts anything off: full attention is then exact.
    if window and windowed and window < max_len:
        raise UnsupportedModel(f"sliding-window attention (window {window} < max_len {max_len}) is not in "
                               "the own decoder")


def attention_mask(visible: torch.Tensor, group: int) -> torch.Tensor:
    """The SDPA mask of every layer, built once per step from visible bool [B, T, S]: the query rows of a
    key/value head are its `group` query heads × T tokens (head-major); one token broadcasts as it is."""
    b, t, span = visible.shape
    if t == 1:
        return visible[:, None]
    return visible[:, None, None].expand(b, 1, group, t, span).reshape(b, 1, group * t, span)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, H, T, D] over k, v [B, KVH, S, D]; mask from `attention_mask`."""
    b, heads, t, d = q.shape
    grouped = q.reshape(b, k.shape[1], -1, d)  # query head h = kv head h // group: a view, no copy
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale).reshape(b, heads, t, d)


def rotary(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, D] as every layer's `rotate` wants them, made once per step: a head axis, and the
    sign of the rotated half folded into sin."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, D] (the half-split layout): x cos + (-x2, x1) sin, written as
    x cos + (x2, x1) (-sin1, sin2), which rounds the same (a sign flip is exact)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def graphs_can_run(model, device: torch.device) -> bool:
    """CUDA graphs need a GPU and a step without host syncs: dynamic rotary scaling reads the longest
    position on the host, so those models decode eagerly."""
    config = base_model(model).config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return device.type == "cuda" and "dynamic" not in str(rope)


class LlamaFamilyBackend:
    def __init__(self, model, rows: int, max_len: int, cuda_graphs: bool = True, compile: bool | str = False):
        check_supported(model, max_len)
        self.model = model
        base = base_model(model)
        self.backbone, self.head = base.model, base.get_output_embeddings()
        self.layers = list(self.backbone.layers)
        attention = self.layers[0].self_attn
        self.head_dim, self.scale = attention.head_dim, attention.scaling
        self.group = base.config.num_attention_heads // base.config.num_key_value_heads
        weight = self.backbone.embed_tokens.weight
        self.vocab_size = self.head.weight.shape[0]
        self.cache = KVCache(len(self.layers), rows, base.config.num_key_value_heads, max_len, self.head_dim,
                             weight.dtype, weight.device)
        self.device = weight.device
        self.pad_position = max_len - 1
        """Where padding rows of a captured step feed (see cache.py): no sequence ever holds it."""
        self.compiled = bool(compile)
        self.step_fn = compiled_step(self.step, compile, self.cache) if compile else self.step
        self.graphs = DecodeGraphs(self, rows, max_len) if cuda_graphs and graphs_can_run(model, self.device) \
            else None

    def parameter_holders(self) -> list[dict]:
        """The `_parameters` dicts of the model's modules that hold any: reading them each step finds a
        replaced parameter or moved storage at a tenth of the cost of walking `model.parameters()` (an 8B
        model's 291 parameters: ~0.7 ms of host time a step). A module swapped for another after the engine is
        built is not seen: build a new engine then."""
        return [module._parameters for module in self.model.modules() if module._parameters]

    def prefill(self, rows: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed chunks[i] at positions starts[i].. of rows[i], all rows in one forward; the float logits
        [B, V] after each chunk's last token. Shorter chunks are padded with tokens at position max_len - 1,
        the column no sequence holds: they are seen by no real token and overwrite nothing."""
        width = max(len(chunk) for chunk in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.full((len(chunks), width), self.pad_position, dtype=torch.long)
        for i, (chunk, start) in enumerate(zip(chunks, starts)):
            tokens[i, :len(chunk)] = torch.tensor(chunk)
            positions[i, :len(chunk)] = torch.arange(start, start + len(chunk))
        row_ids = torch.tensor(rows, device=self.device)
        last = torch.tensor([len(chunk) - 1 for chunk in chunks], device=self.device)
        span = max(start + len(chunk) for chunk, start in zip(chunks, starts))
        return self.forward(tokens.to(self.device), positions.to(self.device), row_ids, row_ids, span, last)

    def step_rows(self, count: int) -> int:
        """Rows a decoding step of `count` sequences runs: the graph's bucket, padding rows included."""
        return bucket(count, self.cache.rows) if self.graphs is not None else count

    def decode_step(self, packed: np.ndarray, count: int, mode: DrawMode | None
                    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One token for each of rows 0..count-1 from the step's packed inputs (`draw.pack_inputs`): the
        fused draw's outputs [count, 3] (None when `mode` is None: the caller draws) and float logits
        [count, V], both valid until the next step."""
        while self.graphs is not None:
            try:
                return self.graphs.run(packed, count, mode)
            except RuntimeError as error:  # a step that cannot be captured still decodes, eagerly
                if not self.stop_compiling(error):
                    log.warning("CUDA graph capture failed (%s); decoding without graphs", error)
                    self.graphs = None
                    packed = packed[:count]
        inputs = torch.from_numpy(packed).to(self.device)
        span = int(packed[:, POSITION].max()) + 1
        if self.compiled:  # a few span sizes keep the compiled step's shapes few
            try:
                return self.step_fn(inputs, bucket(span, self.cache.max_len, MIN_SPAN), mode)
            except RuntimeError as error:
                if not self.stop_compiling(error):
                    raise
        return self.step(inputs, span, mode)

    def stop_compiling(self, error: RuntimeError) -> bool:
        """After a compilation failure (no compiler, an operator the backend lacks), decode uncompiled: True
        when `error` was one and compiling is now off."""
        if not self.compiled or not type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return False
        log.warning("compiling the decoding step failed (%s); decoding without torch.compile",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        self.compiled, self.step_fn = False, self.step
        return True

    def step(self, inputs: torch.Tensor, span: int, mode: DrawMode | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The decoding step (what is compiled and captured): forward rows 0..B-1 at their positions from the
        int32 [B, 8] row inputs over `span` positions, then the fused draw unless `mode` is None."""
        rows = inputs.shape[0]  # the row ids made here, not sliced from a tensor of `slots` rows: a compiled
        # step would otherwise guard on rows == slots when its first call happens to have them equal
        logits = self.forward(inputs[:, TOKEN:TOKEN + 1].long(), inputs[:, POSITION:POSITION + 1].long(),
                              torch.arange(rows, device=inputs.device), slice(0, rows), span)
        return (None if mode is None else draw_rows(logits, logits, inputs, mode)), logits

    def copy_row(self, source: int, target: int, length: int) -> None:
        self.cache.copy_row(source, target, length)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        self.cache.swap_rows(a, b, length)

    def clear_row(self, row: int) -> None:
        """Nothing to free: a row's stale positions are never visible (masked by length)."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                row_select: slice | torch.Tensor, span: int, last: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits [b, V] after tokens [b, t] at positions [b, t] of cache rows [b], whose keys/values are
        read through `row_select` (a slice of the packed decoding rows is a view; an index tensor copies) up
        to `span`. `last` [b] picks each row's last real token (default: the last column). What is the same
        for every layer (mask, rotary cos/sin, the cache index) is made once, before the layer loop."""
        hidden = self.backbone.embed_tokens(tokens)
        cos, sin = rotary(*self.backbone.rotary_emb(hidden, positions))
        mask = attention_mask(torch.arange(span, device=self.device)[None, None] <= positions[..., None], self.group)
        where = (rows[:, None], slice(None), positions)  # -> [b, t, kv_heads, head_dim] of a layer's cache
        b, t, _ = hidden.shape
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(b, t, -1, self.head_dim)
            k = attention.k_proj(x).view(b, t, -1, self.head_dim)
            if hasattr(attention, "q_norm"):  # Qwen3 normalises each head's query and key
                q, k = attention.q_norm(q), attention.k_norm(k)
            q = rotate(q.transpose(1, 2), cos, sin)
            k = rotate(k.transpose(1, 2), cos, sin)
            v = attention.v_proj(x).view(b, t, -1, self.head_dim)
            self.cache.write(index, where, k.transpose(1, 2), v)
            keys = self.cache.keys[index][row_select, :, :span]
            values = self.cache.values[index][row_select, :, :span]
            mixed = grouped_attention(q.to(keys.dtype), keys, values, mask, self.scale)
            hidden = hidden + attention.o_proj(mixed.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        final = hidden[:, -1] if last is None else hidden[torch.arange(b, device=self.device), last]
        return self.head(self.backbone.norm(final)).float()


def compiled_step(step, backend: bool | str, cache: KVCache):
    """The decoding step through torch.compile, with dynamic shapes: one compilation serves every batch and
    span bucket (only one row, a size torch always specialises, and each `DrawMode` compile apart).
    `backend` True is inductor; a string names another torch.compile backend. The cache's shapes are marked
    static: they never change, and a dynamic rows dimension would otherwise be guarded equal to theirs when
    the first compiled step happens to run `slots` rows."""
    for stored in (*cache.keys, *cache.values):
        torch._dynamo.mark_static(stored)
    return torch.compile(step, dynamic=True, backend="inductor" if backend is True else backend)
