"""Packing and collation.

Packed rows carry `position_ids` that restart at 0 for each document and no attention mask:
transformers then builds a block-diagonal causal mask (and flash-attention runs varlen), so no
token attends across a document boundary. The first token of each document gets no label: in a
one-by-one run nothing predicts it, and the packed loss must equal that run's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lmforge.data.tokenize import IGNORE


def pack_stream(documents: Iterable[list[int]], block_size: int) -> Iterable[dict]:
    """PT packing: concatenate documents (each already ending in EOS) and cut into block_size rows.

    A document that crosses a row boundary continues in the next row with positions restarting,
    so every row is a valid packed row on its own.
    """
    ids: list[int] = []
    positions: list[int] = []
    for doc in documents:
        start = 0  # an offset, not `doc = doc[len(take):]`: re-slicing made one long document quadratic
        while start < len(doc):
            take = doc[start:start + block_size - len(ids)]
            ids += take
            positions += range(len(take))  # a continuation starts a fresh attention span in the next row
            start += len(take)
            if len(ids) == block_size:
                yield _packed_row(ids, positions)
                ids, positions = [], []
    if ids:
        yield _packed_row(ids, positions)


def _packed_row(ids: list[int], positions: list[int]) -> dict:
    labels = [IGNORE if p == 0 else t for t, p in zip(ids, positions)]
    return {"input_ids": list(ids), "labels": labels, "position_ids": list(positions)}


def pack_samples(samples: list[dict], max_length: int) -> list[dict]:
    """SFT packing: first-fit-decreasing bins of whole samples (none is split)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(samples[index]["input_ids"])
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(max_length - size)
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for index in sorted(members):
            sample = samples[index]
            ids += sample["input_ids"]
            labels += [IGNORE] + list(sample["labels"][1:])
            positions += range(len(sample["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Packed rows keep position_ids (and get no attention mask); plain rows
    get an attention mask. Padding never carries loss."""
    width = max(len(r["input_ids"]) for r in rows)
    packed = "position_ids" in rows[0]
    batch = {"input_ids": [], "labels": []}
    batch["position_ids" if packed else "attention_mask"] = []
    for row in rows:
        pad = width - len(row["input_ids"])
        batch["input_ids"].append(list(row["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(row["labels"]) + [IGNORE] * pad)
        if packed:
            # Padding forms its own "document" (positions from 0) so it is masked off the real ones.
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * pad)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if packed:  # computed here, on the host: finding them on a GPU costs a synchronisation
        out["cu_seq_lens"] = cu_seq_lens(out["position_ids"])
    return out


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each document starts in the flattened batch, plus its end (int32, for variable-length
    attention). A row's first token always starts a document, whatever its position id."""
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[:: position_ids.shape[-1]] = True
    return torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
