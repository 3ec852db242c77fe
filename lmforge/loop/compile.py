"""torch.compile for the blocks of a transformer, in place."""

from __future__ import annotations

from transformers.modeling_layers import GradientCheckpointingLayer


def compile_blocks(model) -> int:
    """torch.compile every transformer block in place (parameter names unchanged). The blocks share one
    compiled graph, so compiling costs about one block's worth, once. Shapes are symbolic from the start
    (dynamic=True): batch widths and document counts change from step to step, and a recompilation
    whenever a new one appears would cost seconds in the middle of training."""
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
