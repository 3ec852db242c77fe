"""An lmforge command run as a child process and SIGKILLed at random moments, then resumed until it ends.

Run as a script, this file is the child: it makes the checkpoint code pause inside each save (after every
file it writes, and between the files it deletes when pruning), announces each such moment on stdout,
then runs the lmforge command line:

    python kill_harness.py lmforge ARGS...

The parent (`run_with_kills`) kills either at a random time while training or in one of those pauses, so
many kills land in the middle of a checkpoint being written or deleted. After every kill, each checkpoint
folder that can be seen must load. The pauses change only timing, never what is computed."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import chaos_trials
from chaos_trials import FULL

REPO = Path(__file__).resolve().parents[2]
EVENT = "CHAOS "
PAUSE_S = float(os.environ.get("CHAOS_PAUSE_S", "0.03"))


def trials(cheap: int, full: int) -> int:
    """chaos_trials' count; LMFORGE_CHAOS_TRIALS lowers a full run's (a quicker full pass)."""
    return min(full, int(os.environ["LMFORGE_CHAOS_TRIALS"])) if FULL and os.environ.get("LMFORGE_CHAOS_TRIALS") \
        else chaos_trials.trials(cheap, full)


# -- the child ------------------------------------------------------------------------------------------
def _announce(what: str) -> None:
    print(f"{EVENT}{what}", flush=True)
    time.sleep(PAUSE_S)


class _SlowShutil:
    """shutil as the checkpoint module sees it, deleting a folder file by file with pauses between, so a
    kill can land half-way through removing an old checkpoint."""

    def __getattr__(self, name):
        import shutil

        return getattr(shutil, name)

    @staticmethod
    def rmtree(path, ignore_errors=False):
        import shutil

        path = Path(path)
        if path.is_dir() and path.name.startswith(".trash-"):  # a checkpoint being deleted
            for item in sorted(path.iterdir()):
                if item.is_file():
                    item.unlink()
                    _announce(f"delete {item}")
        shutil.rmtree(path, ignore_errors=ignore_errors)


def _install_pauses() -> None:
    from lmforge.loop import checkpoint

    real_write = checkpoint._write

    def slow_write(path, write):
        real_write(path, write)
        _announce(f"write {path}")

    checkpoint._write = slow_write
    checkpoint.shutil = _SlowShutil()


# -- the parent -----------------------------------------------------------------------------------------
@dataclass
class KillRecord:
    kills: int = 0
    in_write: int = 0
    """Kills that landed after a checkpoint file was written and before the save finished."""
    in_delete: int = 0
    """Kills that landed while an old checkpoint was being deleted."""
    at_random_time: int = 0
    finished_first: int = 0
    """Times the run ended before the planned kill (nothing was killed)."""
    folders_checked: int = 0
    """Checkpoint folders loaded after a kill."""


def child_command(lmforge_args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "lmforge", *lmforge_args]


def child_env() -> dict:
    # One thread: the tiny models gain nothing from more, and on a busy machine spinning threads slow every
    # child down; the uninterrupted run and the killed ones share it, so their results stay comparable.
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        if line.startswith(EVENT):
            lines.put(line[len(EVENT):].strip())
    lines.put(None)


def run_once(lmforge_args: list[str], log: Path, timeout: float = 600) -> float:
    """Run to the end without kills; the seconds it took."""
    started = time.perf_counter()
    with open(log, "a") as err:
        process = subprocess.Popen(child_command(lmforge_args), stdout=subprocess.DEVNULL, stderr=err,
                                   env=child_env(), cwd=REPO)
        if process.wait(timeout=timeout) != 0:
            raise AssertionError(f"{' '.join(lmforge_args[:2])} failed (exit {process.returncode}); see {log}")
    return time.perf_counter() - started


def _kill_once(lmforge_args: list[str], rng: random.Random, run_seconds: float, log: Path,
               record: KillRecord, mode: str) -> bool:
    """Start the command, kill it at a moment chosen by `rng`; False when it ended first. A kill at a random
    time may land anywhere (reading data, training, evaluating, saving the artifact); a kill on the n-th
    write or delete event lands inside a checkpoint save or a pruning."""
    target = rng.randint(1, 12)
    deadline = rng.uniform(0.0, 0.9 * run_seconds)
    spawned = time.perf_counter()
    with open(log, "a") as err:
        process = subprocess.Popen(child_command(lmforge_args), stdout=subprocess.PIPE, stderr=err, text=True,
                                   env=child_env(), cwd=REPO)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
        seen = 0
        while True:
            try:
                event = lines.get(timeout=0.005)
            except queue.Empty:
                event = ""
            if event is None:  # the child closed its output: it finished (or failed) before the kill
                if process.wait() != 0:
                    raise AssertionError(f"run failed (exit {process.returncode}); see {log}")
                record.finished_first += 1
                return False
            elapsed = time.perf_counter() - spawned
            if mode == "time" and elapsed >= deadline:
                break
            if mode != "time" and event.startswith(mode):
                seen += 1
                if seen >= target:
                    break
            if mode != "time" and elapsed > 2 * run_seconds:
                break  # fewer such events than planned (a short run): kill where it is
        process.send_signal(signal.SIGKILL)
        process.wait()
    record.kills += 1
    landed = {"time": "at_random_time", "write": "in_write", "delete": "in_delete"}[mode]
    setattr(record, landed, getattr(record, landed) + 1)
    return True


MODES = ("time", "write", "delete")


def run_with_kills(lmforge_args: list[str], output_dir: Path, modes: list[str], rng: random.Random,
                   run_seconds: float, log: Path, resume_args: list[str] | None = None) -> KillRecord:
    """Kill the command once per entry of `modes` (time, write or delete: see `_kill_once`), checking the
    checkpoints after each kill and resuming with `resume_args` (default `train.resume=true`), then let
    it run to the end. `run_seconds` is how long an uninterrupted run takes."""
    record = KillRecord()
    resume = resume_args if resume_args is not None else ["train.resume=true"]
    args = list(lmforge_args)
    for mode in modes:
        if not _kill_once(args, rng, run_seconds, log, record, mode):
            return record  # it finished: nothing left to resume
        record.folders_checked += assert_checkpoints_load(output_dir)
        args = [*lmforge_args, *resume]
    run_once(args, log)
    return record


def record_results(path: Path, key: str, figures: dict) -> None:
    """Merge one test's figures into a results file (a full chaos run writes it; CI runs do not)."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def totals(records: list[KillRecord]) -> dict:
    return {name: sum(getattr(r, name) for r in records) for name in asdict(KillRecord())}


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every folder a resume could pick, in every stage folder below `output_dir` (a pipeline's too)."""
    return sorted(p for p in Path(output_dir).rglob("checkpoint-*") if p.is_dir() and p.parent.name == "checkpoints")


def assert_checkpoints_load(output_dir: Path) -> int:
    """Each visible checkpoint folder is complete: its checksums match and every file loads."""
    import torch
    from safetensors.torch import load_file

    from lmforge.loop.checkpoint import CHECKSUMS, STATE_FILE, LoopState, verify_checksums

    folders = checkpoint_folders(output_dir)
    for folder in folders:
        assert (folder / STATE_FILE).is_file() and (folder / CHECKSUMS).is_file(), \
            f"{folder} is visible but incomplete: {sorted(p.name for p in folder.iterdir())}"
        verify_checksums(folder)
        LoopState(**json.loads((folder / STATE_FILE).read_text()))
        assert load_file(str(folder / "trainable.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(folder / name, weights_only=True)
    return len(folders)


def assert_same_weights(expected: Path, got: Path) -> int:
    """Bitwise-equal tensors in the two artifacts' model.safetensors; the number of tensors compared."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(expected / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert a.keys() == b.keys(), f"{got}: different tensors from {expected}"
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{got}: {len(differ)} tensors differ from the uninterrupted run (e.g. {differ[0]})"
    return len(a)


if __name__ == "__main__":
    if sys.argv[1:2] != ["lmforge"]:
        sys.exit("usage: kill_harness.py lmforge ARGS...")
    sys.path.insert(0, str(REPO))
    _install_pauses()
    from lmforge.cli import main

    sys.exit(main(sys.argv[2:]))
