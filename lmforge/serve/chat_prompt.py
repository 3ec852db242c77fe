"""A chat request as the text the model continues: its messages in the form SFT data is rendered in, its
tools through the chat template's own `tools` argument, and what the reply will be read for (tool calls in
the template's format, a think block the prompt may already have opened)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.reasoning import OPEN
from lmforge.data.templates import render_prompt
from lmforge.data.tool_calls import call_format
from lmforge.serve.protocol import ApiError, ChatRequest

NO_TOOL_FORMAT = ("this model's chat template has no tool-call format lmforge can read (the <tool_call> JSON of "
                  "Hermes/Qwen, or Mistral's [TOOL_CALLS]); serve a model trained with model.template=chatml, qwen "
                  "or qwen3, or leave tools out")


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    call_format: str | None
    """The format the reply's tool calls are read in; None when the request offers no tools."""
    opened: bool
    """The generation prompt ends in `<think>` (DeepSeek-R1 style): the reply starts inside the block."""


def chat_prompt(tokenizer, body: ChatRequest) -> ChatPrompt:
    """The prompt of a chat request (an ApiError naming the field for what the template cannot take)."""
    fmt = None
    if body.offers_tools:
        fmt = call_format(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
        if fmt is None:
            raise ApiError(400, f"tools: {NO_TOOL_FORMAT}", "tools")
    messages = [m.as_template_message() for m in body.messages]
    try:
        text = render_prompt(tokenizer, messages, tools=body.tools if body.offers_tools else None,
                             template_kwargs=body.chat_template_kwargs)
    except Exception as error:  # the template's own rules (roles must alternate, no tool format, ...)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ApiError(400, f"the chat template refused these messages: {first}", "messages") from None
    return ChatPrompt(text, fmt, text.rstrip().endswith(OPEN))
