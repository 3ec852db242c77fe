"""The Gradio app: Train (every config field, generated from the schema; preview, YAML, start), Runs (status,
one chart per metric, progress and ETA, the live log; stop, resume, report), Pipeline, Evaluate (eval suites
on an artifact), Chat (one or two models side by side, streamed) and Export, in English or Chinese. Everything
it runs is the CLI's own code; a training run is `lmforge train` in a subprocess, identical to one started
from a shell, and an evaluation is `lmforge eval`."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from lmforge.config.errors import ConfigError
from lmforge.webui.confine import Rules
from lmforge.webui.hosts import HostGuard, allowed_names, check_exposure, login
from lmforge.webui.i18n import LANGUAGES, TEXTS
from lmforge.webui.tab_eval import eval_tab
from lmforge.webui.tab_runs import pipeline_tab, runs_tab
from lmforge.webui.tab_train import train_tab
from lmforge.webui.tab_use import chat_tab, export_tab
from lmforge.webui.ui import Context

TABS = (("tab.train", train_tab), ("tab.runs", runs_tab), ("tab.pipeline", pipeline_tab),
        ("tab.evaluate", eval_tab), ("tab.chat", chat_tab), ("tab.export", export_tab))


def build_app(root: Path, runs_root: Path, allow_code: bool = False) -> gr.Blocks:
    """The app for the files under `root`; `allow_code` lets configs run code shipped with models (and reward
    functions), which only `lmforge webui --allow-remote-code` turns on."""
    root = root.resolve()
    runs_root = (root / runs_root).resolve() if not runs_root.is_absolute() else runs_root
    ctx = Context(root, runs_root, Rules(root, allow_code))

    def switch_language(language):
        return ctx.relabel(language if language in LANGUAGES else LANGUAGES[0])

    def language_from_address(request: gr.Request):
        """`?lang=zh` opens the app in Chinese (a link to share, and the screenshots)."""
        asked = (request.query_params.get("lang") or "") if request is not None else ""
        return LANGUAGES[1] if asked.lower().startswith("zh") else LANGUAGES[0]

    with gr.Blocks(title="lmforge") as app:
        with gr.Row():
            header = tuple(words.format(root=root, runs=runs_root) for words in TEXTS["header"])
            ctx.words(gr.Markdown(header[0]), value=header)
            language = ctx.words(gr.Radio(list(LANGUAGES), value=LANGUAGES[0], label=TEXTS["language"][0],
                                          elem_id="language", scale=0, min_width=220), label="language")
        for key, build in TABS:
            with ctx.words(gr.Tab(TEXTS[key][0], elem_id=key.replace(".", "-")), label=key):
                build(ctx)
        language.change(switch_language, language, ctx.components)
        app.load(language_from_address, None, language)
    return app


def launch(root: str = ".", runs: str = "runs", host: str = "127.0.0.1", port: int = 7860,
           auth: str | None = None, allow_code: bool = False, allowed_hosts: list[str] | None = None) -> None:
    """Serve the app; refuses a non-loopback address without a login, answers only the Host names allowed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    credentials = login(auth)
    check_exposure(host, credentials)
    guard = Middleware(HostGuard, allowed=allowed_names(host, allowed_hosts))
    served = Path(root).resolve()
    # Gradio stores what any visitor uploads (its own route, though this app takes no upload) in this folder:
    # inside --root, a visitor could put any file (a .py, a config.json) where configs may point.
    uploads = Path(gr.utils.get_upload_folder()).resolve()
    if uploads == served or served in uploads.parents:
        raise ConfigError(f"--root {served} holds Gradio's upload folder {uploads}: serve a folder that does not "
                          "contain it, or set GRADIO_TEMP_DIR to a folder outside --root")
    # allowed_paths: the served folder's files (reports) may be downloaded, nothing else.
    build_app(served, Path(runs), allow_code).queue().launch(
        server_name=host, server_port=port, share=False, auth=credentials, allowed_paths=[str(served)],
        max_file_size="1mb", app_kwargs={"middleware": [guard]})


