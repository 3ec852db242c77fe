"""The slice of OpenAI's HTTP protocol that lmforge serves: request bodies (validated, so a bad one
gets a 400 naming the field) and the response and stream-chunk bodies clients parse."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmforge.data.tools import parse_calls, parse_tools

MAX_CHOICES = 16
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 500
"""Longest stop string (characters): far above real use (end markers, a few words), and it bounds the reply
text the decoder holds back while it may be the start of a stop string."""


class ApiError(Exception):
    """A request the server refuses: answered with `status` and OpenAI's error body naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CallFunction(BaseModel):
    name: str
    arguments: str | dict = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and other per-message fields clients send

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls (its content may then be null)."""
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    """An earlier reply's reasoning, rendered as the template renders it (as in training)."""

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role!r} ones")
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError(f"reasoning_content belongs to assistant messages, not {self.role!r} ones")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls:  # the arguments must be a JSON object, as the template prints them with tojson
            parse_calls([c.model_dump() for c in self.tool_calls], "tool_calls")
        return self

    def as_template_message(self) -> dict:
        """The message in the form SFT data is rendered in (lmforge.data.tools), so a served conversation
        renders to the tokens the model was trained on."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = parse_calls([c.model_dump(exclude_none=True) for c in self.tool_calls])
        if self.reasoning_content and self.reasoning_content.strip():
            message["reasoning_content"] = self.reasoning_content
        return message


UNSUPPORTED_WHEN_ON = ("functions", "function_call", "response_format", "presence_penalty", "frequency_penalty",
                       "logit_bias")
TEMPLATE_ARGUMENTS = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
                      "return_dict", "return_tensors", "padding", "truncation", "max_length", "chat_template"}
"""apply_chat_template's own arguments: `chat_template_kwargs` may not set them (the request's fields do)."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's bound on alternatives per token (the engine's too)."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields (user, presence_penalty, ...) are accepted and ignored, as clients send them freely.
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    """Choice i samples with seed + i: the same seed gives the same reply, whatever else is being served."""
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields this server does not implement yet: accepted at their "off" values only, so a client
    # that asks for them is told (400 naming the field) instead of getting a reply that silently lacks them.
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator(*UNSUPPORTED_WHEN_ON)
    @classmethod
    def _not_implemented(cls, value, info):
        if value in (None, False, 0, [], {}) or (info.field_name == "function_call" and value in ("none", "auto")) \
                or (info.field_name == "response_format" and value == {"type": "text"}):
            return value
        raise ValueError(f"{info.field_name} is not supported by this server yet; leave it out")

    @model_validator(mode="before")
    @classmethod
    def _encodable_text(cls, body):
        """JSON may carry an unpaired UTF-16 surrogate ("\\ud800") that no tokenizer can encode: refused
        here, with the field named, rather than failing deep inside the tokenizer."""
        stack = [("body", body)]
        while stack:  # iterative: a deeply nested value must not exhaust the recursion limit
            where, value = stack.pop()
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{where}: text with an unpaired surrogate is not valid Unicode") from None
            elif isinstance(value, dict):
                stack.extend((where, key) for key in value)  # names are text too, even of ignored fields
                stack.extend((f"{where}.{key}", item) for key, item in value.items())
            elif isinstance(value, list):
                stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        return body

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        if (longest := max((len(s) for s in stops), default=0)) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has {longest} characters; at most {MAX_STOP_CHARS} are allowed")
        return stops

    @property
    def stop_texts(self) -> list[str]:
        return self.stop or []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    """OpenAI function schemas, rendered by the chat template's own `tools` argument."""
    tool_choice: str | dict | None = None
    """"auto" (the default with tools): the model may call; "none": tools are left out of the prompt.
    "required" and a named function need constrained decoding, which this server does not do: refused."""
    parallel_tool_calls: bool = True
    """false: a reply's first call alone is returned."""
    chat_template_kwargs: dict | None = None
    """Variables for the chat template (qwen3's `enable_thinking`), as vLLM takes them."""
    logprobs: bool | None = None
    """Return each reply token's log-prob (under the model's own distribution, before temperature)."""
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """With logprobs: also this many most likely tokens at each position."""

    @field_validator("tools")
    @classmethod
    def _function_schemas(cls, value):
        return parse_tools(value) or None  # a list of schemas each with a function name, else a 400

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, value):
        if value is None or value in ("auto", "none"):
            return value
        if value == "required" or (isinstance(value, dict) and value.get("type") == "function"):
            what = "'required'" if value == "required" else f"a named function ({value.get('function')!r})"
            raise ValueError(f"tool_choice {what} is not supported by this server (it needs constrained decoding); "
                             "send 'auto' or 'none'")
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {value!r}")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value):
        taken = sorted(set(value or {}) & TEMPLATE_ARGUMENTS)
        if taken:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)} (the request's own fields do)")
        if any(not isinstance(key, str) or not key.isidentifier() for key in value or {}):
            raise ValueError("chat_template_kwargs keys must be variable names")
        return value

    @property
    def offers_tools(self) -> bool:
        """Tools reach the prompt and replies are read for calls ("none" renders without them)."""
        return bool(self.tools) and self.tool_choice != "none"

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_request(self) -> tuple[bool, int]:
        """(return log-probs, alternatives per token)."""
        return bool(self.logprobs), self.top_logprobs or 0

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return each token's log-prob and this many most likely alternatives (0: the drawn token's alone)."""
    top_logprobs: int | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _count_not_switch(cls, value):
        if isinstance(value, bool):  # the chat endpoint's switch sent here would read as 0 or 1 silently
            raise ValueError(f"on /v1/completions logprobs is how many alternatives to list (0-{MAX_TOP_LOGPROBS}), "
                             "not true/false")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _chat_field(cls, value):
        if value:
            raise ValueError("top_logprobs is a chat field; on /v1/completions send logprobs: k")
        return value

    @property
    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (use n for several completions)")
            value = value[0]
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    # A message may quote what the client sent, unpaired surrogates included: escaped, so it encodes.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(reply) -> dict:
    """A choice's message from a split reply (lmforge.data.replies.Reply): `tool_calls` and `reasoning_content`
    only when it has them."""
    message = {"role": "assistant", "content": reply.content}
    if reply.calls:
        message["tool_calls"] = reply.calls
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    return message


def chat_response(rid: str, model: str, replies: list, reasons: list[str], prompt_tokens: int,
                  completion_tokens: int, logprobs: list[dict | None] | None = None) -> dict:
    """`replies`: each choice's split reply; `logprobs`: each choice's, already in the chat shape (see
    serve.logprobs), or None."""
    logprobs = logprobs or [None] * len(replies)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": chat_message(reply), "finish_reason": reason, "logprobs": lp}
                        for i, (reply, reason, lp) in enumerate(zip(replies, reasons, logprobs))],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(rid: str, model: str, texts: list[str], reasons: list[str], prompt_tokens: int,
                        completion_tokens: int, logprobs: list[dict | None] | None = None) -> dict:
    logprobs = logprobs or [None] * len(texts)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": lp}
                        for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs))],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(rid: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
