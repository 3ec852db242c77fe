"""Tool definitions and tool calls in one form, whatever the data set wrote.

- Tools (a record's `tools` column, a JSON string or a list): OpenAI function schemas,
  `{"type": "function", "function": {"name", "description", "parameters"}}`; the bare
  `{"name", "description", "parameters"}` of glaive/LLaMA-Factory data is wrapped into that form,
  which is what transformers' `apply_chat_template(tools=...)` and the families' templates read.
- Tool calls (an assistant message's `tool_calls`): `{"type": "function", "function": {"name",
  "arguments": {...}}}` with the arguments parsed into an object (OpenAI sends them as JSON text; the
  templates print them with `tojson`). A ShareGPT `function_call` turn holds `{"name", "arguments"}`
  or a list of them.

In the data tables a message keeps `tool_calls` as JSON text (Arrow needs one type per column);
`chat_messages` turns stored messages back into what a template reads.
"""

from __future__ import annotations

import json


def _loads(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None


def parse_tools(value) -> list[dict]:
    """The tool list of a record's `tools` value; empty (None, "", [], "[]") is no tools."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    tools = _loads(value, "the tools column") if isinstance(value, str) else value
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ValueError(f"the tools column must be a list of function schemas, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be an object (a function schema), got {type(tool).__name__}")
        function = tool.get("function") if tool.get("type") == "function" else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] has no function name")
        out.append({"type": "function", "function": function})
    return out


def tools_text(tools: list[dict]) -> str:
    return json.dumps(tools, ensure_ascii=False) if tools else ""


def _call(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object with a name and arguments, got {type(item).__name__}")
    function = item.get("function") if isinstance(item.get("function"), dict) else item
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} has no function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _loads(arguments, f"{where}'s arguments") if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}'s arguments must be a JSON object, got {type(arguments).__name__}")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(item.get("id"), str):
        call["id"] = item["id"]
    return call


def parse_calls(value, where: str = "the tool call") -> list[dict]:
    """Tool calls from a ShareGPT `function_call` value (JSON text) or an OpenAI `tool_calls` list."""
    calls = _loads(value, where) if isinstance(value, str) else value
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise ValueError(f"{where} is an empty list")
    return [_call(c, where if len(calls) == 1 else f"{where} {i}") for i, c in enumerate(calls)]


def chat_messages(messages: list[dict]) -> list[dict]:
    """Stored messages → template input: unset fields (None, "") dropped, `tool_calls` parsed."""
    out = []
    for message in messages:
        clean = {k: v for k, v in message.items() if v is not None and (v != "" or k == "content")}
        if isinstance(clean.get("tool_calls"), str):
            clean["tool_calls"] = json.loads(clean["tool_calls"])
        out.append(clean)
    return out


def has_tool_content(messages: list[dict], tools: list | None) -> bool:
    """Tool definitions or calls (tool results follow calls: `check_dialogue` sees to that)."""
    return bool(tools) or any(m.get("tool_calls") for m in messages)


def plain_messages(messages: list[dict]) -> list[dict]:
    """{role, content} only, for the tables and readers that know no tool calls: a call's text is its
    JSON (`{"name", "arguments"}`, a list for several), after any text the reply had."""
    out = []
    for message in messages:
        content = message["content"]
        calls = message.get("tool_calls")
        if calls:
            calls = json.loads(calls) if isinstance(calls, str) else calls
            bare = [c["function"] for c in calls]
            text = json.dumps(bare[0] if len(bare) == 1 else bare, ensure_ascii=False)
            content = f"{content}\n{text}" if content.strip() else text
        out.append({"role": message["role"], "content": content})
    return out


def chat_json(messages: list[dict]) -> str:
    """The structured messages as JSON text when any has a tool call or reasoning (else "")."""
    if any(m.get("tool_calls") or m.get("reasoning_content") for m in messages):
        return json.dumps(messages, ensure_ascii=False)
    return ""


def example_messages(example: dict) -> list[dict]:
    """An SFT example's messages as a template reads them: its `chat` column when set, else `messages`."""
    return chat_messages(json.loads(example["chat"]) if example.get("chat") else example["messages"])
