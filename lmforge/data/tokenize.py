"""Messages → token ids + labels.

Labels are -100 on every token that carries no loss. By default only assistant replies
(each with its end-of-turn token) carry loss; `train_on_prompt` puts loss on everything and
`mask_history` keeps it only on the last reply.

Truncation to max_length follows the policy stated in `lmforge.data.truncate`: the template's
structure (role markers, the assistant header, the reply's end-of-turn token) is never cut; the
user's text and the reply's content are; every cut or dropped sample is counted by kind.
"""

from __future__ import annotations

from collections import Counter

from lmforge.data.templates import Segment
from lmforge.data.tools import parse_tools
from lmforge.data.truncate import encode_parts, render_parts, truncate_pieces

IGNORE = -100


def encode_segments(tokenizer, segments: list[Segment]) -> list[tuple[list[int], bool]]:
    # Tokenizing segment by segment matches inference, where the prompt is tokenized on its own
    # and the model continues it.
    return [(tokenizer.encode(s.text, add_special_tokens=False), s.is_assistant) for s in segments]


def sft_render_options(cfg, tools: str | list | None = None) -> dict:
    """encode_sft's rendering keywords from a DataConfig and a record's tools (JSON text or a list)."""
    thinking = getattr(cfg, "enable_thinking", None)
    return {"tools": parse_tools(tools) or None, "reasoning_loss": getattr(cfg, "reasoning_loss", True),
            "template_kwargs": {"enable_thinking": thinking} if thinking is not None else None}


def encode_sft(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool = False,
               mask_history: bool = False, cuts: Counter | None = None, tools: list | None = None,
               template_kwargs: dict | None = None, reasoning_loss: bool = True) -> dict | None:
    """Token ids and labels for one dialogue, or None when truncation left nothing to learn.

    `tools` (OpenAI function schemas) go to the template's `tools` argument, `template_kwargs` to its
    variables; `reasoning_loss` false leaves a reply's leading think block out of the loss.
    `cuts`, when given, gains one count per kind of cut this sample went through."""
    parts = render_parts(tokenizer, messages, tools, template_kwargs, reasoning_loss)
    is_reply = [any(kind == "reply" or kind == "end" for _, kind in segment) and
                all(kind in ("reply", "end") for _, kind in segment) for segment in parts]
    if mask_history and any(is_reply):
        last = max(i for i, reply in enumerate(is_reply) if reply)
        is_reply = [reply and i == last for i, reply in enumerate(is_reply)]
    pieces, kinds = truncate_pieces(encode_parts(tokenizer, parts, is_reply), max_length)
    if cuts is not None:
        cuts.update(kinds)
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        input_ids += piece.ids
        labels += piece.ids if (piece.loss or train_on_prompt) else [IGNORE] * len(piece.ids)
    if not any(piece.loss for piece in pieces):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_text(tokenizer, text: str) -> list[int]:
    """A pretraining document: its tokens plus EOS, so the model learns where documents end."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id]


def messages_as_text(messages: list[dict]) -> str:
    """Chat data used as pretraining text: the turns' contents joined by newlines."""
    return "\n".join(m["content"] for m in messages)
