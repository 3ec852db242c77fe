"""What the benchmark scripts share: the machine and versions stamped on every result file, and
running one measurement in a fresh process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def machine_and_versions() -> dict:
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-thread CPU"
    return {"machine": {"device": device, "platform": platform.platform(), "python": platform.python_version()},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def write_result(out: str | None, workload, rows: list[dict]) -> None:
    """The result file: machine and versions, the workload, the rows (nothing written without `out`)."""
    if out:
        result = {**machine_and_versions(), "workload": workload, "rows": rows}
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def run_fresh(command: list[str], label: dict) -> dict:
    """Run `command` (which prints its row as JSON on its last line) in a new process; the row, or
    `label` with the error."""
    done = subprocess.run(command, capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {**label, "error": done.stderr[-2000:]}


def run_peer_script(script: Path, arguments: list[str], label: dict) -> dict:
    """A script of the peer harness, which appends its result rows to $RESULTS: its last row, as TRL's."""
    out = Path(tempfile.mkdtemp()) / "peer.jsonl"
    done = subprocess.run([sys.executable, str(script), *arguments], env={**os.environ, "RESULTS": str(out)},
                          capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        return {"who": "trl", **label, "error": done.stdout[-1500:] + done.stderr[-1500:]}
    return {"who": "trl", **json.loads(out.read_text().splitlines()[-1])}
