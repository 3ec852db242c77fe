"""`lmforge report RUN_DIR`: the pipeline run as one self-contained HTML page (`RUN_DIR/report.html`):
the stage graph, every evaluation metric before and after each stage, training curves, sample
answers side by side and timings. Figures are embedded as base64 PNG; nothing is fetched.

Read from the run folder: `run.json` (the runner's record), `pipeline.yaml`, and per stage
`<name>/lmforge.json` (its manifest, with the pipeline's evaluation under "eval") and
`<name>/metrics.jsonl`. A stage that failed or never ran has no manifest and still shows.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from lmforge.report import plots

# File names fixed by the pipeline runner (kept here so the report does not import the training stack).
RUN_STATE = "run.json"
MANIFEST = "lmforge.json"
METRICS = "metrics.jsonl"
PIPELINE = "pipeline.yaml"
REPORT = "report.html"
START = "start"
"""The column of the evaluation before any training (run.json's optional `start_eval`)."""

LOWER_IS_BETTER = ("perplexity", "kl")
NO_BEST = ("length", "eval_tokens")
"""Descriptive numbers where neither direction is better."""
RATE_WORDS = ("match", "accuracy", "rate", "contains")
METRIC_ORDER = ("perplexity", "exact_match", "contains", "choice_accuracy", "rm_accuracy", "rm_margin", "reward",
                "kl", "win_rate", "gt_win_rate")
SUMMARY_METRICS = {
    "pt": ("perplexity", "exact_match"),
    "sft": ("exact_match", "perplexity", "contains", "choice_accuracy"),
    "rm": ("rm_accuracy", "rm_margin"),
    "dpo": ("reward", "win_rate", "kl", "exact_match"),
}
SUMMARY_METRICS["ppo"] = SUMMARY_METRICS["grpo"] = SUMMARY_METRICS["rloo"] = SUMMARY_METRICS["dpo"]

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", "Microsoft YaHei",
       sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f3f5f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #dff0d8; font-weight: bold; }
td.text { white-space: pre-wrap; max-width: 320px; }
.meta td { border: none; padding: 1px 12px 1px 0; }
.status { padding: 1px 6px; border-radius: 3px; }
img { max-width: 100%; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 13px; }
.note { color: #666; font-size: 13px; }
"""


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a metrics file; a line that is not one (cut short by a crash) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_run(run_dir: str | Path) -> dict:
    """run.json, with each stage entry given its `manifest` (or None) and its metrics lines (`rows`)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_STATE).is_file():
        raise FileNotFoundError(f"{run_dir}: no {RUN_STATE}, so it is not a pipeline run folder "
                                "(lmforge run PIPELINE.yaml writes one)")
    run = json.loads((run_dir / RUN_STATE).read_text(encoding="utf-8"))
    run["stages"] = [{**entry, "manifest": _read_json(run_dir / entry["name"] / MANIFEST),
                      "rows": read_jsonl(run_dir / entry["name"] / METRICS)} for entry in run.get("stages", [])]
    return run


def _eval_of(stage: dict) -> dict:
    return ((stage.get("manifest") or {}).get("eval") or {})


def _numbers(metrics: dict | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_columns(run: dict) -> list[tuple[str, dict[str, float]]]:
    """(column label, numeric evaluation metrics): the start (when evaluated), then every stage."""
    columns = []
    if run.get("start_eval"):
        columns.append((START, _numbers(run["start_eval"].get("metrics"))))
    return columns + [(s["name"], _numbers(_eval_of(s).get("metrics"))) for s in run["stages"]]


def metric_names(columns: list[tuple[str, dict]]) -> list[str]:
    """Known metrics in a fixed order, then the others in the order they first appear."""
    seen = list(dict.fromkeys(name for _, metrics in columns for name in metrics))
    return [n for n in METRIC_ORDER if n in seen] + [n for n in seen if n not in METRIC_ORDER]


def is_rate(name: str) -> bool:
    return any(word in name for word in RATE_WORDS)


def format_number(value: float) -> str:
    """Three significant digits, trailing zeros kept (3.10, 0.432, 58.2); whole numbers above 100 plain."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def format_metric(name: str, value: float) -> str:
    return f"{100 * value:.1f}%" if is_rate(name) and math.isfinite(value) else format_number(value)


def best_columns(name: str, values: list[float | None]) -> set[int]:
    """Indices of the best value in a row (every one, on a tie); none when fewer than two to compare."""
    present = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(present) < 2 or name in NO_BEST or name.endswith("ties"):
        return set()
    lower = name in LOWER_IS_BETTER or name.endswith("losses")
    best = (min if lower else max)(v for _, v in present)
    return {i for i, v in present if v == best}


def _esc(value) -> str:
    return html.escape(str(value))


def metrics_table(columns: list[tuple[str, dict[str, float]]]) -> str:
    names = metric_names(columns)
    if not names:
        return '<p class="note">No stage has evaluation results (the pipeline has no <code>eval:</code> block, ' \
               "or no stage finished).</p>"
    head = "".join(f"<th>{_esc(label)}</th>" for label, _ in columns)
    body = []
    for name in names:
        values = [metrics.get(name) for _, metrics in columns]
        best = best_columns(name, values)
        cells = "".join(
            "<td></td>" if v is None else
            f'<td class="num{" best" if i in best else ""}">{_esc(format_metric(name, v))}</td>'
            for i, v in enumerate(values))
        body.append(f"<tr><th>{_esc(name)}</th>{cells}</tr>")
    direction = ", ".join(LOWER_IS_BETTER)
    return (f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"
            f'<p class="note">Best value of each row in bold (lower is better for {direction}; '
            "higher for the rest).</p>")


def samples_table(run: dict) -> str:
    """One row per held-out prompt (by id, in the first column's order): prompt, reference, each reply."""
    columns = []
    if run.get("start_eval") and run["start_eval"].get("samples"):
        columns.append((START, run["start_eval"]["samples"]))
    columns += [(s["name"], _eval_of(s)["samples"]) for s in run["stages"] if _eval_of(s).get("samples")]
    if not columns:
        return '<p class="note">No sample answers were recorded.</p>'
    replies = [{str(sample.get("id", i)): sample for i, sample in enumerate(samples) if isinstance(sample, dict)}
               for _, samples in columns]
    ids = list(replies[0])
    head = "".join(f"<th>{_esc(label)}</th>" for label, _ in columns)
    body = []
    for sample_id in ids:
        first = replies[0][sample_id]
        cells = "".join(f'<td class="text">{_esc(by_id[sample_id].get("reply", ""))}</td>' if sample_id in by_id
                        else "<td></td>" for by_id in replies)
        body.append(f'<tr><td class="text">{_esc(first.get("prompt", ""))}</td>'
                    f'<td class="text">{_esc(first.get("reference", ""))}</td>{cells}</tr>')
    return f"<table><tr><th>prompt</th><th>reference</th>{head}</tr>{''.join(body)}</table>"


CUT_NAMES = ("prompt_cut", "reply_cut", "turns_dropped", "dropped_no_room")
"""The kinds of truncation a stage's manifest counts per file (lmforge.data.errors.CUT_KINDS)."""


def data_rows(stage: dict) -> list[dict]:
    """One row per data file the stage read, from its manifest's data.by_file: file, read, kept, skipped
    with reasons, cut by kind."""
    by_file = ((stage.get("manifest") or {}).get("data") or {}).get("by_file") or {}
    rows = []
    for name, counts in by_file.items():
        reasons = ", ".join(f"{n} {r}" for r, n in (counts.get("skipped_by_reason") or {}).items())
        cut = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in CUT_NAMES if counts.get(k))
        rows.append({"file": name, "read": counts.get("read", 0), "kept": counts.get("kept", 0),
                     "skipped": counts.get("skipped", 0), "reasons": reasons, "cut": cut})
    return rows


def data_section(run: dict) -> str:
    """Each stage's data counts: a stage that trained on half its data must not look like one that
    trained on all of it."""
    body = []
    for stage in run["stages"]:
        rows = data_rows(stage)
        if not rows:
            note = "no manifest (not finished)" if stage.get("manifest") is None else "no per-file counts recorded"
            body.append(f'<tr><td>{_esc(stage["name"])}</td><td colspan="5" class="note">{note}</td></tr>')
        for row in rows:
            kept_share = row["kept"] / row["read"] if row["read"] else 1.0
            mark = ' class="num best"' if kept_share == 1.0 else ' class="num"'
            skipped = f"{row['skipped']}" + (f" ({_esc(row['reasons'])})" if row["reasons"] else "")
            body.append(f'<tr><td>{_esc(stage["name"])}</td><td>{_esc(row["file"])}</td>'
                        f'<td class="num">{row["read"]}</td><td{mark}>{row["kept"]} ({kept_share:.0%})</td>'
                        f"<td>{skipped}</td><td>{_esc(row['cut'])}</td></tr>")
    return ("<table><tr><th>stage</th><th>file</th><th>read</th><th>kept</th><th>skipped</th><th>cut to max_length"
            f"</th></tr>{''.join(body)}</table>")


def _image(fig, alt: str) -> str:
    return f'<p><img alt="{_esc(alt)}" src="{plots.png_data_uri(fig)}"></p>'


def curves_section(run: dict) -> str:
    figures = []
    for stage in run["stages"]:
        fig = plots.stage_curves(stage["name"], stage.get("stage", ""), stage["rows"])
        if fig is not None:
            figures.append(_image(fig, f"training curves of {stage['name']}"))
    return "".join(figures) or f'<p class="note">No stage has curves in its {METRICS}.</p>'


def _stage_total(stage: dict) -> float:
    return float(stage.get("seconds") or 0.0) + float(stage.get("eval_seconds") or 0.0)


def timings_section(run: dict) -> str:
    prepare = {k: float(v or 0.0) for k, v in (run.get("prepare") or {}).items()}
    total = float(run.get("seconds") or 0.0)
    rows = "".join(f"<tr><td>prepare: {_esc(step)}</td><td></td><td></td>"
                   f'<td class="num">{seconds:.1f}</td><td></td><td class="num">{seconds:.1f}</td></tr>'
                   for step, seconds in prepare.items())
    for stage in run["stages"]:
        status = str(stage.get("status", "?"))
        colour = plots.STATUS_COLOURS.get(status, plots.UNKNOWN_STATUS_COLOUR)
        rows += (f"<tr><td>{_esc(stage['name'])}</td><td>{_esc(stage.get('stage', ''))}</td>"
                 f'<td><span class="status" style="background:{colour}">{_esc(status)}</span></td>'
                 f'<td class="num">{float(stage.get("seconds") or 0.0):.1f}</td>'
                 f'<td class="num">{float(stage.get("eval_seconds") or 0.0):.1f}</td>'
                 f'<td class="num">{_stage_total(stage):.1f}</td></tr>')
    table = ("<table><tr><th>step</th><th>kind</th><th>status</th><th>training s</th><th>evaluation s</th>"
             f"<th>total s</th></tr>{rows}<tr><th>total</th><td></td><td></td><td></td><td></td>"
             f'<th class="num">{total:.1f}</th></tr></table>')
    return _image(plots.timings_chart(run["stages"], prepare, total), "seconds per stage") + table


def header(run: dict, run_dir: Path) -> str:
    pipeline_path = run_dir / PIPELINE
    resolved = (f'<a href="{PIPELINE}">{PIPELINE}</a>' if pipeline_path.is_file()
                else f'<span class="note">no {PIPELINE} in the run folder</span>')
    meta = [("run folder", _esc(run_dir)), ("pipeline", _esc(run.get("pipeline", "?"))),
            ("resolved pipeline", resolved), ("started", _esc(run.get("started", "?"))),
            ("total time", f"{float(run.get('seconds') or 0.0):.1f}s")]
    rows = "".join(f"<tr><td><b>{key}</b></td><td>{value}</td></tr>" for key, value in meta)
    text = ""
    if pipeline_path.is_file():
        text = (f"<details><summary>{PIPELINE} (as it ran)</summary>"
                f"<pre>{_esc(pipeline_path.read_text(encoding='utf-8', errors='replace'))}</pre></details>")
    return f'<h1>lmforge run: {_esc(run_dir.name or run_dir)}</h1><table class="meta">{rows}</table>{text}'


def render(run: dict, run_dir: Path) -> str:
    graph = _image(plots.pipeline_graph(run["stages"]), "pipeline graph")
    sections = [("Pipeline", graph), ("Evaluation before and after each stage", metrics_table(eval_columns(run))),
                ("Data read, kept, skipped and cut", data_section(run)),
                ("Training curves", curves_section(run)), ("Sample answers", samples_table(run)),
                ("Timings", timings_section(run))]
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lmforge report: {_esc(run_dir)}</title><style>{CSS}</style></head>"
            f"<body>{header(run, run_dir)}{body}</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html and return its path."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    path = run_dir / REPORT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(run, run_dir), encoding="utf-8")
    tmp.replace(path)  # a browser open on the old report never sees half a page
    return path


def _key_metrics(stage: dict) -> list[tuple[str, float]]:
    metrics = _numbers(_eval_of(stage).get("metrics"))
    wanted = [n for n in SUMMARY_METRICS.get(stage.get("stage", ""), ()) if n in metrics]
    return [(n, metrics[n]) for n in (wanted or metric_names([("", metrics)])[:3])]


def summary_lines(run_dir: str | Path) -> list[str]:
    """One line per stage (name, kind, status, seconds with evaluation, key metrics), then the total."""
    run = load_run(run_dir)
    stages = run["stages"]
    name_width = max((len(s["name"]) for s in stages), default=0)
    kind_width = max((len(str(s.get("stage", ""))) for s in stages), default=0)
    lines = []
    for stage in stages:
        metrics = "  ".join(f"{name} {format_number(value)}" for name, value in _key_metrics(stage))
        data = data_rows(stage)
        read, kept = sum(r["read"] for r in data), sum(r["kept"] for r in data)
        if read > kept:  # a stage that did not train on all it read says so in the summary too
            metrics += f"  data {kept}/{read} kept"
        line = (f"{stage['name']:<{name_width}}  {stage.get('stage', ''):<{kind_width}}  "
                f"{stage.get('status', '?'):<7}  {_stage_total(stage):>7.1f}s  {metrics}")
        note = f"  ({stage['note']})" if stage.get("note") and stage.get("status") != "done" else ""
        lines.append(line.rstrip() + note)
    prepare = sum(float(v or 0.0) for v in (run.get("prepare") or {}).values())
    total = f"total {float(run.get('seconds') or 0.0):.1f}s"
    lines.append(f"{total} (preparation {prepare:.1f}s)" if prepare else total)
    return lines
