"""`lmforge chat MODEL`: talk to any model or artifact in the terminal, tokens printed as they come.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt, and reset),
/tool RESULT (answer the model's tool call), /exit (or Ctrl-D). The model's own chat template renders
every turn, with the tools of `--tools FILE` through its `tools` argument.

A reply is shown in its parts: a leading think block as `[thinking]`, then the answer, then each tool
call as `[tool call] name {arguments}`. It joins the history in the structured form SFT data is rendered
in (`tool_calls` with their arguments, `reasoning_content`), so the next turn renders as in training."""

from __future__ import annotations

import json
import sys

from lmforge.config.errors import ConfigError
from lmforge.data.reasoning import OPEN
from lmforge.data.replies import Reply, ReplyStream
from lmforge.data.templates import end_of_turn_ids, render_prompt
from lmforge.data.tool_calls import call_format
from lmforge.data.tools import parse_calls
from lmforge.generation import Engine, Request, RequestError, Sampling

HELP = "commands: /reset  /system TEXT  /tool RESULT  /exit"


def chat_engine(model, tokenizer) -> Engine:
    """One row on the generation engine; its cache holds the model's positions (at most the engine's
    default), so a conversation grows until it would pass them."""
    return Engine(model, slots=1, eos_ids=end_of_turn_ids(tokenizer), tokenizer=tokenizer)


def chat_sampling(temperature: float, top_p: float) -> Sampling:
    """Greedy at temperature 0 (top_p then plays no part), else nucleus sampling; a bad value raises
    RequestError naming it."""
    return Sampling(temperature=temperature, top_p=top_p) if temperature != 0 else Sampling(temperature=0.0)


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The text the model continues for this conversation (tools through the template's `tools`)."""
    return render_prompt(tokenizer, messages, tools=tools or None)


def reply_stream(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float,
                 engine: Engine | None = None, tools: list[dict] | None = None):
    """The reply to `messages`, piece by piece as the model writes it. Each turn re-submits the whole
    rendered conversation: the template renders earlier replies as text, so their token ids may differ
    from the ones the model drew. Without `engine`, a one-row engine is made for this reply (the web UI
    answers concurrent users on separate engines, since one engine is driven by one thread)."""
    engine = engine or chat_engine(model, tokenizer)
    sampling = chat_sampling(temperature, top_p)
    ids = tokenizer(chat_prompt(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
    for event in engine.stream(Request(ids, sampling, max_new_tokens)):
        if event.text:
            yield event.text


def history_turn(reply: Reply) -> dict:
    """A reply as the history keeps it: the form SFT data is rendered in (lmforge.data.tools)."""
    turn = {"role": "assistant", "content": (reply.content or "").strip()}
    if reply.calls:
        turn["tool_calls"] = parse_calls([{"type": "function", "function": c["function"]} for c in reply.calls])
    if reply.reasoning:
        turn["reasoning_content"] = reply.reasoning
    return turn


class Conversation:
    """The history, the system prompt and the tool calls still waiting for their results."""

    def __init__(self, system: str | None):
        self.system, self.history, self.waiting = system, [], 0

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        self.system = self.system if keep_system else system
        self.history, self.waiting = [], 0


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
              top_p: float = 0.9, read=input, write=sys.stdout.write, tools: list[dict] | None = None) -> None:
    try:
        chat_sampling(temperature, top_p)
    except RequestError as error:
        raise ConfigError(f"chat sampling settings (--temperature/--top-p): {error}") from None
    if tools and call_format(tokenizer.chat_template) is None:
        raise ConfigError("--tools: this model's chat template has no tool-call format lmforge can read (the "
                          "<tool_call> JSON of Hermes/Qwen, or Mistral's [TOOL_CALLS]); chat without --tools")
    chat, engine = Conversation(system), chat_engine(model, tokenizer)
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
        turn = _command(text, chat, write)
        if turn is None:
            continue
        try:
            reply = _answer(model, tokenizer, [*chat.messages(), turn], (max_new_tokens, temperature, top_p),
                            engine, tools, write)
        except RequestError as error:  # the conversation outgrew the model's positions, say
            write(f"\n({error}; /reset to start over)\n")
            continue
        chat.history += [turn, history_turn(reply)]
        chat.waiting = len(reply.calls)


def _command(text: str, chat: Conversation, write) -> dict | None:
    """The message a typed line adds (None: a command that only changed the state, or a refused line)."""
    if text == "/reset":
        chat.reset()
        write("(conversation cleared)\n")
    elif text.startswith("/system"):
        chat.reset(text[len("/system"):].strip() or None, keep_system=False)
        write(f"(system prompt {'set' if chat.system else 'removed'}; conversation cleared)\n")
    elif text == "/tool" or text.startswith("/tool "):
        if chat.waiting == 0:
            write("(no tool call is waiting for a result)\n")
            return None
        chat.waiting -= 1
        result = {"role": "tool", "content": text[len("/tool"):].strip()}
        if chat.waiting:  # the model answers once every call of its turn has its result
            chat.history.append(result)
            write(f"({chat.waiting} more tool result{'s' if chat.waiting > 1 else ''} to give)\n")
            return None
        return result
    elif text.startswith("/"):
        write(f"unknown command {text.split()[0]}; {HELP}\n")
    else:
        if chat.waiting:
            write("(the model called a tool: answer with /tool RESULT first, or /reset)\n")
            return None
        return {"role": "user", "content": text}
    return None


def _answer(model, tokenizer, messages: list[dict], sampling: tuple, engine, tools, write) -> Reply:
    """Stream the reply with its reasoning and tool calls shown apart; the split reply."""
    fmt = call_format(tokenizer.chat_template) if tools else None
    opened = chat_prompt(tokenizer, messages, tools).rstrip().endswith(OPEN)
    parts, shown = ReplyStream(opened, fmt), None
    write("bot> ")

    def show(delta: dict) -> None:
        nonlocal shown
        for key, label in (("reasoning_content", "[thinking] "), ("content", "")):
            if delta.get(key):
                if shown != key:
                    write(label if shown is None else f"\n{label}")
                    shown = key
                write(delta[key])
        sys.stdout.flush()

    for piece in reply_stream(model, tokenizer, messages, *sampling, engine=engine, tools=tools):
        show(parts.feed(piece))
    last, reply = parts.finish()
    show(last)
    for call in reply.calls:
        write(f"\n[tool call] {call['function']['name']} {call['function']['arguments']}")
    if reply.calls:
        write("\n(answer with /tool RESULT)")
    write("\n")
    return reply


def read_tools(path: str) -> list[dict]:
    """`--tools FILE`: a JSON list of OpenAI function schemas (or glaive's bare {name, parameters})."""
    from lmforge.data.tools import parse_tools

    try:
        with open(path, encoding="utf-8") as handle:
            return parse_tools(json.load(handle))
    except (OSError, ValueError) as error:
        raise ConfigError(f"--tools {path}: {str(error).splitlines()[0]}") from None
