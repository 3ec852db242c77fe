"""YAML + dotted overrides → typed dataclasses, with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmforge.config.constraints import check_field, range_of, shown
from lmforge.config.errors import ConfigError
from lmforge.config.foreign_keys import foreign_rule, lmforge_keys_of
from lmforge.config.safe_yaml import RefusedYAMLError, safe_load
from lmforge.config.schema import DatasetSpec, StageConfig

T = TypeVar("T")


def load_config(path: str | Path | None, overrides: list[str] | None = None, stage: str | None = None,
                cls: type[T] = StageConfig) -> T:
    """Read a YAML file (optional), apply `a.b=value` overrides, and build `cls`."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    if stage is not None:
        raw["stage"] = stage
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(cls, raw, where=str(path) if path else "config")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_override(raw: dict, item: str) -> None:
    """`train.lr=3e-4` sets raw['train']['lr'] = 3e-4 (the value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like group.key=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a group")
    try:
        node[parts[-1]] = safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The YAML error in a line; a Python-object tag gets the reason it is refused."""
    if isinstance(exc, RefusedYAMLError):
        return str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and "python/" in str(exc.problem):
        mark = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        return (f"invalid YAML{mark}: {exc.problem}; lmforge reads YAML with the safe loader, so tags that build "
                "Python objects (!!python/...) are refused")
    # PyYAML's own text spans several lines (the context, a quoted excerpt, a caret): keep the facts.
    mark = getattr(exc, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    context = getattr(exc, "context", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"invalid YAML{at}: {f'{context}, ' if context else ''}{problem}".replace("\n", " ")


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts (for manifests and the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}{_unknown_key_hint(str(key), fields)}")
        kwargs[key] = _checked(cls.__name__, key, hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _unknown_key_hint(key: str, fields: set[str]) -> str:
    """A LLaMA-Factory/TRL name gets the lmforge key it stands for (string likeness sent `learning_rate` to
    `logging_steps`); any other key the closest field, or the list of them."""
    rule = foreign_rule(key)
    if rule is not None:
        targets = lmforge_keys_of(key)
        if targets:
            return f"; {key} is a LLaMA-Factory/TRL name: in lmforge it is {' and '.join(targets)}"
        if hasattr(rule, "what_to_do"):
            return f"; {key} is a LLaMA-Factory/TRL setting with no lmforge equivalent: {rule.what_to_do}"
        return f"; {key} is a LLaMA-Factory/TRL setting lmforge does not need ({getattr(rule, 'why', None) or rule.note}); remove it"
    close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(fields))}"


def _checked(cls_name: str, name: str, tp: Any, value: Any, key: str) -> Any:
    """One field's value, typed and checked against its constraints (config/constraints.py); a value of the
    wrong type for a numeric field is refused with the range it must be in."""
    try:
        value = _coerce(tp, value, key)
    except ConfigError:
        bound = range_of(cls_name, name)
        if bound is None or isinstance(value, (dict, list)):
            raise
        raise ConfigError(f"{key}={shown(value)}: must be {bound.describe()}") from None
    check_field(cls_name, name, value, key)
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        # A scalar fits a scalar option before it is wrapped into a list option.
        for option in sorted(options, key=lambda o: typing.get_origin(o) is list):
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if tp is DatasetSpec and isinstance(value, str):
            value = _dataset_shorthand(value)
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer of hundreds of digits
                raise ConfigError(f"{where}: {str(value)[:20]}... is too large for a number") from None
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _dataset_shorthand(text: str) -> dict:
    """`data/x.jsonl` is a path; a bare word like `alpaca_en_demo` names a dataset_info entry."""
    looks_like_path = any(c in text for c in "/\\*.") or Path(text).exists()
    return {"path": text} if looks_like_path else {"name": text}


def schema_dataclasses() -> list[type]:
    """Every config group reachable from StageConfig (StageConfig included): what RANGES must cover."""
    found: list[type] = []
    todo: list[Any] = [StageConfig]
    while todo:
        tp = todo.pop()
        if dataclasses.is_dataclass(tp) and tp not in found:
            found.append(tp)
            todo += list(typing.get_type_hints(tp).values())
        todo += list(typing.get_args(tp))
    return found
