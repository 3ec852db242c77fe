"""The conversion context and the handlers of the keys both LLaMA-Factory and TRL take from transformers'
TrainingArguments, and of TRL's own keys (LLaMA-Factory's are in foreign_convert.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config.foreign_keys import FORMAT_NAMES

LORA_LIKE = ("lora", "dora", "qlora")


class Unmappable(Exception):
    """One key's value cannot be carried over; the text says what to do."""


@dataclass
class Conversion:
    """The lmforge dict built from a foreign file, and what happened to each of its keys."""

    fmt: str
    raw: dict = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)
    """(foreign key, the lmforge keys it set)."""
    ignored: list[tuple[str, str]] = field(default_factory=list)
    defaults: list[tuple[str, Any]] = field(default_factory=list)
    """(lmforge key, value): the foreign tool's default where lmforge's differs."""
    origin: dict[str, str] = field(default_factory=dict)
    """lmforge key → the foreign key that set it (to name it in a type error)."""
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return FORMAT_NAMES[self.fmt]


class Ctx:
    """What a handler sees: the foreign file (`src`), the lmforge stage, and the dict being built."""

    def __init__(self, fmt: str, src: dict, stage: str) -> None:
        self.fmt, self.src, self.stage = fmt, src, stage
        self.conv = Conversion(fmt)
        self.key = ""

    def set(self, dotted: str, value: Any) -> None:
        node = self.conv.raw
        *groups, last = dotted.split(".")
        for group in groups:
            node = node.setdefault(group, {})
        node[last] = value
        self.conv.origin[dotted] = self.key

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.conv.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Unmappable(f"expected true/false, got {value!r}")
    return value


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def names(value: Any) -> list[str]:
    """LLaMA-Factory's comma lists (`identity,alpaca_en_demo`), or a YAML list of names."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise Unmappable(f"expected a comma-separated list of names, got {value!r}")
    return [x.strip() for x in items]


def only(*allowed: Any):
    """A key lmforge takes with these values only (its own behaviour); any other value is a problem."""
    def handler(ctx: Ctx, value: Any) -> None:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise Unmappable(f"{value!r}: lmforge supports {' or '.join(map(repr, allowed))} only; remove the key")
    return handler


def targets(dotted: str, everything: str):
    def handler(ctx: Ctx, value: Any) -> None:
        ctx.set(dotted, "all-linear" if value in (everything, "all-linear") else names(value))
    return handler


def true_sets(dotted: str, on: Any):
    def handler(ctx: Ctx, value: Any) -> None:
        if as_bool(value):
            ctx.set(dotted, on)
    return handler


def _seed(ctx: Ctx, value: Any) -> None:
    ctx.set("train.seed", value)
    if "data_seed" not in ctx.src:
        ctx.set("data.seed", value)


def _save_total_limit(ctx: Ctx, value: Any) -> None:
    ctx.set("train.save_total_limit", 0 if value is None else value)


def _resume(ctx: Ctx, value: Any) -> None:
    if value is True:
        ctx.set("train.resume", True)
    elif isinstance(value, str) and value.strip():
        ctx.set("train.resume_from", value)
    elif value not in (None, False):
        raise Unmappable(f"expected a checkpoint folder or true, got {value!r}")


def _report_to(ctx: Ctx, value: Any) -> None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise Unmappable(f"expected a tracker name or a list of them, got {value!r}")
    ctx.set("log.report_to", [x for x in items if x != "none"])


SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant",
              "cosine_with_min_lr": "cosine"}


def _scheduler(ctx: Ctx, value: Any) -> None:
    if not isinstance(value, str) or value not in SCHEDULERS:
        raise Unmappable(f"{value!r}: lmforge schedules {', '.join(SCHEDULERS)} (train.scheduler)")
    ctx.set("train.scheduler", SCHEDULERS[value])
    if value == "constant" and (ctx.src.get("warmup_ratio") or ctx.src.get("warmup_steps")):
        ctx.set("train.warmup_ratio", 0.0)  # transformers' `constant` has no warmup; constant_with_warmup has
    if value == "cosine_with_min_lr":
        kwargs = ctx.src.get("lr_scheduler_kwargs") or {}
        rate = kwargs.get("min_lr_rate") if isinstance(kwargs, dict) else None
        if not finite(rate):
            raise Unmappable("cosine_with_min_lr needs lr_scheduler_kwargs: {min_lr_rate: R} (lmforge: "
                             "train.min_lr_ratio)")
        ctx.set("train.min_lr_ratio", rate)
    else:
        ctx.set("train.min_lr_ratio", 0.0)  # transformers' schedules decay to 0


def _scheduler_kwargs(ctx: Ctx, value: Any) -> None:
    if value and ctx.src.get("lr_scheduler_type") != "cosine_with_min_lr":
        raise Unmappable("lmforge takes min_lr_rate with lr_scheduler_type: cosine_with_min_lr only")
    if not isinstance(value, dict) or set(value) - {"min_lr_rate"}:
        raise Unmappable(f"{value!r}: lmforge takes {{min_lr_rate: R}} only (train.min_lr_ratio)")
    if finite(value.get("min_lr_rate")):
        ctx.set("train.min_lr_ratio", value["min_lr_rate"])


def _warmup_steps(ctx: Ctx, value: Any) -> None:
    if not whole(value) or value < 0:
        raise Unmappable(f"expected a whole number of steps, got {value!r}")
    if value == 0 or ctx.src.get("lr_scheduler_type") == "constant":
        return
    steps = ctx.src.get("max_steps", -1)
    if not whole(steps) or steps <= 0:
        raise Unmappable("lmforge sets warmup as a share of the steps (train.warmup_ratio): give warmup_ratio "
                         "(warmup_steps / total steps) or max_steps")
    ctx.set("train.warmup_ratio", min(1.0, value / steps))  # transformers' warmup_steps wins over warmup_ratio


def _precision(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        if ctx.src.get("bf16") is True and ctx.src.get("fp16") is True:
            raise Unmappable("bf16 and fp16 are both true; keep one")
        if ctx.src.get("pure_bf16") is not True:
            ctx.set("train.mixed_precision", ctx.key)


def _eval_strategy(ctx: Ctx, value: Any) -> None:
    if value == "no":
        ctx.set("train.eval_steps", 0)
    elif value == "steps":
        steps = ctx.src.get("eval_steps", ctx.src.get("logging_steps", 500))  # transformers' fallbacks
        if not whole(steps) or steps < 1:
            raise Unmappable(f"eval_steps={steps!r}: lmforge evaluates every N steps (a whole number); "
                             "a fraction of the run is not supported")
        ctx.set("train.eval_steps", steps)
    else:
        raise Unmappable(f"{value!r}: lmforge evaluates every N steps: use eval_strategy: steps with eval_steps")


def _eval_steps(ctx: Ctx, value: Any) -> None:
    if ctx.src.get("eval_strategy", ctx.src.get("evaluation_strategy", "no")) != "steps":
        ctx.conv.ignored.append((ctx.key, "transformers evaluates every eval_steps only with eval_strategy: steps"))
    elif whole(value) and value >= 1:
        ctx.set("train.eval_steps", value)  # checked with the strategy otherwise


def _save_strategy(ctx: Ctx, value: Any) -> None:
    if value == "no":
        ctx.set("train.save_steps", 0)
    elif value == "steps":
        steps = ctx.src.get("save_steps", 500)  # transformers' default
        if not whole(steps) or steps < 1:
            raise Unmappable(f"save_steps={steps!r}: lmforge saves every N steps (a whole number)")
        ctx.set("train.save_steps", steps)
    else:
        raise Unmappable(f"{value!r}: lmforge saves every N steps: use save_strategy: steps with save_steps")


def _do_train(ctx: Ctx, value: Any) -> None:
    if value is not True:
        raise Unmappable("lmforge train always trains; to predict use `lmforge generate`, to evaluate `lmforge eval`")


def _epsilon(ctx: Ctx, value: Any) -> None:
    if not finite(value) or abs(value - 1e-8) > 1e-12:
        raise Unmappable(f"{value!r}: lmforge's AdamW uses eps 1e-8; remove the key")


# TRL's own keys.


def _dataset_name(ctx: Ctx, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise Unmappable(f"expected a file or folder, got {value!r}")
    if not Path(value).exists():
        raise Unmappable(f"{value!r} is not a local file or folder (lmforge never downloads): download it and give "
                         "its local path")
    ctx.set("data.train", [{"path": value}])


def _use_peft(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        four, eight = ctx.src.get("load_in_4bit") is True, ctx.src.get("load_in_8bit") is True
        ctx.set("model.finetuning", "qlora" if four or eight else "lora")


def _load_in(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        if ctx.src.get("use_peft") is not True:
            raise Unmappable("lmforge quantises the base of a LoRA run only (QLoRA): add use_peft: true")
        if ctx.src.get("load_in_4bit") is True and ctx.src.get("load_in_8bit") is True:
            raise Unmappable("load_in_4bit and load_in_8bit are both true; keep one")
        ctx.set("lora.bits", 4 if ctx.key == "load_in_4bit" else 8)


DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "auto": "auto"}


def _dtype(ctx: Ctx, value: Any) -> None:
    if not isinstance(value, str) or value not in DTYPES:
        raise Unmappable(f"{value!r} is not one of {', '.join(DTYPES)}")
    ctx.set("model.dtype", DTYPES[value])


def _completion_only(ctx: Ctx, value: Any) -> None:
    if value is False:
        ctx.set("data.train_on_prompt", True)


def _beta(ctx: Ctx, value: Any) -> None:
    if ctx.stage == "dpo":
        ctx.set("dpo.beta", value)
    elif ctx.stage in ("ppo", "grpo", "rloo"):
        ctx.set("rl.kl_coef", value)
    else:
        raise Unmappable(f"no β in {ctx.stage}; remove it")


def _loss_type(ctx: Ctx, value: Any) -> None:
    if ctx.stage == "sft" and value == "nll":
        return
    if ctx.stage != "dpo" or value not in ("sigmoid", "hinge", "ipo", "robust"):
        raise Unmappable(f"{value!r}: lmforge's {ctx.stage} takes "
                         + ("loss_type sigmoid, hinge, ipo or robust (dpo.loss)" if ctx.stage == "dpo" else "no loss_type"))
    ctx.set("dpo.loss", value)


TRAINER_SPECIAL = {
    "seed": _seed, "save_total_limit": _save_total_limit, "resume_from_checkpoint": _resume,
    "report_to": _report_to, "lr_scheduler_type": _scheduler, "lr_scheduler_kwargs": _scheduler_kwargs,
    "warmup_steps": _warmup_steps, "bf16": _precision, "fp16": _precision, "eval_strategy": _eval_strategy,
    "evaluation_strategy": _eval_strategy, "eval_steps": _eval_steps, "save_strategy": _save_strategy,
    "optim": only("adamw_torch", "adamw_torch_fused", "adamw_hf"), "adam_epsilon": _epsilon,
    "do_train": _do_train, "model_revision": only("main"),
    # TRL
    "dataset_name": _dataset_name, "dataset_train_split": only("train"), "dataset_text_field": only("text"),
    "use_peft": _use_peft, "lora_target_modules": targets("lora.target_modules", "all-linear"),
    "load_in_4bit": _load_in, "load_in_8bit": _load_in, "bnb_4bit_quant_type": only("nf4"),
    "torch_dtype": _dtype, "dtype": _dtype, "use_liger_kernel": true_sets("train.fused_loss", True),
    "completion_only_loss": _completion_only, "assistant_only_loss": only(True, False), "beta": _beta,
    "loss_type": _loss_type,
}
