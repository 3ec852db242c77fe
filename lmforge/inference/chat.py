"""`lmforge chat MODEL`: talk to any model or artifact in the terminal, tokens printed as they come.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt, and reset),
/exit (or Ctrl-D). The model's own chat template renders every turn."""

from __future__ import annotations

import sys
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from lmforge.data.templates import end_of_turn_ids, render_prompt

HELP = "commands: /reset  /system TEXT  /exit"


def reply_stream(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float):
    """The reply to `messages`, piece by piece as the model writes it."""
    enc = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    enc = enc.to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
        else {"do_sample": False}
    kwargs = {**enc, "max_new_tokens": max_new_tokens, "eos_token_id": end_of_turn_ids(tokenizer),
              "pad_token_id": tokenizer.pad_token_id, "streamer": streamer, **sampling}
    worker = Thread(target=_generate, args=(model, kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()


@torch.no_grad()
def _generate(model, kwargs: dict) -> None:
    model.generate(**kwargs)


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
              top_p: float = 0.9, read=input, write=sys.stdout.write) -> None:
    history: list[dict] = []
    write(f"{HELP}\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            write(f"(system prompt {'set' if system else 'removed'}; conversation cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": text}]
        write("bot> ")
        pieces = []
        for piece in reply_stream(model, tokenizer, messages, max_new_tokens, temperature, top_p):
            pieces.append(piece)
            write(piece)
            sys.stdout.flush()
        write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]
