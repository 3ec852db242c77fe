"""Configuration of the fine-tuning methods beyond full training: LoRA and its variants (LoRA+, rsLoRA,
PiSSA), GaLore, Mixture-of-Depths and LLaMA-Pro block expansion. Every stage reads them the same way,
through `model.finetuning` and these groups."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.config.constraints import check_group
from lmforge.config.errors import ConfigError

FINETUNING = ("full", "freeze", "lora", "dora", "qlora", "galore", "mod", "llama_pro")
LORA_METHODS = ("lora", "dora", "qlora")
LORA_INITS = ("default", "gaussian", "pissa")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer except the output head)."""
    bits: int = 4
    """QLoRA quantisation bits (4 or 8); needs a GPU and bitsandbytes."""
    plus_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): the B matrices learn at train.lr times this (e.g. 16); 0 turns it off."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023): scale the adapter by alpha/sqrt(r) instead of alpha/r."""
    init: str = "default"
    """Adapter start: default (B = 0), gaussian, pissa (the weights' principal singular components, the
    residual kept in the base; Meng et al. 2024) or pissa_niter_N (PiSSA through N fast-SVD iterations)."""

    def __post_init__(self) -> None:
        check_group(self, "lora")
        if self.bits not in (4, 8):
            raise ConfigError(f"lora.bits={self.bits!r} is not one of 4, 8")
        if self.init not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", self.init):
            raise ConfigError(f"lora.init={self.init!r} is not one of {', '.join(LORA_INITS)}, pissa_niter_N")

    def peft_init(self) -> bool | str:
        """The value of peft's `init_lora_weights` for this choice."""
        return {"default": True, "gaussian": "gaussian"}.get(self.init, self.init)


@dataclass
class GaloreConfig:
    """With model.finetuning=galore: full-parameter training whose optimizer keeps Adam's moments in a
    low-rank projection of each targeted weight's gradient (Zhao et al. 2024)."""

    rank: int = 128
    """Rank of the gradient projection (capped at each matrix's smaller side)."""
    update_interval: int = 200
    """Optimizer steps between recomputing a projection (an SVD of the current gradient)."""
    scale: float = 0.25
    """The projected-back update is multiplied by this (the paper's alpha)."""
    target_modules: list[str] | str = "all-linear"
    """Linear layers whose weights get the projection, chosen like lora.target_modules; every other
    trainable parameter gets plain AdamW."""

    def __post_init__(self) -> None:
        check_group(self, "galore")


@dataclass
class ModConfig:
    """With model.finetuning=mod: Mixture-of-Depths (Raposo et al. 2024). In each chosen decoder layer a
    learned router picks ceil(capacity x T) of a sequence's T tokens to go through attention and MLP; the
    rest skip the layer."""

    capacity: float = 0.125
    """Share of tokens a routed layer processes, in (0, 1]."""
    layers: list[int] | str = "alternate"
    """Routed layers: `alternate` (every other layer, starting at the second, as in the paper) or indices."""

    def __post_init__(self) -> None:
        check_group(self, "mod")
        if isinstance(self.layers, str) and self.layers != "alternate":
            raise ConfigError(f"mod.layers={self.layers!r}: use `alternate` or a list of layer indices")


@dataclass
class ExpandConfig:
    """With model.finetuning=llama_pro: LLaMA-Pro block expansion (Wu et al. 2024). The layers are split
    into num_new_blocks equal groups and a copy of each group's last block is inserted after it, with its
    output projections zeroed so the model starts unchanged; only the new blocks train."""

    num_new_blocks: int = 2
    """Blocks to add; the model's layer count must be a multiple of it."""

    def __post_init__(self) -> None:
        check_group(self, "expand")
