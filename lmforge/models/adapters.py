"""Fine-tuning methods — full, freeze (last N layers), LoRA/DoRA/QLoRA (with LoRA+, rsLoRA, PiSSA), GaLore,
Mixture-of-Depths, LLaMA-Pro — one place for all stages. What a method needs from the optimizer is
recorded on the model (`models.optimizers.OptimizerPlan`) for the loop to build it."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lmforge.config.errors import ConfigError
from lmforge.config.schema import ExpandConfig, GaloreConfig, LoraConfig, ModConfig, ModelConfig
from lmforge.models.checkpointing import enable_checkpointing
from lmforge.models.expand import expand_blocks
from lmforge.models.layers import decoder_layers
from lmforge.models.mod import apply_mod
from lmforge.models.optimizers import OptimizerPlan, attach_plan

# Heads that stay out of LoRA targeting: adapting the output projection rarely helps and
# breaks weight tying. A Mixture-of-Depths router is a one-output linear layer: no target either.
HEAD_NAMES = ("lm_head", "score", "v_head", "embed_out", "output", "mod_router")


def find_linear_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except output heads (`q_proj`, `gate_proj`, ...)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = full_name.split(".")[-1]
            if leaf not in HEAD_NAMES:
                names.add(leaf)
    if not names:
        raise ConfigError("no linear layers found to adapt; set lora.target_modules")
    return sorted(names)


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one use of the run's seed (`train.seed`): stable across processes and platforms, and
    independent of the other uses, so the adapter's first draws are not the scratch model's first draws."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:8], "little") % 2**63


def apply_finetuning(model: nn.Module, cfg: ModelConfig, lora: LoraConfig, extra_trainable: tuple[str, ...] = (),
                     task_type: str = "CAUSAL_LM", galore: GaloreConfig | None = None, mod: ModConfig | None = None,
                     expand: ExpandConfig | None = None, seed: int | None = None):
    """Set which parameters train; returns the (possibly peft-wrapped) model.

    `extra_trainable` names modules that always train (a reward head). The method groups default to
    their defaults when a caller does not pass them. `seed` (the run's train.seed) fixes every random
    initialisation a method makes — LoRA/DoRA A matrices, gaussian and PiSSA's randomised SVD, a reward
    head kept to train, Mixture-of-Depths routers — so one config gives one artifact; None leaves the
    generators as they are. Activation checkpointing (`cfg.gradient_checkpointing`) is applied last, to
    the blocks the method leaves (LLaMA-Pro's added blocks counted).
    """
    if seed is not None:
        torch.manual_seed(derived_seed(seed, f"finetuning:{cfg.finetuning}"))  # every device's generator
    model = _apply_method(model, cfg, lora, extra_trainable, task_type, galore, mod, expand)
    enable_checkpointing(model, cfg.gradient_checkpointing)
    return model


def _apply_method(model, cfg: ModelConfig, lora: LoraConfig, extra_trainable: tuple[str, ...], task_type: str,
                  galore: GaloreConfig | None, mod: ModConfig | None, expand: ExpandConfig | None):
    if cfg.finetuning in ("full", "galore", "mod"):
        if cfg.finetuning == "galore":
            galore = galore or GaloreConfig()
            attach_plan(model, OptimizerPlan(galore=galore, galore_targets=tuple(_targets(model, galore.target_modules))))
        if cfg.finetuning == "mod":
            apply_mod(model, mod or ModConfig())
        return model
    if cfg.finetuning in ("freeze", "llama_pro"):
        if cfg.finetuning == "llama_pro":
            trainable = expand_blocks(model, expand or ExpandConfig())
        else:
            count = len(decoder_layers(model))
            trainable = range(count - min(cfg.freeze_trainable_layers, count), count)
        layers = decoder_layers(model)
        model.requires_grad_(False)
        for index in trainable:
            layers[index].requires_grad_(True)
        _unfreeze(model, extra_trainable)
        return model
    if not hasattr(model, "peft_config"):  # else the parent's adapter, kept to train further (parent_adapter=continue)
        model = _wrap_lora(model, cfg, lora, extra_trainable, task_type)
    attach_plan(model, OptimizerPlan(lora_plus_ratio=lora.plus_ratio))
    return model


def _targets(model: nn.Module, names: list[str] | str) -> list[str]:
    """`all-linear` resolved to leaf names; a bare string as a one-name list (peft would read it as a regex)."""
    if names == "all-linear":
        return find_linear_targets(model)
    return [names] if isinstance(names, str) else list(names)


def _unfreeze(model: nn.Module, names: tuple[str, ...]) -> None:
    for name, param in model.named_parameters():
        if any(part in name.split(".") for part in names):
            param.requires_grad_(True)


def _wrap_lora(model, cfg: ModelConfig, lora: LoraConfig, extra_trainable: tuple[str, ...], task_type: str):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if getattr(model, "lmforge_vocab_grew", False):
        extra_trainable = (*extra_trainable, "embed_tokens", "lm_head")
    targets = _targets(model, lora.target_modules)
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_dora=cfg.finetuning == "dora", use_rslora=lora.use_rslora, init_lora_weights=lora.peft_init(),
        modules_to_save=list(extra_trainable) or None, task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def quantization_config(cfg: ModelConfig, lora: LoraConfig):
    """bitsandbytes settings for QLoRA; a clear error where it cannot run."""
    if cfg.finetuning != "qlora":
        return None
    if not torch.cuda.is_available():
        raise ConfigError("finetuning=qlora needs a CUDA GPU (bitsandbytes 4/8-bit kernels); "
                          "on a CPU use finetuning=lora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("finetuning=qlora needs bitsandbytes: pip install 'lmforge[qlora]'") from exc
    from transformers import BitsAndBytesConfig

    if lora.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
