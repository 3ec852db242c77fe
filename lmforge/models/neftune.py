"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training, of scale
alpha / sqrt(L x d) for rows of L tokens and width d. A cheap regulariser that often improves SFT."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def add_neftune_noise(model: nn.Module, alpha: float) -> RemovableHandle:
    """Hook the noise onto the input embeddings; remove the handle before the model is saved or used
    for anything but training. The noise is added in training mode only, never in eval mode."""
    if alpha <= 0:
        raise ValueError(f"NEFTune needs a positive alpha, got {alpha}")

    def add_noise(module: nn.Module, _inputs, embeddings: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return embeddings
        length, width = embeddings.shape[-2], embeddings.shape[-1]
        bound = alpha / math.sqrt(length * width)
        return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(add_noise)
