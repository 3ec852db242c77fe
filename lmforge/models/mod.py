"""Mixture-of-Depths (Raposo et al. 2024): in each routed decoder layer a learned linear router scores
the tokens of a sequence, the top k = ceil(capacity x T) go through attention and MLP, and the others
skip the layer (their hidden state passes on unchanged). A processed token's block output is scaled by
its router weight, which is how the router gets a gradient and learns which tokens to pick.

The router weight is 2·sigmoid(score) and the router starts at zero, so right after conversion every
weight is exactly 1: at capacity 1 a converted layer computes what the original layer computed.

Top-k over the sequence looks at future tokens, so it cannot decide a token's route while generating.
With a KV cache (generation), a routed layer therefore computes every token and keeps the block output
only for tokens whose score reaches a threshold learned during training: a running mean of the k-th
largest score per sequence. Skipped tokens still leave keys in that layer's cache there, which top-k
training never shows the model, and generation saves no compute: the saving is a training one.
Teacher-forced passes without a cache (training, held-out loss) route by top-k.

A converted model keeps its parameter names (the layer's class is swapped for a routed subclass and a
`mod_router` added); `config.lmforge_mod` records the settings, and `restore_mod` re-applies them when
lmforge loads the folder. Other tools load it as the plain model, every token through every layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lmforge.config.errors import ConfigError
from lmforge.config.schema import ModConfig
from lmforge.models.layers import decoder_layers

SUPPORTED_TYPES = ("llama",)
CONFIG_KEY = "lmforge_mod"
THRESHOLD_MOMENTUM = 0.99


class RoutedLayer:
    """Mixed into a decoder layer's own class (`routed_class`): the layer's forward runs on the tokens
    its router picks."""

    mod_capacity: float
    mod_router: nn.Linear
    mod_threshold: torch.Tensor

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kwargs):
        scores = self.mod_router(hidden_states).squeeze(-1).float()  # [B, T]
        weight = (2 * torch.sigmoid(scores)).to(hidden_states.dtype)
        # transformers renamed the layers' `past_key_values` argument to `cache` (5.25, the old name
        # deprecated until 5.40): take whichever the caller used and pass it on under that same name.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer_args = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": use_cache,
                      "position_embeddings": position_embeddings, **kwargs}
        if "cu_seq_lens_q" in kwargs:
            raise ConfigError("Mixture-of-Depths cannot route packed variable-length attention "
                              "(lmforge_varlen): set model.attn_implementation=sdpa")
        batch, length, width = hidden_states.shape
        k = math.ceil(self.mod_capacity * length)
        # A cache means generation: every token must leave its keys in this layer's cache, so route by the
        # learned threshold instead of top-k (which would also look at future tokens).
        if cache is not None or k >= length:
            full = super().forward(hidden_states, **layer_args)
            if cache is not None and self.mod_capacity < 1:  # generating: a causal stand-in for top-k
                weight = weight * (scores >= self.mod_threshold).to(weight.dtype)
            return hidden_states + weight.unsqueeze(-1) * (full - hidden_states)
        picked = scores.topk(k, dim=1).indices.sort(dim=1).values  # [B, k], in sequence order
        if self.training:
            with torch.no_grad():
                kth = scores.gather(1, picked).min(dim=1).values.mean()
                self.mod_threshold.mul_(THRESHOLD_MOMENTUM).add_((1 - THRESHOLD_MOMENTUM) * kth)
        rows = picked.unsqueeze(-1).expand(-1, -1, width)
        selected = hidden_states.gather(1, rows)
        layer_args.update(attention_mask=_pick_mask(attention_mask, picked, length),
                          position_ids=_pick_tokens(position_ids, picked, batch),
                          position_embeddings=tuple(_pick_tokens(t, picked, batch) for t in position_embeddings))
        out = super().forward(selected, **layer_args)
        update = selected + weight.gather(1, picked).unsqueeze(-1) * (out - selected)
        return hidden_states.scatter(1, rows, update)


def _pick_tokens(tensor: torch.Tensor | None, picked: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Rows [B or 1, T, ...] at the picked positions."""
    if tensor is None:
        return None
    tensor = tensor.expand(batch, *tensor.shape[1:])
    index = picked.view(*picked.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


def _pick_mask(mask: torch.Tensor | None, picked: torch.Tensor, length: int) -> torch.Tensor | None:
    """The [B, H, T, T] attention mask between picked tokens. None stays None: picked tokens are kept
    in order, so plain causal attention among them is still causal."""
    if mask is None or not torch.is_tensor(mask) or mask.dim() != 4:
        if mask is not None:
            raise ConfigError(f"Mixture-of-Depths cannot route with an attention mask of type {type(mask).__name__}; "
                              "use model.attn_implementation=sdpa or eager")
        return None
    batch, k = picked.shape
    mask = mask.expand(batch, mask.shape[1], length, mask.shape[-1])
    heads = mask.shape[1]
    mask = mask.gather(2, picked[:, None, :, None].expand(batch, heads, k, mask.shape[-1]))
    return mask.gather(3, picked[:, None, None, :].expand(batch, heads, k, k))


def routed_class(cls: type) -> type:
    return type(f"Routed{cls.__name__}", (RoutedLayer, cls), {})


def routed_layer_indices(cfg: ModConfig, num_layers: int) -> list[int]:
    if cfg.layers == "alternate":
        return list(range(1, num_layers, 2))
    bad = [i for i in cfg.layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"mod.layers {bad} out of range: the model has {num_layers} layers")
    return sorted(set(cfg.layers))


def apply_mod(model: nn.Module, cfg: ModConfig) -> list[int]:
    """Convert the chosen layers in place; returns their indices. Llama-style models only."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"finetuning=mod supports Llama-style models ({', '.join(SUPPORTED_TYPES)}), "
                          f"not model_type={model_type!r}")
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        # Routing gathers tokens and their mask; packed varlen attention has no per-token mask to gather.
        model.set_attn_implementation("sdpa")
    layers = decoder_layers(model)
    indices = routed_layer_indices(cfg, len(layers))
    for i in indices:
        layer = layers[i]
        if isinstance(layer, RoutedLayer):
            continue
        reference = next(layer.parameters())
        layer.__class__ = routed_class(type(layer))
        layer.mod_capacity = cfg.capacity
        layer.mod_router = nn.Linear(model.config.hidden_size, 1, bias=False,
                                     device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(layer.mod_router.weight)
        layer.register_buffer("mod_threshold", torch.zeros((), device=reference.device, dtype=torch.float32))
    setattr(model.config, CONFIG_KEY, {"capacity": cfg.capacity, "layers": indices})
    return indices


def restore_mod(model: nn.Module, folder: str | Path) -> None:
    """Re-apply a saved conversion (config.lmforge_mod) and load the routers from the folder's
    safetensors: transformers builds the plain layers and drops the router weights as unexpected."""
    from safetensors import safe_open

    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        return
    apply_mod(model, ModConfig(capacity=settings["capacity"], layers=list(settings["layers"])))
    own = model.state_dict()
    routed = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            routed.update({k: handle.get_tensor(k) for k in handle.keys() if ".mod_" in k})
    missing = [k for k in own if ".mod_" in k and k not in routed]
    if missing:
        raise ConfigError(f"{folder}: config.json says Mixture-of-Depths but the weights lack {missing[:3]}")
    model.load_state_dict(routed, strict=False)
