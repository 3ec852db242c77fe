"""A reply's reasoning and its answer, told apart the way thinking models write them: one
`<think>…</think>` block at the start of the reply, then the answer.

Pure string functions, used by the SFT loss mask (`data.reasoning_loss`), the `think_format` reward,
and by whatever must hand `reasoning_content` apart from `content` (a server). The rules, chosen so
that text which merely mentions the tags is never taken for reasoning:

- only a block that opens the reply (after leading whitespace) is reasoning; `<think>` later in the
  text (inside code, in a quoted example) is answer text;
- a second block after the first stays in the answer, as written;
- an unclosed block (a reply cut by max_new_tokens) is all reasoning and no answer;
- `opened=True` is for templates whose generation prompt already printed `<think>` (DeepSeek-R1):
  the reply is reasoning up to the first `</think>`; without one, all of it is reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str
    has_block: bool
    """A think block opened the reply (or the prompt opened it)."""
    closed: bool
    """The block was closed; an unclosed one means the reply ended while still reasoning."""
    end: int
    """Index in the reply just past the block and the whitespace after it (0 without a block)."""


def split_block(reply: str, opened: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)) -> Split:
    """The reply's leading think block and what follows it (see the module docstring)."""
    open_tag, close_tag = tags
    stripped = reply.lstrip()
    if opened:
        body_at = 0
    elif stripped.startswith(open_tag):
        body_at = len(reply) - len(stripped) + len(open_tag)
    else:
        return Split("", reply.strip(), False, False, 0)
    close_at = reply.find(close_tag, body_at)
    if close_at < 0:
        return Split(reply[body_at:].strip(), "", True, False, len(reply))
    after = close_at + len(close_tag)
    end = len(reply) - len(reply[after:].lstrip())
    return Split(reply[body_at:close_at].strip(), reply[after:].strip(), True, True, end)


def split_reasoning(reply: str, opened: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)) -> tuple[str, str]:
    """(reasoning, answer) of a reply; ("", reply stripped) when it does not open with a think block."""
    split = split_block(reply, opened, tags)
    return split.reasoning, split.answer


def is_think_then_answer(reply: str, opened: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)) -> bool:
    """The format a thinking model is rewarded for: one closed think block with some reasoning in it,
    then a non-empty answer that holds no further think tags."""
    split = split_block(reply, opened, tags)
    return (split.closed and bool(split.reasoning) and bool(split.answer)
            and not any(tag in split.answer for tag in tags) and tags[0] not in split.reasoning)
