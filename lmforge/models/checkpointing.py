"""Activation checkpointing per transformer block: which blocks recompute their activations in backward.

`model.gradient_checkpointing` takes
- `false` (or 0): no block recomputes; every activation is kept for backward;
- `true` (or `every-1`): every block;
- an integer k >= 1: the first k blocks (the usual "recompute k layers" knob: memory falls by about
  k/L of the blocks' activations, time rises by about k/L of one forward pass);
- `every-N`: every N-th block, starting with the first (blocks 0, N, 2N, ...).

Checkpointing is non-reentrant (torch.utils.checkpoint with use_reentrant=False): it works when the
block's inputs do not require grad (LoRA, frozen embeddings) and inside a compiled block — transformers
wraps the block's `forward`, which is what `compile_blocks` compiles, so the checkpoint is traced into
the block's graph. The chunked loss runs after the last block and is untouched.
"""

from __future__ import annotations

from torch import nn

from lmforge.config.checkpointing import KEY, selected_blocks
from lmforge.config.errors import ConfigError


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, in order (transformers marks them GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: nn.Module, value: bool | int | str) -> list[int]:
    """Turn checkpointing on for the blocks `value` selects (and off for the others); the selected indices.

    No-op (and nothing changed on the model) when nothing is selected."""
    blocks = checkpointable_blocks(model)
    if not value:
        return []
    if not blocks:
        raise ConfigError(f"{KEY}: {type(model).__name__} has no blocks transformers can checkpoint; set it to false")
    chosen = selected_blocks(value, len(blocks))
    if not chosen:
        return []
    # transformers installs the checkpoint function (non-reentrant) on every block and the flags the model's
    # own forward reads; the per-block flag then decides which blocks recompute.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index in chosen
    model.config.use_cache = False
    return chosen
