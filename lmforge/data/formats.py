"""Row formats → one normal form: `{"messages": [{role, content}, ...], "tools": str, "chat": str}` or
`{"text": str}`. `tools` is the JSON text of the record's OpenAI-style function schemas; `chat`, set when
an assistant turn has `tool_calls` or `reasoning_content`, is the JSON text of the messages with them
(see `lmforge.data.tools`), while `messages` keeps {role, content} with a call as its JSON text.

Formats (see docs/data.md): raw text, Alpaca (instruction/input/output/system/history),
question/answer (a prompt and its reference answer), ShareGPT (conversations of {from, value}), OpenAI (messages of {role, content}). Column and
role names are remappable the way LLaMA-Factory's dataset_info.json remaps them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lmforge.data.hints import format_hint
from lmforge.data.tools import chat_json, parse_calls, parse_tools, plain_messages, tools_text

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
QA_ANSWER_KEYS = ("answer", "response")
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
    "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system",
}


@dataclass
class RowFormat:
    formatting: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    """Read at most this many records (max_samples, or dataset_info's num_samples)."""


def detect_format(row: dict, fmt: RowFormat) -> str:
    if fmt.formatting != "auto":
        return fmt.formatting
    messages_key = fmt.columns.get("messages")
    if messages_key and messages_key in row:
        return "sharegpt"
    if "messages" in row:
        turns = row["messages"]
        first = turns[0] if isinstance(turns, list) and turns else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "openai"
    if "conversations" in row:
        return "sharegpt"
    prompt = fmt.columns.get("prompt", "instruction")
    if prompt in row and fmt.columns.get("response", "output") in row:
        return "alpaca"
    if prompt in row and set(fmt.columns) <= {"prompt"} and "prompt" in fmt.columns:
        return "text"  # LLaMA-Factory's way of naming a raw-text column: columns: {prompt: text}
    if prompt in row:
        return "alpaca"
    if "question" in row and any(k in row for k in QA_ANSWER_KEYS):
        return "qa"  # the prompt + reference-answer shape of GRPO and QA data sets (MedicalGPT's too)
    if "text" in row:
        return "text"
    keys = ", ".join(sorted(row)) or "none"
    raise ValueError(f"cannot tell the format from the keys ({keys}); {format_hint(row)}")


def to_example(row: dict, fmt: RowFormat) -> dict:
    """Normalise one row; raises ValueError with the problem (the caller adds file and line)."""
    if fmt.replacements:
        row = _replace(row, fmt.replacements)
    kind = detect_format(row, fmt)
    if kind == "text":
        return {"text": text_field(row, fmt)[1], "messages": [], "tools": "", "chat": ""}
    if kind == "qa":
        messages, tools = _qa(row, fmt)
    else:
        messages, tools = _alpaca(row, fmt) if kind == "alpaca" else _conversation(row, fmt, kind)
    check_dialogue(messages)
    return {"text": "", "messages": plain_messages(messages), "tools": tools, "chat": chat_json(messages)}


def text_field(row: dict, fmt: RowFormat) -> tuple[str, str]:
    """(column, text) of a raw-text record; the text must be a non-empty string."""
    key = fmt.columns.get("prompt", "text")
    text = row.get(key)
    if not isinstance(text, str):
        raise ValueError(f"field {key!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"field {key!r} is empty")
    return key, text


def _replace(value, replacements: dict[str, str]):
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_replace(v, replacements) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, replacements) for k, v in value.items()}
    return value


def _text_field(row: dict, key: str, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca(row: dict, fmt: RowFormat) -> tuple[list[dict], str]:
    cols = {**ALPACA_COLUMNS, **fmt.columns}
    instruction = _text_field(row, cols["prompt"], required=True)
    # {input, target} data maps `input` to the prompt: the default query column is then the same text.
    query = _text_field(row, cols["query"], required=False) if cols["query"] != cols["prompt"] else ""
    response = _text_field(row, cols["response"], required=True)
    system = _text_field(row, cols["system"], required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get(cols["history"]) or []
    if not isinstance(history, list):
        raise ValueError(f"field {cols['history']!r} must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"history[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = "\n".join(x for x in (instruction, query) if x)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return messages, ""


def _qa(row: dict, fmt: RowFormat) -> tuple[list[dict], str]:
    """{question, answer (or response), system?}: an Alpaca record under other names; a numeric answer
    (a GRPO data set's "16") is its text."""
    answer_key = next(k for k in QA_ANSWER_KEYS if k in row)
    answer = row[answer_key]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        row = {**row, answer_key: str(answer)}
    return _alpaca(row, RowFormat(columns={**fmt.columns, "prompt": "question", "response": answer_key}))


def _conversation(row: dict, fmt: RowFormat, kind: str) -> tuple[list[dict], str]:
    base_cols = SHAREGPT_COLUMNS if kind == "sharegpt" else {**SHAREGPT_COLUMNS, "messages": "messages"}
    cols = {**base_cols, **fmt.columns}
    key = cols["messages"] if cols["messages"] in row else ("messages" if "messages" in row else cols["messages"])
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {key!r} must be a non-empty list of turns")
    first = turns[0] if isinstance(turns[0], dict) else {}
    default_tags = SHAREGPT_TAGS if "from" in first or (kind == "sharegpt" and "role" not in first) else OPENAI_TAGS
    tags = {**default_tags, **fmt.tags}
    roles = {
        tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
        tags["observation_tag"]: "tool", tags["function_tag"]: "function_call",
    }
    messages = []
    system = _text_field(row, cols["system"], required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} must be an object, got {type(turn).__name__}")
        messages.append(_turn(turn, i, tags, roles))
    return messages, tools_text(parse_tools(row.get(cols["tools"])))


def _turn(turn: dict, i: int, tags: dict, roles: dict) -> dict:
    """One turn → {role, content} plus `tool_calls` (JSON text) and `reasoning_content` when it has them."""
    role, content = turn.get(tags["role_tag"]), turn.get(tags["content_tag"])
    if role not in roles:
        raise ValueError(f"turn {i} has unknown role {role!r} (known: {', '.join(map(str, roles))})")
    role = roles[role]
    calls = turn.get("tool_calls") if role == "assistant" else None
    if role == "function_call":  # ShareGPT: the call is the turn's text
        if not isinstance(content, str):
            raise ValueError(f"turn {i} content must be a string, got {type(content).__name__}")
        calls, content = parse_calls(content, f"turn {i} (function_call)"), ""
    elif calls is not None:  # OpenAI: content may be null beside tool_calls
        calls = parse_calls(calls, f"turn {i} tool_calls")
        content = "" if content is None else content
    if not isinstance(content, str):
        raise ValueError(f"turn {i} content must be a string, got {type(content).__name__}")
    message = {"role": "assistant" if role == "function_call" else role, "content": content}
    if calls:
        message["tool_calls"] = json.dumps(calls, ensure_ascii=False)
    reasoning = turn.get("reasoning_content") if role == "assistant" else None
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise ValueError(f"turn {i} reasoning_content must be a string, got {type(reasoning).__name__}")
        if reasoning.strip():
            message["reasoning_content"] = reasoning
    return message


def check_dialogue(messages: list[dict]) -> None:
    """Roles in a sensible order, no empty turns, at least one assistant reply, ending on one. A tool
    call stands where a reply may; tool results follow a call, at most one result per call."""
    expected_after = {None: {"user"}, "system": {"user"}, "user": {"assistant"},
                      "assistant": {"user", "tool"}, "tool": {"assistant", "tool"}}
    previous, open_calls = None, 0
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i == 0:
            previous = "system"
            continue
        calls = message.get("tool_calls")
        if not message["content"].strip() and not calls:
            raise ValueError(f"turn {i} ({role}) is empty")
        if role == "tool" and open_calls == 0:
            raise ValueError(f"turn {i} is a tool result with no tool call before it" if previous != "tool" else
                             f"turn {i}: more tool results than the tool calls before them")
        if role not in expected_after[previous]:
            after = f"after {previous!r}" if previous else "first"
            raise ValueError(f"roles out of order: turn {i} is {'a tool call' if calls else repr(role)} {after}")
        if role == "assistant":
            open_calls = len(json.loads(calls)) if isinstance(calls, str) else len(calls or [])
        elif role == "tool":
            open_calls -= 1
        previous = role
    if previous != "assistant":
        raise ValueError("the dialogue must end with an assistant reply")
