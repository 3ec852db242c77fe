"""What the tabs share: the served folders, the process launchers, and the words of every component (so the
language switch relabels them all at once), plus the widgets of schema-generated fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from lmforge.webui.confine import Rules
from lmforge.webui.evaluate import EvalLauncher
from lmforge.webui.i18n import HELP_ZH, LANGUAGES, TEXTS, text
from lmforge.webui.runs import Launcher
from lmforge.webui.schema_fields import TRISTATE, FormField, to_widget
from lmforge.webui.watch import Progress

Words = tuple[str, str]
"""(English, Chinese)."""


@dataclass
class Context:
    root: Path
    runs_root: Path
    rules: Rules
    launcher: Launcher = field(default_factory=Launcher)
    progress: Progress = field(default_factory=Progress)
    evals: EvalLauncher | None = None
    labelled: list[tuple[gr.components.Component | gr.blocks.BlockContext, dict[str, Words]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.evals = EvalLauncher(self.launcher)

    def words(self, component, **keys: str | Words):
        """Register `component`'s label/info/value words (a TEXTS key or an (English, Chinese) pair)."""
        self.labelled.append((component, {attr: TEXTS[k] if isinstance(k, str) else k for attr, k in keys.items()}))
        return component

    def relabel(self, language: str) -> list:
        """An update per registered component: its words in `language`."""
        chinese = language == LANGUAGES[1]
        return [gr.update(**{attr: pair[1] if chinese else pair[0] for attr, pair in keys.items()})
                for _, keys in self.labelled]

    @property
    def components(self) -> list:
        return [component for component, _ in self.labelled]


def en(key: str) -> str:
    return text(key)


def field_widget(spec: FormField, ctx: Context):
    """The widget of one schema field: its config key as the label, its docstring (and range) as help."""
    common = {"label": spec.name, "info": spec.help or None, "elem_id": "field-" + spec.key.replace(".", "-")}
    value = to_widget(spec, spec.default)
    if spec.kind == "bool":
        widget = gr.Checkbox(value=value, **common)
    elif spec.kind == "tristate":
        widget = gr.Dropdown(list(TRISTATE), value=value, **common)
    elif spec.kind in ("choice", "multichoice"):
        widget = gr.Dropdown(list(spec.choices), value=value, multiselect=spec.kind == "multichoice",
                             allow_custom_value=True, **common)
    elif spec.kind in ("int", "float"):
        widget = gr.Number(value=value, precision=0 if spec.kind == "int" else None, **common)
    else:
        widget = gr.Textbox(value=value, **common)
    if spec.help:
        ctx.words(widget, info=(spec.help, HELP_ZH.get(spec.key, spec.help)))
    return widget


def field_widgets(specs: list[FormField], ctx: Context, collapsed: bool = True, per_row: int = 4) -> list:
    """Widgets for `specs` in schema order; grouped in collapsed accordions by config group."""
    widgets, groups = [], {}
    for spec in specs:
        groups.setdefault(spec.group, []).append(spec)
    for group, members in groups.items():
        title = TEXTS.get(f"group.{group}") or ((group, group) if group else TEXTS["group.other"])
        box = gr.Accordion(title[0], open=False, elem_id=f"group-{group or 'other'}") if collapsed else gr.Column()
        if collapsed:
            ctx.words(box, label=title)
        with box:
            for start in range(0, len(members), per_row):
                with gr.Row():
                    widgets += [field_widget(spec, ctx) for spec in members[start:start + per_row]]
    return widgets
