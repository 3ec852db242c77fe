"""A model's reply as what a client wants apart: its reasoning, its text and its tool calls.

`split_reply` reads a whole reply: a leading think block is the reasoning (the rules of
`lmforge.data.reasoning`), the text after it the content (stripped, as the split does), and with a
tool-call format the calls that end the content (`lmforge.data.tool_calls`). A reply with no think
block keeps its text exactly as written.

`ReplyStream` releases the same three parts while the reply is being written. It holds back only what
may still change meaning: the start of a reply that may be opening a think block, a tail that may be
the start of `</think>` or of the call marker, trailing whitespace that the final split strips, and
everything from the call marker on (the calls are read once the reply is whole, and come as one delta).
The deltas it releases join to exactly what `split_reply` returns for the whole reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.data.reasoning import CLOSE, OPEN, split_block
from lmforge.data.tool_calls import call_marker, parse_tool_calls


@dataclass(frozen=True)
class Reply:
    reasoning: str | None
    """The think block's text; None when the reply has none."""
    content: str | None
    """The reply's text; None when it is tool calls alone."""
    calls: list[dict] = field(default_factory=list)


def split_reply(text: str, opened: bool = False, call_format: str | None = None) -> Reply:
    """Reasoning, content and tool calls of a whole reply. `opened`: the prompt already printed `<think>`;
    `call_format`: the template's tool-call format when the request offered tools (else calls stay text)."""
    block = split_block(text, opened)
    reasoning, answer = (block.reasoning, block.answer) if block.has_block else (None, text)
    calls: list[dict] = []
    if call_format is not None:
        parsed = parse_tool_calls(answer, call_format)
        answer, calls = parsed.content, parsed.calls
    return Reply(reasoning, None if calls and not answer else answer, calls)


class ReplyStream:
    """Feed the reply's text as it comes; each call returns the delta that may be released now."""

    def __init__(self, opened: bool = False, call_format: str | None = None):
        self.opened, self.call_format = opened, call_format
        self.text = ""
        self._sent = {"reasoning_content": 0, "content": 0}

    def feed(self, piece: str) -> dict:
        """{"reasoning_content": ..., "content": ...}: the new text of each part, either key absent when
        it has none (an empty dict: nothing to release yet)."""
        self.text += piece
        return self._delta(*self._stable())

    def finish(self) -> tuple[dict, Reply]:
        """The reply is whole: the rest of its text as a last delta, and the split reply (with its calls)."""
        reply = split_reply(self.text, self.opened, self.call_format)
        return self._delta(reply.reasoning or "", reply.content or ""), reply

    def _delta(self, reasoning: str, content: str) -> dict:
        delta = {}
        for key, text in (("reasoning_content", reasoning), ("content", content)):
            if len(text) > self._sent[key]:
                delta[key] = text[self._sent[key]:]
                self._sent[key] = len(text)
        return delta

    def _stable(self) -> tuple[str, str]:
        """The reasoning and content that no further text can change (prefixes of the final split's)."""
        text = self.text
        body_at = 0 if self.opened else None
        if not self.opened:
            rest = text.lstrip()
            if OPEN.startswith(rest):  # nothing yet, or what may still become "<think>"
                return "", ""
            if rest.startswith(OPEN):
                body_at = len(text) - len(rest) + len(OPEN)
        strip = body_at is not None
        if body_at is None:
            reasoning, answer = "", text
        else:
            close = text.find(CLOSE, body_at)
            if close < 0:
                return _hold(text[body_at:], CLOSE).strip(), ""
            reasoning, answer = text[body_at:close].strip(), text[close + len(CLOSE):].lstrip()
        if self.call_format is not None:
            marker = call_marker(self.call_format)
            at = answer.find(marker)
            answer = (answer[:at] if at >= 0 else _hold(answer, marker)).rstrip()
        elif strip:
            answer = answer.rstrip()
        return reasoning, answer


def _hold(text: str, tag: str) -> str:
    """`text` without its longest tail that may be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return text[:-size]
    return text
