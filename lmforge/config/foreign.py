"""Reading a LLaMA-Factory or TRL config as it is: `lmforge train CONFIG.yaml` and `lmforge convert`.

A file is foreign when its top level has a key of those tools (model_name_or_path, finetuning_type, ...) and no
lmforge group; an lmforge file has only `stage` and groups, so it is never taken for a foreign one, and a file
with both is refused. Among foreign files, TRL's are those with more TRL-only keys (dataset_name, use_peft,
lora_r, ...) than LLaMA-Factory-only ones (`stage` counts for LLaMA-Factory: TRL configs name no stage).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from lmforge.config.errors import ConfigError
from lmforge.config.foreign_convert import convert_settings, lf_stage
from lmforge.config.foreign_keys import FORMAT_NAMES, LLAMAFACTORY, TRL, foreign_rule, lmforge_keys_of
from lmforge.config.foreign_rules import Conversion, Unmappable
from lmforge.config.load import apply_override, from_dict, read_yaml
from lmforge.config.schema import STAGES, StageConfig

LMFORGE_TOP = tuple(f.name for f in dataclasses.fields(StageConfig))
LF_ONLY = set(LLAMAFACTORY) - set(TRL)
TRL_ONLY = set(TRL) - set(LLAMAFACTORY)


def detect_format(raw: dict, where: str) -> str | None:
    """`llamafactory`, `trl`, or None for an lmforge config; a file mixing lmforge groups with foreign keys
    is refused."""
    foreign = [str(k) for k in raw if k not in LMFORGE_TOP and foreign_rule(str(k)) is not None]
    if not foreign:
        return None
    groups = [str(k) for k in raw if k in LMFORGE_TOP and k != "stage"]
    if groups:
        shown = ", ".join(f"{k} (lmforge: {', '.join(lmforge_keys_of(k))})" if lmforge_keys_of(k) else k
                          for k in foreign[:6])
        raise ConfigError(f"{where} mixes lmforge groups ({', '.join(groups)}) with LLaMA-Factory/TRL keys "
                          f"({shown}{', ...' if len(foreign) > 6 else ''}); use one form: move them into the groups, "
                          "or write the whole file in the other tool's names")
    lf = sum(str(k) in LF_ONLY for k in raw) + ("stage" in raw)
    trl = sum(str(k) in TRL_ONLY for k in raw)
    return "trl" if trl > lf else "llamafactory"


def convert_foreign(raw: dict, fmt: str, where: str, stage: str | None = None) -> Conversion:
    """The lmforge dict of a foreign config; every key it cannot take is named in one ConfigError."""
    if stage is None and fmt == "trl":
        raise ConfigError(f"{where} is a TRL config, and TRL configs name no stage: run `lmforge train sft|dpo|rm "
                          f"{where}` (or `lmforge convert {where} --stage dpo`)")
    if stage is None:
        try:
            stage = lf_stage(raw)
        except Unmappable:
            stage = "sft"  # the `stage` key's handler lists the problem; the other keys are checked all the same
    conv = convert_settings(raw, fmt, stage)
    problems = conv.problems
    if problems:
        count = f"{len(problems)} {conv.name} setting{'s' if len(problems) > 1 else ''}"
        raise ConfigError(f"{where}: {count} that lmforge cannot take: {'; '.join(problems)}. Fix or remove "
                          f"{'them' if len(problems) > 1 else 'it'} (lmforge keys can follow as overrides, "
                          "e.g. train.lr=1e-4)")
    return conv


def load_stage_config(path: str | Path | None, overrides: list[str], stage: str | None
                      ) -> tuple[StageConfig, Conversion | None]:
    """An lmforge, LLaMA-Factory or TRL YAML (with dotted overrides) as a StageConfig, and the conversion
    when it was foreign. Without `stage` the file must name it. In a foreign file, an override without a
    dot (`learning_rate=1e-5`) is one of that tool's keys, applied before the conversion."""
    raw = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    fmt = detect_format(raw, where)
    if fmt is None:
        if stage is not None:
            raw["stage"] = stage
        for item in overrides:
            apply_override(raw, item)
        if "stage" not in raw:
            raise ConfigError(f"{where} names no stage: add `stage: sft` ({', '.join(STAGES)}) to it, or run "
                              f"`lmforge train STAGE {where}`")
        return from_dict(StageConfig, raw, where=where), None
    flat = [item for item in overrides if "." not in item.partition("=")[0]]
    for item in flat:
        apply_override(raw, item)
    conv = convert_foreign(raw, fmt, where, stage)
    for item in overrides:
        if item not in flat:
            apply_override(conv.raw, item)
    return stage_config(conv, where), conv


def stage_config(conv: Conversion, where: str) -> StageConfig:
    """The StageConfig of a conversion; a schema error about a converted value names the foreign key too."""
    try:
        return from_dict(StageConfig, conv.raw, where=where)
    except ConfigError as exc:
        raise ConfigError(_with_origin(str(exc), conv)) from None


def _with_origin(message: str, conv: Conversion) -> str:
    """A schema error about a converted value also names the foreign key the value came from."""
    for dotted in sorted(conv.origin, key=len, reverse=True):
        if dotted in message and conv.origin[dotted]:
            return f"{message} (from `{conv.origin[dotted]}` in the {conv.name} file)"
    return message


GROUP_ORDER = ("stage", "model", "data", "train", "lora", "galore", "mod", "expand", "log", "pt", "sft", "rm",
               "dpo", "rl")


def render_yaml(conv: Conversion, where: str) -> str:
    """The lmforge YAML of a conversion, with what was mapped, defaulted and ignored as comments on top."""
    lines = [f"# lmforge config converted by `lmforge convert` from {where} ({conv.name}).", "#"]
    lines += [f"#   {key} -> {dotted}" for key, dotted in conv.mapped]
    if conv.defaults:
        lines += ["#", f"# {conv.name}'s defaults where lmforge's differ (the file left them out):"]
        lines += [f"#   {dotted}: {value}" for dotted, value in conv.defaults]
    if conv.ignored:
        lines += ["#", "# Ignored (no effect in lmforge):"]
        lines += [f"#   {key}: {why}" for key, why in conv.ignored]
    ordered = {g: conv.raw[g] for g in GROUP_ORDER if g in conv.raw}
    body = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(lines) + "\n\n" + body


def report_lines(conv: Conversion, where: str) -> list[str]:
    """What `lmforge train` prints before it starts on a foreign config."""
    lines = [f"read {where} as a {conv.name} config ({len(conv.mapped)} keys mapped; `lmforge convert {where}` "
             "writes the lmforge YAML)"]
    lines.append("  mapped: " + ", ".join(f"{key} -> {dotted}" for key, dotted in conv.mapped))
    if conv.defaults:
        lines.append(f"  {conv.name} defaults kept: " + ", ".join(f"{d}={v}" for d, v in conv.defaults))
    if conv.ignored:
        lines.append("  ignored (no effect in lmforge): " + ", ".join(key for key, _ in conv.ignored))
    return lines


__all__ = ["FORMAT_NAMES", "convert_foreign", "detect_format", "load_stage_config", "render_yaml", "report_lines",
           "stage_config"]
