"""The Evaluate tab: pick an artifact under the root, give a suite (a suite file and/or the EvalSpec
fields, generated from the schema), run `lmforge eval` in a subprocess, and read the results table from
the artifact's manifest while the log streams."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from lmforge.config.errors import ConfigError
from lmforge.webui.evaluate import EVAL_LOG, artifacts, checked_artifact, eval_fields, results, suite_text
from lmforge.webui.forms import one_line
from lmforge.webui.ui import Context, en, field_widgets
from lmforge.webui.watch import log_tail

COLUMNS = ["suite", "metric", "value"]


def eval_tab(ctx: Context) -> None:
    def artifact_choices():
        return gr.update(choices=artifacts(ctx.runs_root, ctx.root))

    def evaluate(artifact, suite_file, *values):
        try:
            folder = checked_artifact(artifact, ctx.rules)
            text = suite_text(suite_file, list(values), ctx.rules)
            ctx.evals.start(folder, text, ctx.root)
        except (ConfigError, RuntimeError, OSError) as error:  # RuntimeError: already being evaluated
            return f"⚠ {one_line(error)}"
        return f"evaluating {folder.relative_to(ctx.root)} (log: {EVAL_LOG} in that folder)"

    def eval_status(artifact):
        try:
            folder = checked_artifact(artifact, ctx.rules) if artifact else None
        except ConfigError:  # a half-typed name: nothing to show yet
            folder = None
        if folder is None:
            return pd.DataFrame([], columns=COLUMNS), "", ""
        state = ctx.evals.state(folder)
        return (pd.DataFrame(results(folder), columns=COLUMNS), f"**{state}**" if state else "",
                log_tail(folder / EVAL_LOG, ctx.root))

    with gr.Row():
        artifact = ctx.words(gr.Dropdown(artifacts(ctx.runs_root, ctx.root), label=en("eval_artifact"), value=None,
                                         allow_custom_value=True, elem_id="eval-artifact", scale=3),
                             label="eval_artifact")
        refresh = ctx.words(gr.Button(en("button.refresh"), scale=0), value="button.refresh")
        suite_file = ctx.words(gr.Textbox(label=en("eval_suite"), elem_id="eval-suite", scale=3), label="eval_suite")
    ctx.words(gr.Markdown("#### " + en("eval_files")), value=("#### " + en("eval_files"), "#### 评估数据与评判模型"))
    widgets = field_widgets(eval_fields(), ctx, collapsed=False)
    with gr.Row():
        run_button = ctx.words(gr.Button(en("button.evaluate"), variant="primary", elem_id="eval-run"),
                               value="button.evaluate")
        state = gr.Markdown(elem_id="eval-state")
    message = gr.Markdown(elem_id="eval-message")
    table = ctx.words(gr.Dataframe(pd.DataFrame([], columns=COLUMNS), label=en("eval_results"),
                                   elem_id="eval-results"), label="eval_results")
    log = ctx.words(gr.Textbox(label=en("eval_log"), lines=10, max_lines=10, autoscroll=True, elem_id="eval-log"),
                    label="eval_log")
    refresh.click(artifact_choices, None, artifact)
    run_button.click(evaluate, [artifact, suite_file, *widgets], message)
    gr.Timer(2.0).tick(eval_status, artifact, [table, state, log])
    artifact.change(eval_status, artifact, [table, state, log])
