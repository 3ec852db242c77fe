"""The web UI against a visitor who wants to run code (issue 19, point 1), over real HTTP against a real
`lmforge webui` process started without a login, as most people start it. The visitor tries to plant files
through Save (a Python/YAML polyglot, a model folder's config.json or weights, overwriting data and a run's
config), to run or resume a config whose paths leave --root or that switches trust_remote_code on (written
through Save, or changed on disk between Save and Run), to read outside the root through Preview and a
dataset_info.json entry, and to reach the app under a foreign Host name (DNS rebinding). Every attempt must
be refused with a one-line ⚠ message, leave every file as it was, start no process, and put no traceback
in the app's log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from client_harness import free_port, raw_request, request

from lmforge.webui.forms import FORM_FIELDS, grouped_fields

pytestmark = pytest.mark.chaos

MARKER = "TOPSECRET-c41d"
"""The text of every file outside --root: an answer that contains it has read outside."""
PLANTED = "PLANTED-CODE-RAN"
"""What the planted remote-code module would write if it ever ran."""
GOOD = """run_dir: runs/p
stages:
  - name: sft
    stage: sft
    config:
      model: {scratch: test, tokenizer: tok}
      data: {train: data/missing.jsonl}
"""
POLYGLOT = f'x: int = open("{PLANTED}", "w").write("{PLANTED}")\n'
"""Python (an annotated assignment that writes a file) and YAML (a mapping) at once."""


def pipeline(**changes) -> str:
    """GOOD with a change: `run_dir`, `name`, or `model`/`data`/`rl` of the stage's config."""
    import yaml

    raw = yaml.safe_load(GOOD)
    if "run_dir" in changes:
        raw["run_dir"] = changes.pop("run_dir")
    if "name" in changes:
        raw["stages"][0]["name"] = changes.pop("name")
    for key in ("tokenizer", "eval"):
        if key in changes:
            raw[key] = changes.pop(key)
    raw["stages"][0]["config"].update(changes)
    return yaml.safe_dump(raw)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, world_tokenizer_dir) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("webui-hostile")
    root, outside = base / "root", base / "outside"
    for folder in ("model", "data", "info", "runs/r1"):
        (root / folder).mkdir(parents=True)
    shutil.copytree(world_tokenizer_dir, root / "tok")  # a tokenizer that loads: Preview gets as far as the data
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"text": MARKER}) + "\n")
    (root / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))
    (root / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (root / "data" / "ok.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (root / "info" / "dataset_info.json").write_text(json.dumps({
        "escape": {"file_name": "../../outside/secret.jsonl", "columns": {"prompt": "text"}},
        "absolute": {"file_name": str(outside / "secret.jsonl"), "columns": {"prompt": "text"}},
        "ok": {"file_name": "../data/ok.jsonl", "columns": {"prompt": "text"}}}))
    (root / "runs" / "r1" / "webui-config.yaml").write_text(
        "stage: sft\nmodel: {scratch: test, tokenizer: tok}\ndata: {train: data/ok.jsonl}\n"
        "train: {output_dir: runs/r1}\n")
    (root / "good.yaml").write_text(GOOD)  # a pipeline the user wrote
    (root / "compose.yaml").write_text("services:\n  web: {image: nginx}\n")  # some other tool's YAML
    return base, root, outside


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with a digest of its bytes: what changed, appeared or vanished."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            app_log = path.name.startswith("webui-") and path.suffix == ".log"
            if path.is_file() and not path.is_symlink() and not app_log:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


class WebUI:
    """`lmforge webui` without --auth on a free loopback port, root's parent as its working folder."""

    def __init__(self, base: Path, root: Path, *extra: str):
        self.port, self.log = free_port(), base / f"webui-{len(extra)}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lmforge.cli", "webui", "--root", str(root), "--port", str(self.port), *extra],
                cwd=base, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})

    def ready(self) -> int:
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                if request(self.port, "GET", "/", headers={"Host": f"127.0.0.1:{self.port}"}, timeout=2)[0] == 200:
                    return self.port
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the web UI did not answer: {self.log.read_text()[-3000:]}")

    def call(self, name: str, *args) -> str:
        """One endpoint through Gradio's HTTP API: the text of its event stream."""
        headers = {"Content-Type": "application/json", "Host": f"127.0.0.1:{self.port}"}
        status, answer = request(self.port, "POST", f"/gradio_api/call/{name}",
                                 json.dumps({"data": list(args)}).encode(), headers)
        assert status == 200, (name, status, answer[:300])
        status, stream = request(self.port, "GET", f"/gradio_api/call/{name}/{json.loads(answer)['event_id']}",
                                 headers=headers)
        text = stream.decode()
        assert "event: complete" in text and "event: error" not in text, (name, args, text[:500])
        return json.loads(text.split("data: ", 1)[1].splitlines()[0])[0] if "data: " in text else ""


@pytest.fixture(scope="module")
def webui(tree):
    app = WebUI(tree[0], tree[1])
    app.ready()
    yield app
    app.process.terminate()
    app.process.wait(timeout=30)
    assert "Traceback" not in app.log.read_text(), app.log.read_text()[-3000:]


TALLY = {"tried": 0, "refused": 0}


def refused(answer: str) -> bool:
    TALLY["tried"] += 1
    TALLY["refused"] += answer.startswith("⚠") and "\n" not in answer.strip() and MARKER not in answer
    return answer.startswith("⚠") and "\n" not in answer.strip() and MARKER not in answer


SAVES = [  # (name, text): each must be refused and leave the tree as it was
    ("modeling_x.py", POLYGLOT),
    ("config.json", json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}, "model_type": "llama"})),
    ("model/config.json", json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}})),
    ("model/model.safetensors", "a: b\n"),
    ("model/modeling_x.py", POLYGLOT),
    ("model/pipeline.yaml", GOOD),  # a model's folder takes no file from the UI
    ("data/ok.jsonl", '{"text": "overwritten"}\n'),
    ("runs/r1/webui-config.yaml", GOOD),  # a run's config
    ("runs/r1/new.yaml", GOOD),  # a run's folder
    ("compose.yaml", GOOD),  # exists and is not a pipeline
    (".github/workflows/x.yaml", GOOD),
    ("../escape.yaml", GOOD),
    ("evil.yaml", pipeline(model={"name_or_path": ".", "trust_remote_code": True})),
    ("evil.yaml", pipeline(run_dir="../escaped")),
    ("evil.yaml", pipeline(run_dir="/tmp/lmforge-escaped")),
    ("evil.yaml", pipeline(name="../../../escaped")),
    ("evil.yaml", pipeline(model={"name_or_path": "../outside"})),
    ("evil.yaml", pipeline(model={"scratch": "test", "tokenizer": "/etc"})),
    ("evil.yaml", pipeline(data={"train": {"name": "escape"}, "dataset_dir": "info"})),
    ("evil.yaml", pipeline(data={"train": {"name": "absolute"}, "dataset_dir": "info"})),
    ("evil.yaml", pipeline(data={"train": "data/ok.jsonl", "eval": "../outside/secret.jsonl"})),
    ("evil.yaml", pipeline(data={"train": "../*/secret.jsonl"})),
    ("evil.yaml", pipeline(train={"resume_from": "../outside"})),
    ("evil.yaml", pipeline(tokenizer={"train": "../outside/secret.jsonl"})),
    ("evil.yaml", pipeline(eval={"perplexity": "../outside/secret.jsonl"})),
    ("evil.yaml", GOOD.replace("stage: sft", "stage: grpo").replace(
        "data/missing.jsonl}", "data/missing.jsonl}\n      rl: {num_generations: 2, rewards: "
        "[{kind: function, function: 'data/x.py:reward'}]}")),
    ("evil.yaml", "a: &a [1, 2]\nb: [*a, *a]\n"),  # aliases: refused before anything expands them
    ("evil.yaml", "run_dir: [unclosed\n"),
    ("evil.yaml", GOOD + "x" * (1 << 20)),
    ("a\x00b.yaml", GOOD),
    ("", GOOD),
]


def test_save_writes_only_validated_pipelines_under_names_it_controls(webui, tree):
    base, root, outside = tree
    before = snapshot(base)
    for name, text in SAVES:
        answer = webui.call("save_pipeline", name, text)
        assert refused(answer), (name, text[:80], answer)
    assert snapshot(base) == before  # nothing planted, nothing overwritten, nothing escaped
    assert not (base / "escaped").exists() and not Path("/tmp/lmforge-escaped").exists()
    # What Save is for still works: a new pipeline, then the same name again, and over a user's pipeline.
    assert webui.call("save_pipeline", "mine.yaml", GOOD) == "saved mine.yaml"
    assert webui.call("save_pipeline", "mine.yaml", GOOD.replace("runs/p", "runs/q")) == "saved mine.yaml"
    assert webui.call("save_pipeline", "good.yaml", GOOD.replace("runs/p", "runs/g")) == "saved good.yaml"
    assert (root / "mine.yaml").read_text() == GOOD.replace("runs/p", "runs/q")
    assert webui.call("read_pipeline", "mine.yaml").strip() == GOOD.replace("runs/p", "runs/q").strip()


CHANGED_ON_DISK = [  # what a pipeline file may become between Save and Run (another process, a shell)
    pipeline(model={"name_or_path": ".", "trust_remote_code": True}),
    pipeline(run_dir="../escaped"),
    pipeline(name="../../../escaped"),
    pipeline(data={"train": {"name": "escape"}, "dataset_dir": "info"}),
    pipeline(model={"name_or_path": "model", "attn_implementation": "kernels-community/flash-attn"}),  # Hub code
    pipeline(train={"lr": "fast"}),  # the schema's own refusal
]


def test_run_and_resume_check_the_file_actually_run(webui, tree):
    base, root, outside = tree
    (root / "model" / "modeling_x.py").write_text(POLYGLOT)  # planted by some other way than the UI
    (root / "model" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                            "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    before = snapshot(base)
    for text in CHANGED_ON_DISK:
        (root / "good.yaml").write_text(text)
        before[str(root / "good.yaml")] = hashlib.sha256(text.encode()).hexdigest()
        assert refused(webui.call("run_pipeline", "good.yaml")), text
    run_config = root / "runs" / "r1" / "webui-config.yaml"
    for text in ["stage: sft\nmodel: {name_or_path: model, trust_remote_code: true}\ndata: {train: data/ok.jsonl}\n"
                 "train: {output_dir: runs/r1}\n",
                 "stage: sft\nmodel: {scratch: test, tokenizer: tok}\ndata: {train: data/ok.jsonl}\n"
                 "train: {output_dir: ../escaped}\n",
                 "stage: sft\nmodel: {scratch: test, tokenizer: tok}\ndata: {train: data/ok.jsonl}\n"
                 "train: {output_dir: runs/other}\n",  # inside root, but not this run's folder
                 "stage: sft\nmodel: {scratch: test, tokenizer: tok}\ndata: {train: {name: escape}, "
                 "dataset_dir: info}\ntrain: {output_dir: runs/r1}\n"]:
        run_config.write_text(text)
        before[str(run_config)] = hashlib.sha256(text.encode()).hexdigest()
        assert refused(webui.call("resume_run", "r1")), text
    time.sleep(1)
    assert snapshot(base) == before  # no log, no run folder: nothing was started
    assert not (base / PLANTED).exists() and not (root / PLANTED).exists()


def test_a_pipeline_runs_from_the_text_that_was_checked(webui, tree):
    base, root, outside = tree
    (root / "fails.yaml").write_text(GOOD.replace("runs/p", "runs/f"))
    answer = webui.call("run_pipeline", "fails.yaml")
    assert answer.startswith("running fails.yaml"), answer
    (root / "fails.yaml").write_text(pipeline(model={"name_or_path": ".", "trust_remote_code": True}))
    log = root / "fails.webui-run.log"
    deadline = time.time() + 120
    while time.time() < deadline and "data/missing.jsonl" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    assert "data/missing.jsonl" in log.read_text()  # the checked text ran (it names the missing data) ...
    assert "trust_remote_code" not in log.read_text() and not (root / PLANTED).exists()  # ... not the new one


def test_preview_and_start_cannot_read_outside_through_dataset_info(webui, tree):
    base, root, outside = tree
    form = ["sft", "scratch:test", "tok", "escape", "info", "full", 1e-4, 1, 8, 128, 8, "sigmoid", "runs/x", 1]
    form += [None] * (len(FORM_FIELDS) + len(grouped_fields()) - len(form))  # every other field: its default
    for entry in ("escape", "absolute", "escape, ok"):
        form[3] = entry
        for name in ("preview", "start", "make_yaml"):
            answer = webui_message(webui, form) if name == "make_yaml" else webui.call(name, *form)
            assert refused(answer.removeprefix("<p>").removesuffix("</p>")), (name, entry, answer)
    assert not (root / "runs" / "x").exists()


def webui_message(webui, form) -> str:
    """Show YAML answers with (YAML, message): the message is the refusal."""
    headers = {"Content-Type": "application/json", "Host": f"127.0.0.1:{webui.port}"}
    status, answer = request(webui.port, "POST", "/gradio_api/call/make_yaml", json.dumps({"data": form}).encode(),
                             headers)
    stream = request(webui.port, "GET", f"/gradio_api/call/make_yaml/{json.loads(answer)['event_id']}",
                     headers=headers)[1].decode()
    return json.loads(stream.split("data: ", 1)[1].splitlines()[0])[1]


FOREIGN_HOSTS = ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "localhost.evil.example",
                 "attacker.localhost.evil:{port}", "[::2]:{port}", "0.0.0.0:{port}", "10.0.0.1:{port}", "localhost.",
                 "", "127.0.0.1:{port}@evil.example", "127.0.0.1 evil.example"]


def test_foreign_host_header_is_refused(webui):
    port = webui.port
    for host in FOREIGN_HOSTS:
        for path in ("/", "/config", "/gradio_api/info"):
            status, answer = request(port, "GET", path, headers={"Host": host.format(port=port)})
            TALLY["tried"] += 1
            TALLY["refused"] += 400 <= status < 500
            assert status in (400, 403) and b"gradio" not in answer.lower(), (host, path, status)
    status, _ = raw_request(port, b"GET / HTTP/1.0\r\n\r\n")  # no Host at all
    assert status in (400, 403)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", "localhost", f"[::1]:{port}"):
        assert request(port, "GET", "/", headers={"Host": host})[0] == 200, host


def test_chat_and_export_refuse_what_is_no_model_and_never_write_over_one(webui, tree):
    base, root, outside = tree
    before = snapshot(root)
    for folder in ("data", "tok", "model", "runs", "info/dataset_info.json"):
        headers = {"Content-Type": "application/json", "Host": f"127.0.0.1:{webui.port}"}
        status, answer = request(webui.port, "POST", "/gradio_api/call/chat",
                                 json.dumps({"data": ["hi", folder, 0.7, 16]}).encode(), headers)
        stream = request(webui.port, "GET", f"/gradio_api/call/chat/{json.loads(answer)['event_id']}",
                         headers=headers)[1].decode()
        TALLY["tried"] += 1
        TALLY["refused"] += "\\u26a0" in stream and "event: error" not in stream
        assert "\\u26a0" in stream and "event: error" not in stream, (folder, stream[:500])
        assert refused(webui.call("export", folder, "exports/x", "as loaded", False)), folder
    for out in ("model", ".", "../escaped", "data/.."):
        assert refused(webui.call("export", "data", out, "as loaded", False)), out
    assert snapshot(root) == before and not (root / "exports").exists()


def test_uploads_are_small_and_land_outside_root(webui, tree):
    """Gradio's own upload route is open to every visitor (this app has no upload field): it must neither
    fill the disk nor put a file under --root."""
    base, root, outside = tree
    before = snapshot(root)
    for size in (2 << 20, 8 << 20):
        boundary = "lmforgeboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"modeling_x.py\"\r\n"
                f"Content-Type: text/plain\r\n\r\n").encode() + b"#" * size + f"\r\n--{boundary}--\r\n".encode()
        status, answer = request(webui.port, "POST", "/gradio_api/upload", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                  "Host": f"127.0.0.1:{webui.port}"})
        TALLY["tried"] += 1
        TALLY["refused"] += status == 413
        assert status == 413, (size, status, answer[:300])
    assert snapshot(root) == before


def test_non_loopback_without_login_is_refused(tree):
    from lmforge.config.errors import ConfigError
    from lmforge.webui.hosts import check_exposure, login

    base, root, outside = tree
    # The command itself, once: a one-line error and exit status 2 before anything listens.
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "webui", "--root", str(root), "--port",
                           str(free_port()), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=300,
                          cwd=base, env={k: v for k, v in os.environ.items() if k != "LMFORGE_WEBUI_AUTH"})
    output = done.stdout + done.stderr
    TALLY["tried"] += 1
    TALLY["refused"] += done.returncode == 2 and "Traceback" not in output and "--auth" in output
    assert done.returncode == 2 and "Traceback" not in output and "--auth" in output, output[-1500:]
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.com", "127.0.0.1.nip.io"):
        TALLY["tried"] += 1
        with pytest.raises(ConfigError, match="--auth"):
            check_exposure(host, None)
        TALLY["refused"] += 1
    for auth in ("nocolon", ":empty-user", "user:", ""):
        TALLY["tried"] += 1
        with pytest.raises(ConfigError, match="USER:PASSWORD"):
            check_exposure("0.0.0.0", login(auth or ":"))
        TALLY["refused"] += 1
    check_exposure("0.0.0.0", login("alice:correct-horse"))  # with a login it may listen
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)


def test_tally():
    """The figures for docs/reliability.md (printed with -s)."""
    print(f"\nweb UI hostile cases: {TALLY}")
    assert TALLY["tried"] == TALLY["refused"]
