"""Run one tool call (a registered Python function) in a separate, limited process.

The parent starts this file as a fresh interpreter (`python -I tools_sandbox.py`), writes the call as JSON on
its stdin and waits at most `seconds`. Before importing the tool the child sets its own hard limits: address
space (`memory_mb`), CPU time, size of any file it writes, and no new processes; it cuts itself off the
network (a new user and network namespace where the kernel allows it, and in any case Python's socket
functions refuse). What the tool prints is kept up to `output_chars`; its return value likewise. Whatever
happens — an exception, a hang, a flood of output, running out of memory, a crash — the parent gets a
`ToolOutcome` whose text is what the model sees as the tool's observation: a bad call never ends a run.

This file imports nothing from lmforge at the top, so the child starts without torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

OUTCOMES = ("ok", "error", "timeout", "memory", "crashed")


@dataclass(frozen=True)
class ToolLimits:
    seconds: float = 5.0
    """Wall-clock limit of one call (the process is killed past it)."""
    memory_mb: int = 512
    """Address-space limit of the tool's process."""
    output_chars: int = 4096
    """Characters of printed output and of the return value kept (each); the rest is cut and counted."""


@dataclass(frozen=True)
class ToolOutcome:
    kind: str
    """ok, error (the tool raised, or the call was bad), timeout, memory, crashed (killed by a signal)."""
    text: str
    """The observation the model reads."""


def run_tool(target: str, arguments: dict, limits: ToolLimits, path: list[str] | None = None) -> ToolOutcome:
    """Call `target` (`package.module:function` or `path/to/file.py:function`) with keyword `arguments` in a
    child process under `limits`. `path` is the child's sys.path (default: this process's)."""
    request = {"target": target, "arguments": arguments, "path": list(sys.path if path is None else path),
               "memory_mb": limits.memory_mb, "output_chars": limits.output_chars,
               "cpu_seconds": max(1, int(limits.seconds) + 1)}
    with tempfile.TemporaryDirectory(prefix="lmforge-tool-") as folder:
        # The tool works in a folder of its own: a file it writes by a common name (result.json, out) cannot
        # overwrite the result or the output this side reads.
        work = os.path.join(folder, "work")
        os.mkdir(work)
        result_path = os.path.join(folder, "result.json")
        request["result"] = result_path
        with open(os.path.join(folder, "out"), "w+b") as out:
            child = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=out, stderr=out, cwd=work, start_new_session=True,
                                     env={"PATH": os.defpath, "HOME": work, "PYTHONDONTWRITEBYTECODE": "1"})
            try:
                child.communicate(json.dumps(request).encode(), timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                _kill(child)
                return ToolOutcome("timeout", f"error: the tool {target} did not finish within {limits.seconds:g} s")
            out.seek(0)
            raw = out.read(limits.output_chars).decode("utf-8", "replace")
        try:
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = None
    if not (isinstance(result, dict) and result.get("kind") in OUTCOMES and isinstance(result.get("text"), str)):
        if child.returncode < 0:
            return ToolOutcome("crashed", f"error: the tool {target} was killed ({_signal_name(-child.returncode)})")
        tail = raw.strip().splitlines()[-1:] or ["no output"]
        return ToolOutcome("crashed", f"error: the tool {target} exited without a result ({tail[0][:200]})")
    return ToolOutcome(result["kind"], result["text"])


def _signal_name(number: int) -> str:
    """SIGKILL, ...; a signal Python has no name for (a real-time one) by its number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the whole session: a tool that forked dies with it
    except (ProcessLookupError, PermissionError):
        child.kill()
    child.wait()


# ---------------------------------------------------------------- the child's side


class _Bounded:
    """A text stream that keeps the first `limit` characters and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.kept, self.dropped = limit, [], 0, 0

    def write(self, text: str) -> int:
        room = self.limit - self.kept
        self.parts.append(text[:max(room, 0)])
        self.kept += min(len(text), max(room, 0))
        self.dropped += max(len(text) - max(room, 0), 0)
        return len(text)

    def flush(self) -> None:
        pass

    def value(self) -> str:
        text = "".join(self.parts)
        return text + (f"\n[... {self.dropped} more characters cut]" if self.dropped else "")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} more characters cut]"


def _no_network() -> None:
    """A new user and network namespace (only a loopback, down) where unprivileged namespaces are allowed;
    and in any case Python's socket layer refuses, for kernels that forbid them."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET; failure leaves the patch below
    except Exception:  # noqa: BLE001 - no libc or no unshare: the socket patch still holds
        pass
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled for tools")

    class Refused(socket.socket):  # a class still (modules subclass socket.socket), but none can be made
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = Refused
    for name in ("create_connection", "getaddrinfo", "socketpair", "fromfd", "create_server"):
        setattr(socket, name, refuse)


def _limit(memory_mb: int, cpu_seconds: int, file_bytes: int) -> None:
    import resource

    for kind, value in ((resource.RLIMIT_AS, memory_mb * 2**20), (resource.RLIMIT_CPU, cpu_seconds),
                        (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NPROC, 0)):
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # a limit the platform lacks or that is already lower
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file limit then fails instead of killing


def _load(target: str):
    import importlib
    import importlib.util

    module_name, _, name = target.rpartition(":")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("lmforge_tool", module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, name)


def _child() -> None:
    request = json.loads(sys.stdin.read())
    limit = request["output_chars"]
    sys.path[:] = request["path"]
    result_file = open(request["result"], "w", encoding="utf-8")  # opened before the limits: it must be writable
    _limit(request["memory_mb"], request["cpu_seconds"], 8 * limit + 65536)
    _no_network()
    printed = _Bounded(limit)
    sys.stdout = sys.stderr = printed
    try:
        value = _load(request["target"])(**request["arguments"])
        text = value if isinstance(value, str) else json.dumps(value, default=repr, ensure_ascii=False)
        kind, text = "ok", _cut(text, limit)
    except MemoryError:
        kind, text = "memory", f"error: the tool ran out of memory (limit {request['memory_mb']} MB)"
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: all are observations
        kind, text = "error", _cut(f"error: {type(exc).__name__}: {exc}", limit)
    shown = printed.value()
    if shown:
        text = f"{text}\n[printed]\n{shown}"
    json.dump({"kind": kind, "text": text}, result_file)
    result_file.close()


if __name__ == "__main__":
    _child()
