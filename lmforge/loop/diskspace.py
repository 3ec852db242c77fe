"""Telling a full disk apart from other failures of a save, and how much space a save needs.

A full disk does not always surface as `OSError(ENOSPC)`: torch.save reports it as a RuntimeError from
its zip writer ("unexpected pos ..."), safetensors as a SafetensorError that names "os error 28". The
errno or the text settles it where there is one; otherwise the free space left at the moment of the
failure does: a write that failed with room to spare was not stopped by the disk.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What a write that runs out of space raises: the OS, torch.save, safetensors."""
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("no space left", "os error 28", "disk quota exceeded", "os error 122")
SLACK = 1 << 20
"""Free bytes under which a failed write is taken as the disk's doing (file systems keep some back)."""


def free_bytes(path: str | Path) -> int:
    """Free space on the file system holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors' data (tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.device.type, t.untyped_storage().data_ptr()) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def nested_tensors(obj):
    """Every tensor inside nested dicts / lists (an optimizer's state dict)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from nested_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from nested_tensors(value)


def says_disk_full(exc: BaseException) -> bool:
    """The error itself names a full disk or quota (errno, or the text torch/safetensors/arrow give)."""
    if getattr(exc, "errno", None) in FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(words in text for words in FULL_TEXTS)


def is_disk_full(exc: BaseException, free_at_failure: int, remaining: int) -> bool:
    """Whether a save failed for want of space. An OSError carries its errno, so only its errno or text
    counts; torch's and safetensors' errors may not, so for them the space left decides: less free than
    what the save still had to write (at least SLACK) means the disk stopped it."""
    if says_disk_full(exc):
        return True
    # Only the plain types torch.save and safetensors raise: a subclass (the project's own errors, say)
    # says what it is, even on a disk that happens to be full.
    return type(exc) in (RuntimeError, SafetensorError) and free_at_failure < max(remaining, SLACK)


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def disk_full_message(where: str | Path, exc: BaseException) -> str | None:
    """A one-line message when `exc` came from the disk under `where` filling up, else None."""
    try:
        free = free_bytes(where)
    except OSError:
        return None
    # Libraries wrap the OSError (datasets: DatasetGenerationError "from" it): the chain is searched.
    named = next((e for e in error_chain(exc) if says_disk_full(e)), None)
    if named is None and not is_disk_full(exc, free, 0):
        return None
    named = named or exc
    cause = named.strerror if isinstance(named, OSError) and named.strerror else str(named).splitlines()[0][:200]
    return (f"disk full under {where}: {human(free)} free ({cause}); free some space, then run again "
            "with train.resume=true (the checkpoints there are intact)")


def error_chain(exc: BaseException | None):
    """The error, then what caused it (or what it replaced), and so on."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
