"""The report's figures, drawn with matplotlib's object API (no pyplot: no global backend or figure
state, so drawing a report never touches the caller's matplotlib) and returned as PNG data URIs."""

from __future__ import annotations

import base64
import io
import math

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from matplotlib.ticker import FormatStrFormatter

STATUS_COLOURS = {"done": "#a5d6a7", "skipped": "#c5e1a5", "failed": "#ef9a9a", "running": "#ffe082",
                  "preempted": "#90caf9", "interrupted": "#90caf9", "pending": "#e0e0e0"}
UNKNOWN_STATUS_COLOUR = "#e0e0e0"

CURVE_KEYS = {
    "pt": ("loss", "eval_loss", "eval_ppl", "lr", "eval_exact_match"),
    "sft": ("loss", "eval_loss", "eval_ppl", "lr", "eval_exact_match"),
    "rm": ("loss", "eval_loss", "accuracy", "eval_accuracy", "margin", "eval_margin", "lr"),
    "dpo": ("loss", "eval_loss", "rewards/accuracy", "eval_rewards/accuracy", "rewards/margin",
            "eval_rewards/margin", "lr"),
    "ppo": ("reward", "eval_reward", "kl", "eval_kl", "entropy", "length", "eval_exact_match", "lr"),
}
CURVE_KEYS["grpo"] = CURVE_KEYS["rloo"] = CURVE_KEYS["ppo"]
DEFAULT_CURVE_KEYS = ("loss", "eval_loss", "lr")
"""Curves for a stage kind this module does not know."""

BOX_WIDTH, BOX_HEIGHT = 1.5, 0.62
COLUMN_GAP, ROW_GAP = 2.3, 1.1


def png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def graph_layout(stages: list[dict]) -> dict[str, tuple[int, int]]:
    """name -> (depth, row). Depth is 1 + the depth of `from`; a stage continues its parent's row
    unless a sibling already did, in which case it opens a new row below (sft → ppo, sft → dpo)."""
    place: dict[str, tuple[int, int]] = {}
    row_taken: set[str] = set()  # parents whose row a child already continues
    rows = 0
    for stage in stages:
        parent = stage.get("from")
        if parent in place and parent not in row_taken:
            row_taken.add(parent)
            place[stage["name"]] = (place[parent][0] + 1, place[parent][1])
            continue
        depth = place[parent][0] + 1 if parent in place else 0
        place[stage["name"]] = (depth, rows)
        rows += 1
    return place


def _centre(depth: int, row: int) -> tuple[float, float]:
    return depth * COLUMN_GAP, -row * ROW_GAP


def _edge_points(start: tuple[float, float], end: tuple[float, float]) -> tuple[tuple, tuple]:
    """Where an arrow between two boxes leaves the first and meets the second."""
    (x1, y1), (x2, y2) = start, end
    if abs(x1 - x2) < 1e-9:  # same column: from the bottom (or top) edge to the facing one
        sign = -1 if y2 < y1 else 1
        return (x1, y1 + sign * BOX_HEIGHT / 2), (x2, y2 - sign * BOX_HEIGHT / 2)
    sign = 1 if x2 > x1 else -1
    return (x1 + sign * BOX_WIDTH / 2, y1), (x2 - sign * BOX_WIDTH / 2, y2)


def _arrow(ax, start: tuple, end: tuple, dashed: bool) -> None:
    tail, head = _edge_points(start, end)
    rows_apart = abs(start[1] - end[1]) / ROW_GAP
    bend = 0.35 if dashed and rows_apart > 1.5 else 0.0  # keep a long dashed arrow off the boxes between
    ax.add_patch(FancyArrowPatch(tail, head, arrowstyle="-|>", mutation_scale=14, color="#455a64",
                                 linestyle="--" if dashed else "-", linewidth=1.4,
                                 connectionstyle=f"arc3,rad={bend}", zorder=1))


def pipeline_graph(stages: list[dict]) -> Figure:
    """One box per stage (name, kind, status colour); solid arrows for `from`, dashed for `reward_model`."""
    place = graph_layout(stages)
    columns = 1 + max((d for d, _ in place.values()), default=0)
    rows = 1 + max((r for _, r in place.values()), default=0)
    fig = Figure(figsize=(1.0 + 2.2 * columns, 0.9 + 1.05 * rows))
    ax = fig.add_subplot()
    centres = {name: _centre(*spot) for name, spot in place.items()}
    for stage in stages:
        x, y = centres[stage["name"]]
        colour = STATUS_COLOURS.get(stage.get("status"), UNKNOWN_STATUS_COLOUR)
        ax.add_patch(FancyBboxPatch((x - BOX_WIDTH / 2, y - BOX_HEIGHT / 2), BOX_WIDTH, BOX_HEIGHT,
                                    boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=colour,
                                    edgecolor="#37474f", linewidth=1.2, zorder=2))
        ax.text(x, y + 0.1, stage["name"], ha="center", va="center", fontsize=11, fontweight="bold", zorder=3)
        ax.text(x, y - 0.15, f"{stage.get('stage', '?')} · {stage.get('status', '?')}", ha="center",
                va="center", fontsize=8.5, color="#37474f", zorder=3)
        for key, dashed in (("from", False), ("reward_model", True)):
            if stage.get(key) in centres:
                _arrow(ax, centres[stage[key]], (x, y), dashed)
    ax.set_xlim(-BOX_WIDTH / 2 - 0.2, (columns - 1) * COLUMN_GAP + BOX_WIDTH / 2 + 0.2)
    ax.set_ylim(-(rows - 1) * ROW_GAP - BOX_HEIGHT / 2 - 0.25, BOX_HEIGHT / 2 + 0.25)
    ax.set_aspect("equal")
    ax.axis("off")
    used = [s for s in STATUS_COLOURS if any(stage.get("status") == s for stage in stages)]
    handles = [Patch(facecolor=STATUS_COLOURS[s], edgecolor="#37474f", label=s) for s in used]
    handles += [Line2D([], [], color="#455a64", label="from"),
                Line2D([], [], color="#455a64", linestyle="--", label="reward model")]
    ax.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, 0.0))
    return fig


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_panels(kind: str) -> list[list[str]]:
    """The wanted keys of a stage kind grouped into subplots: a train key with its `eval_` twin."""
    wanted = CURVE_KEYS.get(kind, DEFAULT_CURVE_KEYS)
    panels, seen = [], set()
    for key in wanted:
        if key in seen:
            continue
        base = key.removeprefix("eval_")
        group = [k for k in (base, f"eval_{base}") if k in wanted]
        seen.update(group)
        panels.append(group)
    return panels


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key over the metrics lines that carry a finite number for it."""
    steps, values = [], []
    for i, row in enumerate(rows):
        if _numeric(row.get(key)):
            step = row.get("step")
            steps.append(step if _numeric(step) else i)
            values.append(float(row[key]))
    return steps, values


def stage_curves(name: str, kind: str, rows: list[dict]) -> Figure | None:
    """Small subplots of the keys that matter for the stage kind; None when none of them was logged."""
    panels = []
    for group in curve_panels(kind):
        lines = [(key, *series(rows, key)) for key in group]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append(lines)
    if not panels:
        return None
    cols = min(len(panels), 4)
    grid = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.3 * cols, 2.5 * grid), layout="constrained")
    fig.suptitle(f"{name} ({kind})", fontsize=11, fontweight="bold")
    for i, lines in enumerate(panels):
        ax = fig.add_subplot(grid, cols, i + 1)
        for key, steps, values in lines:
            sparse = key.startswith("eval_") or len(values) < 20
            ax.plot(steps, values, marker="o" if sparse else None, markersize=3, linewidth=1.3, label=key)
            if "ppl" in key and min(values) > 0 and max(values) / min(values) > 50:
                ax.set_yscale("log")
        ax.set_title(lines[0][0].removeprefix("eval_") if len(lines) > 1 else lines[0][0], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        if lines[0][0] == "lr":  # matplotlib's own offset text ("1e-3") would sit on the title
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    return fig


def timings_chart(stages: list[dict], prepare: dict[str, float], total: float) -> Figure:
    """Seconds per preparation step and per stage (training and evaluation stacked)."""
    labels = [f"prepare: {step}" for step in prepare] + \
             [f"{s['name']} ({s.get('status', '?')})" for s in stages]
    train = [float(v or 0.0) for v in prepare.values()] + [float(s.get("seconds") or 0.0) for s in stages]
    evals = [0.0] * len(prepare) + [float(s.get("eval_seconds") or 0.0) for s in stages]
    fig = Figure(figsize=(8.0, 0.8 + 0.38 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(labels)))
    ax.barh(y, train, color="#5c8fcf", label="training / preparation")
    ax.barh(y, evals, left=train, color="#f0a04b", label="evaluation")
    widest = max((t + e for t, e in zip(train, evals)), default=0.0) or 1.0
    for row, (t, e) in enumerate(zip(train, evals)):
        ax.text(t + e + widest * 0.01, row, f"{t + e:.1f}s", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, widest * 1.15)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_title(f"total {total:.1f}s", fontsize=10, loc="right")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig
