"""Watching a run from the Runs tab: every metric it logs drawn on its own axis (small multiples, so the
learning rate is not a flat line beside the loss), its progress and ETA, and the tail of its log. All of it
is read from the run's folder (metrics.jsonl, the config it recorded, webui-train.log), bounded, so a huge
or damaged file slows nothing and breaks nothing."""

from __future__ import annotations

import html
import json
import math
import re
import time
from pathlib import Path

METRICS = "metrics.jsonl"
MAX_READ = 8 << 20
"""Bytes of metrics.jsonl read (its end): a long run's file is far smaller; a hostile one is cut."""
FIRST = ("loss", "eval_loss", "lr", "grad_norm", "reward", "kl", "entropy", "length", "stopped_rate",
         "rewards/accuracy", "rewards/margin", "accuracy", "margin")
"""Metrics drawn first, in this order; every other numeric metric follows, by name."""
NOT_CURVES = {"step", "epoch", "tokens", "total_steps"}
MAX_PANELS = 30
MAX_POINTS = 400
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's rows (the last MAX_READ bytes); a line being written, or not JSON, is skipped."""
    path = run / METRICS
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - MAX_READ))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = text.splitlines()[1 if size > MAX_READ else 0:]  # a cut first line is half a row
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and _finite(row.get("step")):
            rows.append(row)
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} for every numeric metric, the watched ones first."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in NOT_CURVES and isinstance(key, str) and _finite(value):
                series.setdefault(key, []).append((float(row["step"]), float(value)))
    order = [k for k in FIRST if k in series] + sorted(k for k in series if k not in FIRST)
    return {k: series[k] for k in order[:MAX_PANELS]}


def curves_svg(series: dict[str, list[tuple[float, float]]], width: int = 300, height: int = 150) -> str:
    """One small chart per metric, each with its own y-axis (its min and max), in a wrapping grid."""
    if not series:
        return '<p class="no-curves">no metrics yet</p>'
    panels = [_panel(name, points, width, height) for name, points in series.items()]
    return f'<div class="curves-grid" style="display:flex;flex-wrap:wrap;gap:8px">{"".join(panels)}</div>'


def _panel(name: str, points: list[tuple[float, float]], width: int, height: int) -> str:
    step = max(1, len(points) // MAX_POINTS)
    points = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    left, top, plot_w, plot_h = 52, 22, width - 62, height - 44
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * plot_w  # noqa: E731
    sy = lambda y: top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h if y1 > y0 else top + plot_h / 2  # noqa: E731
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    label = html.escape(name)
    return (f'<svg class="curve" data-metric="{label}" data-ymin="{y0:.6g}" data-ymax="{y1:.6g}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" style="background:#fff;border:1px solid #ddd">'
            f'<text x="{left}" y="15" font-size="12" font-weight="bold">{label}</text>'
            f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{y1:.4g}</text>'
            f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">{y0:.4g}</text>'
            f'<text x="{left}" y="{height - 6}" font-size="10">{x0:g}</text>'
            f'<text x="{left + plot_w}" y="{height - 6}" font-size="10" text-anchor="end">step {x1:g}</text>'
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>'
            f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
            + (f'<circle cx="{sx(xs[0]):.1f}" cy="{sy(ys[0]):.1f}" r="2.5" fill="#1f77b4"/>' if len(points) == 1 else "")
            + "</svg>")


class Progress:
    """Steps seen per run over time (the app's polls), for a rate that leaves out model loading."""

    def __init__(self, clock=time.monotonic):
        self.clock, self.seen = clock, {}

    def observe(self, run: Path, step: float) -> float | None:
        """Steps per second between the first and latest steps seen for `run` (None before two)."""
        now, first = self.clock(), self.seen.setdefault(run, [])
        if not first or first[-1][1] != step:
            first.append((now, step))
        (t0, s0), (t1, s1) = first[0], first[-1]
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None


def total_steps(rows: list[dict], config: dict, stated: int | None = None) -> int | None:
    """The run's step count: as metrics.jsonl or the log (`stated`) gives it, else train.max_steps, else
    epochs x the steps one epoch took (known once an epoch is done)."""
    for row in reversed(rows):
        if _finite(row.get("total_steps")) and row["total_steps"] > 0:
            return int(row["total_steps"])
    if stated:
        return stated
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    if _finite(train.get("max_steps")) and train["max_steps"] > 0:
        return int(train["max_steps"])
    epochs = train.get("epochs", 1.0)
    done = next((row for row in rows if _finite(row.get("epoch")) and row["epoch"] >= 1), None)
    if done is not None and _finite(epochs):
        return max(1, math.ceil(epochs * done["step"] / done["epoch"]))
    return None


def progress_line(step: float, total: int | None, rate: float | None, status: str) -> str:
    """`step 40 / 120 (33%) · 0.52 steps/s · ETA 2 min 34 s`, or what is known of it."""
    if status != "running":
        return f"{status}: step {step:g}" + (f" / {total}" if total else "")
    if not step and not total:
        return "starting: loading the model and the data (no step logged yet)"
    parts = [f"step {step:g}" + (f" / {total} ({100 * step / total:.0f}%)" if total else "")]
    if rate:
        parts.append(f"{rate:.3g} steps/s")
    if rate and total and total > step:
        parts.append(f"ETA {duration((total - step) / rate)}")
    elif not total:
        parts.append("ETA once the first epoch ends (or set train.max_steps)")
    else:
        parts.append("ETA after the next logged step")
    return " · ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _read(path: Path, root: Path, limit: int, end: bool) -> str:
    """Up to `limit` bytes from the start or the end of a file under `root`; a link that leads out of it is
    not followed, and a missing file reads as ""."""
    try:
        resolved = path.resolve()
        if root.resolve() not in resolved.parents or not resolved.is_file():
            return ""
        with resolved.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - limit) if end else 0)
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, root: Path, lines: int = 60, limit: int = 32 << 10) -> str:
    """The last lines of a log under `root`, progress-bar redraws (carriage returns) and terminal colours
    taken out."""
    text = _read(path, root, limit, end=True)
    shown = [ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1]) for line in text.rstrip("\n").split("\n")]
    return "\n".join(shown[-lines:]) if text else ""


LOGGED_TOTAL = re.compile(r"optimizer steps: (?:[\d,]+ per epoch, )?([\d,]+) in all")


def logged_total(path: Path, root: Path) -> int | None:
    """The step count a training run states before step 1 (`optimizer steps: ... N in all`)."""
    match = LOGGED_TOTAL.search(_read(path, root, 64 << 10, end=False))
    return int(match.group(1).replace(",", "")) if match else None
