"""The Train tab: the common fields up front, every other config field of the schema in collapsed groups,
Preview, Show YAML, Load YAML and Start (`lmforge train` in a subprocess)."""

from __future__ import annotations

import html

import gradio as gr

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DPO_LOSSES, STAGES
from lmforge.config.templates import template_names
from lmforge.webui.confine import check_stage
from lmforge.webui.forms import (
    FORM_FIELDS,
    METHODS,
    TrainForm,
    config_to_form,
    form_to_config,
    from_yaml,
    grouped_fields,
    one_line,
    read_form,
    to_yaml,
    validate,
)
from lmforge.webui.schema_fields import to_widget
from lmforge.webui.ui import Context, en, field_widgets


def train_tab(ctx: Context) -> None:
    grouped = grouped_fields()

    def checked_form(*values) -> dict:
        """The form's config, read through the schema and the run checks (the data behind dataset_info.json
        entries included)."""
        config = form_to_config(read_form(list(values)), ctx.root)
        check_stage(validate(config), ctx.rules, "the form")
        return config

    def make_yaml(*values):
        try:
            return to_yaml(checked_form(*values)), ""
        except ConfigError as error:
            return gr.update(), f"⚠ {one_line(error)}"

    def load_yaml(text):
        try:  # read through the schema first: the form's widgets then get values of their types
            config = from_yaml(text)
            validate(config)
            form = config_to_form(config)
        except ConfigError as error:
            return [gr.update()] * (len(FORM_FIELDS) + len(grouped)) + [f"⚠ {one_line(error)}"]
        return ([getattr(form, name) for name in FORM_FIELDS]
                + [to_widget(spec, form.extra.get(spec.key, spec.default)) for spec in grouped]
                + ["loaded into the form"])

    def preview(*values):
        from lmforge.webui.preview import preview_html

        try:
            return preview_html(checked_form(*values), ctx.root)
        except (ConfigError, FileNotFoundError, ValueError, OSError) as error:
            return f"<p>⚠ {html.escape(one_line(error))}</p>"

    def start(*values):
        try:
            config = checked_form(*values)
            out = ctx.launcher.start(config["stage"], to_yaml(config), ctx.root / config["train"]["output_dir"],
                                     ctx.root)
        except (ConfigError, RuntimeError, OSError) as error:  # RuntimeError: that folder is training already
            return f"⚠ {one_line(error)}"
        return f"started: {out.relative_to(ctx.root)} (log: webui-train.log in that folder)"

    common = _common_fields(ctx)
    widgets = field_widgets(grouped, ctx)
    inputs = [common[name] for name in FORM_FIELDS] + widgets
    with gr.Row():
        preview_button = ctx.words(gr.Button(en("button.preview")), value="button.preview")
        yaml_button = ctx.words(gr.Button(en("button.yaml")), value="button.yaml")
        load_button = ctx.words(gr.Button(en("button.load")), value="button.load")
        start_button = ctx.words(gr.Button(en("button.start"), variant="primary"), value="button.start")
    message = gr.Markdown(elem_id="train-message")
    config_yaml = ctx.words(gr.Code(language="yaml", label=en("config_yaml"), interactive=True, elem_id="config-yaml"),
                            label="config_yaml")
    preview_box = gr.HTML(elem_id="preview")
    preview_button.click(preview, inputs, preview_box)
    yaml_button.click(make_yaml, inputs, [config_yaml, message])
    load_button.click(load_yaml, config_yaml, inputs + [message])
    start_button.click(start, inputs, message)


def _common_fields(ctx: Context) -> dict:
    """The up-front fields, laid out in rows; by TrainForm field name."""
    defaults, made = TrainForm(), {}

    def add(name, widget, info: str | None = None):
        made[name] = ctx.words(widget, label=name, **({"info": info} if info else {}))

    with gr.Row():
        add("stage", gr.Dropdown(list(STAGES), value=defaults.stage, label=en("stage")))
        add("model", gr.Textbox(defaults.model, label=en("model"), scale=2))
        add("tokenizer", gr.Textbox(defaults.tokenizer, label=en("tokenizer")))
        add("template", gr.Dropdown(list(template_names()), value=defaults.template, label=en("template"),
                                    allow_custom_value=True,  # a .jinja file under --root, loaded from a YAML
                                    info=en("help.template"), elem_id="template"), "help.template")
    with gr.Row():
        add("data", gr.Textbox(defaults.data, scale=3, label=en("data"), info=en("help.data")), "help.data")
        add("dataset_dir", gr.Textbox(defaults.dataset_dir, label=en("dataset_dir")))
    with gr.Row():
        add("method", gr.Dropdown(METHODS, value=defaults.method, label=en("method"), info=en("help.method")),
            "help.method")
        add("lr", gr.Number(defaults.lr, label=en("lr")))
        add("epochs", gr.Number(defaults.epochs, label=en("epochs")))
        add("max_steps", gr.Number(defaults.max_steps, label=en("max_steps"), precision=0, info=en("help.max_steps")),
            "help.max_steps")
    with gr.Row():
        add("batch_size", gr.Number(defaults.batch_size, label=en("batch_size"), precision=0))
        add("max_length", gr.Number(defaults.max_length, label=en("max_length"), precision=0))
        add("lora_r", gr.Number(defaults.lora_r, label=en("lora_r"), precision=0))
        add("dpo_loss", gr.Dropdown(list(DPO_LOSSES), value=defaults.dpo_loss, label=en("dpo_loss")))
    with gr.Row():
        add("output_dir", gr.Textbox(defaults.output_dir, label=en("output_dir")))
        add("seed", gr.Number(defaults.seed, label=en("seed"), precision=0))
    return made
