"""The Runs tab (the table, one chart per metric, progress and ETA, the live log, Stop/Resume/Report) and
the Pipeline tab (load, save, run a pipeline YAML; its stages' states)."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from lmforge.config.errors import ConfigError
from lmforge.webui.confine import check_pipeline_text, check_stage_text, inside
from lmforge.webui.forms import checked_path, one_line, read_config
from lmforge.webui.runs import (
    LOG,
    MANIFEST,
    UI_CONFIG,
    list_runs,
    pipeline_stages,
    recorded_config,
    report_for,
    run_info,
)
from lmforge.webui.saving import save_pipeline as save_checked
from lmforge.webui.ui import Context, en
from lmforge.webui.watch import (
    curves_svg,
    log_tail,
    logged_total,
    metric_series,
    progress_line,
    read_metrics,
    total_steps,
)

FRESH_SECONDS = 120
"""A run not started here counts as running while its metrics.jsonl changed this recently."""


def watch_run(ctx: Context, run: Path) -> tuple[str, str, str]:
    """(charts, progress line, log tail) of one run folder."""
    rows = read_metrics(run)
    step = max((row["step"] for row in rows), default=0)
    status = ctx.launcher.state(run)
    if status is None:
        metrics = run / "metrics.jsonl"
        fresh = metrics.is_file() and time.time() - metrics.stat().st_mtime < FRESH_SECONDS
        status = "done" if (run / MANIFEST).is_file() else "running" if fresh else \
            run_info(run, ctx.runs_root.resolve(), ctx.launcher).status
    rate = ctx.progress.observe(run, step) if status == "running" else None
    line = progress_line(step, total_steps(rows, recorded_config(run), logged_total(run / LOG, ctx.root)), rate, status)
    return curves_svg(metric_series(rows)), line, log_tail(run / LOG, ctx.root)


def runs_tab(ctx: Context) -> None:
    root, runs_root, rules, launcher = ctx.root, ctx.runs_root, ctx.rules, ctx.launcher

    def runs_table():
        rows = [[r.name, r.stage, r.status, r.step, None if r.loss is None else round(r.loss, 4)]
                for r in list_runs(runs_root, launcher)]
        return pd.DataFrame(rows, columns=["run", "stage", "status", "step", "loss"])

    def run_curves(name):
        try:
            run = (runs_root / checked_path(name, runs_root)).resolve() if name else None
        except ConfigError:  # a half-typed or refused name: nothing shown rather than an error every tick
            run = None
        if run is None or not run.is_dir():
            return curves_svg({}), "", ""
        return watch_run(ctx, run)

    def stop_run(name):
        try:
            return "stopped" if name and launcher.stop(runs_root / checked_path(name, runs_root)) else "not running"
        except ConfigError as error:
            return f"⚠ {one_line(error)}"

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
            return f"⚠ {one_line(error)}"
        return "resumed"

    def open_report(name):
        try:
            report = report_for(runs_root / checked_path(name, runs_root)) if name else None
        except ConfigError as error:
            return None, f"⚠ {one_line(error)}"
        return (str(report), "") if report else (None, "no report.html for this run (pipelines write one)")

    ctx.words(gr.Dataframe(runs_table, every=2.0, label=en("runs_table"), elem_id="runs-table"), label="runs_table")
    run_name = ctx.words(gr.Textbox(label=en("run_name"), elem_id="run-name"), label="run_name")
    progress = gr.Markdown(elem_id="run-progress")
    plot = ctx.words(gr.HTML(label=en("curves"), elem_id="curves"), label="curves")
    log = ctx.words(gr.Textbox(label=en("log_tail"), lines=12, max_lines=12, autoscroll=True, elem_id="run-log"),
                    label="log_tail")
    gr.Timer(2.0).tick(run_curves, run_name, [plot, progress, log])
    run_name.change(run_curves, run_name, [plot, progress, log])
    with gr.Row():
        stop_button = ctx.words(gr.Button(en("button.stop")), value="button.stop")
        resume_button = ctx.words(gr.Button(en("button.resume")), value="button.resume")
        report_button = ctx.words(gr.Button(en("button.report")), value="button.report")
    run_message = gr.Markdown()
    report_file = ctx.words(gr.File(label=en("report_file")), label="report_file")
    report_button.click(open_report, run_name, [report_file, run_message])
    stop_button.click(stop_run, run_name, run_message)
    resume_button.click(resume_run, run_name, run_message)


def pipeline_tab(ctx: Context) -> None:
    root, rules, launcher = ctx.root, ctx.rules, ctx.launcher

    def read_pipeline(path):
        try:
            return read_config(root / checked_path(path, root)), ""
        except ConfigError as error:
            return gr.update(), f"⚠ {one_line(error)}"

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

    with gr.Row():
        pipeline_path = ctx.words(gr.Textbox(label=en("pipeline_path"), elem_id="pipeline-path"), label="pipeline_path")
        load_button = ctx.words(gr.Button(en("button.load_pipeline")), value="button.load_pipeline")
        save_button = ctx.words(gr.Button(en("button.save")), value="button.save")
        run_button = ctx.words(gr.Button(en("button.run"), variant="primary"), value="button.run")
    message = gr.Markdown(elem_id="pipeline-message")
    text = ctx.words(gr.Code(language="yaml", interactive=True, label=en("pipeline_text")), label="pipeline_text")
    stages = ctx.words(gr.Dataframe(label=en("pipeline_stages"), elem_id="pipeline-stages"), label="pipeline_stages")
    gr.Timer(2.0).tick(pipeline_table, pipeline_path, stages)
    load_button.click(read_pipeline, pipeline_path, [text, message])
    save_button.click(save_pipeline, [pipeline_path, text], message)
    run_button.click(run_pipeline, pipeline_path, message)

