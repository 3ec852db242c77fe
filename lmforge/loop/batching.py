"""Which rows make each micro-batch: a seeded order per epoch that a resumed run reproduces, length
grouping, and each process's share."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """The micro-batches of one epoch, in a seeded order that a resumed run reproduces. With
    `lengths`, rows are sorted by length inside chunks of 50 batches and the batches shuffled, so a
    batch holds rows of similar length while every epoch still sees a new order."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=generator).tolist()
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    chunk = 50 * batch_size
    order = [i for start in range(0, n_rows, chunk)
             for i in sorted(order[start:start + chunk], key=lambda row: -lengths[row])]
    batches = [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def row_lengths(rows) -> list[int]:
    """Tokens per row for length grouping: `input_ids`, or a prompt plus its longest answer."""
    columns = rows.column_names
    if "input_ids" in columns:
        return [len(ids) for ids in rows["input_ids"]]
    answers = [rows[c] for c in columns if c.endswith("_ids") and c != "prompt_ids"]
    prompts = rows["prompt_ids"] if "prompt_ids" in columns else [[]] * len(rows)
    return [len(p) + max((len(a[i]) for a in answers), default=0) for i, p in enumerate(prompts)]


def shard_size(batches: int, world: int) -> int:
    """Micro-batches each process gets per epoch: the same count everywhere, the remainder dropped
    (a process with one more batch would wait forever in a collective)."""
    return batches // world if batches >= world else min(batches, 1)


def chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk
