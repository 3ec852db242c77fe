"""`model.template` as the config reads it: the names lmforge ships, a user's .jinja file, and the header a
template opens with.

A template lmforge ships (or a user's file) opens with a `{#- lmforge-template ... -#}` comment holding YAML:
`stop` (the strings that end a reply, so generation stops on them), `special` (the tokens it prints, which
the tokenizer must have), `add_missing` (add those tokens when missing instead of refusing) and `about`.
It lives in the config layer because a config is checked when it is read: a bad name, file or header is a
config error before any model loads. Rendering with a template is lmforge/data/templates.py's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2
import yaml

from lmforge.config.errors import ConfigError

HEADER = re.compile(r"\A\{#-?\s*lmforge-template\b(.*?)-?#\}", re.DOTALL)
HEADER_KEYS = {"about", "stop", "special", "add_missing"}


@dataclass(frozen=True)
class TemplateInfo:
    """What a template's header declares (empty for a template without one)."""

    stop: tuple[str, ...] = ()
    special: tuple[str, ...] = ()
    add_missing: bool = False
    about: str = ""


def _folder():
    return resources.files("lmforge") / "templates"


def template_names() -> tuple[str, ...]:
    """What `model.template` accepts by name: `auto` and every template shipped in lmforge/templates/
    (a path to a .jinja file is accepted too, see `check_template_choice`)."""
    return ("auto", *sorted(p.name.removesuffix(".jinja") for p in _folder().iterdir() if p.name.endswith(".jinja")))


def is_template_path(choice: str) -> bool:
    return choice.endswith(".jinja") or "/" in choice or "\\" in choice


def builtin_template(name: str) -> str:
    """The Jinja text of a template shipped with lmforge (`chatml`, `llama3`, ...)."""
    path = _folder() / f"{name}.jinja"
    if not path.is_file():
        raise ConfigError(f"model.template={name!r} is not a template; choose one of {', '.join(template_names())} "
                          "or give the path of a .jinja file")
    return path.read_text(encoding="utf-8")


def template_text(choice: str) -> str:
    """The Jinja text `model.template` names: a built-in name or a .jinja file; its header is checked."""
    if not is_template_path(choice):
        text = builtin_template(choice)
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.template: no such file {choice}; give the path of a .jinja file "
                              f"or one of {', '.join(template_names())}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"model.template: cannot read {choice}: {exc}") from exc
        if not text.strip():
            raise ConfigError(f"model.template: {choice} is empty; it must hold a Jinja chat template")
    template_info(text, where=f"model.template ({choice})")
    if is_template_path(choice):
        _check_syntax(text, f"model.template ({choice})")
    return text


def _check_syntax(text: str, where: str) -> None:
    """Compile a user's template the way transformers will, so a syntax error is a config error."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateError as exc:
        line = f" line {exc.lineno}:" if getattr(exc, "lineno", None) else ""
        raise ConfigError(f"{where}: not a valid Jinja template:{line} {str(exc).splitlines()[0]}") from exc


def check_template_choice(choice: str) -> None:
    """Config-time check of `model.template`: a known name, or a readable .jinja file with a valid header."""
    if choice == "auto":
        return
    if not is_template_path(choice) and choice not in template_names():
        raise ConfigError(f"model.template={choice!r} is not a template; choose one of "
                          f"{', '.join(template_names())} or give the path of a .jinja file")
    template_text(choice)


def template_info(text: str | None, where: str = "the chat template") -> TemplateInfo:
    """The header of a template (see the module docstring); a template without one declares nothing."""
    match = HEADER.match(text or "")
    if match is None:
        return TemplateInfo()
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: the lmforge-template header is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict) or set(data) - HEADER_KEYS:
        extra = sorted(set(data) - HEADER_KEYS) if isinstance(data, dict) else [type(data).__name__]
        raise ConfigError(f"{where}: unknown lmforge-template header keys {extra}; known: {sorted(HEADER_KEYS)}")
    lists = {}
    for key in ("stop", "special"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            raise ConfigError(f"{where}: header key {key!r} must be a list of token strings, got {value!r}")
        lists[key] = tuple(value)
    if not isinstance(data.get("add_missing", False), bool):
        raise ConfigError(f"{where}: header key 'add_missing' must be true or false")
    return TemplateInfo(lists["stop"], lists["special"], data.get("add_missing", False), str(data.get("about", "")))
