"""The web UI under hostile input. `checked_path` fuzzed with traversal strings, absolute paths, symlinks
(out of --root, into it, chained, looping, up a level), NUL bytes, surrogates and over-long names; the
Train form's path fields; and a real `lmforge webui --auth` process: listening on 127.0.0.1 alone, giving
nothing but its login page without credentials, and its path-taking endpoints, called over HTTP once
logged in, never reading or writing outside --root."""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from client_harness import free_port, request, trials

from lmforge.config.errors import ConfigError
from lmforge.webui.forms import FORM_FIELDS, TrainForm, checked_path, form_to_config, grouped_fields

MARKER = "TOPSECRET-7f3a"
"""The text of every file outside --root: an answer that contains it has read outside."""
USER, PASSWORD = "alice", "correct-horse-42"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path, Path]:
    """base/root is what the app serves; base/outside holds secrets; links cross between them."""
    base = tmp_path_factory.mktemp("webui-paths")
    root, outside = base / "root", base / "outside"
    (root / "data").mkdir(parents=True)
    (root / "runs" / "r1").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text(MARKER + "\n")
    (outside / "pipe.yaml").write_text(f"# {MARKER}\nstages: []\n")
    (root / "data" / "ok.jsonl").write_text('{"text": "hello"}\n')
    (root / "pipe.yaml").write_text("stages: []\n")
    (root / "out").symlink_to(outside)  # a folder link out
    (root / "data" / "sneaky.yaml").symlink_to(outside / "pipe.yaml")  # a file link out
    (root / "in").symlink_to(root / "data")  # a link that stays inside
    (root / "chain1").symlink_to(root / "chain2")
    (root / "chain2").symlink_to(outside)  # a chain that ends outside
    (root / "loop").symlink_to(root / "loop")
    (root / "ping").symlink_to(root / "pong")  # a loop of two links
    (root / "pong").symlink_to(root / "ping")
    (root / "up").symlink_to("..")  # relative: the parent of root
    return base, root, outside


ACCEPTED = {"data/ok.jsonl": "data/ok.jsonl", "in/ok.jsonl": "data/ok.jsonl", "./data//ok.jsonl": "data/ok.jsonl",
            "data/../data/ok.jsonl": "data/ok.jsonl", "runs/r1/": "runs/r1", ".": ".", " data ": "data"}
NEW_NAMES = {"%2e%2e": "%2e%2e", "~": "~", "..\\..\\x": "..\\..\\x", "runs/new": "runs/new", "...": "..."}
REFUSED = ["..", "../", "../outside/secret.txt", "data/../../outside/secret.txt", "/etc/passwd", "/", "//etc",
           "out", "out/secret.txt", "chain1/secret.txt", "up/outside/secret.txt", "up/root/../outside",
           "data/sneaky.yaml", "in/../../outside", "loop", "loop/x", "loop/../out/new.yaml",
           "ping/../out/new.yaml", "a\x00b", "\ud800", "a" * 5000, "", "   ",
           None, 5]


def test_checked_path_table(tree):
    base, root, outside = tree
    for value, expected in ACCEPTED.items():
        assert checked_path(value, root) == expected, value
    assert checked_path(str(root / "data" / "ok.jsonl"), root) == "data/ok.jsonl"  # absolute, inside
    for value, expected in NEW_NAMES.items():  # odd but harmless names: files inside root
        assert checked_path(value, root, must_exist=False) == expected, value
    for value in [*REFUSED, str(outside / "secret.txt"), str(root / ".." / "outside"), str(base)]:
        with pytest.raises(ConfigError):
            checked_path(value, root, must_exist=False)


def test_checked_path_fuzzed_never_leaves_root(tree):
    base, root, outside = tree
    rng = random.Random(1)
    pieces = ["..", ".", "", "data", "ok.jsonl", "out", "in", "loop", "ping", "chain1", "chain2", "up", "root", "outside",
              "secret.txt", "runs", "r1", "sneaky.yaml", "~", "%2e%2e", "..\\..", "\x00", "\ud800", "a" * 300,
              "etc", "passwd"]
    starts = ["", "/", str(root) + "/", str(base) + "/", str(outside) + "/", " ", "./"]
    outcome = {"accepted": 0, "refused": 0}
    for _ in range(trials(3000, 30000)):
        value = rng.choice(starts) + "/".join(rng.choices(pieces, k=rng.randint(1, 6)))
        try:
            relative = checked_path(value, root, must_exist=rng.random() < 0.5)
        except ConfigError:
            outcome["refused"] += 1
            continue
        outcome["accepted"] += 1
        target = os.path.realpath(root / relative)  # the OS's own reading of where it points
        assert os.path.commonpath([target, str(root)]) == str(root), (value, relative, target)
    # both kinds are common: the check is neither refusing everything nor letting everything through
    assert outcome["accepted"] > trials(3000, 30000) // 20 and outcome["refused"] > trials(3000, 30000) // 4, outcome


def test_form_path_fields_cannot_leave_root(tree):
    base, root, outside = tree
    form = TrainForm(stage="sft", model="scratch:test", tokenizer="data", data="data/ok.jsonl", method="full",
                     output_dir="runs/new")
    assert form_to_config(form, root)["data"]["train"] == "data/ok.jsonl"
    for field, value in [("model", ".."), ("model", "up"), ("model", "../outside"), ("model", str(outside)),
                         ("model", "scratch:test"), ("tokenizer", "../outside"), ("tokenizer", "out"),
                         ("data", "data/ok.jsonl, ../outside/secret.txt"), ("data", "data/sneaky.yaml"),
                         ("dataset_dir", ".."), ("output_dir", "../escaped"), ("output_dir", "out/run")]:
        changed = {**form.__dict__, field: value}
        if field == "model" and value == "scratch:test":
            changed["tokenizer"] = "chain1"
        with pytest.raises(ConfigError, match="outside the folder"):
            form_to_config(TrainForm(**changed), root)
    assert not (base / "escaped").exists()


class WebUI:
    """`lmforge webui --auth` on a free port, with root's parent as its working folder (a ".." that slipped
    through would land there)."""

    def __init__(self, base: Path, root: Path):
        self.port, self.log = free_port(), base / "webui.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lmforge.cli", "webui", "--root", str(root), "--port", str(self.port),
                 "--auth", f"{USER}:{PASSWORD}"], cwd=base, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})

    def ready(self) -> int:
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                if request(self.port, "GET", "/", timeout=2)[0] == 200:
                    return self.port
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the web UI did not answer: {self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module", autouse=True)
def webui(tree):
    """Started before the first test, so that its boot overlaps the checks that do not need it."""
    app = WebUI(tree[0], tree[1])
    yield app
    app.process.terminate()
    app.process.wait(timeout=30)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (hex, as /proc/net/tcp{,6} write them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local.endswith(f":{port:04X}"):
                found.add(local.rsplit(":", 1)[0])
    return found


def login(port: int, password: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/login", f"username={USER}&password={password}".encode(),
                       {"Content-Type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    response.read()
    cookies = "; ".join(v.split(";")[0] for k, v in response.getheaders() if k.lower() == "set-cookie")
    connection.close()
    return response.status, cookies


def test_webui_listens_on_loopback_and_refuses_strangers(webui, tree):
    port = webui.ready()
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
    secret = tree[2] / "secret.txt"
    ok_file = tree[1] / "data" / "ok.jsonl"
    for method, path in [("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", f"/gradio_api/file={ok_file}"),
                         ("GET", f"/gradio_api/file={secret}"), ("GET", "/gradio_api/queue/status"),
                         ("POST", "/gradio_api/call/read_pipeline"), ("POST", "/gradio_api/queue/join"),
                         ("POST", "/gradio_api/upload"), ("POST", "/gradio_api/run/predict")]:
        for cookie in ("", "access-token=forged; access-token-unsecure=forged"):
            payload = json.dumps({"data": ["pipe.yaml"], "fn_index": 0, "session_hash": "x"}).encode()
            status, answer = request(port, method, path, payload if method == "POST" else None,
                                     {"Content-Type": "application/json", "Cookie": cookie})
            assert status == 401 and MARKER.encode() not in answer, (method, path, status)
    assert login(port, "wrong")[0] == 400
    status, cookie = login(port, PASSWORD)
    assert status == 200 and cookie
    assert request(port, "GET", "/gradio_api/info", headers={"Cookie": cookie})[0] == 200
    assert request(port, "GET", f"/gradio_api/file={ok_file}", headers={"Cookie": cookie})[1] == b'{"text": "hello"}\n'
    for target in [secret, tree[1] / "out" / "secret.txt", f"{tree[1]}/../outside/secret.txt",
                   f"{tree[1]}/%2e%2e/outside/secret.txt", tree[1] / "data" / "sneaky.yaml", "/etc/passwd"]:
        status, answer = request(port, "GET", f"/gradio_api/file={target}", headers={"Cookie": cookie})
        assert status == 403 and MARKER.encode() not in answer, (target, status)


def call(port: int, cookie: str, name: str, *args) -> str:
    """One endpoint of the app through Gradio's HTTP API: the text of its event stream."""
    headers = {"Cookie": cookie, "Content-Type": "application/json"}
    status, answer = request(port, "POST", f"/gradio_api/call/{name}", json.dumps({"data": list(args)}).encode(),
                             headers)
    assert status == 200, (name, status, answer[:300])
    status, stream = request(port, "GET", f"/gradio_api/call/{name}/{json.loads(answer)['event_id']}",
                             headers=headers)
    return stream.decode()


def test_webui_endpoints_refuse_outside_paths(webui, tree):
    base, root, outside = tree
    port = webui.ready()
    cookie = login(port, PASSWORD)[1]
    before = {p: sorted(os.listdir(p)) for p in (base, outside)}
    form = ["sft", "scratch:test", "data", "data/ok.jsonl", "", "full", 1e-4, 1, 8, 128, 8, "sigmoid", "runs/x", 1]
    form += [None] * (len(FORM_FIELDS) + len(grouped_fields()) - len(form))  # every other field: its default
    bad = ["../outside/secret.txt", "loop/../out/stolen.yaml", "up", "a\x00b", str(outside / "secret.txt"),
           "data/sneaky.yaml",
           "out/secret.txt", "chain1/pipe.yaml", "..", "loop"][:trials(4, 9)]
    asked = 0
    for value in bad:
        calls = [("read_pipeline", value), ("save_pipeline", value, f"stolen: {MARKER}"), ("run_pipeline", value),
                 ("pipeline_table", value), ("run_curves", value), ("stop_run", value), ("resume_run", value),
                 ("open_report", value), ("export", value, "exported", "as loaded", False),
                 ("export", "data", value, "as loaded", False), ("chat", "hi", value, 0.7, 16)]
        for position in (1, 3, 12):  # model, datasets, output folder of the Train form
            changed = list(form)
            changed[position] = value
            calls += [("preview", *changed), ("make_yaml", *changed), ("start", *changed)]
        for name, *args in calls:
            stream = call(port, cookie, name, *args)
            asked += 1
            assert "event: complete" in stream and "event: error" not in stream, (name, args, stream[:500])
            assert MARKER not in stream, (name, args, stream[:500])
            if name not in ("pipeline_table", "run_curves"):  # those just show nothing
                assert "\\u26a0" in stream, (name, args, stream[:500])  # the ⚠ of a refusal, JSON-escaped
    assert {p: sorted(os.listdir(p)) for p in (base, outside)} == before  # nothing written outside root
    assert not (root / "runs" / "x").exists() and not (root / "exported").exists()  # nothing started either
    assert asked == len(bad) * 20
