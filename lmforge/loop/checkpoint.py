"""Atomic checkpoints: written to a temporary folder, flushed, then renamed into place.

A checkpoint holds the trainable weights (safetensors), optimizer and scheduler state, RNG
states and the data position. Frozen weights are not stored: resuming rebuilds the same starting
model (seeded scratch init or the same pretrained folder) and loads the trainable part on top.
Optimizer/scheduler/RNG files are torch tensors loaded with `weights_only=True` (no unpickling
of arbitrary objects). Every file's sha256 is kept in the checkpoint's `checksums.json` and checked
before anything is loaded: a flipped byte is refused instead of resumed from.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.artifacts import STATE_FILE, checkpoint_dir, latest_checkpoint, list_checkpoints
from lmforge.loop.diskspace import (
    SAVE_ERRORS,
    error_chain,
    folder_bytes,
    free_bytes,
    human,
    is_disk_full,
    nested_tensors,
    tensor_bytes,
)

CHECKSUMS = "checksums.json"  # the sha256 of every other file, written last


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or that must not be loaded (corrupted files)."""


@dataclass
class LoopState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""
    tokens: int = 0
    extra: dict = field(default_factory=dict)
    """Stage-specific state that must survive a resume (RL: iterations done, KL coefficient)."""


SHARDED = "sharded"
"""The accelerate-written part of a checkpoint saved under FSDP or DeepSpeed."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(output_dir: str | Path, state: LoopState, model, optimizer, scheduler, keep: int) -> Path:
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    need = checkpoint_bytes(model, optimizer)
    check_room(final, need, _kept(root))
    with cleaned_up_on_failure(tmp, final, need, lambda: _kept(root)):
        tmp.mkdir()
        _write(tmp / "trainable.safetensors", lambda p: save_file(trainable_state(model), str(p)))
        _write(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
        _write(tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p))
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
               "python_pos": random.getstate()[2]}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _write(tmp / "rng.pt", lambda p: torch.save(rng, p))
        _write(tmp / STATE_FILE, lambda p: p.write_text(json.dumps(asdict(state))))
        write_checksums(tmp)
    _move_into_place(tmp, final)
    prune_checkpoints(root, keep)
    return final


def checkpoint_bytes(model, optimizer) -> int:
    """At least what a checkpoint writes: the trainable weights and the optimizer's state tensors."""
    weights = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return weights + tensor_bytes(nested_tensors(optimizer.state_dict().get("state", {})))


def _kept(root: Path) -> str:
    last = list_checkpoints(root)
    return f"the last complete checkpoint, {last[-1]}, is intact" if last else "no earlier checkpoint exists"


def check_room(final: Path, need: int, kept: str) -> None:
    """Refuse a save that cannot fit before writing a byte of it (nothing to clean up, nothing filled)."""
    free = free_bytes(final)
    if free < need:
        raise CheckpointError(f"disk full while saving {final}: it needs at least {human(need)} and "
                              f"{human(free)} is free on that disk; nothing was written and {kept}; free some "
                              "space, then train.resume=true continues from the last checkpoint")


def saved_step(path: Path) -> int:
    """The step a checkpoint was saved at (-1 when its state file is missing or unreadable: loading says why)."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def check_room_to_continue(path: Path) -> None:
    """Before a resumed run spends any compute: the checkpoints it will write are as big as the one it
    resumes from, so a disk without that much room fails now, with the same message, not steps later."""
    need = folder_bytes(path)
    free = free_bytes(path.parent)
    if free < need:
        raise CheckpointError(f"disk full while resuming from {path}: the next checkpoint needs about "
                              f"{human(need)} and {human(free)} is free on that disk; nothing was written and "
                              f"{path} is intact; free some space, then train.resume=true continues from it")


@contextmanager
def cleaned_up_on_failure(tmp: Path, final: Path, need: int, kept):
    """A save that fails removes its partial folder, which would otherwise hold on to the space, and says
    why in one line: a full disk (however torch or safetensors report it) or another write error. Any other
    exception is re-raised as it is, after the cleanup. The saves already complete are never touched."""
    try:
        yield
    except BaseException as exc:
        written, free_at_failure = folder_bytes(tmp), _free_or_zero(tmp.parent)
        full = isinstance(exc, SAVE_ERRORS) and is_disk_full(exc, free_at_failure, need - written)
        if full:
            # torch.save's writer, still open in the traceback's frames, holds the deleted file's space
            # until it is collected: the disk would stay full for as long as the error is kept.
            _release(exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, SAVE_ERRORS) or isinstance(exc, CheckpointError):
            raise
        if not full and not isinstance(exc, OSError):
            raise
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        what = "disk full" if full else "write failed"
        room = f": it needs at least {human(need)} and {human(_free_or_zero(tmp.parent))} is free" if full else ""
        then = "free some space, then" if full else "once the cause is fixed,"
        raise CheckpointError(f"{what} while saving {final}{room} (in {tmp}: {cause}); the partial folder was "
                              f"removed and {kept()}; {then} train.resume=true continues") from exc


def _release(exc: BaseException) -> None:
    """Drop the locals of every frame in the error's chain (torch's writer is in the one it replaced)."""
    for error in error_chain(exc):
        traceback.clear_frames(error.__traceback__)
    gc.collect()


def _free_or_zero(path: Path) -> int:
    try:
        return free_bytes(path)
    except OSError:
        return 0


def write_checksums(folder: Path) -> None:
    sums = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    _write(folder / CHECKSUMS, lambda p: p.write_text(json.dumps(sums, indent=1)))


def verify_checksums(folder: Path) -> None:
    """Refuse a checkpoint whose files differ from what was written (a bit flip, a truncated copy).
    Checkpoints from before checksums were kept have no `checksums.json` and are taken as they are."""
    listed = folder / CHECKSUMS
    if not listed.is_file():
        return
    try:
        sums = json.loads(listed.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{listed} is unreadable ({exc}): the checkpoint is corrupted") from exc
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} is corrupted: {name} is missing")
        if (found := _sha256(path)) != expected:
            raise CheckpointError(f"{path} is corrupted (sha256 {found[:12]}…, written as {expected[:12]}…): "
                                  "refusing to resume from it; pick an earlier checkpoint with train.resume_from")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _move_into_place(tmp: Path, final: Path) -> None:
    """The complete folder appears under its final name in one rename, after everything in it is on disk.
    A folder already there (the same step saved again) is renamed away first, never deleted in place."""
    _fsync_dir(tmp)
    if final.exists():
        discard(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def discard(folder: Path) -> None:
    """Delete a checkpoint so that no half-deleted one is ever visible: one rename takes it out of sight
    (a kill during the deletion leaves a `.trash-` folder, swept by the next save), then it is removed."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; sweep what killed runs left (partial saves, half deletions)."""
    for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".trash-*")]:
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            discard(old)


def resume_path(resume: bool, resume_from: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint a run continues from: the one named, else the newest when asked to resume."""
    if resume_from:
        return Path(resume_from)
    return latest_checkpoint(output_dir) if resume else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> LoopState:
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete lmforge checkpoint (no {STATE_FILE})")
    verify_checksums(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint weights do not match the model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return LoopState(**json.loads((path / STATE_FILE).read_text()))


def save_sharded_checkpoint(accelerator, output_dir: str | Path, state: LoopState, scheduler, keep: int) -> Path:
    """FSDP / DeepSpeed: every process writes its shards of the model and optimizer through accelerate
    (torch.distributed.checkpoint for FSDP, which can load them back on another number of processes);
    the first process adds the scheduler and loop state and renames the folder into place last."""
    root = checkpoint_dir(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}-sharded"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / SHARDED))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with cleaned_up_on_failure(tmp, final, 0, lambda: _kept(root)):
            _write(tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p))
            _write(tmp / STATE_FILE, lambda p: p.write_text(json.dumps(asdict(state))))
            write_checksums(tmp)
        _move_into_place(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(accelerator, path: Path, scheduler) -> LoopState:
    if not (path / STATE_FILE).is_file() or not (path / SHARDED).is_dir():
        raise FileNotFoundError(f"{path} is not a complete sharded lmforge checkpoint")
    verify_checksums(path)
    accelerator.load_state(str(path / SHARDED))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return LoopState(**json.loads((path / STATE_FILE).read_text()))
