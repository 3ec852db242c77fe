"""A real `lmforge serve` process for the abusive-client tests, watched from outside: its peak RSS (the
kernel's VmHWM), its open descriptors and mapped files sampled from /proc, and every file operation
Python made in it, logged by an audit hook (PEP 578) that this file installs when run as a script:

    python client_harness.py AUDIT_LOG serve MODEL --port N ...

The audit hook sees every open, listdir, mkdir, remove and rename made through Python (imports included);
files opened by native code (the safetensors and tokenizers libraries) are caught by the /proc samples
of open descriptors and memory maps instead."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos_trials import FULL, trials  # noqa: F401  (re-exported to the tests)

AUDITED_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rmdir", "os.rename",
                  "os.replace", "os.truncate", "os.symlink", "os.link", "os.chmod", "os.utime", "shutil.rmtree",
                  "shutil.copyfile", "tempfile.mkstemp", "tempfile.mkdtemp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model(tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised 2-layer Llama (the `test` preset) with a ChatML tokenizer: what it says does
    not matter here, only how the server holds up."""
    from transformers import AutoTokenizer

    from lmforge.models.load import build_scratch_model

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    build_scratch_model("test", tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class Watch:
    """What the sampler saw of the server process."""
    peak_rss_kib: int = 0
    rss_kib: int = 0
    max_fds: int = 0
    fd_paths: set[str] = field(default_factory=set)
    mapped_paths: set[str] = field(default_factory=set)
    samples: int = 0


class ServerProcess:
    """`lmforge serve` under the audit hook, with cwd and HOME in empty folders of `workdir`."""

    def __init__(self, model: Path, workdir: Path, api_key: str | None = None, extra: tuple[str, ...] = ()):
        self.port, self.api_key = free_port(), api_key
        self.model = model.resolve()
        self.cwd, self.home = workdir / "cwd", workdir / "home"
        self.cwd.mkdir(parents=True)
        self.home.mkdir()
        self.audit_log = workdir / "audit.log"
        self.output_log = workdir / "server.log"
        # One thread: a 2-layer model gains nothing from more, and CI machines are shared.
        env = {**os.environ, "HOME": str(self.home), "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
               "OMP_NUM_THREADS": "1"}
        env.pop("LMFORGE_API_KEY", None)
        if api_key:
            env["LMFORGE_API_KEY"] = api_key
        command = [sys.executable, str(Path(__file__).resolve()), str(self.audit_log), "serve", str(self.model),
                   "--port", str(self.port), "--name", "tiny", *extra]
        with self.output_log.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.watch = Watch()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self, timeout: float = 120) -> ServerProcess:
        """Wait until it answers (at once if it did already)."""
        if hasattr(self, "ready_at"):
            return self
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                if request(self.port, "GET", "/health", headers=self.auth_headers(), timeout=2)[0] == 200:
                    self.ready_at = time.monotonic()
                    self.rss_at_ready_kib = _rss_kib(self.process.pid)
                    self._sampler.start()
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {timeout}s: {self.output()}")

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        return self.output_log.read_text(errors="replace")[-3000:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def _sample(self) -> None:
        pid = self.process.pid
        while not self._stop.is_set() and self.alive():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                fds = os.listdir(f"/proc/{pid}/fd")
                for fd in fds:
                    try:
                        self.watch.fd_paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    except OSError:  # closed between the listing and the look
                        pass
                for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].startswith("/"):
                        self.watch.mapped_paths.add(parts[5])
            except OSError:
                break
            fields_ = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            self.watch.rss_kib = int(fields_["VmRSS"].split()[0])
            self.watch.peak_rss_kib = int(fields_["VmHWM"].split()[0])  # the kernel's own peak
            self.watch.max_fds = max(self.watch.max_fds, len(fds))
            self.watch.samples += 1
            self._stop.wait(0.05)

    def stop(self) -> int | None:
        """Stop sampling and the server; the exit code if it had died on its own, else None."""
        self._stop.set()
        died = self.process.poll()
        if died is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._sampler.is_alive():
            self._sampler.join(timeout=5)
        return died

    def file_events(self, since: float = 0.0) -> list[FileEvent]:
        """What the audit hook logged at or after `since` (a time.monotonic() of this machine)."""
        events = []
        for line in self.audit_log.read_text(errors="replace").splitlines():
            when, event, access, path = line.split("\t", 3)
            if float(when) >= since:
                events.append(FileEvent(float(when), event, access == "w", path))
        return events


@dataclass(frozen=True)
class FileEvent:
    when: float
    event: str
    writes: bool
    path: str


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection: (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def raw_request(port: int, data: bytes) -> tuple[int | None, bytes]:
    """Send raw bytes (a request no HTTP client would normalise) and read one whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        answer = b""
        while not (b"\r\n\r\n" in answer and len(answer.split(b"\r\n\r\n", 1)[1]) >= _content_length(answer)):
            piece = s.recv(65536)
            if not piece:
                break
            answer += piece
    return (int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None), answer


def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def post_json(port: int, path: str, payload, key: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return request(port, "POST", path, json.dumps(payload).encode(), headers, timeout)


def raw_exchange(port: int, data: bytes, timeout: float = 30, pause: float = 0.0) -> int | None:
    """Send raw bytes (optionally one byte per `pause` seconds) and return the status code of the answer,
    or None when the server closed the connection without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if pause:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(pause)
            else:
                s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on us; what it answered (if anything) is still readable
        head = b""
        try:
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    if not head.startswith(b"HTTP/1."):
        return None
    return int(head.split(b" ", 2)[1])


def _audit_and_run(log_path: str, argv: list[str]) -> int:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def hook(event: str, args: tuple) -> None:
        if event not in AUDITED_EVENTS or not args:
            return
        two_paths = event in ("os.rename", "os.replace", "os.symlink", "os.link", "shutil.copyfile")
        writes = _opens_for_writing(args) if event == "open" else event not in ("os.listdir", "os.scandir")
        for target in args[:2] if two_paths else args[:1]:
            if isinstance(target, bytes):
                target = os.fsdecode(target)
            if not isinstance(target, str | os.PathLike):
                continue  # a descriptor already opened (and logged) by path
            path = os.path.realpath(os.fspath(target) or ".")
            # CLOCK_MONOTONIC is one clock for the whole machine: the test compares these times with its own.
            os.write(log_fd, f"{time.monotonic():.3f}\t{event}\t{'w' if writes else 'r'}\t{path}\n"
                     .encode(errors="backslashreplace"))

    sys.addaudithook(hook)
    from lmforge.cli import main

    return main(argv)


def _opens_for_writing(args: tuple) -> bool:
    mode, flags = (args + (None, None))[1:3]
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))


if __name__ == "__main__":
    sys.exit(_audit_and_run(sys.argv[1], sys.argv[2:]))


SLOW_KINDS = ("headers byte by byte", "body byte by byte", "silent")


def slow_loris(port: int, sockets: int, seconds: float, head: bytes) -> dict[str, list[float | None]]:
    """Open `sockets` connections split among SLOW_KINDS and keep each one trickling (one byte per socket
    every 0.1 s) for up to `seconds`. `head` is a request line and headers (not yet ended) that would be
    accepted. Returns, per kind, the seconds after which the server closed each connection (None: still
    open at the end)."""
    payloads = {"headers byte by byte": head + b"X-Pad: " + b"a" * 4000 + b"\r\n\r\n",
                "body byte by byte": head + b"Content-Length: 4000\r\n\r\n" + b" " * 4000, "silent": b""}
    first = {"body byte by byte": len(head) + len(b"Content-Length: 4000\r\n\r\n")}  # headers sent whole
    opened = []
    for i in range(sockets):
        kind = SLOW_KINDS[i % len(SLOW_KINDS)]
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        opened.append([kind, s, first.get(kind, 0), None])
        if first.get(kind):
            _send_all_nonblocking(s, payloads[kind][:first[kind]])
    start = time.monotonic()
    while time.monotonic() - start < seconds and any(entry[3] is None for entry in opened):
        for entry in opened:
            kind, s, sent, closed = entry
            if closed is not None:
                continue
            try:
                if s.recv(4096) == b"":  # the server closed it (or answered and closed)
                    entry[3] = time.monotonic() - start
                    continue
            except BlockingIOError:
                pass
            except OSError:
                entry[3] = time.monotonic() - start
                continue
            if sent < len(payloads[kind]):
                try:
                    entry[2] += s.send(payloads[kind][sent:sent + 1])
                except BlockingIOError:
                    pass
                except OSError:
                    entry[3] = time.monotonic() - start
        time.sleep(0.1)
    seen: dict[str, list[float | None]] = {kind: [] for kind in SLOW_KINDS}
    for kind, s, _, closed in opened:
        seen[kind].append(closed)
        s.close()
    return seen


def _send_all_nonblocking(s: socket.socket, data: bytes) -> None:
    s.setblocking(True)
    s.sendall(data)
    s.setblocking(False)


def upload(port: int, head: bytes, body_pieces, timeout: float = 30) -> tuple[int | None, int]:
    """Send `head` then the pieces of a body, stopping as soon as the server answers: (the status it
    answered, or None if it closed without one; the body bytes sent before that)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        try:
            for piece in body_pieces:
                if select.select([s], [], [], 0)[0]:
                    break  # an answer (or a close) came before the whole body: stop and read it
                s.sendall(piece)
                sent += len(piece)
        except OSError:
            pass
        try:
            answer = s.recv(4096)
        except OSError:
            answer = b""
    return (int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None), sent


def chunked(data: bytes, size: int = 64 << 10):
    """`data` in HTTP/1.1 chunked transfer coding."""
    for i in range(0, len(data), size):
        piece = data[i:i + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"
