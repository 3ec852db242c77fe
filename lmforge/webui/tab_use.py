"""The Chat tab (one model, or two side by side, streamed) and the Export tab (merge, cast, GGUF)."""

from __future__ import annotations

import gradio as gr

from lmforge.config.errors import ConfigError
from lmforge.models.load import SHORT_NAMES
from lmforge.webui.confine import owned_output
from lmforge.webui.forms import checked_path, one_line
from lmforge.webui.ui import Context, en


def chat_tab(ctx: Context) -> None:
    models: dict[str, tuple] = {}

    def load_model(path):
        from lmforge.models.load import load_for_inference

        path = path.strip()
        source = path if path in SHORT_NAMES else str(ctx.root / checked_path(path, ctx.root))
        if source not in models:  # loaded once, kept for the next message
            models[source] = load_for_inference(source)
        return models[source]

    def chat(message, history, model_path, temperature, max_new_tokens):
        from lmforge.generation.request import RequestError
        from lmforge.inference.chat import reply_stream

        try:
            model, tokenizer = load_model(model_path)
        except (ConfigError, OSError, ValueError) as error:  # a folder that holds no model transformers reads
            yield f"⚠ {one_line(error)}"
            return
        messages = [{"role": m["role"], "content": m["content"]} for m in history] + \
            [{"role": "user", "content": message}]
        text = ""
        try:
            for piece in reply_stream(model, tokenizer, messages, int(max_new_tokens), float(temperature), 0.9):
                text += piece
                yield text
        except (RequestError, ConfigError) as error:  # the conversation outgrew the model, or a bad setting
            yield f"{text}\n⚠ {one_line(error)} (clear the chat to start over)"
            return
        if not text.strip():  # an empty message would look like a hang: say what happened
            yield "(no reply: the model ended its turn at once)"

    with gr.Row():
        temperature = ctx.words(gr.Slider(0, 1.5, value=0.7, label=en("temperature")), label="temperature")
        max_new = ctx.words(gr.Slider(16, 1024, value=256, step=16, label=en("max_new_tokens")), label="max_new_tokens")
    with gr.Row():  # two models side by side (say SFT and PPO), each with its own conversation
        for key in ("chat_model", "chat_model_2"):
            with gr.Column():
                chat_model = ctx.words(gr.Textbox(label=en(key)), label=key)
                gr.ChatInterface(chat, additional_inputs=[chat_model, temperature, max_new])


def export_tab(ctx: Context) -> None:
    def export(model_path, out, dtype, gguf):
        from lmforge.models.export import export_model

        try:
            target = export_model(str(ctx.root / checked_path(model_path, ctx.root)),
                                  owned_output(out, ctx.rules, "new folder"),
                                  dtype=None if dtype == "as loaded" else dtype, gguf=gguf)
        except (ConfigError, OSError, ValueError) as error:  # a folder that holds no model transformers reads
            return f"⚠ {one_line(error)}"
        return f"exported to {target.relative_to(ctx.root)}"

    with gr.Row():
        model_path = ctx.words(gr.Textbox(label=en("export_model")), label="export_model")
        out = ctx.words(gr.Textbox(label=en("export_out")), label="export_out")
        dtype = ctx.words(gr.Dropdown(["as loaded", "fp32", "bf16", "fp16"], value="as loaded",
                                      label=en("export_dtype")), label="export_dtype")
        gguf = ctx.words(gr.Checkbox(label=en("export_gguf")), label="export_gguf")
    message = gr.Markdown()
    ctx.words(gr.Button(en("button.export")), value="button.export").click(export, [model_path, out, dtype, gguf],
                                                                           message)
