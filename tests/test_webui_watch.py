"""The Runs tab's charts (one axis per metric, RL metrics included), progress and ETA, and log tail; and the
UI's two languages (issue 24, the web UI against LlamaBoard)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.webui.watch import (
    Progress,
    curves_svg,
    log_tail,
    logged_total,
    metric_series,
    progress_line,
    read_metrics,
    total_steps,
)

CJK = re.compile(r"[\u4e00-\u9fff]")


def write_metrics(run: Path, rows: list[dict], tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def panels(svg: str) -> dict[str, tuple[float, float]]:
    return {m: (float(lo), float(hi)) for m, lo, hi in
            re.findall(r'data-metric="([^"]*)" data-ymin="([^"]*)" data-ymax="([^"]*)"', svg)}


def test_each_metric_gets_its_own_axis_and_rl_metrics_are_drawn(tmp_path):
    rows = [{"step": s, "epoch": 0, "tokens": 1000 * s, "loss": 5.0 - s / 10, "lr": 3e-4 * s / 20,
             "reward": 0.1 * s, "kl": 0.01 * s, "entropy": 2.0 - 0.05 * s, "length": 40.0 + s,
             "groups/dropped": float(s % 3), "nan_metric": float("nan") if s == 10 else 1.0}
             for s in range(10, 21, 5)]
    write_metrics(tmp_path / "run", rows, tail='{"step": 25, "lo')  # a line being written
    series = metric_series(read_metrics(tmp_path / "run"))
    assert list(series)[:6] == ["loss", "lr", "reward", "kl", "entropy", "length"]
    assert "tokens" not in series and "epoch" not in series and series["nan_metric"] == [(15.0, 1.0), (20.0, 1.0)]
    drawn = panels(curves_svg(series))
    assert drawn["lr"] == (1.5e-4, 3e-4) and drawn["loss"] == (3.0, 4.0)  # the lr's own scale, not the loss's
    assert drawn["groups/dropped"] == (0.0, 2.0) and len(drawn) == len(series)


def test_metric_names_from_the_file_are_escaped_and_a_huge_file_is_read_from_its_end(tmp_path, monkeypatch):
    import lmforge.webui.watch as watch

    write_metrics(tmp_path / "r", [{"step": 1, "<script>x</script>": 1.0}])
    assert "<script>" not in curves_svg(metric_series(read_metrics(tmp_path / "r")))
    monkeypatch.setattr(watch, "MAX_READ", 200)
    write_metrics(tmp_path / "big", [{"step": s, "loss": 1.0} for s in range(100)])
    rows = read_metrics(tmp_path / "big")
    assert rows and rows[-1]["step"] == 99 and len(rows) < 20
    assert curves_svg({}) == '<p class="no-curves">no metrics yet</p>'


def test_total_steps_and_eta():
    assert total_steps([{"step": 5, "total_steps": 80}], {"train": {"max_steps": 10}}) == 80  # as the run logged it
    assert total_steps([{"step": 5}], {"train": {"max_steps": 10}}) == 10
    assert total_steps([{"step": 5}], {"train": {"max_steps": 10}}, stated=1250) == 1250  # the run's own count
    assert total_steps([{"step": 10, "epoch": 0}, {"step": 30, "epoch": 1}], {"train": {"epochs": 3}}) == 90
    assert total_steps([{"step": 10, "epoch": 0}], {"train": {"epochs": 3}}) is None
    clock = iter([100.0, 110.0, 130.0])
    progress = Progress(clock=lambda: next(clock))
    run = Path("r")
    assert progress.observe(run, 10) is None  # one observation: no rate yet
    assert progress.observe(run, 20) == 1.0
    rate = progress.observe(run, 30)
    assert rate == pytest.approx(20 / 30)
    assert progress_line(30, 120, rate, "running") == "step 30 / 120 (25%) · 0.667 steps/s · ETA 2 min 15 s"
    assert progress_line(30, None, rate, "running").endswith("ETA once the first epoch ends (or set train.max_steps)")
    assert progress_line(120, 120, None, "done") == "done: step 120 / 120"
    assert progress_line(0, None, None, "running").startswith("starting:")


def test_log_tail_shows_the_last_lines_without_bar_redraws_or_colours(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    log = root / "run" / "webui-train.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "train 1/9\rtrain 5/9\r\x1b[32mtrain 9/9\x1b[0m\n")
    tail = log_tail(log, root, lines=3)
    assert tail == "line 98\nline 99\ntrain 9/9"
    (tmp_path / "secret.log").write_text("TOPSECRET\n")
    (root / "run" / "out.log").symlink_to(tmp_path / "secret.log")
    assert log_tail(root / "run" / "out.log", root) == ""  # a link that leads out of --root is not read
    assert log_tail(root / "run" / "missing.log", root) == ""
    log.write_text("train rows: 9\noptimizer steps: 125 per epoch, 1,250 in all (8 rows per step)\n" + "x\n" * 99)
    assert logged_total(log, root) == 1250 and logged_total(root / "run" / "out.log", root) is None


def test_every_label_has_its_chinese_text():
    from lmforge.config.schema import StageConfig
    from lmforge.webui.i18n import HELP_ZH, LANGUAGES, TEXTS, text
    from lmforge.webui.schema_fields import schema_fields

    for key, (english, chinese) in TEXTS.items():
        assert english.strip() and chinese.strip() and english != chinese, key
        assert CJK.search(chinese) and not CJK.search(english.replace("语言", "")), key
    groups = {f.group for f in schema_fields(StageConfig) if f.group}
    assert {f"group.{g}" for g in groups} <= set(TEXTS)  # every collapsed group has a title in both
    from lmforge.eval.spec import EvalSpec

    keys = {f.key for f in schema_fields(StageConfig)} | {f.key for f in schema_fields(EvalSpec)}
    assert set(HELP_ZH) <= keys and all(CJK.search(v) for v in HELP_ZH.values())  # no help for a field gone
    assert {f.key for f in schema_fields(EvalSpec)} <= set(HELP_ZH)  # the Evaluate tab wholly in Chinese
    assert text("tab.evaluate", LANGUAGES[1]) == "评估" and text("tab.evaluate") == "Evaluate"


def test_the_language_switch_relabels_every_registered_component(tmp_path):
    import gradio as gr

    from lmforge.webui.confine import Rules
    from lmforge.webui.i18n import LANGUAGES, TEXTS
    from lmforge.webui.tab_eval import eval_tab
    from lmforge.webui.tab_runs import runs_tab
    from lmforge.webui.ui import Context

    ctx = Context(tmp_path, tmp_path / "runs", Rules(tmp_path))
    with gr.Blocks():
        for build in (runs_tab, eval_tab):
            with gr.Tab("x"):
                build(ctx)
    chinese, english = ctx.relabel(LANGUAGES[1]), ctx.relabel(LANGUAGES[0])
    assert len(chinese) == len(ctx.components) > 20
    labels = [u.get("label") or u.get("value") for u in chinese]
    assert TEXTS["run_name"][1] in labels and TEXTS["eval_results"][1] in labels and TEXTS["button.evaluate"][1] in labels
    assert all(CJK.search(str(u.get("label") or u.get("value") or "")) for u in chinese if "info" not in u)
    assert [u.get("label") or u.get("value") for u in english][:2] == [TEXTS["runs_table"][0], TEXTS["run_name"][0]]
