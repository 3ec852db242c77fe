"""Packed rows with documents kept apart, without a dense mask: variable-length attention.

Packed rows restart `position_ids` at 0 for each document. Under SDPA, transformers turns that into a
dense block-diagonal mask over the whole row (quadratic memory, and the slow masked kernel). Here the
batch is flattened to one row, the document boundaries become cumulative lengths (`cu_seqlens`), and
attention runs per document:

- on a GPU, through torch's own variable-length flash attention (`torch.nn.attention.varlen`), no
  flash-attn package needed;
- elsewhere (the CPU, fp32 weights without autocast), one causal SDPA call per document: the same
  numbers, for tests and small runs.

`lmforge_varlen` is registered with transformers' attention and mask interfaces, so a model loaded
with `attn_implementation="lmforge_varlen"` uses it; without document boundaries in the call (plain
padded batches, generation with a cache) it falls back to SDPA.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from lmforge.data.packing import cu_seq_lens

VARLEN = "lmforge_varlen"


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens of the flattened batch (see data.packing.cu_seq_lens) and the longest document."""
    cu = cu_seq_lens(position_ids)
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_inputs(batch: dict) -> dict:
    """Model inputs for a packed batch: one flattened row plus its document boundaries. The longest
    document is given as the row width, an upper bound the kernel accepts: a value that changed from
    batch to batch would make torch.compile specialise on it again each time."""
    cu = batch["cu_seq_lens"] if "cu_seq_lens" in batch else cu_seq_lens(batch["position_ids"])
    width = batch["input_ids"].shape[-1]
    return {"input_ids": batch["input_ids"].reshape(1, -1), "position_ids": batch["position_ids"].reshape(1, -1),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


KERNEL = _torch_varlen()
_PARAMETERS = set(inspect.signature(KERNEL).parameters) if KERNEL is not None else set()
# Older torch took is_causal, later versions a (left, right) window; GQA is native to the flash kernel
# and only later versions ask for it by name. Worked out once: inspecting inside a compiled graph breaks it.
_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _PARAMETERS else {"is_causal": True}
_GQA = {"enable_gqa": True} if "enable_gqa" in _PARAMETERS else {}


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature: query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None)."""
    cu, positions = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    batch, _, length, _ = query.shape
    if cu is None and attention_mask is None and positions is not None and key.shape[2] == length \
            and positions.shape[-1] == length:  # packed rows given without boundaries: find them here
        cu = cu_seq_lens(positions.expand(batch, -1))
    if cu is None or (batch != 1 and int(cu[-1]) != batch * length):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    # [B, heads, T, D] -> [B*T, heads, D]: one flattened row
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3]) for t in (query, key, value))
    longest = int(kwargs.get("max_length_q") or length)
    if q.is_cuda and KERNEL is not None and q.dtype in (torch.bfloat16, torch.float16):
        out = KERNEL(q, k, v, cu, cu, longest, longest, scale=scaling, **_CAUSAL,
                     **(_GQA if k.shape[1] != q.shape[1] else {}))
    else:
        bounds = cu.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           is_causal=True, scale=scaling,
                                           enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])])
    return out.reshape(batch, length, *out.shape[1:]), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask for unpadded rows (document boundaries travel as cu_seqlens, and plain rows are causal);
    SDPA's mask where there is padding (evaluation, generation)."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _mask)
