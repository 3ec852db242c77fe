"""The Evaluate tab: the suite it runs (a suite file and the EvalSpec fields, generated from the schema) stays
under --root, and a run's results come back as a table from the artifact's manifest."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lmforge.config.errors import ConfigError
from lmforge.eval.spec import EvalSpec
from lmforge.webui.confine import Rules
from lmforge.webui.evaluate import EvalLauncher, artifacts, checked_artifact, eval_fields, results, suite_text
from lmforge.webui.runs import Launcher
from lmforge.webui.schema_fields import to_widget


@pytest.fixture
def served(tmp_path) -> Path:
    root = tmp_path / "root"
    for folder in ("data", "runs/sft", "runs/p/dpo", "suites"):
        (root / folder).mkdir(parents=True)
    (root / "data" / "held.txt").write_text("some held-out text\n")
    (root / "runs" / "sft" / "lmforge.json").write_text(json.dumps({"stage": "sft"}))
    (root / "runs" / "p" / "dpo" / "lmforge.json").write_text(json.dumps({"stage": "dpo"}))
    (tmp_path / "secret.txt").write_text("TOPSECRET\n")
    return root.resolve()


def typed(**values) -> list:
    return [values.get(f.key, to_widget(f, f.default)) for f in eval_fields()]


def test_the_tab_has_every_evalspec_field():
    import dataclasses

    assert [f.key for f in eval_fields()] == [f.name for f in dataclasses.fields(EvalSpec)]


def test_suite_from_a_file_and_the_fields(served):
    (served / "suites" / "s.yaml").write_text("perplexity: data/held.txt\nmax_samples: 8\n")
    text = suite_text("suites/s.yaml", typed(max_new_tokens=16, answers="data/held.txt"), Rules(served))
    assert json.loads(json.dumps(__import__("yaml").safe_load(text))) == {
        "perplexity": "data/held.txt", "max_samples": 8, "answers": "data/held.txt", "max_new_tokens": 16}
    assert artifacts(served / "runs", served) == ["runs/p/dpo", "runs/sft"]


@pytest.mark.parametrize("suite_file, fields, message", [
    ("", {"perplexity": "../secret.txt"}, "eval.perplexity"),
    ("", {"reward_model": "/etc"}, "eval.reward_model"),
    ("../secret.txt", {}, "outside the folder"),
    ("suites/alias.yaml", {}, "alias"),
    ("", {"max_samples": 0}, "max_samples"),
    ("", {"max_samples": "many"}, "must be a number"),
    ("suites/unknown.yaml", {}, "unknown key"),
])
def test_suites_that_leave_the_root_or_break_the_schema_are_refused(served, suite_file, fields, message):
    (served / "suites" / "alias.yaml").write_text("a: &x data/held.txt\nperplexity: *x\n")
    (served / "suites" / "unknown.yaml").write_text("perplexity: data/held.txt\nsecret: 1\n")
    with pytest.raises(ConfigError, match=message):
        suite_text(suite_file, typed(**fields), Rules(served))


def test_artifact_must_be_a_folder_under_the_root(served):
    rules = Rules(served)
    assert checked_artifact("runs/sft", rules) == served / "runs" / "sft"
    for bad, message in (("../", "outside"), ("data/held.txt", "not a folder"), ("runs/none", "not a folder"),
                         ("data", "not an lmforge artifact"), ("runs/p", "not an lmforge artifact")):
        with pytest.raises(ConfigError, match=message):
            checked_artifact(bad, rules)


def test_results_table_from_the_manifest(served):
    run = served / "runs" / "sft"
    (run / "lmforge.json").write_text(json.dumps({"stage": "sft", "eval": {"suites": {
        "perplexity": {"key": "k", "metrics": {"perplexity": 12.3456789, "eval_tokens": 100}},
        "answers": {"key": "k", "metrics": {"exact_match": 0.25, "note": "text is left out", "flag": True}}}}}))
    assert results(run) == [["perplexity", "perplexity", 12.3457], ["perplexity", "eval_tokens", 100.0],
                            ["answers", "exact_match", 0.25]]
    (run / "lmforge.json").write_text('{"eval": [1, 2]')  # damaged: an empty table, not an error
    assert results(run) == []


@pytest.mark.slow
def test_an_evaluation_started_from_the_tab_fills_the_table(base, world_dir, tmp_path):
    root = (tmp_path / "root").resolve()
    shutil.copytree(base, root / "runs" / "base")
    shutil.copy(world_dir / "pt" / "train.txt", root / "held.txt")
    rules = Rules(root)
    evals = EvalLauncher(Launcher())
    artifact = checked_artifact("runs/base", rules)
    evals.start(artifact, suite_text("", typed(perplexity="held.txt", max_samples=4), rules), root)
    deadline = time.time() + 300
    while evals.state(artifact) == "running" and time.time() < deadline:
        time.sleep(0.5)
    log = (artifact / "webui-eval.log").read_text()
    assert evals.state(artifact) == "done", log[-2000:]
    table = {(suite, metric): value for suite, metric, value in results(artifact)}
    assert table[("perplexity", "perplexity")] > 1.0 and "perplexity" in log
