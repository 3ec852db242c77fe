"""The demo world's tool task: two-digit sums the tiny model cannot do from memory, SFT traces that teach the
`add` call through the template's own `tools=` argument, RL prompts, and the built-in tool itself."""

from __future__ import annotations

import json

import pytest
from conftest import jsonl_records
from transformers import AutoTokenizer

from lmforge.data.templates import apply_template_choice
from lmforge.data.tokenize import IGNORE, encode_sft
from lmforge.data.tools import parse_tools
from lmforge.demo.tool_data import ADD_SCHEMA, HIGH, LOW, TOOL
from lmforge.rollout.environments import ToolEnvironment, checked_step, tool_schema
from lmforge.rollout.tools_sandbox import ToolLimits, run_tool


def _sums(records: list[dict]) -> set[tuple[int, int]]:
    return {tuple(sorted(map(int, r["subject"].split(" + ")))) for r in records}


def test_the_three_files_ask_distinct_two_digit_sums(demo_files):
    sft, train, held = (jsonl_records(demo_files[k]) for k in ("tools_sft", "tools_train", "tools_eval"))
    assert (len(sft), len(train), len(held)) == (240, 240, 64)
    assert len(_sums(sft)) == 240 and len(_sums(train)) == 240 and len(_sums(held)) == 32  # eval: both languages
    assert not (_sums(sft) & _sums(held)) and not (_sums(train) & _sums(held)) and not (_sums(sft) & _sums(train))
    for record in sft + train + held:
        a, b = map(int, record["subject"].split(" + "))
        assert LOW <= a <= HIGH and LOW <= b <= HIGH and record["answer"] == str(a + b)
        assert record["messages"][-1]["content"].replace("。", ".").endswith(f"{a + b}.")
    assert {r["lang"] for r in held[:2]} == {"en", "zh"} and "tools" not in held[0] and "tools" not in train[0]


def test_a_trace_calls_add_with_the_operands_and_answers_with_its_result(demo_files):
    record = jsonl_records(demo_files["tools_sft"])[0]
    a, b = map(int, record["subject"].split(" + "))
    user, call, result, answer = record["messages"]
    assert user["role"] == "user" and f"{a}" in user["content"] and f"{b}" in user["content"]
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]
    assert result == {"role": "tool", "content": str(a + b)} and answer["content"].startswith(f"{a}")
    assert record["tools"] == [ADD_SCHEMA]


def test_the_traces_show_the_schema_the_tool_environment_derives():
    assert tool_schema(TOOL) == ADD_SCHEMA  # SFT prompts and RL prompts open with the same system turn


def test_only_the_call_and_the_answer_carry_loss(demo_files, world_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(world_tokenizer_dir))
    apply_template_choice(tokenizer, "chatml")
    record = jsonl_records(demo_files["tools_sft"])[0]
    a, b = map(int, record["subject"].split(" + "))
    encoded = encode_sft(tokenizer, record["messages"], 2048, tools=parse_tools(record["tools"]))
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs, current = [*runs, tokenizer.decode(current)], []
    runs += [tokenizer.decode(current)] if current else []
    assert runs == [f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call><|im_end|>',
                    record["messages"][-1]["content"] + "<|im_end|>"]
    context = tokenizer.decode(encoded["input_ids"])
    assert context.index("<tools>") < context.index(json.dumps(ADD_SCHEMA)) < context.index(record["messages"][0]["content"])
    assert f"<tool_response>\n{a + b}\n</tool_response>" in context  # the result is context, not loss


@pytest.mark.parametrize("arguments, kind, text", [
    ({"a": 47, "b": 38}, "ok", "85"),
    ({"a": "47", "b": 38}, "error", "error: TypeError: a must be a whole number, got '47'"),
    ({"a": 47}, "error", "error: TypeError: add() missing 1 required positional argument: 'b'"),
    ({"a": True, "b": 1}, "error", "a must be a whole number, got True"),
])
def test_the_demo_tool_adds_and_refuses_what_is_not_a_whole_number(arguments, kind, text):
    outcome = run_tool(TOOL, arguments, ToolLimits(seconds=20))
    assert outcome.kind == kind and text in outcome.text, outcome


def test_a_played_trace_is_paid_only_for_the_right_sum(demo_files):
    held = jsonl_records(demo_files["tools_eval"])[0]
    a, b = map(int, held["subject"].split(" + "))
    record = {"prompt": held["messages"][:1], "answer": held["answer"], "reference": held["messages"][-1]["content"]}
    env = ToolEnvironment([TOOL], ToolLimits(seconds=20))
    assert env.schemas == [ADD_SCHEMA] and env.reset(record) == held["messages"][:1]
    call = f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'
    assert checked_step(env, call) == ([{"role": "tool", "content": str(a + b)}], 0.0, False)
    assert checked_step(env, f"{a} plus {b} equals {a + b}.") == ([], 1.0, True)
    env.reset(record)
    assert checked_step(env, f"{a} plus {b} equals {a + b + 1}.") == ([], 0.0, True)
    env.reset(record)
    assert checked_step(env, f"{a} plus {b} equals {a}.")[1] == 0.0  # restating an operand is no answer


FIRST_STEPS = ["stages.pt.config.model.scratch=test", "stages.pt.config.train.epochs=1",
               "stages.pt.config.train.max_steps=4", "stages.sft.config.train.max_steps=4",
               *[f"stages.{s}.config.{k}" for s in ("grpo_tools", "grpo_plain")
                 for k in ("train.max_steps=1", "rl.prompts_per_step=2", "rl.num_generations=2", "rl.eval_prompts=4",
                           "rl.max_new_tokens=8", "train.eval_steps=0", "train.save_steps=0")],
               "tokenizer.vocab_size=600", "eval.max_new_tokens=4"]


def test_the_tool_pipeline_runs_its_first_steps_and_plays_the_held_out_sums_with_the_tool(tmp_path, monkeypatch):
    from pathlib import Path

    from lmforge.pipeline.run import load_pipeline, run_pipeline

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the example names its template relative to the repository, as its users run it
    run = tmp_path / "demo_tools"
    run_pipeline(load_pipeline(root / "examples" / "demo_tools.yaml", [f"run_dir={run}", *FIRST_STEPS]))
    stages = {s["name"]: s["status"] for s in json.loads((run / "run.json").read_text())["stages"]}
    assert set(stages) == {"pt", "sft", "grpo_tools", "grpo_plain"} and set(stages.values()) == {"done"}, stages
    tools = json.loads((run / "grpo_tools" / "lmforge.json").read_text())["metrics"]
    plain = json.loads((run / "grpo_plain" / "lmforge.json").read_text())["metrics"]
    # the tool run played the held-out sums in the environment, before and after; the other answered them once
    assert {"initial_eval_reward", "eval_reward", "eval_turns", "eval_tool_calls/error"} <= set(tools)
    assert "eval_turns" not in plain and "eval_reward/answer_match" in plain
    assert "one-line-per-tool list" in (run / "sft" / "chat_template.jinja").read_text()  # the template travels on
