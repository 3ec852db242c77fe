"""Reasoning in replies: the (reasoning, answer) split on hostile strings, the think_format reward, and SFT
on thinking data — reasoning rendered through the template's own handling, its loss a setting, and earlier
turns as the template renders them at inference."""

from __future__ import annotations

import pytest
from test_chat_templates import family_tokenizer
from test_tool_data import loss_runs

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DataConfig, RewardSpec
from lmforge.data.formats import RowFormat, to_example
from lmforge.data.reasoning import is_think_then_answer, split_block, split_reasoning
from lmforge.data.templates import apply_template_choice, render_prompt, render_segments
from lmforge.data.tokenize import encode_sft, sft_render_options
from lmforge.data.tools import example_messages
from lmforge.rollout.rewards import RewardSet, build_reward

SPLITS = [
    ("<think>\nadd 2 and 2\n</think>\n\nIt is 4.", ("add 2 and 2", "It is 4."), True),
    ("  <think>a</think>b", ("a", "b"), True),
    ("It is 4.", ("", "It is 4."), False),
    ("", ("", ""), False),
    ("<think>still thinking when the tokens ran out", ("still thinking when the tokens ran out", ""), False),
    ("<think>one</think>answer <think>two</think> more", ("one", "answer <think>two</think> more"), False),
    ("<think>one</think><think>two</think>", ("one", "<think>two</think>"), False),
    ("Use it like this:\n```\n<think>x</think>\n```", ("", "Use it like this:\n```\n<think>x</think>\n```"), False),
    ("<think></think>answer", ("", "answer"), False),
    ("<think>r</think>   ", ("r", ""), False),
    ("answer first</think>", ("", "answer first</think>"), False),
    ("<think><think>nested</think>answer", ("<think>nested", "answer"), False),
]


@pytest.mark.parametrize(("reply", "expected", "well_formed"), SPLITS)
def test_split_and_the_think_then_answer_format(reply, expected, well_formed):
    assert split_reasoning(reply) == expected
    assert is_think_then_answer(reply) is well_formed


def test_a_prompt_that_opened_the_block_reads_up_to_the_first_close():
    assert split_reasoning("r1 r2</think>\n\nA", opened=True) == ("r1 r2", "A")
    assert split_reasoning("no close at all", opened=True) == ("no close at all", "")
    block = split_block("<think>x</think>\n\nA")
    assert (block.end, block.closed) == (len("<think>x</think>\n\n"), True)


def test_think_format_reward_is_built_from_the_config_and_scores_each_reply():
    spec = RewardSpec(kind="think_format", weight=0.5)
    replies = ["<think>2+2</think>4", "4", "<think>unclosed", "<think>x</think>"]
    assert build_reward(spec)([[]] * 4, replies, {}) == [1.0, 0.0, 0.0, 0.0]
    total, parts = RewardSet([spec])([[]] * 4, replies, {"reference": [""] * 4, "answer": [""] * 4})
    assert total.tolist() == [0.5, 0.0, 0.0, 0.0] and parts["think_format"].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="kind"):
        RewardSpec(kind="think")


THINKING = {"messages": [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "two and two"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "<think>\nthree and three\n</think>\n\n6."}]}


def qwen3(tok):
    return family_tokenizer(tok, "qwen3")


def test_qwen3_renders_reasoning_content_and_inline_think_blocks_alike(tok):
    tokenizer = qwen3(tok)
    messages = example_messages(to_example(THINKING, RowFormat()))
    replies = [s.text for s in render_segments(tokenizer, messages) if s.is_assistant]
    assert replies == ["<think>\ntwo and two\n</think>\n\n4.<|im_end|>", "<think>\nthree and three\n</think>\n\n6.<|im_end|>"]


def test_reasoning_loss_off_leaves_the_think_block_out_of_the_loss(tok):
    tokenizer = qwen3(tok)
    messages = example_messages(to_example(THINKING, RowFormat()))
    on = encode_sft(tokenizer, messages, 512, **sft_render_options(DataConfig()))
    off = encode_sft(tokenizer, messages, 512, **sft_render_options(DataConfig(reasoning_loss=False)))
    assert on["input_ids"] == off["input_ids"]
    assert loss_runs(tokenizer, off) == ["4.<|im_end|>", "6.<|im_end|>"]
    assert "three and three" in "".join(loss_runs(tokenizer, on))


def test_earlier_turns_render_in_training_as_the_template_renders_them_at_inference(tok):
    """lmforge's qwen3 keeps each reply as written, so the context a turn trains with is exactly
    render_prompt of the same history (reasoning included)."""
    tokenizer = qwen3(tok)
    messages = example_messages(to_example(THINKING, RowFormat()))
    segments = render_segments(tokenizer, messages)
    last = max(i for i, s in enumerate(segments) if s.is_assistant)
    assert "".join(s.text for s in segments[:last]) == render_prompt(tokenizer, messages[:-1])


def test_enable_thinking_false_keeps_the_prefix_and_trains_the_empty_block(tok):
    tokenizer = qwen3(tok)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    options = sft_render_options(DataConfig(enable_thinking=False))
    segments = render_segments(tokenizer, messages, options["tools"], options["template_kwargs"])
    prompt = render_prompt(tokenizer, messages[:1], template_kwargs={"enable_thinking": False})
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "".join(s.text for s in segments).startswith(prompt)
    assert [s.text for s in segments if s.is_assistant] == ["hello<|im_end|>"]


# Qwen3's own rule: reasoning is dropped from replies before the last user message and the last reply
# gets a think block (written here in a few lines with that rule, not copied).
REWRITING = (
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if loop.index0 > ns.last %}"
    "{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_that_drops_earlier_reasoning_trains_on_its_own_final_rendering(tok):
    """The whole conversation is what the template renders at inference; replies it rewrites later (their
    reasoning dropped) are context there, so only replies printed as generated carry loss."""
    apply_template_choice(tok, "auto")
    tok.chat_template = REWRITING
    messages = [*example_messages(to_example(THINKING, RowFormat()))[:3],
                {"role": "assistant", "content": "6.", "reasoning_content": "three and three"}]
    segments = render_segments(tok, messages)
    assert "".join(s.text for s in segments) == tok.apply_chat_template(messages, tokenize=False)
    assert [s.text for s in segments if s.is_assistant] == ["<think>\nthree and three\n</think>\n\n6.<|im_end|>"]
    context = "".join(s.text for s in segments[:-2])
    assert context == render_prompt(tok, messages[:-1]) and "two and two" not in context


def test_a_template_that_rewrites_every_turn_is_still_refused(tok):
    apply_template_choice(tok, "auto")
    tok.chat_template = "{{ messages | length }}" + REWRITING  # the count changes the text before every reply
    with pytest.raises(ValueError, match="does not render turns as a growing prefix"):
        render_segments(tok, example_messages(to_example(THINKING, RowFormat())))
