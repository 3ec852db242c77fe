"""The allowed range of every numeric config field, in one table, and the checks that enforce it.

A value outside its range is refused when the config is read (`load.from_dict`, naming the file and the
dotted key) and when a group is built in Python (each group's `__post_init__`), so no stage ever sees a
negative learning rate, a NaN epoch count or a seed that numpy cannot take. A new numeric field without
an entry here fails tests/test_config_ranges.py.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge.config.errors import ConfigError

INT_MAX = 2**31 - 1
"""Counts stop here: beyond it tokenizers, torch sizes and samplers overflow."""
SEED_MAX = 2**32 - 1
"""`accelerate.set_seed` seeds numpy too, which takes seeds in [0, 2**32)."""


@dataclass(frozen=True)
class Bound:
    """The values a numeric field takes: `kind` (int or float) in [low, high] (ends open where marked)."""

    kind: type = int
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    words: tuple[str, ...] = ()
    """Words the field takes instead of a number (mod.layers: alternate)."""

    def allows(self, value: Any) -> bool:
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        if self.words:
            noun = f"{' or '.join(self.words)} or {noun}"
        low, high = _number(self.low), _number(self.high)
        if math.isinf(self.high) and math.isinf(self.low):
            return noun
        if math.isinf(self.high):
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        if math.isinf(self.low):
            return f"{noun} {'<' if self.high_open else '<='} {high}"
        return f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def count(low: int = 0, high: int = INT_MAX) -> Bound:
    return Bound(int, low, high)


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Bound:
    return Bound(float, low, high, low_open, high_open)


POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
RATIO = number(0, 1)
SEED = count(0, SEED_MAX)

# Class name -> field -> range. Keyed by name so that groups outside lmforge.config (EvalSpec) have theirs
# here too without config importing upwards.
RANGES: dict[str, dict[str, Bound]] = {
    "ModelConfig": {"freeze_trainable_layers": count(1)},
    "DatasetSpec": {"weight": POSITIVE, "max_samples": count(1)},
    "DataConfig": {"eval_split": number(0, 1, high_open=True), "max_length": count(8), "seed": SEED,
                   "max_bad_fraction": RATIO},
    "TrainConfig": {
        "seed": SEED, "epochs": number(0, 1e6, low_open=True), "max_steps": count(-1),
        "batch_size": count(1), "grad_accum": count(1), "lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "warmup_ratio": RATIO, "min_lr_ratio": RATIO, "max_grad_norm": POSITIVE,
        "adam_beta1": number(0, 1, high_open=True), "adam_beta2": number(0, 1, high_open=True),
        "logging_steps": count(1), "eval_steps": count(0), "save_steps": count(0), "save_total_limit": count(0),
        "num_workers": count(0, 1024),
    },
    "PTConfig": {"block_size": count(8)},
    "SFTConfig": {"eval_generate": count(0), "max_new_tokens": count(1), "neftune_alpha": NON_NEGATIVE},
    "RMConfig": {"margin": NON_NEGATIVE, "center_coef": NON_NEGATIVE},
    "DPOConfig": {
        "beta": POSITIVE, "label_smoothing": number(0, 0.5, high_open=True), "simpo_gamma": NON_NEGATIVE,
        "orpo_lambda": NON_NEGATIVE, "sft_weight": NON_NEGATIVE, "kto_desirable_weight": NON_NEGATIVE,
        "kto_undesirable_weight": NON_NEGATIVE, "eval_generate": count(0), "max_new_tokens": count(1),
    },
    "RewardSpec": {"weight": number(), "target_length": count(0)},
    "RLConfig": {
        "prompts_per_step": count(1), "num_generations": count(1), "max_new_tokens": count(1),
        "temperature": POSITIVE, "top_p": number(0, 1, low_open=True), "top_k": count(0), "ppo_epochs": count(1),
        "minibatch_size": count(0), "clip_range": POSITIVE, "clip_range_value": POSITIVE, "value_coef": NON_NEGATIVE,
        "gamma": RATIO, "lam": RATIO, "kl_coef": NON_NEGATIVE, "kl_target": NON_NEGATIVE, "kl_horizon": count(1),
        "reward_clip": NON_NEGATIVE, "missing_eos_penalty": NON_NEGATIVE, "target_approx_kl": NON_NEGATIVE,
        "eval_prompts": count(0), "clip_range_low": number(0, 1, low_open=True), "clip_range_high": POSITIVE,
        "entropy_coef": NON_NEGATIVE, "overlong_buffer": count(0), "overlong_penalty": NON_NEGATIVE,
        "max_sampling_rounds": count(1), "max_turns": count(1), "max_total_tokens": count(1),
        "tool_timeout": POSITIVE, "tool_memory_mb": count(64), "tool_output_chars": count(1),
        "tool_call_reward": number(), "rollout_rows": count(0),
    },
    "DistillConfig": {
        "lambda_on_policy": RATIO, "beta": RATIO, "temperature": POSITIVE, "prompts_per_step": count(1),
        "num_generations": count(1), "max_new_tokens": count(1), "eval_prompts": count(0),
    },
    "LoraConfig": {"r": count(1), "alpha": count(1), "dropout": number(0, 1, high_open=True), "bits": count(4, 8),
                   "plus_ratio": NON_NEGATIVE},
    "GaloreConfig": {"rank": count(1), "update_interval": count(1), "scale": POSITIVE},
    "ModConfig": {"capacity": number(0, 1, low_open=True), "layers": Bound(int, 0, INT_MAX, words=("alternate",))},
    "ExpandConfig": {"num_new_blocks": count(1)},
    "EvalSpec": {"max_samples": count(1), "max_new_tokens": count(1), "block_size": count(8),
                 "perplexity_tokens": count(1), "show_samples": count(0), "seed": SEED},
}

FOLDERS: dict[str, tuple[str, ...]] = {
    "TrainConfig": ("output_dir", "resume_from"),
    "DataConfig": ("dataset_dir",),
}
"""Path fields that name a folder: refused at once when the path, or a folder above it, is a file."""

COLUMN_ROLES = ("prompt", "query", "response", "system", "history", "messages", "tools", "chosen", "rejected",
                "kto_tag", "text")
"""Roles a dataset's `columns` may rename (LLaMA-Factory's names, those lmforge reads)."""
TAG_ROLES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
NAMES: dict[str, dict[str, tuple[str, ...]]] = {"DatasetSpec": {"columns": COLUMN_ROLES, "tags": TAG_ROLES}}
"""Mapping fields whose keys are roles from a fixed list."""


def check_value(bound: Bound, value: Any, key: str) -> None:
    """Refuse `value` for `key` unless `bound` allows it; a list (of layer indices) is checked item by item."""
    if value is None:
        return  # an optional field left unset
    if isinstance(value, list):
        items = replace(bound, words=())  # a word stands for the whole list, never for one item
        for i, item in enumerate(value):
            check_value(items, item, f"{key}[{i}]")
        return
    if not bound.allows(value):
        raise ConfigError(f"{key}={shown(value)}: must be {bound.describe()}")


def shown(value: Any) -> str:
    """A value as an error message quotes it: short enough for the one line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def check_choice(group: str, name: str, value: Any, choices: tuple) -> None:
    """Refuse `value` for `group.name` unless it is one of `choices`."""
    if value not in choices:
        key = f"{group}.{name}" if group else name
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def check_field(cls_name: str, name: str, value: Any, key: str) -> None:
    """Every constraint the tables hold for field `name` of class `cls_name`; `key` names it in errors."""
    bound = RANGES.get(cls_name, {}).get(name)
    if bound is not None:
        check_value(bound, value, key)
    if name in FOLDERS.get(cls_name, ()) and value:
        _check_folder(str(value), key)
    roles = NAMES.get(cls_name, {}).get(name)
    if roles is not None and isinstance(value, dict):
        _check_names(value, roles, key)


def check_group(obj: Any, prefix: str) -> None:
    """All constraints of one config group built in Python (its `__post_init__` calls this)."""
    cls_name = type(obj).__name__
    names = {*RANGES.get(cls_name, {}), *FOLDERS.get(cls_name, ()), *NAMES.get(cls_name, {})}
    for name in sorted(names):
        check_field(cls_name, name, getattr(obj, name), f"{prefix}.{name}")


def range_of(cls_name: str, name: str) -> Bound | None:
    return RANGES.get(cls_name, {}).get(name)


def _check_folder(value: str, key: str) -> None:
    path = Path(value)
    for candidate in (path, *path.parents):
        try:
            if candidate.is_file():
                where = "" if candidate == path else f" ({candidate} is a file)"
                raise ConfigError(f"{key}={value!r}: must be a folder, and it is a file{where}; choose another path")
            if candidate.is_dir():
                return
        except OSError:  # a name too long, or a folder that cannot be read: the stage says so when it gets there
            return


def _check_names(mapping: dict, roles: tuple[str, ...], key: str) -> None:
    for name in mapping:
        if name not in roles:
            close = difflib.get_close_matches(str(name), roles, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key} has an unknown role {name!r}: {hint}roles: {', '.join(roles)}")
