"""The Train form as data: the fields users touch most up front (`TrainForm`), every other config field
of the schema in `extra` (schema_fields.py generates them), turned into the same YAML config the CLI takes
(and back), checked by lmforge's own config schema, and a preview of the first records as the chosen
stage will see them, loss-carrying tokens marked."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.config.errors import ConfigError
from lmforge.config.load import from_dict
from lmforge.config.safe_yaml import safe_load
from lmforge.config.schema import FINETUNING, LORA_METHODS, STAGES, StageConfig
from lmforge.webui.schema_fields import FormField, from_widget, parse_yaml_value, schema_fields, to_widget

METHODS = list(FINETUNING)
COMMON_KEYS = {
    "stage": ("stage",), "model": ("model.name_or_path", "model.scratch"), "tokenizer": ("model.tokenizer",),
    "data": ("data.train",), "dataset_dir": ("data.dataset_dir",), "method": ("model.finetuning",),
    "lr": ("train.lr",), "epochs": ("train.epochs",), "batch_size": ("train.batch_size",),
    "max_length": ("data.max_length",), "lora_r": ("lora.r",), "dpo_loss": ("dpo.loss",),
    "output_dir": ("train.output_dir",), "seed": ("train.seed",), "template": ("model.template",),
    "max_steps": ("train.max_steps",),
}
"""The config keys each up-front field of the form stands for; every other schema field is in a group."""


@dataclass
class TrainForm:
    stage: str = "sft"
    model: str = "smollm2-135m-instruct"
    """A folder, a GGUF file, a short name, a previous artifact, or `scratch:PRESET`."""
    tokenizer: str = ""
    """For scratch models: a tokenizer folder."""
    data: str = ""
    """Files, folders or dataset_info.json entries, comma-separated."""
    dataset_dir: str = ""
    """The folder of a LLaMA-Factory dataset_info.json, for datasets named by entry."""
    method: str = "lora"
    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 1024
    lora_r: int = 8
    dpo_loss: str = "sigmoid"
    output_dir: str = "runs/webui"
    seed: int = 42
    template: str = "auto"
    max_steps: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    """Config values of the grouped fields, by dotted key (`train.scheduler`), where not the default."""


FORM_FIELDS = [f.name for f in dataclasses.fields(TrainForm) if f.name != "extra"]
"""The up-front fields, in the order the app's Train events take them (the grouped fields follow)."""


def grouped_fields(cls: type = StageConfig) -> list[FormField]:
    """The schema's fields not up front, in schema order: the form's collapsed groups."""
    common = {key for keys in COMMON_KEYS.values() for key in keys}
    return [f for f in schema_fields(cls) if f.key not in common]


def read_form(values: list, cls: type = StageConfig) -> TrainForm:
    """The form from the app's inputs: the up-front fields, then one value per grouped field."""
    grouped = grouped_fields(cls)
    if len(values) != len(FORM_FIELDS) + len(grouped):
        raise ConfigError(f"the form sent {len(values)} values for {len(FORM_FIELDS) + len(grouped)} fields; reload the page")
    form = TrainForm(**dict(zip(FORM_FIELDS, values)))
    for spec, value in zip(grouped, values[len(FORM_FIELDS):]):
        parsed = from_widget(spec, value)
        if parsed is not dataclasses.MISSING:
            form.extra[spec.key] = parsed
    return form


def _text(value, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected text, got {type(value).__name__}")
    return value


def _num(value, key: str, kind: type, default):
    """A typed number from the form (None: the default); anything else refused naming the key."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        value = safe_load(value) if len(value) < 64 else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{key}={str(value)[:40]!r}: must be a number")
    return int(value) if kind is int and float(value).is_integer() else kind(value) if kind is float else value


def form_to_config(form: TrainForm, root: Path) -> dict:
    """The YAML-ready config for `lmforge train STAGE`; the up-front paths checked to lie under `root`."""
    if form.stage not in STAGES:
        raise ConfigError(f"stage {form.stage!r}: expected one of {', '.join(STAGES)}")
    name, method = _text(form.model, "model").strip(), _text(form.method, "model.finetuning") or "full"
    if name.startswith("scratch:"):
        model = {"scratch": name.split(":", 1)[1], "tokenizer": checked_path(_text(form.tokenizer, "tokenizer"), root)}
    else:
        from lmforge.models.load import SHORT_NAMES  # imported on use: it brings torch

        # Anything but a short name is a path, even without a slash: ".." names the parent folder.
        model = {"name_or_path": name if name in SHORT_NAMES else checked_path(name, root)}
    if (form.template or "auto") != "auto":
        model["template"] = _text(form.template, "model.template")
    if method != "full":
        model["finetuning"] = method
    dataset_dir = _text(form.dataset_dir, "data.dataset_dir").strip()
    info_dir = checked_path(dataset_dir, root) if dataset_dir else None
    files = dataset_specs(_text(form.data, "data"), root, info_dir)
    if not files:
        raise ConfigError("choose at least one dataset (a file, a folder or a dataset_info.json entry)")
    data = {"train": files[0] if len(files) == 1 and isinstance(files[0], str) else files,
            "max_length": _num(form.max_length, "data.max_length", int, 1024)}
    if info_dir is not None:
        data["dataset_dir"] = info_dir
    train = {"output_dir": checked_path(_text(form.output_dir, "train.output_dir"), root, must_exist=False),
             "lr": _num(form.lr, "train.lr", float, 1e-4), "epochs": _num(form.epochs, "train.epochs", float, 1.0),
             "batch_size": _num(form.batch_size, "train.batch_size", int, 8),
             "seed": _num(form.seed, "train.seed", int, 42)}
    max_steps = _num(form.max_steps, "train.max_steps", int, -1)
    if max_steps != -1:
        train["max_steps"] = max_steps
    config = {"stage": form.stage, "model": model, "data": data, "train": train}
    if method in LORA_METHODS:
        config["lora"] = {"r": _num(form.lora_r, "lora.r", int, 8)}
    if form.stage == "dpo":
        config["dpo"] = {"loss": _text(form.dpo_loss, "dpo.loss") or "sigmoid"}
    for key, value in form.extra.items():
        group, _, name = key.rpartition(".")
        config.setdefault(group, {})[name] = value
    validate(config)
    return config


def config_to_form(config: dict) -> TrainForm:
    """Fill the form from a config (a YAML pasted or loaded back); fields it does not set keep defaults."""
    def group(name: str) -> dict:
        value = config.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of settings, got {type(value).__name__}")
        return value or {}

    model, data, train = group("model"), group("data"), group("train")
    form = TrainForm()
    form.stage = config.get("stage", form.stage)
    if model.get("scratch"):
        form.model, form.tokenizer = f"scratch:{model['scratch']}", model.get("tokenizer", "")
    elif model.get("name_or_path"):
        form.model = model["name_or_path"]
    form.method = model.get("finetuning", "full")
    form.template = model.get("template", "auto")
    specs = data.get("train", [])
    specs = specs if isinstance(specs, list) else [specs]
    if all(isinstance(s, str) or (isinstance(s, dict) and set(s) <= {"path", "name"}) for s in specs):
        form.data = ", ".join(s if isinstance(s, str) else str(s.get("path") or s.get("name")) for s in specs)
    else:  # columns, formatting, weights: the datasets as YAML
        form.data = to_widget(DATASETS, data["train"])
    form.dataset_dir = data.get("dataset_dir", "") or ""
    form.max_length = data.get("max_length", form.max_length)
    for name in ("lr", "epochs", "batch_size", "seed", "output_dir", "max_steps"):
        setattr(form, name, train.get(name, getattr(form, name)))
    form.lora_r = group("lora").get("r", form.lora_r)
    form.dpo_loss = group("dpo").get("loss", form.dpo_loss)
    for spec in grouped_fields():
        group_name, _, name = spec.key.rpartition(".")
        values = group(group_name) if group_name else config
        if name in values and values[name] != spec.default:
            form.extra[spec.key] = values[name]
    return form


DATASETS = FormField("data.train", "datasets", [], "")


def dataset_specs(text: str, root: Path, info_dir: str | None) -> list:
    """The datasets typed up front: `a.jsonl, entry` or a YAML list of specs (path or name, columns, ...)."""
    if not text.strip():
        return []
    parsed = parse_yaml_value(text, "data.train", datasets=True)
    specs = parsed if isinstance(parsed, list) else [parsed]
    checked = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            checked.append(dataset_spec(spec.strip(), root, info_dir))
        elif isinstance(spec, dict) and isinstance(spec.get("path"), str):
            checked.append({**spec, "path": checked_path(spec["path"], root)})
        elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
            checked.append({**spec, "name": entry(spec["name"], root, info_dir or ".")})
        else:
            raise ConfigError(f"data.train[{i}]: a file, a folder, an entry name, or a mapping with path or name")
    return checked


def dataset_spec(part: str, root: Path, info_dir: str | None):
    """A file or folder under `root`, or, with a dataset_info.json folder chosen, an entry of it by name."""
    if info_dir is not None and not (root / part).exists() and "/" not in part:
        return {"name": entry(part, root, info_dir)}
    return checked_path(part, root)


def entry(name: str, root: Path, info_dir: str) -> str:
    """`name` if the dataset_info.json in `info_dir` has it (the file is read as JSON, bounded)."""
    import json

    info = root / checked_path(info_dir, root) / "dataset_info.json"
    try:
        if info.stat().st_size > MAX_CONFIG_BYTES * 16:
            raise ConfigError(f"{info_dir}/dataset_info.json: over {MAX_CONFIG_BYTES * 16 // 1024} KiB")
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # missing, unreadable, not JSON
        raise ConfigError(f"{name}: no readable {info_dir}/dataset_info.json to find it in ({error})") from None
    if not isinstance(entries, dict) or name not in entries:
        raise ConfigError(f"{name}: not a file under {root} nor an entry of {info_dir}/dataset_info.json")
    return name


def validate(config: dict) -> StageConfig:
    """The typed config the CLI would build from this dict: the same errors, raised here."""
    return from_dict(StageConfig, yaml.safe_load(yaml.safe_dump(config)), where="the form")


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


MAX_CONFIG_BYTES = 256 * 1024
"""A config longer than this is not something a person typed: refused unread."""


def from_yaml(text: str, where: str = "the YAML") -> dict:
    """A config's text as a mapping: bounded, without YAML aliases (a few bytes of anchors expand to
    gigabytes), every problem in one line naming the line."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected YAML text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: over {MAX_CONFIG_BYTES // 1024} KiB; a config is shorter than that")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{where}: line {event.start_mark.line + 1} uses a YAML alias (*name); the web UI "
                                  "takes configs without anchors and aliases: write the values out")
        config = safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{where}: the YAML does not parse{line}: {problem}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: the YAML must be a mapping of config groups (stage, model, data, train, ...)")
    return config


def checked_path(value: str, root: Path, must_exist: bool = True) -> str:
    """`value` as a path under `root` (the folder the app was started for): typed paths may not reach
    outside it, through `..`, an absolute path or a link."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("a path is empty")
    root = root.resolve()
    try:  # a NUL byte, an unpaired surrogate, a link loop or a name too long: refused like any bad path
        path = Path(value.strip())
        os.fsencode(path)
        resolved = (path if path.is_absolute() else root / path).resolve()
        exists = resolved.exists()
        # resolve() stops at a link loop and returns the rest unresolved ("loop/../out/x" comes back as
        # root/out/x with `out` still a link): a result with a link left in it is not trusted.
        unresolved = any(part.is_symlink() for part in (resolved, *resolved.parents))
    except (ValueError, OSError, RuntimeError) as error:  # UnicodeError is a ValueError
        raise ConfigError(f"{value!r}: not a usable path ({error})") from None
    if unresolved:
        raise ConfigError(f"{value}: goes through a link loop")
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"{value}: outside the folder this app serves ({root})")
    if must_exist and not exists:
        raise ConfigError(f"{value}: no such file or folder under {root}")
    return str(resolved.relative_to(root)) if resolved != root else "."


def read_config(path: Path) -> str:
    """A config file's text, bounded (a config is small; a large file is not one), errors in one line."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path.name}: over {MAX_CONFIG_BYTES // 1024} KiB; not a config")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:  # a folder, a binary file, a file gone
        raise ConfigError(f"{path.name}: not readable as a text config ({one_line(error)})") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
