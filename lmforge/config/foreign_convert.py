"""A LLaMA-Factory or TRL settings mapping → the lmforge config dict, key by key (tables in foreign_keys.py).

Every problem is collected, not raised at the first one, so the user fixes them all from one message.
"""

from __future__ import annotations

from typing import Any

from lmforge.config.foreign_keys import (
    FORMAT_NAMES,
    LF_DEFAULTS,
    LF_STAGES,
    TABLES,
    TEMPLATES,
    TRL_DEFAULTS,
    TRL_LORA,
    TRL_LR,
    Ignored,
    Refused,
    Special,
    Target,
)
from lmforge.config.foreign_rules import (
    LORA_LIKE,
    TRAINER_SPECIAL,
    Conversion,
    Ctx,
    Unmappable,
    as_bool,
    names,
    only,
    targets,
    true_sets,
)


def convert_settings(src: dict, fmt: str, stage: str) -> Conversion:
    """Map every key of `src` (a `fmt` file) for the lmforge `stage`; problems are collected in the result."""
    ctx = Ctx(fmt, src, stage)
    ctx.set("stage", stage)
    table = TABLES[fmt]
    for key, value in src.items():
        ctx.key = key = str(key)
        rule = table.get(key)
        try:
            if rule is None:
                raise Unmappable(_unknown(key, fmt))
            if isinstance(rule, Refused):
                raise Unmappable(rule.what_to_do)
            if isinstance(rule, Ignored):
                ctx.conv.ignored.append((key, rule.why))
                continue
            before = set(ctx.conv.origin.items())
            if isinstance(rule, Target):
                for dotted in rule.keys:
                    ctx.set(dotted, value)
            elif isinstance(rule, Special):
                SPECIAL[key](ctx, value)
            landed = sorted(k for k, src_key in set(ctx.conv.origin.items()) - before if src_key == key)
            if landed:
                ctx.conv.mapped.append((key, " + ".join(landed)))
            elif key not in {k for k, _ in ctx.conv.ignored}:
                ctx.conv.ignored.append((key, "lmforge does this already"))
        except Unmappable as exc:
            ctx.conv.problems.append(f"{key}: {exc}")
    _apply_defaults(ctx)
    return ctx.conv


def _unknown(key: str, fmt: str) -> str:
    for other, table in TABLES.items():
        if other != fmt and key in table:
            rule = table[key]
            where = f" (lmforge: {', '.join(rule.keys)})" if isinstance(rule, (Target, Special)) and rule.keys else ""
            return f"a {FORMAT_NAMES[other]} setting in a {FORMAT_NAMES[fmt]} file{where}; use one format"
    return f"not a {FORMAT_NAMES[fmt]} setting lmforge knows; remove it or give the lmforge key as an override"


def _apply_defaults(ctx: Ctx) -> None:
    defaults = dict(LF_DEFAULTS if ctx.fmt == "llamafactory" else TRL_DEFAULTS)
    if ctx.fmt == "trl":
        defaults["train.lr"] = TRL_LR.get(ctx.stage, defaults["train.lr"])
        if ctx.get("model.finetuning") in LORA_LIKE:
            defaults.update(TRL_LORA)
    if ctx.stage == "pt":  # LLaMA-Factory packs pretraining text into cutoff_len blocks
        defaults["pt.block_size"] = defaults.pop("data.max_length")
    if "dataset" not in ctx.src and "eval_dataset" not in ctx.src:
        defaults.pop("data.dataset_dir", None)  # only `dataset` names resolve against it
    if ctx.fmt == "llamafactory" and ctx.get("model.finetuning", "lora") in LORA_LIKE and ctx.get("lora.alpha") is None:
        defaults["lora.alpha"] = 2 * _int(ctx.get("lora.r", 8))
    if ctx.fmt == "llamafactory" and ctx.get("model.finetuning") == "galore":
        defaults.update({"galore.rank": 16, "galore.scale": 2.0})
    if ctx.fmt == "llamafactory" and ctx.stage == "ppo":
        defaults["rl.ppo_epochs"] = 4
    for dotted, value in defaults.items():
        if ctx.get(dotted) is None:
            ctx.key = ""
            ctx.set(dotted, value)
            ctx.conv.origin.pop(dotted)
            ctx.conv.defaults.append((dotted, value))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 8


def _stage(ctx: Ctx, value: Any) -> None:
    lf_stage(ctx.src)  # a bad value is listed even when the command line names the stage
    ctx.set("stage", ctx.stage)  # chosen from this key (or the command line) before the keys were read
    if value == "kto":
        ctx.set("dpo.loss", "kto")


def _finetuning(ctx: Ctx, value: Any) -> None:
    if value not in ("lora", "full", "freeze"):
        raise Unmappable(f"{value!r}: lmforge takes lora, full or freeze here (others: model.finetuning, "
                         "docs/finetuning.md)")
    src = ctx.src
    method = value
    if value == "lora" and src.get("use_dora") is True:
        method = "dora"
    if value == "lora" and src.get("quantization_bit") is not None:
        method = "qlora"
    if value == "full" and src.get("use_galore") is True:
        method = "galore"
    if value == "full" and src.get("mixture_of_depths") == "convert":
        method = "mod"
    ctx.set("model.finetuning", method)


def _modifier(method: str, base: str):
    """use_dora / use_galore / mixture_of_depths: the method was set with finetuning_type; check they agree."""
    def handler(ctx: Ctx, value: Any) -> None:
        on = value == "convert" if method == "mod" else as_bool(value)
        if value == "load":
            raise Unmappable("a saved MoD model is an ordinary folder for lmforge; remove the key")
        if on and ctx.src.get("finetuning_type", "lora") != base:
            raise Unmappable(f"needs finetuning_type: {base}")
        if on and method == "dora" and ctx.src.get("quantization_bit") is not None:
            raise Unmappable("DoRA on a quantised base is not in lmforge; drop use_dora or quantization_bit")
        if on:
            ctx.set("model.finetuning", method)
    return handler


def _quantization(ctx: Ctx, value: Any) -> None:
    if value is None:
        return
    if value not in (4, 8):
        raise Unmappable(f"{value!r}: lmforge quantises to 4 or 8 bits")
    if ctx.src.get("finetuning_type", "lora") != "lora":
        raise Unmappable("lmforge quantises the base of a LoRA run only (QLoRA); use finetuning_type: lora")
    ctx.set("model.finetuning", "qlora")
    ctx.set("lora.bits", value)


def _pissa(ctx: Ctx, value: Any) -> None:
    if ctx.key == "pissa_iter" and not ctx.src.get("pissa_init"):
        return
    if as_bool(ctx.src.get("pissa_init", False)):
        niter = ctx.src.get("pissa_iter", 16)
        if not isinstance(niter, int) or isinstance(niter, bool):
            raise Unmappable(f"pissa_iter must be an integer, got {niter!r}")
        ctx.set("lora.init", "pissa" if niter < 0 else f"pissa_niter_{niter}")


def _freeze_layers(ctx: Ctx, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise Unmappable(f"{value}: lmforge trains the last N layers only; give a positive number")
    ctx.set("model.freeze_trainable_layers", value)


def _datasets(ctx: Ctx, value: Any) -> None:
    group = "data.eval" if ctx.key == "eval_dataset" else "data.train"
    limit = ctx.src.get("max_samples")
    entries = [{"name": name} for name in names(value)]
    if limit is not None:
        entries = [{**entry, "max_samples": limit} for entry in entries]
    ctx.set(group, entries)


def _max_samples(ctx: Ctx, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise Unmappable(f"expected a positive whole number, got {value!r}")
    if value is not None and "dataset" not in ctx.src and "eval_dataset" not in ctx.src:
        raise Unmappable("applies to the datasets of `dataset`, and there are none")
    # _datasets puts it on every entry; this records that the key mapped.
    for key, group in (("dataset", "data.train"), ("eval_dataset", "data.eval")):
        if key in ctx.src:
            ctx.conv.origin[f"{group}[*].max_samples"] = "max_samples"


def _cutoff(ctx: Ctx, value: Any) -> None:
    ctx.set("pt.block_size" if ctx.stage == "pt" else "data.max_length", value)


def _val_size(ctx: Ctx, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
        raise Unmappable(f"{value} counts records; lmforge holds out a fraction: give val_size below 1 (e.g. 0.1) "
                         "or a held-out set as eval_dataset")
    ctx.set("data.eval_split", value)


def _template(ctx: Ctx, value: Any) -> None:
    from lmforge.config.templates import template_names

    installed = template_names()
    target = TEMPLATES.get(value) if isinstance(value, str) else None
    if target is None or target not in installed:
        raise Unmappable(f"{value!r} has no lmforge template; leave `template` out to use the tokenizer's own, "
                         f"or name one of: {', '.join(n for n, t in TEMPLATES.items() if t in installed)}")
    ctx.set("model.template", target)


def _neat_packing(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        ctx.set("data.packing", True)


def _pref_beta(ctx: Ctx, value: Any) -> None:
    ctx.set("dpo.orpo_lambda" if ctx.src.get("pref_loss") == "orpo" else "dpo.beta", value)


def _pref_loss(ctx: Ctx, value: Any) -> None:
    if ctx.src.get("stage") == "kto":
        return  # a KTO run has its own loss
    if value == "kto_pair":
        raise Unmappable("paired KTO is not in lmforge; use stage: kto with unpaired records")
    if value not in ("sigmoid", "hinge", "ipo", "orpo", "simpo"):
        raise Unmappable(f"{value!r} is not one of sigmoid, hinge, ipo, orpo, simpo")
    ctx.set("dpo.loss", value)


def _reward_norm(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        if ctx.get("rl.reward_norm") is not None:
            raise Unmappable("ppo_score_norm and ppo_whiten_rewards together: lmforge normalises once; keep one")
        ctx.set("rl.reward_norm", "running" if ctx.key == "ppo_score_norm" else "batch")


def _ppo_buffer(ctx: Ctx, value: Any) -> None:
    if ctx.stage != "ppo":
        return
    batch, accum = ctx.src.get("per_device_train_batch_size", 8), ctx.src.get("gradient_accumulation_steps", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (batch, accum, value)):
        raise Unmappable("needs whole numbers for it, per_device_train_batch_size and gradient_accumulation_steps")
    ctx.set("rl.minibatch_size", batch * accum)
    ctx.set("rl.prompts_per_step", batch * accum * value)


def _ppo_only(ctx: Ctx, value: Any) -> None:
    if ctx.stage == "ppo":
        ctx.set(f"rl.{ctx.key}", value)


def _attention(ctx: Ctx, value: Any) -> None:
    names = {"auto": "auto", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}
    if not isinstance(value, str) or value not in names:
        raise Unmappable(f"{value!r} is not one of {', '.join(names)}")
    ctx.set("model.attn_implementation", names[value])


def _swanlab(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        ctx.set("log.report_to", [*(ctx.get("log.report_to") or []), "swanlab"])


def _pure_bf16(ctx: Ctx, value: Any) -> None:
    if as_bool(value):
        ctx.set("model.dtype", "bf16")
        ctx.set("train.mixed_precision", "no")


def _gc_off(ctx: Ctx, value: Any) -> None:
    ctx.set("model.gradient_checkpointing", not as_bool(value))


SPECIAL = {
    **TRAINER_SPECIAL,
    "stage": _stage, "finetuning_type": _finetuning, "template": _template, "dataset": _datasets,
    "eval_dataset": _datasets, "cutoff_len": _cutoff, "max_samples": _max_samples, "val_size": _val_size,
    "neat_packing": _neat_packing, "lora_target": targets("lora.target_modules", "all"),
    "galore_target": targets("galore.target_modules", "all"),
    "use_dora": _modifier("dora", "lora"), "use_galore": _modifier("galore", "full"),
    "mixture_of_depths": _modifier("mod", "full"), "quantization_bit": _quantization,
    "pissa_init": _pissa, "pissa_iter": _pissa, "quantization_method": only("bitsandbytes", "bnb"),
    "quantization_type": only("nf4"), "double_quantization": only(True),
    "freeze_trainable_layers": _freeze_layers, "freeze_trainable_modules": only("all"),
    "galore_proj_type": only("std"), "mix_strategy": only("concat"), "reward_model_type": only("full", "lora"),
    "pure_bf16": _pure_bf16, "flash_attn": _attention, "disable_gradient_checkpointing": _gc_off,
    "enable_liger_kernel": true_sets("train.fused_loss", True), "use_swanlab": _swanlab,
    "pref_beta": _pref_beta, "pref_loss": _pref_loss, "ppo_score_norm": _reward_norm,
    "ppo_whiten_rewards": _reward_norm, "ppo_buffer_size": _ppo_buffer, "max_new_tokens": _ppo_only,
    "temperature": _ppo_only, "top_p": _ppo_only, "top_k": _ppo_only,
}


def lf_stage(src: dict) -> str:
    """The lmforge stage a LLaMA-Factory file names (LLaMA-Factory's default is sft)."""
    value = src.get("stage", "sft")
    if not isinstance(value, str) or value not in LF_STAGES:
        raise Unmappable(f"{value!r} is not a LLaMA-Factory stage ({', '.join(LF_STAGES)}); for GRPO or RLOO "
                         "run lmforge train grpo|rloo CONFIG")
    return LF_STAGES[value]
