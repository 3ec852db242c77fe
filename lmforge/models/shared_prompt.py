"""DPO's shared prompt: a pair as one packed row [prompt, chosen, rejected], the prompt computed once.

The plain layout runs each pair as two rows, prompt+chosen and prompt+rejected, so every prompt token's
activations (and its share of the compute) exist twice. Here both replies follow one copy of the prompt
in a single row, under a prefix-sharing attention mask: the rejected reply attends to the prompt and to
itself, never to the chosen reply, and its positions restart where the prompt ends. Each reply token
therefore sees exactly the keys, values and rotary positions it sees in its own row, so the log-probs
equal the two-row forward's up to float rounding, and gradients flow back into the prompt once, as the
sum of what both rows would send.

Why a packed row and not a prompt KV cache kept in the graph: the row is one ordinary forward pass, so
activation checkpointing (transformers refuses a cache under it), LoRA, compiled blocks, DDP and FSDP
all work unchanged, and pairs of different lengths pad like any batch. The price is a dense [L × L]
mask, which rules out the flash kernel: SDPA takes its masked (memory-efficient) path. KTO's rows fit
the same layout: the judged completion and the mismatched one that estimates the KL term share a prompt.

The first token of each reply is predicted by the prompt's last position, so that position feeds two
log-probs; the rest follow the usual shift by one.
"""

from __future__ import annotations

import torch

from lmforge.losses.linear_ce import token_logps_from_hidden
from lmforge.losses.lm import IGNORE
from lmforge.losses.preference import sequence_logps

ATTENTION = ("sdpa", "eager", "lmforge_varlen")
"""Attention implementations that honour a custom 4D mask (lmforge_varlen hands a masked call to SDPA);
flash-attention kernels and flex attention ignore or reject it."""


def unsupported_reason(config, max_length: int, routed: bool = False) -> str | None:
    """Why this model cannot run the shared layout exactly (None: it can)."""
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in ATTENTION:
        return f"attention {attention!r} ignores a custom mask (use sdpa or eager)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_length:
        # Positions in a shared row never exceed max_length: a window at least that long never binds.
        return f"sliding-window attention ({window} tokens < data.max_length={max_length})"
    if routed:
        return "mixture-of-depths routes each row's tokens, so a shared row would route differently"
    return None


def is_shared(batch: dict) -> bool:
    return "segments" in batch


def model_inputs(model, batch: dict) -> dict:
    """Keyword arguments of the forward pass for either layout."""
    if not is_shared(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    ids = batch["input_ids"]
    return {"input_ids": ids, "position_ids": batch["position_ids"], "use_cache": False,
            "attention_mask": shared_mask(batch["segments"], ids.shape[1], _compute_dtype(model, ids.device))}


def _compute_dtype(model, device: torch.device) -> torch.dtype:
    # An additive mask in the dtype the attention runs in: SDPA would otherwise convert it in every layer,
    # and keep each converted copy for backward.
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def segment_ids(segments: torch.Tensor, width: int) -> torch.Tensor:
    """[B, L]: 0 prompt, 1 first reply, 2 second reply, 3 padding, from [B, 3] segment lengths."""
    t = torch.arange(width, device=segments.device)[None, :]
    ends = segments.cumsum(-1)
    return (t >= ends[:, 0:1]).long() + (t >= ends[:, 1:2]).long() + (t >= ends[:, 2:3]).long()


def shared_mask(segments: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: causal, and a key is visible when it is in the prompt or in the query's
    own segment. Padding attends to the prompt and to padding, so no softmax row is empty (an empty one
    is NaN, and NaN times a zero gradient is still NaN in the weight gradients)."""
    seg = segment_ids(segments, width)
    t = torch.arange(width, device=segments.device)
    causal = t[None, :, None] >= t[None, None, :]
    visible = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    mask = torch.zeros(visible.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def scored_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat index of the predicting position, target token, owner sequence) of every scored reply token.
    Owners 0..B-1 are the first replies, B..2B-1 the second, as in the two-row layout's [2B] order."""
    ids, segments = batch["input_ids"], batch["segments"]
    rows, width = ids.shape
    seg = segment_ids(segments, width)
    t = torch.arange(width, device=ids.device)[None, :].expand(rows, -1)
    prompt, second_start = segments[:, 0:1], segments[:, 0:1] + segments[:, 1:2]
    predictor = torch.where(t == second_start, prompt - 1, t - 1)  # each reply starts after the prompt
    # predictor < 0: an empty prompt leaves the first token unscored, as the two-row shift does.
    scored = ((seg == 1) | (seg == 2)) & (predictor >= 0)
    row = torch.arange(rows, device=ids.device)[:, None].expand(-1, width)
    owner = torch.where(seg == 2, row + rows, row)
    return (row * width + predictor)[scored], ids[scored], owner[scored]


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scored_positions for the two-row layout: every position whose next label is not IGNORE."""
    rows, width = labels.shape
    shifted = labels[:, 1:]
    scored = shifted != IGNORE
    row = torch.arange(rows, device=labels.device)[:, None].expand(-1, width - 1)
    position = row * width + torch.arange(width - 1, device=labels.device)[None, :]
    return position[scored], shifted[scored], row[scored]


def batch_logps(output: torch.Tensor, batch: dict, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] summed log-probs and token counts of a batch in either layout, from logits [rows, L, V] or
    from final hidden states [rows, L, H] with the output `weight`. From hidden states only the scored
    positions go through the output layer, in chunks: a prompt's positions carry no label, so the
    [tokens × vocab] projection (often the largest matmul of a small model) skips them."""
    if is_shared(batch):
        (index, targets, owner), sequences = scored_positions(batch), 2 * batch["input_ids"].shape[0]
    elif weight is None:
        return sequence_logps(output, batch["labels"])
    else:
        (index, targets, owner), sequences = labelled_positions(batch["labels"]), batch["labels"].shape[0]
    flat = output.reshape(-1, output.shape[-1])
    if weight is None:
        # logsumexp over every row once, then one gathered logit per scored token: no second [N, V] copy.
        logits = flat.float()
        token = logits[index, targets] - logits.logsumexp(-1)[index]
    else:
        token = token_logps_from_hidden(flat.index_select(0, index), weight, targets)
    sums = torch.zeros(sequences, dtype=torch.float32, device=output.device).index_add(0, owner, token.float())
    return sums, torch.bincount(owner, minlength=sequences)
