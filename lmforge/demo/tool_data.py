"""The demo world's tool task: sums of two-digit numbers, which the tiny model cannot do from memory
(its pre-training text states sums of 0-10 only) but can do with the `add` tool
(`lmforge.demo.tools:add`) by copying the operands into a call and the result into its answer.

- `tools/sft_train.jsonl`: SFT traces on training sums. Each is a conversation with the tool's schema in
  its `tools` column: the question, the model's `add` call (`tool_calls`), the tool's result (a `tool`
  message) and the answer in the world's canonical sum sentence. The template renders the schema through
  its own `tools=` argument; only the model's two turns carry loss.
- `tools/train.jsonl`: prompts for online RL on other training sums (question, reference answer).
- `tools/eval.jsonl`: held-out sums, in neither of the files above.

Every pair of operands is drawn once, so the three files share no sum (in either order). Prompt records
carry no `tools` column: the tool environment (`rl.environment: tools`) adds its schemas itself, and a run
without the tool asks the same questions with nothing to call.
"""

from __future__ import annotations

import json
import random

from lmforge.demo.sft import chat_record
from lmforge.demo.world import LANGS, TEMPLATES, World

TOOL = "lmforge.demo.tools:add"
"""The `rl.tools` entry of the task's one tool."""
ADD_SCHEMA = {"type": "function", "function": {
    "name": "add", "description": "Add two whole numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
"""What the tool environment derives from `add`'s signature and docstring (a test keeps them equal): the
SFT traces must show the model the very system turn its RL prompts will have."""
LOW, HIGH = 10, 99
"""Operands: two-digit numbers, beyond the world's 0-10 arithmetic."""
COUNTS = {"eval": 32, "sft": 240, "train": 240}
"""Distinct operand pairs per file; eval asks each pair in both languages, the others in one."""
TOOL_FILES = {"tools_sft": "tools/sft_train.jsonl", "tools_train": "tools/train.jsonl",
              "tools_eval": "tools/eval.jsonl"}


def _pairs(rng: random.Random) -> dict[str, list[tuple[int, int]]]:
    """Distinct unordered operand pairs for each file (a + b and b + a count as one sum)."""
    seen, drawn = set(), []
    while len(drawn) < sum(COUNTS.values()):
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if (min(a, b), max(a, b)) not in seen:
            seen.add((min(a, b), max(a, b)))
            drawn.append((a, b))
    out, start = {}, 0
    for name, count in COUNTS.items():
        out[name], start = drawn[start:start + count], start + count
    return out


def _question(rng: random.Random, a: int, b: int, lang: str) -> tuple[str, str]:
    """(question, canonical answer sentence)."""
    question = rng.choice(TEMPLATES["asksum", "+", lang]).format(a=a, b=b)
    return question, TEMPLATES["sum", "+", lang][0].format(a=a, b=b, c=a + b)


def _prompt_record(rng: random.Random, a: int, b: int, lang: str, rid: str) -> dict:
    turn = _question(rng, a, b, lang)
    return chat_record(rid, lang, "tool_sum", turn, str(a + b), f"{a} + {b}", [], False)


def _trace(rng: random.Random, a: int, b: int, lang: str, rid: str) -> dict:
    question, answer = _question(rng, a, b, lang)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": str(a + b)},
                {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": [ADD_SCHEMA], "answer": str(a + b), "lang": lang,
            "kind": "tool_sum", "id": rid, "subject": f"{a} + {b}"}


def tool_records(world: World) -> dict[str, list[dict]]:
    rng = random.Random(f"demo-tools:{world.seed}")
    pairs = _pairs(rng)
    langs = [LANGS[i % len(LANGS)] for i in range(max(COUNTS.values()))]
    return {
        "tools_sft": [_trace(rng, a, b, lang, f"tools-sft-{lang}-{a}+{b}")
                      for (a, b), lang in zip(pairs["sft"], langs)],
        "tools_train": [_prompt_record(rng, a, b, lang, f"tools-train-{lang}-{a}+{b}")
                        for (a, b), lang in zip(pairs["train"], langs)],
        "tools_eval": [_prompt_record(rng, a, b, lang, f"tools-eval-{lang}-{a}+{b}")
                       for a, b in pairs["eval"] for lang in LANGS],
    }


def tool_files(world: World) -> dict[str, tuple[str, list[str]]]:
    """name -> (path under the world directory, JSON lines)."""
    records = tool_records(world)
    return {name: (TOOL_FILES[name], [json.dumps(r, ensure_ascii=False) for r in records[name]])
            for name in TOOL_FILES}
