"""The web UI end to end in a real browser (Playwright driving Debian's headless Chromium): fill the
Train form for a tiny scratch SFT (a collapsed schema group opened), see the masked-token preview, start
it, watch one chart per metric, its progress and log, evaluate the result in the Evaluate tab, chat with
it, and switch the whole UI to Chinese. Screenshots of each step are kept in the test's folder
(LMFORGE_SCREENSHOTS=DIR copies them out; docs/images/webui-*.png come from there)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(world_dir, world_tokenizer_dir, tmp_path):
    root = tmp_path / "workspace"
    shutil.copytree(world_dir / "sft", root / "data")
    shutil.copytree(world_tokenizer_dir, root / "tokenizer")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "GRADIO_ANALYTICS_ENABLED": "False"}
    # The app's output goes to a file: an unread pipe fills up and stalls the server mid-test.
    log = (tmp_path / "webui.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "webui", "--root", str(root), "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError((tmp_path / "webui.log").read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    yield url, root
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt install chromium)")
def test_train_watch_and_chat_in_the_browser(app_url, tmp_path):
    url, root = app_url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url)
        page.get_by_label("model (folder, GGUF, short name, artifact, scratch:PRESET)").fill("scratch:test")
        page.get_by_label("tokenizer (scratch models)").fill("tokenizer")
        page.get_by_label("datasets (files, folders, dataset_info.json entries; comma-separated)").fill("data/train.jsonl")
        page.get_by_label("method").click()
        page.get_by_role("option", name="full", exact=True).click()
        page.get_by_label("epochs", exact=True).fill("0.3")
        page.get_by_label("learning rate").fill("0.003")
        page.get_by_label("max length").fill("128")
        page.locator("#group-train").get_by_text("train: optimizer").click()  # a collapsed schema group
        page.locator("#field-train-scheduler input").fill("constant")
        page.locator("#field-train-scheduler input").press("Enter")
        page.locator("#field-train-logging_steps input").fill("2")
        page.get_by_role("button", name="Show YAML").click()
        playwright.expect(page.locator("#config-yaml")).to_contain_text("scheduler: constant", timeout=30000)
        page.get_by_role("button", name="Preview").click()
        page.wait_for_selector("#preview mark.loss", timeout=60000)
        marked = page.locator("#preview mark.loss").first.inner_text()
        assert "<|im_end|>" in marked  # the reply and its end-of-turn token carry loss
        assert "user" in page.locator("#preview span.masked").first.inner_text()  # the prompt does not
        page.screenshot(path=str(shots / "1-train-preview.png"), full_page=True)

        page.get_by_role("button", name="Start").click()
        page.wait_for_selector("#train-message:has-text('started')", timeout=30000)

        page.get_by_role("tab", name="Runs").click()
        page.get_by_label("run (as listed)").fill("webui")
        page.wait_for_selector("#curves canvas, #curves svg", timeout=120000)  # the curve drew from metrics.jsonl
        try:  # a picture of the run mid-way for the docs, if this machine is slow enough to catch one
            playwright.expect(page.locator("#run-progress")).to_contain_text(re.compile(r"ETA \d"), timeout=60000)
            page.screenshot(path=str(shots / "2-runs-running.png"), full_page=True)
        except AssertionError:
            pass
        deadline = time.time() + 300
        while not (root / "runs" / "webui" / "lmforge.json").is_file() and time.time() < deadline:
            time.sleep(1)
        playwright.expect(page.locator("#runs-table")).to_contain_text("done", timeout=30000)
        for metric in ("loss", "lr", "grad_norm"):  # one chart each, each on its own axis
            playwright.expect(page.locator(f'#curves svg[data-metric="{metric}"]')).to_have_count(1, timeout=30000)
        playwright.expect(page.locator("#run-progress")).to_contain_text("done: step", timeout=30000)
        assert page.locator("#run-log textarea").input_value().strip()  # the run's log, tailed
        page.screenshot(path=str(shots / "2-runs-done.png"), full_page=True)

        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#eval-artifact input").fill("runs/webui")
        page.locator("#eval-artifact input").press("Enter")
        page.locator("#field-perplexity textarea").fill("data/train.jsonl")
        page.locator("#field-max_samples input").fill("4")
        page.locator("#eval-run").click()
        playwright.expect(page.locator("#eval-message")).to_contain_text("evaluating runs/webui", timeout=30000)
        playwright.expect(page.locator("#eval-results")).to_contain_text("perplexity", timeout=240000)
        playwright.expect(page.locator("#eval-state")).to_contain_text("done", timeout=60000)
        page.screenshot(path=str(shots / "4-evaluate.png"), full_page=True)

        page.get_by_role("tab", name="Chat").click()
        page.get_by_label("model or artifact", exact=True).first.fill("runs/webui")
        box = page.get_by_placeholder("Type a message...").first
        box.wait_for(state="visible", timeout=30000)
        for _ in range(3):  # the freshly shown tab can swallow a first Enter while it mounts
            box.fill("What is the home town of Kinra?")
            box.press("Enter")
            try:
                page.wait_for_selector('div[data-testid="user"]', timeout=15000)
                break
            except playwright.Error:
                continue
        try:
            page.wait_for_function(
                "(document.querySelector('div[data-testid=\"bot\"]')?.innerText || '').trim().length > 0",
                timeout=120000)
        except playwright.Error:
            page.screenshot(path=str(shots / "3-chat-failed.png"), full_page=True)
            raise AssertionError("no reply in the chat; app log:\n" + (root.parent / "webui.log").read_text()[-3000:]) from None
        page.wait_for_timeout(3000)  # let the stream finish before the screenshot
        assert page.locator('div[data-testid="bot"]').last.inner_text().strip()
        page.screenshot(path=str(shots / "3-chat.png"), full_page=True)

        page.get_by_label("中文").check()  # the language switch: every label and tab in Chinese
        playwright.expect(page.get_by_role("tab", name="评估")).to_be_visible(timeout=30000)
        page.get_by_role("tab", name="训练").click()
        playwright.expect(page.get_by_text("学习率").first).to_be_visible(timeout=30000)
        page.screenshot(path=str(shots / "5-train-zh.png"), full_page=True)
        page.get_by_role("tab", name="运行记录").click()
        playwright.expect(page.get_by_text("运行名称（与列表一致）").first).to_be_visible(timeout=30000)
        page.screenshot(path=str(shots / "6-runs-zh.png"), full_page=True)
        page.get_by_role("tab", name="评估").click()
        playwright.expect(page.get_by_text("评估结果").first).to_be_visible(timeout=30000)
        page.screenshot(path=str(shots / "7-evaluate-zh.png"), full_page=True)
        browser.close()
    keep = os.environ.get("LMFORGE_SCREENSHOTS")
    if keep:
        shutil.copytree(shots, keep, dirs_exist_ok=True)
