"""Issue 24: `data.system_prompt` gives or suppresses the system prompt of every record without its own, for SFT,
preference (pairs, KTO) and RL prompt data, through the chat template: unset keeps the template's behaviour,
a string is the system turn, "" is none (SmolLM2's English default is not injected into Chinese dialogues)."""

from __future__ import annotations

import json

import pytest

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples, tokenize_preference, tokenize_sft
from lmforge.data.errors import ErrorLog
from lmforge.data.templates import apply_template_choice, render_prompt, render_segments
from lmforge.data.tools import example_messages

# SmolLM2-135M-Instruct's chat template as its tokenizer_config.json publishes it.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TALK = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "我们今天学习"}]
THINK = "Think inside <think></think>, then answer inside <answer></answer>."


@pytest.fixture()
def smol(tok):
    tok.chat_template = SMOLLM2
    return tok


def write(tmp_path, name: str, records: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read(path: str, kind: str, tmp_path, system_prompt):
    cfg = DataConfig(train=[DatasetSpec(path=path)], eval_split=0, system_prompt=system_prompt)
    rows, _ = load_examples(cfg.train, cfg, ErrorLog(), str(tmp_path / f"cache-{kind}"), kind=kind)
    return cfg, rows


def test_the_empty_system_message_renders_no_system_turn_and_no_default(smol):
    text = "".join(s.text for s in render_segments(smol, [{"role": "system", "content": ""}, *TALK]))
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n我们今天学习<|im_end|>\n"
    assert "".join(s.text for s in render_segments(smol, TALK)) == DEFAULT + text  # unset: the template's own
    assert render_prompt(smol, [{"role": "system", "content": ""}, TALK[0]]) == \
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("setting, opening", [(None, DEFAULT), ("", ""),
                                              ("你是医生。", "<|im_start|>system\n你是医生。<|im_end|>\n")])
def test_sft_records_get_the_setting_and_keep_their_own_system(smol, tmp_path, setting, opening):
    own = [{"role": "system", "content": "Be brief."}, *TALK]
    path = write(tmp_path, "sft.jsonl", [{"messages": TALK}, {"messages": own}])
    cfg, rows = read(path, "sft", tmp_path, setting)
    tokens = tokenize_sft(rows, smol, cfg, ErrorLog(), pack=False)
    texts = [smol.decode(ids) for ids in tokens["input_ids"]]
    body = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n我们今天学习<|im_end|>\n"
    assert texts[0] == opening + body
    assert texts[1] == "<|im_start|>system\nBe brief.<|im_end|>\n" + body
    labels = [t for t, lab in zip(tokens["input_ids"][0], tokens["labels"][0]) if lab != -100]
    assert smol.decode(labels) == "我们今天学习<|im_end|>"  # the system turn never carries loss


@pytest.mark.parametrize("kind, record", [
    ("pair", {"prompt": "你好", "chosen": "我们今天学习", "rejected": "好的"}),
    ("kto", {"prompt": "你好", "completion": "我们今天学习", "label": True}),
])
@pytest.mark.parametrize("setting, opening", [(None, DEFAULT), ("", ""),
                                              ("你是医生。", "<|im_start|>system\n你是医生。<|im_end|>\n")])
def test_preference_prompts_get_the_setting(smol, tmp_path, kind, record, setting, opening):
    cfg, rows = read(write(tmp_path, f"{kind}.jsonl", [record]), kind, tmp_path, setting)
    tokens = tokenize_preference(rows, smol, cfg, ErrorLog(), kind)
    assert smol.decode(tokens["prompt_ids"][0]) == opening + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_an_rl_prompt_gets_a_grpo_system_prompt_through_the_template(smol, tmp_path):
    from lmforge.data.templates import encode_prompts

    path = write(tmp_path, "rl.jsonl", [{"question": "2+2?", "answer": "4"},
                                        {"question": "3+3?", "answer": "6", "system": "Be brief."}])
    _, rows = read(path, "prompt", tmp_path, THINK)
    assert [r["prompt"][0] for r in rows] == [{"role": "system", "content": THINK},
                                              {"role": "system", "content": "Be brief."}]
    assert smol.decode(encode_prompts(smol, [rows[0]["prompt"]])[0]) == \
        f"<|im_start|>system\n{THINK}<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    _, rows = read(path, "prompt", tmp_path, "")
    assert smol.decode(encode_prompts(smol, [rows[0]["prompt"]])[0]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["chatml", "qwen", "llama3", "gemma", "mistral", "plain"])
def test_none_renders_as_the_family_does_without_a_system_prompt(tok, name):
    """"" is the conversation without a system turn, and for `qwen` also without Qwen's default one."""
    from test_tool_data import with_template

    tokenizer = with_template(tok, name)
    without = "".join(s.text for s in render_segments(tokenizer, [{"role": "system", "content": ""}, *TALK]))
    own = "".join(s.text for s in render_segments(tokenizer, TALK))
    if name == "qwen":
        assert own.startswith("<|im_start|>system\nYou are Qwen") and without == own[own.index("<|im_start|>user"):]
    else:
        assert without == own
    assert "system" not in without


def test_a_system_prompt_that_is_not_a_string_is_refused():
    with pytest.raises(ConfigError, match="data.system_prompt"):
        DataConfig(system_prompt=["be brief"])


def test_a_tool_record_with_the_setting_keeps_the_system_text_beside_the_tools(tok, tmp_path):
    from test_tool_data import with_template

    tokenizer = with_template(tok, "qwen")
    record = {"messages": TALK, "tools": [{"name": "lookup", "description": "find", "parameters": {}}]}
    cfg, rows = read(write(tmp_path, "tools.jsonl", [record]), "sft", tmp_path, "你是医生。")
    assert example_messages(rows[0])[0] == {"role": "system", "content": "你是医生。"}
    apply_template_choice(tokenizer, "qwen")
    text = "".join(s.text for s in render_segments(tokenizer, example_messages(rows[0]), [
        {"type": "function", "function": record["tools"][0]}]))
    assert text.startswith("<|im_start|>system\n你是医生。\n\n# Tools")
