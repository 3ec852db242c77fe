"""Loss masks: which tokens carry loss (`lmforge.data.tokenize`, `lmforge.data.templates`).

The `tok` fixture (conftest) is a tiny byte-level BPE tokenizer with ChatML, trained offline once.
"""

from __future__ import annotations

import pytest

from lmforge.config.templates import builtin_template
from lmforge.data.inspect import render_record
from lmforge.data.templates import (
    Segment,
    apply_template_choice,
    end_of_turn_ids,
    end_of_turn_markers,
    render_prompt,
    render_segments,
)
from lmforge.data.tokenize import IGNORE, encode_sft, encode_text

SYSTEM = "You are Forge."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi, the model learns."},
    {"role": "user", "content": "我们今天学习"},
    {"role": "assistant", "content": "好的，模型训练数据。"},
]
LONG_PROMPT = " ".join(["the model learns from data"] * 12)
LONG_REPLY = " ".join(["every weight with a small step"] * 12)

LLAMA3_STYLE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def labelled_spans(tokenizer, encoded: dict) -> list[str]:
    """Decoded runs of consecutive loss-carrying tokens."""
    spans, run = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label == IGNORE:
            if run:
                spans.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    if run:
        spans.append(run)
    return [tokenizer.decode(span) for span in spans]


def single_turn(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def expected_encoding(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Hand-written (text, carries loss) pieces → the ids and labels they must give."""
    input_ids, labels = [], []
    for text, loss in pieces:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if loss else [IGNORE] * len(piece)
    return input_ids, labels


# --------------------------------------------------------------------------- ChatML masks


def test_chatml_segments(tok):
    assert render_segments(tok, CONVERSATION) == [
        Segment("<|im_start|>system\nYou are Forge.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                "<|im_start|>assistant\n", False),
        Segment("Hi, the model learns.<|im_end|>", True),
        Segment("\n", False),
        Segment("<|im_start|>user\n我们今天学习<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("好的，模型训练数据。<|im_end|>", True),
        Segment("\n", False),
    ]
    assert end_of_turn_markers(tok) == ["<|im_end|>", "<|endoftext|>"]
    assert end_of_turn_ids(tok) == [2, 0]


def test_chatml_labels_token_by_token(tok):
    encoded = encode_sft(tok, CONVERSATION, max_length=512)
    expected_ids, expected_labels = expected_encoding(tok, [
        ("<|im_start|>system\nYou are Forge.<|im_end|>\n", False),
        ("<|im_start|>user\nHello there<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("Hi, the model learns.", True),
        ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>user\n我们今天学习<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("好的，模型训练数据。", True),
        ("<|im_end|>", True),
        ("\n", False),
    ])
    assert encoded["input_ids"] == expected_ids
    assert encoded["labels"] == expected_labels
    # The whole sequence is exactly the rendered conversation.
    assert tok.decode(encoded["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)

    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    loss_positions = [i for i, label in enumerate(labels) if label != IGNORE]
    im_end_positions = [i for i, token in enumerate(input_ids) if token == im_end]
    # Of the five <|im_end|> tokens, only those closing the two replies carry loss.
    assert len(im_end_positions) == 5
    assert [i for i in im_end_positions if labels[i] != IGNORE] == [im_end_positions[2], im_end_positions[4]]
    for i in (im_end_positions[2], im_end_positions[4]):
        assert labels[i] == im_end
        assert tok.decode(input_ids[i + 1 : i + 2]) == "\n" and labels[i + 1] == IGNORE
    # No <|im_start|> (and so no `<|im_start|>assistant\n` header) carries loss.
    assert all(labels[i] == IGNORE for i, token in enumerate(input_ids) if token == im_start)
    header = ids(tok, "<|im_start|>assistant\n")
    for start in (i for i in range(len(input_ids)) if input_ids[i : i + len(header)] == header):
        assert labels[start : start + len(header)] == [IGNORE] * len(header)
    assert len(loss_positions) == len(ids(tok, "Hi, the model learns.")) + len(ids(tok, "好的，模型训练数据。")) + 2
    assert labelled_spans(tok, encoded) == ["Hi, the model learns.<|im_end|>", "好的，模型训练数据。<|im_end|>"]


def test_train_on_prompt_labels_everything(tok):
    encoded = encode_sft(tok, CONVERSATION, max_length=512, train_on_prompt=True)
    assert encoded["labels"] == encoded["input_ids"]
    assert encoded["input_ids"] == encode_sft(tok, CONVERSATION, max_length=512)["input_ids"]


def test_mask_history_labels_only_the_last_reply(tok):
    full = encode_sft(tok, CONVERSATION, max_length=512)
    encoded = encode_sft(tok, CONVERSATION, max_length=512, mask_history=True)
    assert encoded["input_ids"] == full["input_ids"]
    assert labelled_spans(tok, encoded) == ["好的，模型训练数据。<|im_end|>"]
    last = len(ids(tok, "好的，模型训练数据。")) + 1
    # The last reply is followed only by the template's newline.
    assert encoded["labels"][-last - 1 : -1] == full["labels"][-last - 1 : -1] == encoded["input_ids"][-last - 1 : -1]
    assert sum(label != IGNORE for label in encoded["labels"]) == last


def test_single_turn_without_system(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    encoded = encode_sft(tok, messages, max_length=512)
    expected = expected_encoding(tok, [("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", False),
                                       ("hi there<|im_end|>", True), ("\n", False)])
    assert (encoded["input_ids"], encoded["labels"]) == expected
    assert render_prompt(tok, messages[:1]) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_tool_turns_are_masked(tok):
    call = [{"type": "function", "function": {"name": "weather", "arguments": {}}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    encoded = encode_sft(tok, messages, max_length=512)
    assert labelled_spans(tok, encoded) == ['<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call><|im_end|>',
                                            "It is sunny.<|im_end|>"]
    tool_ids = ids(tok, "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n")
    start = next(i for i in range(len(encoded["input_ids"])) if encoded["input_ids"][i : i + len(tool_ids)] == tool_ids)
    assert encoded["labels"][start : start + len(tool_ids)] == [IGNORE] * len(tool_ids)


# --------------------------------------------------------------------------- other templates


def test_plain_builtin_template_closes_replies_with_eos(tok):
    assert apply_template_choice(tok, "plain") == "plain"
    assert tok.chat_template == builtin_template("plain")
    assert end_of_turn_markers(tok) == ["<|endoftext|>"]
    assert render_segments(tok, CONVERSATION) == [
        Segment("You are Forge.\n\nUser: Hello there\nAssistant: ", False),
        Segment("Hi, the model learns.<|endoftext|>", True),
        Segment("\n", False),
        Segment("User: 我们今天学习\nAssistant: ", False),
        Segment("好的，模型训练数据。<|endoftext|>", True),
        Segment("\n", False),
    ]
    encoded = encode_sft(tok, CONVERSATION, max_length=512)
    expected = expected_encoding(tok, [
        ("You are Forge.\n\nUser: Hello there\nAssistant: ", False),
        ("Hi, the model learns.", True), ("<|endoftext|>", True), ("\n", False),
        ("User: 我们今天学习\nAssistant: ", False),
        ("好的，模型训练数据。", True), ("<|endoftext|>", True), ("\n", False),
    ])
    assert (encoded["input_ids"], encoded["labels"]) == expected
    eos_positions = [i for i, t in enumerate(encoded["input_ids"]) if t == tok.eos_token_id]
    assert len(eos_positions) == 2 and all(encoded["labels"][i] == tok.eos_token_id for i in eos_positions)


def test_tokenizer_own_jinja_template_llama3_style(tok):
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_STYLE
    assert apply_template_choice(tok, "auto") == "tokenizer"  # its own template is kept
    assert tok.chat_template == LLAMA3_STYLE
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert ids(tok, "<|eot_id|>") == [eot]
    assert end_of_turn_markers(tok) == ["<|eot_id|>", "<|endoftext|>"]  # <|im_end|> is not in this template

    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert render_segments(tok, CONVERSATION) == [
        Segment("<|start_header_id|>system<|end_header_id|>\n\nYou are Forge.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>" + header, False),
        Segment("Hi, the model learns.<|eot_id|>", True),
        Segment("<|start_header_id|>user<|end_header_id|>\n\n我们今天学习<|eot_id|>" + header, False),
        Segment("好的，模型训练数据。<|eot_id|>", True),
    ]
    encoded = encode_sft(tok, CONVERSATION, max_length=512)
    assert labelled_spans(tok, encoded) == ["Hi, the model learns.<|eot_id|>", "好的，模型训练数据。<|eot_id|>"]
    assert tok.decode(encoded["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    eot_positions = [i for i, t in enumerate(encoded["input_ids"]) if t == eot]
    assert [encoded["labels"][i] == eot for i in eot_positions] == [False, False, True, False, True]
    assert encoded["input_ids"][-1] == eot and encoded["labels"][-1] == eot
    header_ids = ids(tok, header)
    starts = [i for i in range(len(encoded["input_ids"])) if encoded["input_ids"][i : i + len(header_ids)] == header_ids]
    assert len(starts) == 2
    assert all(encoded["labels"][s : s + len(header_ids)] == [IGNORE] * len(header_ids) for s in starts)


def test_auto_falls_back_to_chatml_and_unknown_template_is_rejected(tok):
    tok.chat_template = None
    assert apply_template_choice(tok, "auto") == "chatml"
    assert tok.chat_template == builtin_template("chatml")
    with pytest.raises(ValueError, match=r"model.template='vicuna' is not a template; choose one of auto, baichuan2, chatml"):
        apply_template_choice(tok, "vicuna")


def test_template_that_rewrites_history_is_rejected(tok):
    # Printing the number of messages first changes earlier text as turns are added.
    tok.chat_template = "{{ messages | length }}" + builtin_template("chatml")
    with pytest.raises(ValueError, match="does not render turns as a growing prefix"):
        render_segments(tok, CONVERSATION)


# --------------------------------------------------------------------------- data inspect


@pytest.mark.parametrize(("max_length", "train_on_prompt", "mask_history"),
                         [(512, False, False), (512, True, False), (512, False, True), (32, False, False)])
def test_render_record_counts_match_encode_sft(tok, max_length, train_on_prompt, mask_history):
    example = {"messages": CONVERSATION, "text": "", "tools": ""}
    text, counts = render_record(tok, example, max_length, train_on_prompt, mask_history)
    encoded = encode_sft(tok, CONVERSATION, max_length, train_on_prompt, mask_history)
    assert counts == {"tokens": len(encoded["input_ids"]),
                      "loss_tokens": sum(label != IGNORE for label in encoded["labels"])}
    # spans are decoded whole, so a character split across byte-level tokens shows intact
    assert text.plain == tok.decode(encoded["input_ids"])
    assert "\ufffd" not in text.plain


def test_render_record_marks_loss_tokens_green(tok):
    messages = single_turn("hello", "hi there")
    text, counts = render_record(tok, {"messages": messages, "text": "", "tools": ""}, 512)
    green = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "bold green")
    assert green == "hi there<|im_end|>"
    assert counts["loss_tokens"] == len(ids(tok, "hi there")) + 1


def test_render_record_text_and_dropped(tok):
    text, counts = render_record(tok, {"messages": [], "text": "the model learns", "tools": ""}, 512)
    n = len(encode_text(tok, "the model learns"))
    assert n == len(ids(tok, "the model learns")) + 1  # plus EOS
    assert counts == {"tokens": n, "loss_tokens": n}
    assert text.plain == "the model learns<|endoftext|>"
    _, capped = render_record(tok, {"messages": [], "text": LONG_PROMPT, "tools": ""}, 10)
    assert capped == {"tokens": 10, "loss_tokens": 10}
    dropped = single_turn(LONG_PROMPT, LONG_REPLY) + single_turn("again", "a small step")
    text, counts = render_record(tok, {"messages": dropped, "text": "", "tools": ""}, 32, mask_history=True)
    assert counts == {"tokens": 0, "loss_tokens": 0}
    assert text.plain.startswith("(dropped")
