"""Runs as the web UI sees them: every stage folder under the runs root with its status and curves, and
the training processes the UI started (the same `lmforge train` command as in a shell)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.artifacts import latest_checkpoint
from lmforge.webui.watch import read_metrics

MANIFEST = "lmforge.json"
UI_CONFIG = "webui-config.yaml"
LOG = "webui-train.log"
@dataclass
class RunInfo:
    name: str
    path: Path
    stage: str
    status: str
    """running, done, failed, stopped, or partial (checkpoints but no artifact)."""
    step: int
    loss: float | None


STOPPED_EXIT_CODES = (130, 143)
"""What a run exits with when SIGTERM or Ctrl-C stopped it cleanly (lmforge/loop/preemption.py)."""


class Launcher:
    """Starts `python -m lmforge.cli train STAGE CONFIG` in a subprocess per run; tracks, stops, resumes.
    Each process runs a private copy of the config text it was given (the text the UI checked), not a file
    under the served folder, which could change between the check and the start."""

    def __init__(self):
        self.processes: dict[Path, subprocess.Popen] = {}
        self.stopped: set[Path] = set()
        self.private = Path(tempfile.mkdtemp(prefix="lmforge-webui-"))  # mode 0700: this user's alone
        atexit.register(shutil.rmtree, self.private, ignore_errors=True)

    def _snapshot(self, text: str, name: str) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self.private))
        path = folder / name
        path.write_text(text, encoding="utf-8")
        return path

    def start(self, stage: str, config_yaml: str, output_dir: Path, cwd: Path, resume: bool = False) -> Path:
        output_dir = output_dir.resolve()
        if output_dir in self.processes and self.processes[output_dir].poll() is None:
            raise RuntimeError(f"{output_dir} is already training")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / UI_CONFIG).write_text(config_yaml, encoding="utf-8")  # the record Resume reads (and checks)
        command = [sys.executable, "-m", "lmforge.cli", "train", stage, str(self._snapshot(config_yaml, UI_CONFIG)),
                   "log.progress=false"]
        if resume:
            command.append("train.resume=true")
        log = (output_dir / LOG).open("a", encoding="utf-8")
        self.processes[output_dir] = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                                      start_new_session=True)
        self.stopped.discard(output_dir)
        return output_dir

    def start_pipeline(self, pipeline_file: Path, cwd: Path, text: str) -> Path:
        """`lmforge run` on a private copy of `text` (the checked content of `pipeline_file`); tracked under
        the pipeline file's path, logged beside it."""
        key = pipeline_file.resolve()
        if key in self.processes and self.processes[key].poll() is None:
            raise RuntimeError(f"{pipeline_file} is already running")
        copy = self._snapshot(text, key.name)
        log = key.with_name(key.stem + ".webui-run.log").open("a", encoding="utf-8")
        self.processes[key] = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "run", str(copy)], cwd=cwd,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return key

    def stop(self, output_dir: Path) -> bool:
        process = self.processes.get(output_dir.resolve())
        if process is None or process.poll() is not None:
            return False
        os.killpg(process.pid, signal.SIGTERM)  # the whole process group: data workers too
        process.wait(timeout=60)
        self.stopped.add(output_dir.resolve())
        return True

    def state(self, output_dir: Path) -> str | None:
        process = self.processes.get(output_dir.resolve())
        if process is None:
            return None
        code = process.poll()
        if code is None:
            return "running"
        if output_dir.resolve() in self.stopped:
            return "stopped"
        if code in STOPPED_EXIT_CODES:  # stopped by SIGTERM/Ctrl-C from outside, after saving a checkpoint
            return "stopped"
        return "done" if code == 0 else "failed"


def recorded_stage(run: Path) -> str:
    """The stage a run folder records, or "?": a damaged or hostile manifest or config.yaml under --root
    must not break the Runs table for every other run (YAML read through the bounded loader)."""
    from lmforge.config.safe_yaml import safe_load

    try:
        if (run / MANIFEST).is_file():
            record = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
        elif (run / "config.yaml").is_file():
            record = safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        else:
            return "?"
    except (OSError, ValueError, yaml.YAMLError):  # ValueError covers JSON and UTF-8 decoding errors
        return "?"
    stage = record.get("stage") if isinstance(record, dict) else None
    return stage if isinstance(stage, str) else "?"


def recorded_config(run: Path) -> dict:
    """The stage config a run folder records (config.yaml, else webui-config.yaml), {} when none is
    readable; bounded like recorded_stage."""
    from lmforge.config.safe_yaml import safe_load

    for name in ("config.yaml", UI_CONFIG):
        try:
            if (run / name).is_file() and (run / name).stat().st_size < 256 * 1024:
                record = safe_load((run / name).read_text(encoding="utf-8"))
                return record if isinstance(record, dict) else {}
        except (OSError, ValueError, yaml.YAMLError):
            return {}
    return {}


def run_info(run: Path, root: Path, launcher: Launcher) -> RunInfo:
    manifest = run / MANIFEST
    stage = recorded_stage(run)
    status = launcher.state(run) or ("done" if manifest.is_file() else
                                     "partial" if latest_checkpoint(run) is not None else "failed")
    if status == "done" and not manifest.is_file():
        status = "failed"
    metrics = [r for r in read_metrics(run) if "loss" in r]
    return RunInfo(str(run.relative_to(root)), run, stage, status, metrics[-1]["step"] if metrics else 0,
                   metrics[-1]["loss"] if metrics else None)


def report_for(run: Path) -> Path | None:
    """The pipeline report of a run: in its folder, or in the pipeline folder around a stage."""
    for folder in (run, run.parent):
        if (folder / "report.html").is_file():
            return folder / "report.html"
    return None


def list_runs(runs_root: Path, launcher: Launcher) -> list[RunInfo]:
    """Stage folders under `runs_root` (any depth up to 2): those with a config, metrics or manifest."""
    if not runs_root.is_dir():
        return []
    found = set()
    for pattern in ("*/config.yaml", "*/*/config.yaml", "*/" + MANIFEST, "*/*/" + MANIFEST):
        found.update(p.parent for p in runs_root.glob(pattern) if ".old-" not in str(p))
    found.update(p for p in launcher.processes if p.is_relative_to(runs_root.resolve()))
    return sorted((run_info(p.resolve(), runs_root.resolve(), launcher) for p in found), key=lambda r: r.name)


def pipeline_stages(pipeline_file: Path, cwd: Path) -> list[list]:
    """[stage name, stage kind, status, seconds] from the run folder's run.json (pending before it exists)."""
    from lmforge.pipeline.run import load_pipeline
    from lmforge.pipeline.state import read_state

    pipeline = load_pipeline(pipeline_file)
    run_dir = Path(pipeline.run_dir)
    state = read_state(run_dir if run_dir.is_absolute() else cwd / run_dir) or {}
    recorded = {s["name"]: s for s in state.get("stages", [])}
    return [[s.name, s.stage, recorded.get(s.name, {}).get("status", "pending"),
             round(recorded.get(s.name, {}).get("seconds", 0.0), 1)] for s in pipeline.stages]
