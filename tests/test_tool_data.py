"""Tool-calling SFT data: tools and calls are read into one message form, rendered through the template's own
`tools=` argument (never a system-prompt preamble), only the model's own turns (its calls included) carry
loss, and malformed tool records are bad records named by file and line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_chat_templates import family_tokenizer
from test_readers import load

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.config.templates import template_text
from lmforge.data.build import tokenize_sft
from lmforge.data.formats import RowFormat, to_example
from lmforge.data.templates import apply_template_choice, render_prompt, render_segments
from lmforge.data.tokenize import IGNORE, encode_sft
from lmforge.data.tools import example_messages, parse_tools

GLAIVE = Path("/work/shared/data/llamafactory/glaive_toolcall_en_demo.json")
needs_glaive = pytest.mark.skipif(not GLAIVE.is_file(), reason="LLaMA-Factory's demo data is not here")

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_RECORD = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "It is 18 °C."}], "tools": json.dumps([WEATHER])}
SHAREGPT_RECORD = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {"from": "observation", "value": '{"temp_c": 18}'},
    {"from": "gpt", "value": "It is 18 °C."}], "tools": [WEATHER]}

# Written by hand from Qwen2.5-7B-Instruct's published chat_template (tools in the system turn, the call as
# <tool_call> JSON, the result as a <tool_response> block in a user turn).
QWEN25_TOOL_TEXT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp_c\": 18}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nIt is 18 °C.<|im_end|>\n")


def with_template(tok, name: str):
    if name in ("plain", "chatml"):
        apply_template_choice(tok, name)
        return tok
    return family_tokenizer(tok, name)


def loss_runs(tok, encoded: dict) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("record", [OPENAI_RECORD, SHAREGPT_RECORD], ids=["openai", "sharegpt"])
def test_both_forms_render_as_qwen25_does_with_tools(tok, record):
    example = to_example(record, RowFormat())
    tokenizer = with_template(tok, "qwen")
    segments = render_segments(tokenizer, example_messages(example), parse_tools(example["tools"]))
    assert "".join(s.text for s in segments) == QWEN25_TOOL_TEXT
    assert [s.text for s in segments if s.is_assistant] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 °C.<|im_end|>"]


@needs_glaive
@pytest.mark.parametrize("name", ["qwen", "qwen3", "chatml"])
def test_glaive_records_render_as_transformers_does_with_the_same_template(tok, name):
    """The text lmforge trains on is what transformers' apply_chat_template(tools=...) gives for the
    template's own string and the OpenAI-form messages: nothing added, nothing dropped."""
    tokenizer = with_template(tok, name)
    records = json.loads(GLAIVE.read_text())
    checked = 0
    for record in records[:40]:
        example = to_example(record, RowFormat(formatting="sharegpt"))
        messages, tools = example_messages(example), parse_tools(example["tools"])
        text = "".join(s.text for s in render_segments(tokenizer, messages, tools))
        reference = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  chat_template=template_text(name))
        assert text == reference
        checked += bool(tools)
    assert checked >= 20
    assert "You can call these tools" not in text


@needs_glaive
def test_glaive_record_masks_only_the_models_turns_and_its_calls(tok):
    tokenizer = with_template(tok, "chatml")
    record = json.loads(GLAIVE.read_text())[0]
    example = to_example(record, RowFormat(formatting="sharegpt"))
    encoded = encode_sft(tokenizer, example_messages(example), 4096, tools=parse_tools(example["tools"]))
    turns = record["conversations"]
    call = json.loads(turns[3]["value"])
    expected = [turns[1]["value"] + "<|im_end|>",
                f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {json.dumps(call["arguments"])}}}\n'
                "</tool_call><|im_end|>",
                turns[5]["value"] + "<|im_end|>", turns[7]["value"] + "<|im_end|>"]
    assert loss_runs(tokenizer, encoded) == expected
    # the observation and the tool list are context
    labelled = tokenizer.decode([t for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != IGNORE])
    assert turns[4]["value"] not in labelled and "<tool_response>" not in labelled
    assert "search_recipes" in tokenizer.decode(encoded["input_ids"][:200])  # the tools reach the model


def test_a_template_without_a_tool_format_refuses_tool_records_naming_the_template(tok):
    example = to_example(OPENAI_RECORD, RowFormat())
    tokenizer = with_template(tok, "plain")
    with pytest.raises(ValueError, match=r"model\.template=plain\) has no tool format"):
        encode_sft(tokenizer, example_messages(example), 512, tools=parse_tools(example["tools"]))
    with pytest.raises(ValueError, match="has no tool format"):
        render_prompt(tokenizer, [{"role": "user", "content": "hi"}], tools=parse_tools(example["tools"]))
    plain = encode_sft(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], 64)
    assert plain is not None  # records without tools still train


HOSTILE = [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "tools": "[{oops"},
     "the tools column is not valid JSON (Expecting property name enclosed in double quotes at column 3)"),
    ({"conversations": [{"from": "human", "value": "hi"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": "{city: Paris}"}'},
                        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "ok"}]},
     "turn 1 (function_call)'s arguments is not valid JSON (Expecting property name enclosed in double quotes "
     "at column 2)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "1"},
                        {"from": "gpt", "value": "ok"}]},
     "turn 1 is a tool result with no tool call before it"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "ok"}]},
     "roles out of order: turn 2 is a tool call after 'assistant'"),
    ({"conversations": [{"from": "human", "value": "hi"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                        {"from": "observation", "value": "1"}, {"from": "observation", "value": "2"},
                        {"from": "gpt", "value": "ok"}]},
     "turn 3: more tool results than the tool calls before them"),
    ({"conversations": [{"from": "human", "value": "hi"},
                        {"from": "function_call", "value": '{"arguments": {}}'}, {"from": "gpt", "value": "ok"}]},
     "turn 1 (function_call) has no function name"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "tools": "{\"a\": 1}"},
     "tools[0] has no function name"),
]


def test_hostile_tool_records_are_bad_records_named_by_line_and_counted(tmp_path):
    good = json.dumps(SHAREGPT_RECORD)
    lines = [good] + [json.dumps(row) for row, _ in HOSTILE] + [good]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset, errors = load([DatasetSpec(path=str(path))], tmp_path, on_error="skip", max_bad_fraction=1.0)
    assert len(dataset) == 2 and errors.skipped == {str(path): len(HOSTILE)}
    assert errors.examples == [f"{path}:line {k + 2}: {problem}" for k, (_, problem) in enumerate(HOSTILE)]


def test_tool_records_on_a_template_without_tools_are_counted_at_tokenization(tmp_path, tok):
    path = tmp_path / "tools.jsonl"
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text("\n".join(json.dumps(r) for r in [plain, SHAREGPT_RECORD, plain]) + "\n", encoding="utf-8")
    dataset, errors = load([DatasetSpec(path=str(path))], tmp_path, on_error="skip", max_bad_fraction=1.0)
    tokens = tokenize_sft(dataset, with_template(tok, "plain"), DataConfig(max_bad_fraction=1.0), errors, False)
    assert len(tokens) == 2 and errors.skipped == Counter({str(path): 1})
    assert errors.examples[-1].startswith(f"{path}:line 2: this record has tools or tool calls, but the chat "
                                          "template (model.template=plain) has no tool format")
