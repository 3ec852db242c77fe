"""The run folder's own record, `run.json`: each stage's status and time, rewritten as the run goes,
so a report (or the web UI) can show a run that is still going or that broke."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path

from lmforge.artifacts import write_json_atomic

RUN_STATE = "run.json"


class RunState:
    def __init__(self, run_dir: Path, pipeline_file: str, stages: list):
        self.path = run_dir / RUN_STATE
        self.started = time.time()
        earlier = read_state(run_dir) or {}
        self.data = {"pipeline": str(pipeline_file), "run_dir": str(run_dir),
                     "started": datetime.now().isoformat(timespec="seconds"), "seconds": 0.0,
                     "prepare": earlier.get("prepare", {}),  # a world made by an earlier run took its time then
                     "stages": [{"name": s.name, "stage": s.stage, "from": s.from_, "reward_model": s.reward_model,
                                 "status": "pending", "seconds": 0.0, "eval_seconds": 0.0} for s in stages]}
        self.save()

    def stage(self, name: str) -> dict:
        return next(s for s in self.data["stages"] if s["name"] == name)

    def update(self, name: str, **values) -> None:
        self.stage(name).update(values)
        self.save()

    def stopped(self, name: str, exc: BaseException, seconds: float, resume: str) -> None:
        """Record how a stage ended early: `interrupted` (Ctrl-C) and `preempted` (SIGTERM) stages resume
        from their checkpoint with `resume`; anything else is `failed`."""
        status = stop_status(exc)
        values = {"status": status, "seconds": seconds}
        if status != "failed":
            values["note"] = f"stopped by {'Ctrl-C' if status == 'interrupted' else 'SIGTERM'}; {resume} resumes it"
        self.update(name, **values)

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.started, 1)
        write_json_atomic(self.path, self.data)


def read_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def stop_status(exc: BaseException) -> str:
    """run.json's status of a stage that raised `exc`: a person's Ctrl-C and a scheduler's SIGTERM are
    stops, resumable as they are, not failures."""
    # The loop stops on a signal by raising SystemExit with the status a shell reports for that signal
    # (130 Ctrl-C, 143 SIGTERM): read from the status, the pipeline needs nothing of the loop.
    code = exc.code if isinstance(exc, SystemExit) else None
    if isinstance(exc, KeyboardInterrupt) or code == 128 + signal.SIGINT:
        return "interrupted"
    return "preempted" if code == 128 + signal.SIGTERM else "failed"
