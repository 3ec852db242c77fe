"""Tool calls read back from a model's reply, in the format its chat template taught it.

Each template family that prints tool calls has one format, and a parser for it:

- `hermes` (Hermes, Qwen 2.5, Qwen3, lmforge's chatml/qwen/qwen3): one `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` block per call;
- `mistral` (Mistral v3): `[TOOL_CALLS]` followed by a JSON list of `{"name", "arguments"}`.

The family is found from the template's text (`call_format`). A reply is read as tool calls only when
it ends with them — its text, then the calls, with nothing but whitespace between and after them — and
every call is a JSON object with a non-empty name and an object of arguments. Anything else (a broken
JSON, an unclosed block cut by max_tokens, text after a call) is the reply's plain text, unchanged: a
client is never handed a call the model did not finish, and no text is dropped.

Calls come back in OpenAI's response shape: `{"id", "type": "function", "function": {"name",
"arguments"}}`, the arguments as JSON text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
FORMATS = ("hermes", "mistral")
_HERMES_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    content: str
    """The reply's text before its calls (the whole reply when it holds no valid calls)."""
    calls: list[dict] = field(default_factory=list)
    """OpenAI tool calls, empty when the reply is plain text."""


def call_format(template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or None when it prints no calls lmforge can read."""
    text = template or ""
    if HERMES_OPEN in text and HERMES_CLOSE in text:
        return "hermes"
    if MISTRAL_MARK in text:
        return "mistral"
    return None


def call_marker(fmt: str) -> str:
    """The text that opens the calls of a reply in format `fmt` (a streaming reply holds it back)."""
    return {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARK}[fmt]


def parse_tool_calls(reply: str, fmt: str) -> ParsedReply:
    """The reply's text and its tool calls in format `fmt` (see the module docstring)."""
    start = reply.find(call_marker(fmt))
    if start < 0:
        return ParsedReply(reply)
    raw = _hermes_calls(reply[start:]) if fmt == "hermes" else _mistral_calls(reply[start + len(MISTRAL_MARK):])
    calls = [c for c in (_openai_call(item) for item in raw or []) if c is not None]
    if not raw or len(calls) != len(raw):
        return ParsedReply(reply)
    return ParsedReply(reply[:start].rstrip(), calls)


def _hermes_calls(tail: str) -> list | None:
    """The JSON of each block when `tail` is only blocks and whitespace, else None."""
    items, at = [], 0
    for match in _HERMES_BLOCK.finditer(tail):
        if tail[at:match.start()].strip():
            return None
        items.append(_json(match.group(1)))
        at = match.end()
    return items if tail[at:].strip() == "" else None


def _mistral_calls(tail: str) -> list | None:
    value = _json(tail)
    return value if isinstance(value, list) else None


def _json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _openai_call(item) -> dict | None:
    if not isinstance(item, dict):
        return None
    name, arguments = item.get("name"), item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text, as OpenAI sends them
        arguments = _json(arguments) if arguments.strip() else {}
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
