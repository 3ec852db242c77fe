"""Next-token loss as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens it covers.

    Returning the sum (not the mean) lets the loop normalise by the token count of the whole
    accumulated batch, so 1 micro-batch of 8 and 8 micro-batches of 1 give the same gradient.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return loss_sum, (shift_labels != IGNORE).sum()
