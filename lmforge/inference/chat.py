"""`lmforge chat MODEL`: talk to any model or artifact in the terminal, tokens printed as they come.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt, and reset),
/exit (or Ctrl-D). The model's own chat template renders every turn."""

from __future__ import annotations

import sys

from lmforge.config.schema import ConfigError
from lmforge.data.templates import end_of_turn_ids, render_prompt
from lmforge.generation import Engine, Request, RequestError, Sampling

HELP = "commands: /reset  /system TEXT  /exit"


def chat_engine(model, tokenizer) -> Engine:
    """One row on the generation engine; its cache holds the model's positions (at most the engine's
    default), so a conversation grows until it would pass them."""
    return Engine(model, slots=1, eos_ids=end_of_turn_ids(tokenizer), tokenizer=tokenizer)


def chat_sampling(temperature: float, top_p: float) -> Sampling:
    """Greedy at temperature 0 (top_p then plays no part), else nucleus sampling; a bad value raises
    RequestError naming it."""
    return Sampling(temperature=temperature, top_p=top_p) if temperature != 0 else Sampling(temperature=0.0)


def reply_stream(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float,
                 engine: Engine | None = None):
    """The reply to `messages`, piece by piece as the model writes it. Each turn re-submits the whole
    rendered conversation: the template renders earlier replies as text, so their token ids may differ
    from the ones the model drew. Without `engine`, a one-row engine is made for this reply (the web UI
    answers concurrent users on separate engines, since one engine is driven by one thread)."""
    engine = engine or chat_engine(model, tokenizer)
    sampling = chat_sampling(temperature, top_p)
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    for event in engine.stream(Request(ids, sampling, max_new_tokens)):
        if event.text:
            yield event.text


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
              top_p: float = 0.9, read=input, write=sys.stdout.write) -> None:
    try:
        chat_sampling(temperature, top_p)
    except RequestError as error:
        raise ConfigError(f"chat sampling settings (--temperature/--top-p): {error}") from None
    history: list[dict] = []
    engine = chat_engine(model, tokenizer)
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
        try:
            for piece in reply_stream(model, tokenizer, messages, max_new_tokens, temperature, top_p, engine):
                pieces.append(piece)
                write(piece)
                sys.stdout.flush()
        except RequestError as error:  # the conversation outgrew the model's positions, say
            write(f"\n({error}; /reset to start over)\n")
            continue
        write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]
