"""The pipeline report, on a run folder written by hand: one finished stage per kind, a failed one that
left only curves, a pending one with no folder, a truncated metrics line and hostile sample text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmforge.report.html import (
    best_columns,
    eval_columns,
    format_metric,
    read_jsonl,
    summary_lines,
    write_report,
)
from lmforge.report.plots import curve_panels, graph_layout, series, stage_curves

STAGES = [
    {"name": "pt", "stage": "pt", "from": None, "reward_model": None, "status": "done", "seconds": 58.2,
     "eval_seconds": 3.1},
    {"name": "sft", "stage": "sft", "from": "pt", "reward_model": None, "status": "skipped", "seconds": 0.4,
     "eval_seconds": 0.0},
    {"name": "rm", "stage": "rm", "from": "sft", "reward_model": None, "status": "done", "seconds": 40.0,
     "eval_seconds": 1.5},
    {"name": "ppo", "stage": "ppo", "from": "sft", "reward_model": "rm", "status": "failed", "seconds": 12.0,
     "eval_seconds": 0.0},
    {"name": "dpo", "stage": "dpo", "from": "sft", "reward_model": None, "status": "pending", "seconds": 0.0,
     "eval_seconds": 0.0},
]
EVAL = {
    "pt": {"perplexity": 5.2, "exact_match": 0.01},
    "sft": {"perplexity": 2.31, "exact_match": 0.432, "contains": 0.5},
    "rm": {"rm_accuracy": 0.92},
}
CURVES = {  # stage -> metrics lines; rm's keys are none of the ones drawn for its kind
    "pt": [{"step": 10, "loss": 5.0, "lr": 1e-3}, {"step": 20, "loss": 3.0, "lr": 9e-4},
           {"step": 20, "eval_loss": 3.2, "eval_ppl": 24.5}],
    "sft": [{"step": 0, "eval_loss": 2.0, "eval_ppl": 7.4}, {"step": 10, "loss": 1.5, "lr": 1e-3},
            {"step": 10, "eval_exact_match": 0.432, "eval_stopped_rate": 1.0}],
    "rm": [{"step": 10, "tokens": 512, "pairs": 8}],
    "ppo": [{"step": 1, "iteration": 1, "reward": 0.1, "kl": 0.01, "entropy": 2.0, "length": 30.0},
            {"step": 1, "eval_reward": 0.0, "eval_sample": {"prompt": "p", "reply": "r"}},
            {"step": 2, "iteration": 2, "reward": 0.3, "kl": 0.02, "entropy": 1.9, "length": 28.0}],
}
HOSTILE = "<script>alert(1)</script>"


def _samples(reply: str) -> list[dict]:
    return [{"id": "eval-en-fusovel-region", "prompt": "Which region is the town of Fusovel in?",
             "reference": "Fusovel lies in the south.", "reply": reply},
            {"id": "eval-zh-age", "prompt": "小明今年几岁？", "reference": "小明今年十岁。", "reply": f"{reply} {HOSTILE}"}]


def write_fake_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    run = {"pipeline": "examples/demo.yaml", "run_dir": str(run_dir), "started": "2026-11-23T10:00:00",
           "seconds": 271.4, "prepare": {"world": 1.2, "tokenizer": 3.4},
           "start_eval": {"metrics": {"perplexity": 3012.0, "exact_match": 0.0}, "samples": _samples("哦")},
           "stages": STAGES}
    (run_dir / "run.json").write_text(json.dumps(run, ensure_ascii=False), encoding="utf-8")
    (run_dir / "pipeline.yaml").write_text("run_dir: runs/demo\nstages: []\n", encoding="utf-8")
    for name, metrics in EVAL.items():
        (run_dir / name).mkdir()
        manifest = {"stage": name, "seconds": 1.0, "metrics": {},
                    "eval": {"metrics": metrics, "samples": [] if name == "rm" else _samples(f"{name} 的回答"),
                             "seconds": 1.0}}
        (run_dir / name / "lmforge.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    (run_dir / "ppo").mkdir()  # failed: curves, no manifest
    for name, rows in CURVES.items():
        text = "".join(json.dumps(row) + "\n" for row in rows) + '{"step": 30, "loss": 2.'  # cut by a crash
        (run_dir / name / "metrics.jsonl").write_text(text, encoding="utf-8")
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    run_dir = write_fake_run(tmp_path_factory.mktemp("report") / "demo")
    path = write_report(run_dir)
    return run_dir, path.read_text(encoding="utf-8")


def test_report_is_one_self_contained_file(report):
    run_dir, page = report
    assert (run_dir / "report.html").is_file()
    assert not list(run_dir.glob("*.tmp"))
    assert '<meta charset="utf-8">' in page
    assert 'src="http' not in page and "<link" not in page and "@import" not in page
    # the graph, curves of pt, sft and ppo (rm logged nothing drawable, dpo has no folder), the timings
    assert page.count("data:image/png;base64,") == 1 + 3 + 1
    assert '<a href="pipeline.yaml">' in page and "<details>" in page and "runs/demo" in page


def test_report_shows_every_stage_status_and_value(report):
    _, page = report
    for stage in STAGES:
        assert f"<td>{stage['name']}</td>" in page
    assert ">failed<" in page and ">pending<" in page and ">skipped<" in page
    assert "43.2%" in page and "92.0%" in page and ">3012<" in page and "271.4" in page


def test_replies_are_escaped_and_chinese_is_kept(report):
    _, page = report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    assert "小明今年几岁？" in page and "sft 的回答" in page


def test_best_value_marks_lowest_perplexity_and_highest_exact_match(report):
    assert best_columns("perplexity", [3012.0, 5.2, 2.31, None]) == {2}
    assert best_columns("exact_match", [0.0, 0.01, 0.432, None]) == {2}
    assert best_columns("kl", [0.5, 0.2]) == {1}
    assert best_columns("reward", [1.0, 1.0, 0.5]) == {0, 1}
    assert best_columns("rm_accuracy", [None, 0.92]) == set()  # nothing to compare with
    _, page = report
    assert '<td class="num best">2.31</td>' in page and '<td class="num best">43.2%</td>' in page
    assert '<td class="num">3012</td>' in page


def test_metric_formatting():
    assert format_metric("exact_match", 0.432) == "43.2%"
    assert format_metric("win_rate", 0.655) == "65.5%"
    assert format_metric("perplexity", 3.1) == "3.10"
    assert format_metric("perplexity", 3012.0) == "3012"
    assert format_metric("kl", 0.2) == "0.200"
    assert format_metric("reward", -1.234) == "-1.23"
    assert format_metric("wins", 7) == "7"


def test_table_columns_start_then_stages():
    run = {"start_eval": {"metrics": {"perplexity": 9.0}},
           "stages": [{"name": "pt", "manifest": {"eval": {"metrics": {"perplexity": 3.0, "note": "x"}}}},
                      {"name": "sft", "manifest": None}]}
    assert eval_columns(run) == [("start", {"perplexity": 9.0}), ("pt", {"perplexity": 3.0}), ("sft", {})]
    assert [label for label, _ in eval_columns({"stages": run["stages"]})] == ["pt", "sft"]


def test_metrics_lines_that_are_not_json_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n[1, 2]\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_curves_pair_train_and_eval_keys_and_skip_what_is_not_a_number():
    assert curve_panels("ppo")[:2] == [["reward", "eval_reward"], ["kl", "eval_kl"]]
    assert ["eval_ppl"] in curve_panels("sft")
    assert curve_panels("dpo")[1] == ["rewards/accuracy", "eval_rewards/accuracy"]
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": math.nan}, {"step": 3, "loss": True},
            {"step": 4, "loss": "x"}, {"loss": 0.5}]
    assert series(rows, "loss") == ([1, 4], [1.0, 0.5])  # a line without a step is placed by its index
    assert stage_curves("rm", "rm", CURVES["rm"]) is None
    assert stage_curves("ppo", "ppo", CURVES["ppo"]) is not None


def test_graph_stacks_branches_by_depth():
    assert graph_layout(STAGES) == {"pt": (0, 0), "sft": (1, 0), "rm": (2, 0), "ppo": (2, 1), "dpo": (2, 2)}
    two_roots = [{"name": "a"}, {"name": "b", "from": "a"}, {"name": "c"}]
    assert graph_layout(two_roots) == {"a": (0, 0), "b": (1, 0), "c": (0, 1)}


def test_summary_has_one_line_per_stage_then_the_total(report):
    run_dir, _ = report
    lines = summary_lines(run_dir)
    assert len(lines) == len(STAGES) + 1
    for line, stage in zip(lines, STAGES):
        assert line.split()[:3] == [stage["name"], stage["stage"], stage["status"]]
    assert "61.3s" in lines[0] and "perplexity 5.20" in lines[0]
    assert "exact_match 0.432" in lines[1] and "perplexity 2.31" in lines[1]
    assert "rm_accuracy 0.920" in lines[2]
    assert lines[-1] == "total 271.4s (preparation 4.6s)"


def test_folder_without_run_json_is_refused(tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run.*not a pipeline run folder"):
        write_report(folder)
    with pytest.raises(FileNotFoundError, match="not a pipeline run folder"):
        summary_lines(folder)


def test_each_stage_shows_its_data_counts_from_its_manifest(tmp_path):
    run_dir = write_fake_run(tmp_path / "demo")
    manifest_path = run_dir / "sft" / "lmforge.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["data"] = {"by_file": {
        "data/medical_sft.jsonl": {"read": 300, "kept": 150, "skipped": 148, "prompt_cut": 3, "dropped_no_room": 2,
                                   "skipped_by_reason": {"invalid JSON": 100, "turn N is empty": 48}},
        "data/identity.json": {"read": 20, "kept": 20, "skipped": 0, "skipped_by_reason": {}}}}
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    page = write_report(run_dir).read_text(encoding="utf-8")
    section = page.split("<h2>Data read, kept, skipped and cut</h2>")[1].split("<h2>")[0]
    assert ('<tr><td>sft</td><td>data/medical_sft.jsonl</td><td class="num">300</td><td class="num">150 (50%)</td>'
            "<td>148 (100 invalid JSON, 48 turn N is empty)</td><td>3 prompt cut, 2 dropped no room</td></tr>") in section
    assert '<td>data/identity.json</td><td class="num">20</td><td class="num best">20 (100%)</td>' in section
    assert "<td>ppo</td><td colspan=\"5\" class=\"note\">no manifest (not finished)</td>" in section
    sft_line = next(line for line in summary_lines(run_dir) if line.startswith("sft "))
    assert sft_line.endswith("data 170/320 kept")


def test_a_stopped_stage_says_how_to_resume_in_the_summary(tmp_path):
    run_dir = write_fake_run(tmp_path / "demo")
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    run["stages"][3].update(status="interrupted", note="stopped by Ctrl-C; lmforge run examples/demo.yaml resumes it")
    (run_dir / "run.json").write_text(json.dumps(run), encoding="utf-8")
    line = next(line for line in summary_lines(run_dir) if line.startswith("ppo "))
    assert "interrupted" in line and line.endswith("(stopped by Ctrl-C; lmforge run examples/demo.yaml resumes it)")
