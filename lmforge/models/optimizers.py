"""The optimizer a fine-tuning method trains with: AdamW, AdamW with LoRA+ learning-rate groups, or
GaLore AdamW. `apply_finetuning` records what the method needs on the model (`OptimizerPlan`), so the
loop builds the right optimizer for every stage without knowing the method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config.schema import GaloreConfig, TrainConfig

PLAN_ATTRIBUTE = "lmforge_optimizer_plan"


@dataclass
class OptimizerPlan:
    lora_plus_ratio: float = 0.0
    """> 0: LoRA+ — the adapters' B matrices learn at lr times this."""
    galore: GaloreConfig | None = None
    """GaLore settings, with `galore_targets` the leaf names of the linear layers it projects."""
    galore_targets: tuple[str, ...] = ()


def attach_plan(model: nn.Module, plan: OptimizerPlan) -> None:
    # object.__setattr__: a plain attribute, never registered as a module or a parameter.
    object.__setattr__(model, PLAN_ATTRIBUTE, plan)


def find_plan(model: nn.Module) -> OptimizerPlan:
    """The plan attached to the model or to a module inside it (RL wraps the policy with its critic)."""
    for module in model.modules():
        plan = getattr(module, PLAN_ATTRIBUTE, None)
        if isinstance(plan, OptimizerPlan):
            return plan
    return OptimizerPlan()


def build_optimizer(model: nn.Module, train: TrainConfig, plan: OptimizerPlan | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused on a GPU), with the method's parameter groups."""
    plan = plan if plan is not None else find_plan(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters: check model.finetuning")
    hyper = {"lr": train.lr, "weight_decay": train.weight_decay, "betas": (train.adam_beta1, train.adam_beta2)}
    if plan.galore is not None:
        from lmforge.models.galore import GaLoreAdamW

        return GaLoreAdamW(galore_groups(model, plan, train.lr), **hyper)
    # Fused AdamW (one kernel for all parameters) on a GPU; the CPU keeps the reference implementation.
    fused = (torch.cuda.is_available() or None) if fused is None else fused
    if plan.lora_plus_ratio > 0:
        return torch.optim.AdamW(lora_plus_groups(named, train.lr, plan.lora_plus_ratio), fused=fused, **hyper)
    return torch.optim.AdamW([p for _, p in named], fused=fused, **hyper)


def lora_plus_groups(named: list[tuple[str, nn.Parameter]], lr: float, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): B, the matrix that starts at zero, learns `ratio` times faster than A.
    Everything else (A, DoRA magnitudes, heads that train in full) keeps the base rate."""
    b_matrices = [p for name, p in named if ".lora_B." in name]
    rest = [p for name, p in named if ".lora_B." not in name]
    if not b_matrices:
        raise ValueError("lora.plus_ratio is set but the model has no LoRA B matrices: use model.finetuning=lora")
    groups = [{"params": rest, "lr": lr}] if rest else []
    return groups + [{"params": b_matrices, "lr": lr * ratio}]


def galore_groups(model: nn.Module, plan: OptimizerPlan, lr: float) -> list[dict]:
    """The targeted linear weights in a GaLore group; every other trainable parameter in a plain one."""
    cfg = plan.galore
    projected = {id(module.weight) for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.split(".")[-1] in plan.galore_targets
                 and module.weight.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    low_rank = [p for p in params if id(p) in projected]
    if not low_rank:
        raise ValueError(f"galore.target_modules matched no trainable linear layer ({', '.join(plan.galore_targets)})")
    plain = [p for p in params if id(p) not in projected]
    groups = [{"params": low_rank, "lr": lr, "rank": cfg.rank, "update_interval": cfg.update_interval,
               "scale": cfg.scale}]
    return groups + ([{"params": plain, "lr": lr}] if plain else [])


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Floats the optimizer holds in its state (moments, projectors), step counters excluded."""
    return sum(v.numel() for state in optimizer.state.values() for k, v in state.items()
               if torch.is_tensor(v) and k != "step")
