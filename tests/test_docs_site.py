"""The docs site as a reader sees it: `mkdocs build --strict` (a broken link, a missing page or image
fails it), then the built pages opened in headless Chromium (Playwright driving Debian's Chromium, as
the web UI's browser test does), checking that every figure on a stage page and on the walkthrough,
English and Chinese, actually loads. Screenshots are kept in the test's folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGES_WITH_FIGURES = ("walkthrough/", "ppo/", "zh/walkthrough/", "zh/dpo/")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    site = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def test_strict_build_writes_every_page_and_figure(built_site):
    for page in ("index.html", "quickstart/index.html", "walkthrough/index.html", "papers/index.html",
                 "zh/quickstart/index.html", "zh/walkthrough/index.html"):
        assert (built_site / page).is_file(), page
    figures = sorted(p.name for p in (built_site / "images").glob("demo-*.png"))
    assert len(figures) >= 8 and all((built_site / "images" / f).stat().st_size > 5_000 for f in figures)


@pytest.fixture
def site_url(built_site):
    handler = partial(SimpleHTTPRequestHandler, directory=str(built_site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt install chromium)")
def test_figures_load_in_the_browser(site_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        for path in PAGES_WITH_FIGURES:
            page.goto(site_url + path, wait_until="load")
            images = page.eval_on_selector_all(
                "article img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
            page.screenshot(path=str(tmp_path / (path.strip("/").replace("/", "-") + ".png")), full_page=True)
            assert images, f"{path}: no figure on the page"
            broken = [src for src, complete, width in images if not complete or width == 0]
            assert not broken, f"{path}: figures that did not load: {broken}"
        browser.close()
