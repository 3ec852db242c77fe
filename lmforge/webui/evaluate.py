"""The Evaluate tab: an artifact under --root, a suite (a suite file and/or the fields of `EvalSpec`, generated
from it like the Train form's groups), run as `lmforge eval ARTIFACT --suite COPY` in a subprocess (as
training runs are), and the results the run stored in the artifact's manifest shown as a table."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from lmforge.config.errors import ConfigError
from lmforge.config.load import from_dict
from lmforge.eval.spec import EvalSpec
from lmforge.webui.confine import Rules, check_eval_paths, inside
from lmforge.webui.forms import checked_path, from_yaml
from lmforge.webui.runs import MANIFEST, Launcher
from lmforge.webui.schema_fields import FormField, from_widget, schema_fields

EVAL_LOG = "webui-eval.log"


def eval_fields() -> list[FormField]:
    """Every EvalSpec field: a new one appears in the tab with no change here."""
    return schema_fields(EvalSpec)


def artifacts(runs_root: Path, root: Path) -> list[str]:
    """Folders under the runs folder (up to three levels) that hold an lmforge artifact, relative to root."""
    if not runs_root.is_dir():
        return []
    found = set()
    for pattern in (MANIFEST, f"*/{MANIFEST}", f"*/*/{MANIFEST}", f"*/*/*/{MANIFEST}"):
        for manifest in runs_root.glob(pattern):
            folder = manifest.parent.resolve()
            if folder.is_relative_to(root) and ".old-" not in str(folder):
                found.add(str(folder.relative_to(root)))
    return sorted(found)


def suite_text(suite_file: str, values: list, rules: Rules) -> str:
    """The suite to run: the suite file's keys (if one is named), then the fields typed in the tab, read
    through EvalSpec and with every file and judge under the root; as YAML text."""
    raw: dict = {}
    if isinstance(suite_file, str) and suite_file.strip():
        from lmforge.webui.forms import read_config

        path = rules.root / checked_path(suite_file, rules.root)
        raw = from_yaml(read_config(path), suite_file)
    specs = eval_fields()
    if len(values) != len(specs):
        raise ConfigError(f"the Evaluate tab sent {len(values)} values for {len(specs)} fields; reload the page")
    for spec, value in zip(specs, values):
        parsed = from_widget(spec, value)
        if parsed is not dataclasses.MISSING:
            raw[spec.key] = parsed
    from_dict(EvalSpec, json.loads(json.dumps(raw)), where=suite_file.strip() if suite_file else "the suite")
    check_eval_paths(raw, [], rules, "eval")
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def checked_artifact(value: str, rules: Rules) -> Path:
    """The model folder to evaluate: an lmforge artifact under the root (its manifest takes the results,
    and the log is written beside it, never into someone's model folder)."""
    path = inside(value, rules, "artifact")
    if not path.is_dir():
        raise ConfigError(f"artifact: {value} is not a folder under {rules.root}; pick one from the list")
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"artifact: {value} has no {MANIFEST}, so it is not an lmforge artifact; pick one from "
                          "the list (`lmforge eval` on the command line takes any model folder)")
    return path


class EvalLauncher:
    """`python -m lmforge.cli eval` per artifact, from a private copy of the checked suite text."""

    def __init__(self, launcher: Launcher):
        self.launcher, self.processes = launcher, {}

    def start(self, artifact: Path, text: str, cwd: Path) -> Path:
        if artifact in self.processes and self.processes[artifact].poll() is None:
            raise RuntimeError(f"{artifact.name} is being evaluated already")
        suite = self.launcher._snapshot(text, "suite.yaml")
        log = (artifact / EVAL_LOG).open("a", encoding="utf-8")
        self.processes[artifact] = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", "eval", str(artifact), "--suite", str(suite)], cwd=cwd,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return artifact

    def state(self, artifact: Path) -> str | None:
        process = self.processes.get(artifact)
        if process is None:
            return None
        code = process.poll()
        return "running" if code is None else "done" if code == 0 else "failed"

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)


def results(artifact: Path) -> list[list]:
    """[suite, metric, value] of every suite stored in the artifact's manifest."""
    try:
        manifest = json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    suites = (manifest.get("eval") or {}).get("suites") if isinstance(manifest, dict) else None
    rows = []
    for name, result in (suites or {}).items() if isinstance(suites, dict) else ():
        metrics = result.get("metrics") if isinstance(result, dict) else None
        for metric, value in (metrics or {}).items() if isinstance(metrics, dict) else ():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append([str(name), str(metric), round(float(value), 4)])
    return rows
