"""The Train form's fields, read from the config schema itself: every leaf of `StageConfig` (its groups'
dataclass fields) with its type, default, help text (the docstring under the field) and choices (what the
group's checks refuse a wrong value with). A field added to the schema appears in the form with no change
here; the form's values turn back into config values, omitted where they equal the default, so the YAML
stays as short as one written by hand."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from lmforge.config.constraints import range_of
from lmforge.config.errors import ConfigError

KINDS = ("bool", "tristate", "choice", "multichoice", "int", "float", "text", "yaml", "datasets")
"""Widgets: checkbox, default/true/false, dropdown, multi-select, number, number, text, YAML text, datasets."""
TRISTATE = ("default", "true", "false")
PROBE = "\x00not-a-choice"
"""A value no choice list holds: a group built with it names its choices in the refusal."""
MAX_TEXT = 16 * 1024
"""A YAML value typed into one field (a list of rewards, a column map) is shorter than this."""


@dataclass(frozen=True)
class FormField:
    key: str
    """Dotted config key: `train.lr`, `rl.loss_type`, `stage`."""
    kind: str
    default: Any
    help: str
    choices: tuple = ()

    @property
    def group(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


def schema_fields(cls: type, prefix: str = "") -> list[FormField]:
    """Every leaf field of `cls` and its nested groups, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    found: list[FormField] = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            found += schema_fields(tp, f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = _choices(cls, prefix.rstrip("."), f.name, tp)
        kind = _kind(tp, choices)
        found.append(FormField(key, kind, default, _with_range(cls, f.name, docs.get(f.name, "")), choices))
    return found


@cache
def field_help(cls: type) -> dict[str, str]:
    """{field: the string literal under it} from the class's source (the schema's help convention)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # a class built at run time has no source: no help
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _with_range(cls: type, name: str, text: str) -> str:
    bound = range_of(cls.__name__, name)
    return f"{text} ({bound.describe()})".strip() if bound is not None else text


def _kind(tp: Any, choices: tuple) -> str:
    args = set(typing.get_args(tp))
    optional = type(None) in args
    core = (args - {type(None)}).pop() if optional and len(args) == 2 else tp
    if core is bool:
        return "tristate" if optional else "bool"
    if typing.get_origin(core) is list and choices:
        return "multichoice"
    if choices:
        return "choice"
    if core in (int, float):
        return core.__name__
    if core is str:
        return "text"
    item = typing.get_args(core)[0] if typing.get_origin(core) is list and typing.get_args(core) else None
    if dataclasses.is_dataclass(item) and item.__name__ == "DatasetSpec":
        return "datasets"
    return "yaml"


@cache
def _choices(cls: type, group: str, name: str, tp: Any) -> tuple:
    """The values the group's own check accepts for a text field, read from its refusal of a probe:
    `group.name='...' is not one of a, b, c`. The template's are the named templates lmforge ships."""
    if (group, name) == ("model", "template"):
        from lmforge.config.templates import template_names

        return template_names()
    text_list = typing.get_origin(tp) is list and typing.get_args(tp) == (str,)
    if str not in {tp, *typing.get_args(tp)} and not text_list:
        return ()
    try:
        cls(**{name: [PROBE] if text_list else PROBE})
    except ConfigError as error:
        key = re.escape(f"{group}.{name}" if group else name)
        match = re.match(rf"{key}='.*?' is not one of (.+)$", str(error))
        return tuple(c for c in match.group(1).split(", ")) if match else ()
    except (TypeError, ValueError):  # a group that cannot be built from one field: no list to offer
        return ()
    return ()


def from_widget(field: FormField, value: Any) -> Any:
    """The config value a widget's content stands for; `dataclasses.MISSING` for "leave the default"."""
    if value is None or (isinstance(value, str) and not value.strip() and field.kind != "bool"):
        return dataclasses.MISSING
    kind = field.kind
    if kind == "tristate":
        if value not in TRISTATE:
            raise ConfigError(f"{field.key}={value!r}: one of {', '.join(TRISTATE)}")
        parsed = None if value == "default" else value == "true"
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{field.key}={value!r}: true or false")
        parsed = value
    elif kind in ("int", "float"):
        parsed = _number(field, value)
    elif kind in ("choice", "text"):
        parsed = str(value).strip()
    elif kind == "multichoice":
        parsed = list(value) if isinstance(value, (list, tuple)) else [str(value)]
    else:  # yaml, datasets: a small YAML value (a list, a mapping), or comma-separated datasets
        parsed = parse_yaml_value(str(value), field.key, datasets=kind == "datasets")
    return dataclasses.MISSING if parsed == field.default else parsed


def _number(field: FormField, value: Any) -> int | float:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field.key}={str(value)[:40]!r}: must be a number")
    if field.kind == "int" and float(value).is_integer():
        return int(value)
    return float(value) if field.kind == "float" else value


def parse_yaml_value(text: str, key: str, datasets: bool = False) -> Any:
    """A YAML value typed into one field: bounded, alias-free; datasets may also be `a.jsonl, b.jsonl`."""
    if len(text) > MAX_TEXT:
        raise ConfigError(f"{key}: over {MAX_TEXT // 1024} KiB; write the config as YAML instead")
    stripped = text.strip()
    if datasets and not stripped.startswith(("[", "{", "-")):
        parts = [part.strip() for part in stripped.split(",") if part.strip()]
        return parts if len(parts) > 1 else parts[0]
    try:
        for event in yaml.parse(stripped, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{key}: YAML aliases (*name) are not taken here; write the value out")
        return yaml.safe_load(stripped)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{key}: the YAML does not parse{where}: {getattr(error, 'problem', '') or error}") from None


def to_widget(field: FormField, value: Any) -> Any:
    """What a widget shows for a config value (the default where the config leaves the field out)."""
    if field.kind == "tristate":
        return "default" if value is None else ("true" if value else "false")
    if field.kind in ("bool", "int", "float", "choice"):
        return value
    if field.kind == "multichoice":
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if field.kind == "text":
        return "" if value is None else str(value)
    if value in (None, [], {}, ""):
        return ""
    if field.kind == "datasets" and all(isinstance(v, str) for v in (value if isinstance(value, list) else [value])):
        return ", ".join(value) if isinstance(value, list) else value
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, sort_keys=False).strip()
