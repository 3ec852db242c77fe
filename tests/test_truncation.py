"""Truncation to max_length: the prompt keeps its head, the reply its head; samples left with nothing
to learn are dropped and counted (`lmforge.data.tokenize`)."""

from __future__ import annotations

import json
import tempfile

from test_masking import LONG_PROMPT, LONG_REPLY, ids, single_turn

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples, tokenize_sft
from lmforge.data.errors import ErrorLog
from lmforge.data.tokenize import IGNORE, encode_sft, truncate_pieces


def prompt_and_reply_ids(tokenizer, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    prompt_ids = ids(tokenizer, f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    return prompt_ids, ids(tokenizer, reply) + ids(tokenizer, "<|im_end|>")


def test_long_prompt_keeps_its_head_and_the_whole_short_reply(tok):
    prompt, reply = prompt_and_reply_ids(tok, LONG_PROMPT, "a small step")
    assert len(prompt) > 40 and len(reply) < 16
    encoded = encode_sft(tok, single_turn(LONG_PROMPT, "a small step"), max_length=32)
    keep = 32 - len(reply)
    assert len(encoded["input_ids"]) == 32
    assert encoded["input_ids"] == prompt[:keep] + reply
    assert encoded["labels"] == [IGNORE] * keep + reply


def test_long_prompt_and_long_reply_share_the_room_half_and_half(tok):
    prompt, reply = prompt_and_reply_ids(tok, LONG_PROMPT, LONG_REPLY)
    assert len(prompt) > 32 and len(reply) > 32
    encoded = encode_sft(tok, single_turn(LONG_PROMPT, LONG_REPLY), max_length=33)
    # The reply gets at least half (the odd token goes to it): 16 prompt + 17 reply.
    assert encoded["input_ids"] == prompt[:16] + reply[:17]
    assert encoded["labels"] == [IGNORE] * 16 + reply[:17]


def test_short_prompt_keeps_all_of_it_and_the_reply_head(tok):
    prompt, reply = prompt_and_reply_ids(tok, "hello", LONG_REPLY)
    assert len(prompt) < 40 // 2 and len(reply) > 40
    encoded = encode_sft(tok, single_turn("hello", LONG_REPLY), max_length=40)
    assert encoded["input_ids"] == prompt + reply[: 40 - len(prompt)]
    assert encoded["labels"] == [IGNORE] * len(prompt) + reply[: 40 - len(prompt)]


def test_sequence_that_fits_is_untouched_and_one_less_drops_the_trailing_newline(tok):
    messages = single_turn("hello", "hi there")
    full = encode_sft(tok, messages, max_length=512)
    n = len(full["input_ids"])
    assert encode_sft(tok, messages, max_length=n) == full
    shorter = encode_sft(tok, messages, max_length=n - 1)
    assert shorter == {"input_ids": full["input_ids"][:-1], "labels": full["labels"][:-1]}
    assert tok.decode(full["input_ids"][-1:]) == "\n"


def test_truncate_pieces_policy_on_synthetic_pieces():
    prompt, reply, newline = list(range(100, 110)), list(range(200, 210)), [300]
    pieces = [(prompt, False), (reply, True), (newline, False)]
    assert truncate_pieces(pieces, 21) == pieces
    assert truncate_pieces(pieces, 20) == [(prompt, False), (reply, True)]
    assert truncate_pieces(pieces, 8) == [(prompt[:4], False), (reply[:4], True)]
    assert truncate_pieces(pieces, 9) == [(prompt[:4], False), (reply[:5], True)]
    short_reply = [(prompt, False), ([200, 201], True)]
    assert truncate_pieces(short_reply, 8) == [(prompt[:6], False), ([200, 201], True)]
    # A second turn that does not fit shares only what the first left over.
    two_turns = [(prompt[:3], False), (reply[:3], True), (newline, False), (prompt, False), (reply, True)]
    assert truncate_pieces(two_turns, 11) == [(prompt[:3], False), (reply[:3], True), (newline, False),
                                               (prompt[:2], False), (reply[:2], True)]


def test_reply_with_no_room_left_is_dropped(tok):
    # With mask_history only the last reply carries loss; a long first exchange leaves it no room.
    messages = single_turn(LONG_PROMPT, LONG_REPLY) + single_turn("again", "a small step")
    assert encode_sft(tok, messages, max_length=32, mask_history=True) is None
    kept = encode_sft(tok, messages, max_length=32)  # without mask_history the first reply still learns
    assert kept is not None and len(kept["input_ids"]) == 32
    assert sum(label != IGNORE for label in kept["labels"]) == 16


def test_tokenize_sft_counts_dropped_samples(tok, tmp_path):
    long_dialogue = single_turn(LONG_PROMPT, LONG_REPLY) + single_turn("again", "a small step")
    short_dialogue = single_turn("hello", "hi there")
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (long_dialogue, short_dialogue)) + "\n",
                    encoding="utf-8")
    cfg = DataConfig(max_length=32, mask_history=True)
    errors = ErrorLog(cfg.on_error)
    examples, _ = load_examples([DatasetSpec(path=str(path))], cfg, errors, tempfile.mkdtemp(dir=tmp_path))
    tokens = tokenize_sft(examples, tok, cfg, errors, pack=False)
    assert len(tokens) == 1
    assert errors.dropped_too_long == 1
    assert errors.total_skipped == 0
    assert errors.summary()["dropped_too_long"] == 1
    expected = encode_sft(tok, short_dialogue, max_length=32, mask_history=True)
    assert tokens[0]["input_ids"] == expected["input_ids"]
    assert tokens[0]["labels"] == expected["labels"]


