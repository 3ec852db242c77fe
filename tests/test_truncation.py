"""Truncation to max_length (policy: `lmforge.data.truncate`): the template's structure is kept, the
user's text loses its middle, the reply its tail but never its end-of-turn token; every cut or drop
is counted by kind."""

from __future__ import annotations

import json
import tempfile

from test_masking import LLAMA3_STYLE, LONG_PROMPT, LONG_REPLY, ids, single_turn

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples, tokenize_sft
from lmforge.data.errors import ErrorLog
from lmforge.data.tokenize import IGNORE, encode_sft
from lmforge.data.truncate import Piece, truncate_pieces

NO_CUTS = {"prompt_cut": 0, "reply_cut": 0, "turns_dropped": 0, "dropped_no_room": 0}


def parts(tok, prompt: str, reply: str) -> dict[str, list[int]]:
    return {"open": ids(tok, "<|im_start|>user\n"), "text": ids(tok, prompt),
            "header": ids(tok, "<|im_end|>\n<|im_start|>assistant\n"), "reply": ids(tok, reply),
            "end": ids(tok, "<|im_end|>")}


def middle_cut(text: list[int], keep: int) -> list[int]:
    head = (keep + 1) // 2
    return text[:head] + text[len(text) - (keep - head):]


def test_long_prompt_loses_its_middle_and_keeps_the_assistant_header_before_the_reply(tok):
    p = parts(tok, LONG_PROMPT, "a small step")
    fixed = len(p["open"]) + len(p["header"]) + len(p["reply"]) + len(p["end"])
    assert len(p["text"]) > 40 and fixed < 32
    cuts = {}
    from collections import Counter
    cuts = Counter()
    encoded = encode_sft(tok, single_turn(LONG_PROMPT, "a small step"), max_length=32, cuts=cuts)
    keep = 32 - fixed
    expected = p["open"] + middle_cut(p["text"], keep) + p["header"] + p["reply"] + p["end"]
    assert encoded["input_ids"] == expected and len(expected) == 32
    reply_at = 32 - len(p["reply"]) - len(p["end"])
    assert encoded["input_ids"][reply_at - len(p["header"]):reply_at] == p["header"]  # the header survives
    assert encoded["labels"] == [IGNORE] * reply_at + p["reply"] + p["end"]
    assert dict(cuts) == {"prompt_cut": 1}


def test_long_reply_is_cut_but_keeps_its_end_of_turn_token(tok):
    from collections import Counter

    p = parts(tok, "hello", LONG_REPLY)
    prompt = p["open"] + p["text"] + p["header"]
    cuts = Counter()
    encoded = encode_sft(tok, single_turn("hello", LONG_REPLY), max_length=40, cuts=cuts)
    room = 40 - len(prompt) - len(p["end"])
    assert encoded["input_ids"] == prompt + p["reply"][:room] + p["end"]
    assert encoded["labels"] == [IGNORE] * len(prompt) + p["reply"][:room] + p["end"]
    assert encoded["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert dict(cuts) == {"reply_cut": 1}


def test_long_prompt_and_long_reply_share_the_room_left_by_the_structure(tok):
    from collections import Counter

    p = parts(tok, LONG_PROMPT, LONG_REPLY)
    fixed = len(p["open"]) + len(p["header"]) + len(p["end"])
    cuts = Counter()
    encoded = encode_sft(tok, single_turn(LONG_PROMPT, LONG_REPLY), max_length=fixed + 21, cuts=cuts)
    # 21 tokens for content: the reply gets 11 (at least half, the odd one to it), the user text 10.
    expected = p["open"] + middle_cut(p["text"], 10) + p["header"] + p["reply"][:11] + p["end"]
    assert encoded["input_ids"] == expected
    assert sum(label != IGNORE for label in encoded["labels"]) == 12
    assert dict(cuts) == {"prompt_cut": 1, "reply_cut": 1}


def test_no_room_for_the_structure_and_one_reply_token_drops_the_sample(tok):
    from collections import Counter

    p = parts(tok, LONG_PROMPT, "a small step")
    fixed = len(p["open"]) + len(p["header"]) + len(p["end"])
    cuts = Counter()
    assert encode_sft(tok, single_turn(LONG_PROMPT, "a small step"), max_length=fixed, cuts=cuts) is None
    assert dict(cuts) == {"dropped_no_room": 1}
    cuts.clear()
    one = encode_sft(tok, single_turn(LONG_PROMPT, "a small step"), max_length=fixed + 1, cuts=cuts)
    assert one["input_ids"] == p["open"] + p["header"] + p["reply"][:1] + p["end"]
    assert dict(cuts) == {"prompt_cut": 1, "reply_cut": 1}


def test_sequence_that_fits_is_untouched_and_one_less_drops_the_trailing_newline(tok):
    messages = single_turn("hello", "hi there")
    full = encode_sft(tok, messages, max_length=512)
    n = len(full["input_ids"])
    assert encode_sft(tok, messages, max_length=n) == full
    shorter = encode_sft(tok, messages, max_length=n - 1)
    assert shorter == {"input_ids": full["input_ids"][:-1], "labels": full["labels"][:-1]}
    assert tok.decode(full["input_ids"][-1:]) == "\n"


def test_truncate_pieces_policy_on_synthetic_pieces():
    def piece(kind, start, n, loss=False):
        return Piece(list(range(start, start + n)), kind, loss)

    system = [piece("frame", 0, 2), piece("system", 10, 6), piece("frame", 20, 2)]
    first = [piece("text", 30, 8), piece("frame", 40, 2), piece("reply", 50, 4), piece("end", 60, 1)]
    second = [piece("frame", 70, 2), piece("text", 80, 8), piece("header", 90, 3), piece("reply", 100, 10, True),
              piece("end", 120, 1, True)]
    pieces = system + first + second  # mask_history: only the last reply carries loss
    assert truncate_pieces(pieces, 60) == (pieces, set())
    kept, cuts = truncate_pieces(pieces, 40)
    # Kept whole: 2+2+2+1+2+3+1 = 13 tokens of structure; 27 for content: the reply all 10, the
    # context 17 of its 26: the oldest text (8) goes, then the middle token of the loss-free first
    # reply; the newest text and the system prompt stay whole.
    assert cuts == {"prompt_cut"}
    assert [p.ids for p in kept if p.kind in ("text", "reply", "system")] == [
        list(range(10, 16)), [50, 51, 53], list(range(80, 88)), list(range(100, 110))]
    assert sum(len(p.ids) for p in kept) == 40 and kept[-1].ids == [120]


def test_reply_with_no_room_left_is_dropped_and_later_turns_are_counted(tok):
    from collections import Counter

    messages = single_turn("hello", "hi there") + single_turn(LONG_PROMPT, LONG_REPLY)
    first = encode_sft(tok, single_turn("hello", "hi there"), max_length=512)
    cuts = Counter()
    kept = encode_sft(tok, messages, max_length=len(first["input_ids"]) + 3, cuts=cuts)
    # The second turn's structure alone does not fit in 3 tokens: it goes (with the newline the
    # template prints before it), the first turn stays whole.
    assert kept == {"input_ids": first["input_ids"][:-1], "labels": first["labels"][:-1]}
    assert dict(cuts) == {"turns_dropped": 1}


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




def test_streamed_counts_and_loaded_records_stay_the_same_every_epoch(tok, tmp_path):
    dialogues = [single_turn(LONG_PROMPT, "a small step"),  # prompt cut
                 single_turn("hello", LONG_REPLY),  # reply cut
                 single_turn(LONG_PROMPT, LONG_REPLY) + single_turn("again", "a small step"),  # dropped (mask_history)
                 single_turn("hello", "hi there")]  # untouched
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in dialogues) + "\n", encoding="utf-8")
    for streaming in (False, True):
        cfg = DataConfig(max_length=32, mask_history=True, streaming=streaming)
        errors = ErrorLog(cfg.on_error)
        examples, _ = load_examples([DatasetSpec(path=str(path))], cfg, errors, tempfile.mkdtemp(dir=tmp_path))
        tokens = tokenize_sft(examples, tok, cfg, errors, pack=False)
        for _ in range(3 if streaming else 1):  # every epoch reads and tokenizes a stream again
            assert len(list(tokens)) == 3
            summary = errors.summary()
            assert summary["truncation"] == {**NO_CUTS, "prompt_cut": 1, "reply_cut": 1, "dropped_no_room": 1}
            assert (summary["records_read"], summary["loaded_records"], summary["dropped_too_long"]) == (4, 3, 1)


def test_a_huge_system_prompt_is_cut_before_the_question_the_reply_answers(tok):
    from collections import Counter

    system = " ".join(["every weight with a small step"] * 20)
    messages = [{"role": "system", "content": system}, *single_turn("hello there", "hi")]
    cuts = Counter()
    encoded = encode_sft(tok, messages, max_length=40, cuts=cuts)
    question = ids(tok, "hello there")
    reply_at = len(encoded["input_ids"]) - len(ids(tok, "hi")) - len(ids(tok, "<|im_end|>"))
    header = ids(tok, "<|im_end|>\n<|im_start|>assistant\n")
    # The question survives whole right before the header; the system prompt lost its middle.
    assert encoded["input_ids"][reply_at - len(header) - len(question):reply_at] == question + header
    assert len(encoded["input_ids"]) == 40 and dict(cuts) == {"prompt_cut": 1}


def test_a_trimming_llama3_style_template_keeps_its_header_and_eot_when_cut(tok):
    from collections import Counter

    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_STYLE
    messages = [{"role": "system", "content": "You are Forge."}, *single_turn("  " + LONG_PROMPT + "  ", LONG_REPLY)]
    cuts = Counter()
    # 60 tokens: 31 of structure, 15 for the reply, 14 for the context: the system prompt (6) whole,
    # the user's text (8 of 61) loses its middle.
    encoded = encode_sft(tok, messages, max_length=60, cuts=cuts)
    header = ids(tok, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    first_loss = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE)
    assert encoded["input_ids"][first_loss - len(header):first_loss] == header
    assert encoded["input_ids"][-1] == encoded["labels"][-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    system = ids(tok, "<|start_header_id|>system<|end_header_id|>\n\nYou are Forge.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\n")
    assert encoded["input_ids"][:len(system)] == system  # the system turn and the user's opener stay whole
    assert len(encoded["input_ids"]) == 60 and dict(cuts) == {"prompt_cut": 1, "reply_cut": 1}
