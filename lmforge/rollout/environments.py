"""Multi-turn environments for online RL (PPO, GRPO, RLOO with `rl.environment`).

An environment is a Python class; one instance plays one trajectory:

* `reset(record) -> messages`: the conversation the model answers first (OpenAI-style messages), from a
  prompt record (its `prompt`, `reference`, `answer` and extra columns);
* `step(reply) -> (messages, reward, done)`: the model's reply (text) in; the messages that answer it (a
  `tool` result, the next `user` turn; may be empty when done), that turn's reward, and whether it is over.

A trajectory's reward is the sum of its turns' rewards. `rl.environment` names the class as
`package.module:Class` or `path/to/file.py:Class` (built with `rl.environment_args` as keyword arguments), or
a built-in: `tools` (`ToolEnvironment`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Protocol

from lmforge.config.errors import ConfigError
from lmforge.data import grading
from lmforge.data.tool_calls import call_marker, parse_tool_calls
from lmforge.rollout.tools_sandbox import ToolLimits, ToolOutcome, run_tool


class Environment(Protocol):
    def reset(self, record: dict) -> list[dict]: ...

    def step(self, reply: str) -> tuple[list[dict], float, bool]: ...


UNREADABLE = ('error: the tool call could not be read; write each call as <tool_call>{"name": "<tool>", '
              '"arguments": {...}}</tool_call>, with nothing after the calls')


def tool_calls(reply: str, fmt: str = "hermes") -> list[dict] | None:
    """The reply's tool calls as {"name", "arguments"} by the one parsing rule of `lmforge.data.tool_calls`
    (the server's); [] when it opens a call that rule cannot read (broken JSON, text after it, cut off),
    None when it opens none (a final answer)."""
    parsed = parse_tool_calls(reply, fmt)
    if not parsed.calls:
        return [] if call_marker(fmt) in reply else None
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in parsed.calls]


class ToolEnvironment:
    """The built-in tool environment (Hermes/Qwen `<tool_call>` format). Each turn, the model's tool calls run
    against the registered functions
    (`rl.tools`: `module:function` or `file.py:function`, known to the model by function name), each in a
    separate process under `ToolLimits`; their results, errors included, come back as `tool` messages. A reply
    without a tool call is the final answer: reward 1 when it states the record's answer (the grading rule
    of `answer_match`), else 0, and the trajectory ends. `call_reward` is added for every call that ran
    without an error (0 by default: a per-turn shaping term)."""

    concurrent_steps = True
    """Instances share nothing, so the trajectories of a group step on threads (see multiturn._steps)."""

    def __init__(self, tools: list[str], limits: ToolLimits | None = None, call_reward: float = 0.0):
        self.tools = {target.rpartition(":")[2]: target for target in tools}
        if len(self.tools) != len(tools):
            raise ConfigError(f"rl.tools: two tools share a function name ({', '.join(tools)})")
        self.limits, self.call_reward = limits or ToolLimits(), call_reward
        self.schemas = [tool_schema(target) for target in tools]
        """What the chat template's `tools=` argument renders, so the model knows what it may call."""
        self.record: dict = {}
        self.outcomes: list[ToolOutcome] = []

    def reset(self, record: dict) -> list[dict]:
        self.record, self.outcomes = record, []
        return list(record["prompt"])

    def step(self, reply: str) -> tuple[list[dict], float, bool]:
        calls = tool_calls(reply)
        if calls == []:  # a call the model did not finish or wrote wrong: told so, a counted turn
            self.outcomes.append(ToolOutcome("error", UNREADABLE))
            return [{"role": "tool", "content": UNREADABLE}], 0.0, False
        if calls is None:
            expected = self.record.get("answer") or self.record.get("reference") or ""
            question = next((m["content"] for m in reversed(self.record["prompt"]) if m["role"] == "user"), "")
            right = bool(grading.final_answer(expected)) and grading.answer_match(reply, expected, question)
            return [], float(right), True
        messages, reward = [], 0.0
        for call in calls:
            if call["name"] not in self.tools:
                outcome = ToolOutcome("error", f"error: no tool named {call['name']!r}; tools: {', '.join(self.tools)}")
            else:
                outcome = run_tool(self.tools[call["name"]], call["arguments"], self.limits)
            self.outcomes.append(outcome)
            reward += self.call_reward * (outcome.kind == "ok")
            messages.append({"role": "tool", "content": outcome.text})
        return messages, reward, False


def tool_schema(target: str) -> dict:
    """An OpenAI function schema for a tool: its name, its docstring's first line, and its parameters from the
    signature (annotated int/float/bool/str mapped to JSON types, others left open). Reading a signature
    imports the tool's module here; calling it happens only in the sandbox."""
    name = target.rpartition(":")[2]
    try:
        fn = _import(target)
        signature = inspect.signature(fn)
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
    except Exception as exc:  # a module that cannot be imported here: the sandbox reports it per call
        raise ConfigError(f"rl.tools: cannot load {target!r} ({type(exc).__name__}: {exc})") from exc
    types = {int: "integer", float: "number", bool: "boolean", str: "string", "int": "integer",
             "float": "number", "bool": "boolean", "str": "string"}
    properties = {p.name: ({"type": types[p.annotation]} if p.annotation in types else {})
                  for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in signature.parameters.values() if p.default is p.empty and p.name in properties]
    return {"type": "function", "function": {"name": name, "description": doc[0] if doc else name,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def _import(target: str):
    module_name, _, name = target.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        loaded = importlib.util.spec_from_file_location(f"lmforge_env_{path.stem}", path)
        module = importlib.util.module_from_spec(loaded)
        sys.modules[loaded.name] = module
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, name)


BUILT_IN = {"tools": ToolEnvironment}


def load_environment(spec: str, args: dict | None = None, tools: list[str] | None = None,
                     limits: ToolLimits | None = None):
    """A factory of fresh environments for `rl.environment`; a bad name is a one-line ConfigError."""
    args = dict(args or {})
    if spec == "tools":
        if not tools:
            raise ConfigError("rl.environment=tools needs rl.tools: a list of module:function or file.py:function")
        ToolEnvironment(tools, limits, **args)  # the tools' schemas read once now: a bad target fails here
        return lambda: ToolEnvironment(tools, limits, **args)
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"rl.environment={spec!r}: give package.module:Class, path/to/file.py:Class or a "
                          f"built-in ({', '.join(BUILT_IN)})")
    try:
        cls = _import(spec)
    except Exception as exc:  # whatever the user's module raises while importing, reported as config
        raise ConfigError(f"rl.environment: cannot load {spec!r} ({type(exc).__name__}: {exc})") from exc
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"rl.environment={spec!r} has no {' or '.join(missing)} method: an environment needs "
                          "reset(record) -> messages and step(reply) -> (messages, reward, done)")
    return lambda: cls(**args)


def _call(env, method: str, argument):
    """env.<method>(argument); an exception the user's class raises becomes one line naming the class and
    the file and line it was raised at."""
    try:
        return getattr(env, method)(argument)
    except ConfigError:
        raise
    except Exception as exc:  # the user's code: reported as configuration, not as lmforge's traceback
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ConfigError(f"rl.environment: {type(env).__name__}.{method} raised {type(exc).__name__}: {exc} "
                          f"({frame.filename}:{frame.lineno})") from exc


def checked_reset(env, record: dict) -> list[dict]:
    """env.reset(record), checked."""
    return checked_messages(_call(env, "reset", record), f"{type(env).__name__}.reset")


def checked_step(env, reply: str) -> tuple[list[dict], float, bool]:
    """env.step(reply) with its return values checked (one-line errors naming the class)."""
    out = _call(env, "step", reply)
    where = f"{type(env).__name__}.step"
    if not (isinstance(out, tuple) and len(out) == 3):
        raise ConfigError(f"rl.environment: {where} must return (messages, reward, done), got {type(out).__name__}")
    messages, reward, done = out
    checked_messages(messages, where)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ConfigError(f"rl.environment: {where} returned reward {reward!r}: must be a finite number")
    return list(messages), float(reward), bool(done)


def checked_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content", ""), str) for m in messages):
        raise ConfigError(f"rl.environment: {where} must return a list of messages ({{'role': ..., 'content': ...}}), "
                                f"got {str(messages)[:120]}")
    return messages
