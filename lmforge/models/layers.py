"""Finding a transformers model's stack of decoder layers (freeze, MoD and block expansion work on it)."""

from __future__ import annotations

from torch import nn

from lmforge.config.errors import ConfigError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the first ModuleList whose items are `...DecoderLayer`)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and "DecoderLayer" in type(module[0]).__name__:
            return module
    raise ConfigError("finetuning=freeze needs a model with decoder layers it can find")
