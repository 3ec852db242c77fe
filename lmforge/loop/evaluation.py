"""The held-out loss (and a loss function's extra metrics) of the loop's evaluation, summed over batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def eval_sums(model, loader, loss_fn, accelerator, advance: Callable[[], None]):
    """Summed [loss_sum, count, metric×n ...] over this process's batches, the n behind each metric, and
    the metric names ((None, None, []) when there were no batches). `advance` is called after each batch."""
    names: list[str] = []
    sums = weights = None
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            batch_loss, n, extra = loss_fn(model, batch)
        names = names or sorted(extra)
        values = torch.stack([torch.as_tensor(extra[k], dtype=torch.float32, device=n.device) for k in names]) \
            if names else torch.zeros(0, device=n.device)
        # A metric a batch cannot measure (NaN: e.g. KTO's rejected side with no undesirable
        # record) is left out of its average instead of poisoning it.
        seen = torch.isfinite(values).float() * n.float()
        row = torch.cat([torch.stack([batch_loss.detach().float(), n.float()]), torch.nan_to_num(values) * seen])
        w = torch.cat([torch.stack([n.float(), n.float()]), seen])
        sums, weights = (row, w) if sums is None else (sums + row, weights + w)
        advance()
    return sums, weights, names


def eval_metrics(sums: torch.Tensor, weights: torch.Tensor, names: list[str], perplexity: bool) -> dict:
    """eval_loss, eval_<metric> and (for a per-token LM loss) eval_ppl from all processes' sums."""
    count = float(sums[1].clamp(min=1))
    loss = float(sums[0]) / count
    out = {"eval_loss": loss, **{f"eval_{k}": float(v) / float(w) if float(w) > 0 else float("nan")
                                 for k, v, w in zip(names, sums[2:], weights[2:])}}
    if perplexity:
        out["eval_ppl"] = math.exp(min(loss, 50.0))
    return out
