"""Issue 24: preference pairs and KTO records with a `tools` field keep their tools, rendered through the chat
template's tools= argument as SFT does; a template without a tool format refuses such records (counted), never
drops the tools silently."""

from __future__ import annotations

import json

import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples, tokenize_preference
from lmforge.data.errors import ErrorLog

TOOL = {"name": "lookup_drug", "description": "Find a drug's dose", "parameters": {
    "type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}}
RECORDS = {
    "pair": {"prompt": "你好", "chosen": "我们今天学习", "rejected": "好的", "tools": json.dumps([TOOL])},
    "kto": {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}],
            "label": True, "tools": [TOOL]},
}


def tokens(tok, tmp_path, kind: str, **data):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(json.dumps(RECORDS[kind], ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = DataConfig(train=[DatasetSpec(path=str(path))], eval_split=0, max_length=4096, **data)
    errors = ErrorLog(cfg.on_error, 1.0)
    rows, _ = load_examples(cfg.train, cfg, errors, str(tmp_path / "cache"), kind=kind)
    return tokenize_preference(rows, tok, cfg, errors, kind), errors


@pytest.mark.parametrize("kind", ["pair", "kto"])
def test_the_tools_reach_the_template_as_sft_tools_do(tok, tmp_path, kind):
    from test_tool_data import with_template

    qwen = with_template(tok, "qwen")
    out, errors = tokens(qwen, tmp_path, kind)
    assert errors.examples == []
    prompt = qwen.decode(out["prompt_ids"][0])
    schema = json.dumps({"type": "function", "function": TOOL}, ensure_ascii=False)
    assert prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
                      "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
                      f"provided with function signatures within <tools></tools> XML tags:\n<tools>\n{schema}\n"
                      "</tools>\n\nFor each function call, return a json object with function name and arguments "
                      "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                      "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                      "<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["pair", "kto"])
def test_a_template_without_a_tool_format_refuses_the_record_by_line(tok, tmp_path, kind):
    from test_tool_data import with_template

    plain = with_template(tok, "plain")
    out, errors = tokens(plain, tmp_path, kind, on_error="skip")
    assert len(out) == 0 and errors.total_skipped == 1
    assert errors.examples[0].startswith(f"{tmp_path / (kind + '.jsonl')}:line 1: this record has tools")


def test_bad_tools_are_a_bad_record(tok, tmp_path):
    RECORDS["bad"] = {**RECORDS["pair"], "tools": "[{\"description\": \"no name\"}]"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS["bad"]) + "\n", encoding="utf-8")
    cfg = DataConfig(train=[DatasetSpec(path=str(path))], eval_split=0, on_error="raise")
    with pytest.raises(ValueError, match=r"bad\.jsonl:line 1: tools\[0\] has no function name"):
        load_examples(cfg.train, cfg, ErrorLog("raise"), str(tmp_path / "cache"), kind="pair")
