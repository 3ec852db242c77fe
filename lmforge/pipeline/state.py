"""The run folder's own record, `run.json`: each stage's status and time, rewritten as the run goes,
so a report (or the web UI) can show a run that is still going or that broke."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from lmforge.stages.common import write_json_atomic

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

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.started, 1)
        write_json_atomic(self.path, self.data)


def read_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
