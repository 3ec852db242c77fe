"""lmforge's own rollout decoder for Llama-style models (Llama, Qwen2/3, Mistral without a window).

transformers' `generate` spends most of a small model's decoding step on the host: Python per
layer, cache bookkeeping, logits processors, a stop check that syncs every token. Here the whole
step — embedding, every layer through the model's own modules (so LoRA layers still apply),
attention over a pre-allocated KV cache, the output layer, sampling on the device, the stop test
— touches only fixed buffers, so on a GPU it is captured once as a CUDA graph and replayed per
token. The host syncs every `CHECK_EVERY` tokens to stop when every row has ended.

Cache layout: the prompt is left-padded so it ends at slot `P` (the cache width is rounded up to
a multiple of `WIDTH_BUCKET`, so most rollouts reuse one captured graph); decoding writes slot
P + t at step t. A row's rotary position counts only its real tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lmforge.rollout.sample import left_pad

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
CHECK_EVERY = 16
WIDTH_BUCKET = 64


class UnsupportedModel(ValueError):
    pass


def decoder_parts(model):
    """(backbone, output layer) of a supported causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in SUPPORTED:
        raise UnsupportedModel(f"rl.backend=lmforge decodes {', '.join(SUPPORTED)} models, not "
                               f"{config.model_type!r}: use rl.backend=hf")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", config.model_type == "mistral"):
        raise UnsupportedModel("rl.backend=lmforge has no sliding-window attention: use rl.backend=hf")
    return base.model, base.get_output_embeddings()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, D] with cos/sin [B, T, D] (the half-split layout)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, H, T, D] over k, v [B, KVH, S, D]; visible [B, T, S]. Query heads of a group share
    their key/value head by a reshape, never a copy of the cache."""
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    group = h // kv_heads
    grouped = q.reshape(b, kv_heads, group * t, d)
    mask = visible[:, None, None].expand(b, 1, group, t, visible.shape[-1]).reshape(b, 1, group * t, -1)
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale).reshape(b, h, t, d)


def sample_from(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """One token per row from [B, V] float logits, on the device (no host sync)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the ones above it already hold top_p of the mass (the first always stays).
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    # Exponential race (the Gumbel-max trick): argmax of p / E, E ~ Exp(1), is a draw from p.
    probs = torch.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


class StaticDecoder:
    """Fixed buffers for `batch` rows, a cache `width` slots wide, prompts ending at slot `prompt_width`."""

    def __init__(self, model, batch: int, prompt_width: int, width: int, dtype: torch.dtype, params,
                 stop_ids: list[int], pad_id: int, compile: bool = False):
        self.backbone, self.head = decoder_parts(model)
        config = self.backbone.config
        device = self.backbone.embed_tokens.weight.device
        self.layers = list(self.backbone.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        kv_heads = config.num_key_value_heads
        self.params, self.pad_id, self.prompt_width = params, pad_id, prompt_width
        # One tensor per layer, not views of one: a compiled step then updates each in place instead of
        # rewriting a whole-model buffer for every layer's write.
        shape = (batch, kv_heads, width, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.key_valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        self.stop_ids = torch.tensor(stop_ids or [-1], device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.row_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, width - prompt_width), pad_id, dtype=torch.long, device=device)
        self.graph = None
        # Compiling fuses the step's many small kernels (norms, rotary, softmax, sampling); the
        # compiled code is then captured like the eager one.
        self.run_step = torch.compile(self._step, dynamic=False) if compile else self._step

    # -- the model, layer by layer -----------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
                 keys_seen: slice, visible: torch.Tensor) -> torch.Tensor:
        """Last-position hidden state after writing the new keys/values at cache slots `write`."""
        hidden = self.backbone.embed_tokens(tokens)
        cos, sin = self.backbone.rotary_emb(hidden, positions)
        b, t, _ = hidden.shape
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(b, t, -1, self.head_dim)
            k = attn.k_proj(x).view(b, t, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = rotate(q.transpose(1, 2), cos, sin)
            k = rotate(k.transpose(1, 2), cos, sin)
            v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            keys, values = self.keys[index], self.values[index]
            keys.index_copy_(2, write, k.to(keys.dtype))
            values.index_copy_(2, write, v.to(values.dtype))
            mixed = grouped_attention(q.to(keys.dtype), keys[:, :, keys_seen], values[:, :, keys_seen], visible,
                                      self.scale)
            hidden = hidden + attn.o_proj(mixed.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.backbone.norm(hidden[:, -1])

    def _next_token(self, hidden: torch.Tensor) -> None:
        """Sample, park finished rows on padding, record the token, advance one slot (all on device)."""
        logits = self.head(hidden).float()
        token = sample_from(logits, self.params.temperature, self.params.top_p, self.params.top_k)
        token = torch.where(self.done, torch.full_like(token, self.pad_id), token)
        self.out.scatter_(1, self.step_index.expand(token.shape[0], 1), token[:, None])
        self.done |= torch.isin(token, self.stop_ids)
        self.tokens.copy_(token)

    def _step(self) -> None:
        self.key_valid.index_fill_(1, self.slot, True)
        hidden = self._forward(self.tokens[:, None], self.row_position[:, None], self.slot, slice(None),
                               self.key_valid[:, None, :])
        self._next_token(hidden)
        self.slot += 1
        self.row_position += 1
        self.step_index += 1

    # -- one rollout ---------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the left-padded prompts [B, prompt_width] and sample each row's first reply token."""
        width = self.prompt_width
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        # A padding query sees only itself: its output is unused, and a row of -inf would be NaN.
        visible = (causal[None] & mask[:, None, :].bool()) | torch.eye(width, dtype=torch.bool, device=ids.device)
        self.key_valid.zero_()
        self.key_valid[:, :width] = mask.bool()
        self.done.zero_()
        self.out.fill_(self.pad_id)
        self.step_index.zero_()
        write = torch.arange(width, device=ids.device)
        hidden = self._forward(ids, positions, write, slice(0, width), visible)
        self._next_token(hidden)
        self.slot.fill_(width)
        self.row_position.copy_(mask.sum(-1))
        self.step_index.fill_(1)

    def decode(self, max_new_tokens: int) -> torch.Tensor:
        """[B, max_new_tokens] reply tokens (padding after a row's stop token)."""
        if self.graph is None and self.tokens.is_cuda:
            self._capture()
        for step in range(1, max_new_tokens):
            if step % CHECK_EVERY == 0 and bool(self.done.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.run_step()
        return self.out[:, :max_new_tokens]

    def _capture(self) -> None:
        """Record one decoding step as a CUDA graph; the warm-up runs it on a side stream first (as
        capture requires) and leaves the buffers as they were."""
        saved = [t.clone() for t in (self.tokens, self.row_position, self.slot, self.step_index, self.done,
                                     self.out, self.key_valid)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run_step()
        for buffer, value in zip((self.tokens, self.row_position, self.slot, self.step_index, self.done,
                                  self.out, self.key_valid), saved):
            buffer.copy_(value)


class LMForgeBackend:
    """The rollout interface (token ids in, token ids out) on `StaticDecoder`. The decoder, its cache
    and its captured graph are kept between rollouts while the shapes, the sampling settings and the
    model's parameter storage stay the same, so the capture is paid once per run, not per rollout."""

    def __init__(self, batch_size: int = 256, compile: bool = False):
        self.batch_size = batch_size
        self.compile = compile
        self._decoder: StaticDecoder | None = None
        self._key: tuple | None = None

    @torch.inference_mode()
    def generate(self, model, prompts, params, stop_ids, pad_id):
        device = next(model.parameters()).device
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            longest = max(len(p) for p in chunk)
            width = -(-(longest + params.max_new_tokens) // WIDTH_BUCKET) * WIDTH_BUCKET
            prompt_width = width - params.max_new_tokens
            ids, mask = left_pad(chunk, pad_id)
            ids = F.pad(ids, (prompt_width - ids.shape[1], 0), value=pad_id).to(device)
            mask = F.pad(mask, (prompt_width - mask.shape[1], 0), value=0).to(device)
            decoder = self._decoder_for(model, len(chunk), prompt_width, width, params, stop_ids, pad_id, device)
            decoder.prefill(ids, mask)
            out += decoder.decode(params.max_new_tokens).tolist()
        return out

    def _decoder_for(self, model, batch, prompt_width, width, params, stop_ids, pad_id, device) -> StaticDecoder:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else next(model.parameters()).dtype
        storage = tuple(p.data_ptr() for p in model.parameters())
        key = (id(model), batch, prompt_width, width, dtype, dataclasses.astuple(params), tuple(stop_ids), pad_id,
               hash(storage))
        if key != self._key:
            self._decoder = None  # free the old cache before allocating the new one
            self._decoder = StaticDecoder(model, batch, prompt_width, width, dtype, params, stop_ids, pad_id,
                                          self.compile)
            self._key = key
        return self._decoder
