"""The Gradio app: Train (form, preview, YAML, start), Runs (status and live curves, stop, resume,
report), Chat (one or two models side by side, streamed) and Export. Everything it runs is the CLI's
own code; a training run is `lmforge train` in a subprocess, identical to one started from a shell."""

from __future__ import annotations

import html
import os
from dataclasses import fields
from pathlib import Path

import gradio as gr
import pandas as pd
from starlette.middleware import Middleware

from lmforge.config.schema import STAGES, ConfigError
from lmforge.models.load import SHORT_NAMES
from lmforge.webui.confine import (
    Rules,
    check_pipeline_text,
    check_stage,
    check_stage_text,
    inside,
    owned_output,
)
from lmforge.webui.forms import (
    DPO_LOSSES,
    MAX_CONFIG_BYTES,
    METHODS,
    TrainForm,
    checked_path,
    config_to_form,
    form_to_config,
    from_yaml,
    preview_html,
    to_yaml,
    validate,
)
from lmforge.webui.hosts import HostGuard, allowed_names, check_exposure, login
from lmforge.webui.runs import UI_CONFIG, Launcher, curves, list_runs, pipeline_stages, report_for
from lmforge.webui.saving import save_pipeline as save_checked

FORM_FIELDS = [f.name for f in fields(TrainForm)]


def build_app(root: Path, runs_root: Path, allow_code: bool = False) -> gr.Blocks:
    """The app for the files under `root`; `allow_code` lets configs run code shipped with models (and reward
    functions), which only `lmforge webui --allow-remote-code` turns on."""
    root, launcher = root.resolve(), Launcher()
    rules = Rules(root, allow_code)
    runs_root = (root / runs_root).resolve() if not runs_root.is_absolute() else runs_root
    models: dict[str, tuple] = {}

    def read_form(*values) -> TrainForm:
        return TrainForm(**dict(zip(FORM_FIELDS, values)))

    def checked_form(*values) -> dict:
        """The form's config, read through the schema and the run checks (the data behind dataset_info.json
        entries included)."""
        config = form_to_config(read_form(*values), root)
        check_stage(validate(config), rules, "the form")
        return config

    def make_yaml(*values):
        try:
            return to_yaml(checked_form(*values)), ""
        except ConfigError as error:
            return gr.update(), f"⚠ {error}"

    def load_yaml(text):
        try:
            form = config_to_form(from_yaml(text))
        except ConfigError as error:
            return [gr.update()] * len(FORM_FIELDS) + [f"⚠ {error}"]
        return [getattr(form, name) for name in FORM_FIELDS] + ["loaded into the form"]

    def preview(*values):
        try:
            return preview_html(checked_form(*values), root)
        except (ConfigError, FileNotFoundError, ValueError, OSError) as error:
            return f"<p>⚠ {html.escape(one_line(error))}</p>"

    def start(*values):
        try:
            config = checked_form(*values)
            out = launcher.start(config["stage"], to_yaml(config), root / config["train"]["output_dir"], root)
        except (ConfigError, RuntimeError, OSError) as error:  # RuntimeError: that folder is training already
            return f"⚠ {one_line(error)}"
        return f"started: {out.relative_to(root)} (log: webui-train.log in that folder)"

    def runs_table():
        rows = [[r.name, r.stage, r.status, r.step, None if r.loss is None else round(r.loss, 4)]
                for r in list_runs(runs_root, launcher)]
        return pd.DataFrame(rows, columns=["run", "stage", "status", "step", "loss"])

    def run_curves(name):
        try:
            points = curves(runs_root / checked_path(name, runs_root)) if name else []
        except ConfigError:  # a half-typed or refused name: no curves rather than an error every tick
            points = []
        return pd.DataFrame(points, columns=["step", "metric", "value"])

    def stop_run(name):
        try:
            return "stopped" if name and launcher.stop(runs_root / checked_path(name, runs_root)) else "not running"
        except ConfigError as error:
            return f"⚠ {error}"

    def resume_run(name):
        """Resume what the run's webui-config.yaml says now, checked as it is read: the file may have changed
        since the run started here."""
        try:
            run = (runs_root / checked_path(name, runs_root)).resolve()
            inside(str(run), rules, "run")
            config = run / UI_CONFIG
            if not config.is_file():
                return "only runs started here can be resumed here (use `lmforge train ... train.resume=true`)"
            text = read_config(config)
            cfg = check_stage_text(text, rules, f"{run.relative_to(root)}/{UI_CONFIG}")
            if (root / cfg.train.output_dir).resolve() != run:
                raise ConfigError(f"{run.relative_to(root)}/{UI_CONFIG}: train.output_dir is {cfg.train.output_dir}, "
                                  "not this run's folder; start it from the Train tab instead")
            launcher.start(cfg.stage, text, run, root, resume=True)
        except (ConfigError, RuntimeError) as error:
            return f"⚠ {error}"
        return "resumed"

    def open_report(name):
        try:
            report = report_for(runs_root / checked_path(name, runs_root)) if name else None
        except ConfigError as error:
            return None, f"⚠ {error}"
        return (str(report), "") if report else (None, "no report.html for this run (pipelines write one)")

    def read_pipeline(path):
        try:
            return read_config(root / checked_path(path, root)), ""
        except ConfigError as error:
            return gr.update(), f"⚠ {error}"

    def save_pipeline(path, text):
        try:
            return f"saved {save_checked(path, text, rules)}"
        except (ConfigError, OSError) as error:  # OSError: a full disk, a folder that went away
            return f"⚠ {one_line(error)}"

    def run_pipeline(path):
        """Run the pipeline file as it is now: read once, checked, and that text run (never the file again)."""
        try:
            pipeline_file = root / checked_path(path, root)
            text = read_config(pipeline_file)
            check_pipeline_text(text, rules, str(pipeline_file.relative_to(root)))
            key = launcher.start_pipeline(pipeline_file, root, text)
        except (ConfigError, RuntimeError, OSError) as error:
            return f"⚠ {one_line(error)}"
        return f"running {key.relative_to(root)} (log beside it)"

    def pipeline_table(path):
        columns = ["stage", "kind", "status", "seconds"]
        try:
            rows = pipeline_stages(root / checked_path(path, root), root) if path else []
        except (ConfigError, FileNotFoundError):
            rows = []
        return pd.DataFrame(rows, columns=columns)

    def load_model(path):
        from lmforge.models.load import load_for_inference

        path = path.strip()
        source = path if path in SHORT_NAMES else str(root / checked_path(path, root))
        if source not in models:  # loaded once, kept for the next message
            models[source] = load_for_inference(source)
        return models[source]

    def chat(message, history, model_path, temperature, max_new_tokens):
        from lmforge.generation.request import RequestError
        from lmforge.inference.chat import reply_stream

        try:
            model, tokenizer = load_model(model_path)
        except (ConfigError, OSError, ValueError) as error:  # a folder that holds no model transformers reads
            yield f"⚠ {one_line(error)}"
            return
        messages = [{"role": m["role"], "content": m["content"]} for m in history] + \
            [{"role": "user", "content": message}]
        text = ""
        try:
            for piece in reply_stream(model, tokenizer, messages, int(max_new_tokens), float(temperature), 0.9):
                text += piece
                yield text
        except (RequestError, ConfigError) as error:  # the conversation outgrew the model, or a bad setting
            yield f"{text}\n⚠ {one_line(error)} (clear the chat to start over)"
            return
        if not text.strip():  # an empty message would look like a hang: say what happened
            yield "(no reply: the model ended its turn at once)"

    def export(model_path, out, dtype, gguf):
        from lmforge.models.export import export_model

        try:
            target = export_model(str(root / checked_path(model_path, root)),
                                  owned_output(out, rules, "new folder"),
                                  dtype=None if dtype == "as loaded" else dtype, gguf=gguf)
        except (ConfigError, OSError, ValueError) as error:  # a folder that holds no model transformers reads
            return f"⚠ {one_line(error)}"
        return f"exported to {target.relative_to(root)}"

    with gr.Blocks(title="lmforge") as app:
        gr.Markdown(f"## lmforge\nServing files under `{root}`; runs under `{runs_root}`.")
        with gr.Tab("Train"):
            defaults = TrainForm()
            with gr.Row():
                stage = gr.Dropdown(list(STAGES), value=defaults.stage, label="stage")
                model = gr.Textbox(defaults.model, label="model (folder, GGUF, short name, artifact, scratch:PRESET)")
                tokenizer = gr.Textbox(defaults.tokenizer, label="tokenizer (scratch models)")
            with gr.Row():
                data = gr.Textbox(defaults.data, scale=3,
                                  label="datasets (files, folders, dataset_info.json entries; comma-separated)")
                dataset_dir = gr.Textbox(defaults.dataset_dir, label="dataset_info.json folder (for entries)")
            with gr.Row():
                method = gr.Dropdown(METHODS, value=defaults.method, label="method")
                lr = gr.Number(defaults.lr, label="learning rate")
                epochs = gr.Number(defaults.epochs, label="epochs")
                batch_size = gr.Number(defaults.batch_size, label="batch size", precision=0)
                max_length = gr.Number(defaults.max_length, label="max length", precision=0)
                lora_r = gr.Number(defaults.lora_r, label="LoRA rank", precision=0)
                dpo_loss = gr.Dropdown(DPO_LOSSES, value=defaults.dpo_loss, label="DPO loss")
            with gr.Row():
                output_dir = gr.Textbox(defaults.output_dir, label="output folder")
                seed = gr.Number(defaults.seed, label="seed", precision=0)
            inputs = [stage, model, tokenizer, data, dataset_dir, method, lr, epochs, batch_size, max_length, lora_r, dpo_loss,
                      output_dir, seed]
            with gr.Row():
                preview_button = gr.Button("Preview")
                yaml_button = gr.Button("Show YAML")
                load_button = gr.Button("Load YAML into the form")
                start_button = gr.Button("Start", variant="primary")
            message = gr.Markdown(elem_id="train-message")
            config_yaml = gr.Code(language="yaml", label="config (copy it, or paste one and load it)",
                                  interactive=True, elem_id="config-yaml")
            preview_box = gr.HTML(elem_id="preview")
            preview_button.click(preview, inputs, preview_box)
            yaml_button.click(make_yaml, inputs, [config_yaml, message])
            load_button.click(load_yaml, config_yaml, inputs + [message])
            start_button.click(start, inputs, message)
        with gr.Tab("Runs"):
            gr.Dataframe(runs_table, every=2.0, label="runs", elem_id="runs-table")
            run_name = gr.Textbox(label="run (as listed)", elem_id="run-name")
            plot = gr.LinePlot(x="step", y="value", color="metric", label="curves", elem_id="curves")
            gr.Timer(2.0).tick(run_curves, run_name, plot)
            with gr.Row():
                stop_button, resume_button = gr.Button("Stop"), gr.Button("Resume")
                report_button = gr.Button("Report")
            run_message = gr.Markdown()
            report_file = gr.File(label="HTML report (open or download)")
            report_button.click(open_report, run_name, [report_file, run_message])
            run_name.change(run_curves, run_name, plot)
            stop_button.click(stop_run, run_name, run_message)
            resume_button.click(resume_run, run_name, run_message)
        with gr.Tab("Pipeline"):
            with gr.Row():
                pipeline_path = gr.Textbox(label="pipeline YAML", elem_id="pipeline-path")
                load_pipeline_button = gr.Button("Load")
                save_pipeline_button = gr.Button("Save")
                run_pipeline_button = gr.Button("Run", variant="primary")
            pipeline_message = gr.Markdown(elem_id="pipeline-message")
            pipeline_text = gr.Code(language="yaml", interactive=True, label="pipeline")
            stages_table = gr.Dataframe(label="stages", elem_id="pipeline-stages")
            gr.Timer(2.0).tick(pipeline_table, pipeline_path, stages_table)
            load_pipeline_button.click(read_pipeline, pipeline_path, [pipeline_text, pipeline_message])
            save_pipeline_button.click(save_pipeline, [pipeline_path, pipeline_text], pipeline_message)
            run_pipeline_button.click(run_pipeline, pipeline_path, pipeline_message)
        with gr.Tab("Chat"):
            with gr.Row():
                temperature = gr.Slider(0, 1.5, value=0.7, label="temperature")
                max_new = gr.Slider(16, 1024, value=256, step=16, label="max new tokens")
            with gr.Row():  # two models side by side (say SFT and PPO), each with its own conversation
                for label in ("model or artifact", "second model (optional, to compare)"):
                    with gr.Column():
                        chat_model = gr.Textbox(label=label)
                        gr.ChatInterface(chat, additional_inputs=[chat_model, temperature, max_new])
        with gr.Tab("Export"):
            with gr.Row():
                export_model_path = gr.Textbox(label="model or artifact")
                export_out = gr.Textbox(label="new folder")
                export_dtype = gr.Dropdown(["as loaded", "fp32", "bf16", "fp16"], value="as loaded", label="dtype")
                export_gguf = gr.Checkbox(label="also GGUF")
            export_message = gr.Markdown()
            gr.Button("Export").click(export, [export_model_path, export_out, export_dtype, export_gguf],
                                      export_message)
    return app


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


def launch(root: str = ".", runs: str = "runs", host: str = "127.0.0.1", port: int = 7860,
           auth: str | None = None, allow_code: bool = False, allowed_hosts: list[str] | None = None) -> None:
    """Serve the app; refuses a non-loopback address without a login, answers only the Host names allowed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    credentials = login(auth)
    check_exposure(host, credentials)
    guard = Middleware(HostGuard, allowed=allowed_names(host, allowed_hosts))
    served = Path(root).resolve()
    # Gradio stores what any visitor uploads (its own route, though this app takes no upload) in this folder:
    # inside --root, a visitor could put any file (a .py, a config.json) where configs may point.
    uploads = Path(gr.utils.get_upload_folder()).resolve()
    if uploads == served or served in uploads.parents:
        raise ConfigError(f"--root {served} holds Gradio's upload folder {uploads}: serve a folder that does not "
                          "contain it, or set GRADIO_TEMP_DIR to a folder outside --root")
    # allowed_paths: the served folder's files (reports) may be downloaded, nothing else.
    build_app(served, Path(runs), allow_code).queue().launch(
        server_name=host, server_port=port, share=False, auth=credentials, allowed_paths=[str(served)],
        max_file_size="1mb", app_kwargs={"middleware": [guard]})


