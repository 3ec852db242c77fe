"""LLaMA-Pro block expansion (Wu et al. 2024): new decoder blocks interleaved with the old ones, each a
copy of the block before it with its output projections (attention o_proj, MLP down_proj) zeroed. A
zeroed block adds nothing to the residual stream, so the expanded model starts with the base model's
outputs; only the new blocks train, which adds knowledge while the old blocks keep what they knew.

The result is a plain model with more layers: config.num_hidden_layers and each attention's layer_idx
are updated, so it saves and loads like any other checkpoint."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmforge.config.errors import ConfigError
from lmforge.config.schema import ExpandConfig
from lmforge.models.layers import decoder_layers

# Output projections of a block, by the names Llama-style models use.
ZEROED = ("o_proj", "down_proj")


def expand_blocks(model: nn.Module, cfg: ExpandConfig) -> list[int]:
    """Insert cfg.num_new_blocks blocks, one after each equal group of layers; returns the new blocks'
    indices in the expanded model."""
    layers = decoder_layers(model)
    count = len(layers)
    if count % cfg.num_new_blocks:
        raise ConfigError(f"expand.num_new_blocks={cfg.num_new_blocks} must divide the model's {count} layers "
                          "(one new block after each equal group)")
    group = count // cfg.num_new_blocks
    expanded, new_indices = [], []
    for i, layer in enumerate(layers):
        expanded.append(layer)
        if (i + 1) % group == 0:
            expanded.append(_zeroed_copy(layer))
            new_indices.append(len(expanded) - 1)
    # Rebuilt in place: the ModuleList object stays where the model holds it.
    for index, layer in enumerate(expanded):
        if index < count:
            layers[index] = layer
        else:
            layers.append(layer)
    renumber_layers(model, layers)
    return new_indices


def _zeroed_copy(layer: nn.Module) -> nn.Module:
    block = copy.deepcopy(layer)
    zeroed = 0
    for name, module in block.named_modules():
        if name.split(".")[-1] in ZEROED and isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            zeroed += 1
    if zeroed != len(ZEROED):
        raise ConfigError(f"finetuning=llama_pro needs blocks with {' and '.join(ZEROED)} (Llama-style); "
                          f"{type(layer).__name__} has another layout")
    return block


def renumber_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Each block's KV-cache slot follows its new position; the config records the new depth."""
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    model.config.num_hidden_layers = len(layers)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None and len(layer_types) != len(layers):
        raise ConfigError("finetuning=llama_pro does not support models with per-layer attention types yet")
