"""Stop strings matched piece by piece: held-back text, matches across pieces, linear work; and the engine's
stop strings over real tokens (a stop string across a token boundary)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.generation import Engine, Request, Sampling
from lmforge.generation.stops import StopMatcher
from lmforge.generation.text import ReplyText


def test_a_stop_string_split_across_pieces_is_found_and_its_start_held_back():
    matcher = StopMatcher(["</answer>", "STOP"])
    assert matcher.feed("the answer is 4</").release_to == len("the answer is 4")  # "</" may begin a stop
    assert matcher.feed("ans").release_to == len("the answer is 4")
    check = matcher.feed("wer> more")
    assert check.matched == "</answer>" and check.release_to == len("the answer is 4")


def test_a_false_start_is_released_once_it_cannot_be_a_stop_string():
    matcher = StopMatcher(["abab"])
    assert matcher.feed("xaba").release_to == 1
    assert matcher.feed("c").release_to == 5
    check = matcher.feed("ababab")  # KMP: the overlap is found where it first completes
    assert check.matched == "abab" and check.release_to == 5
    assert StopMatcher(["zz"]).feed("az", final=True).release_to == 2  # the end releases what was held


def test_the_first_stop_string_to_complete_wins_whatever_the_pieces():
    check = StopMatcher(["bcd", "abcdef"]).feed("xxabcdefg")
    assert check.matched == "bcd" and check.release_to == 3
    by_char = StopMatcher(["bcd", "abcdef"])
    checks = [by_char.feed(c) for c in "xxabcdefg"]
    assert next(c for c in checks if c.matched) == check
    assert StopMatcher(["cd", "bcd"]).feed("abcd").matched == "bcd"  # both end at once: the earlier start


def test_matching_work_is_linear_in_the_text():
    """A million characters one at a time, with a stop string that almost matches everywhere."""
    matcher = StopMatcher(["a" * 200 + "b"])
    for _ in range(200_000):
        assert matcher.feed("aaaaa").matched is None
    assert matcher.feed("b").matched is not None


class CharTokenizer:
    """Token i is the character chr(ord('a') + i); decode skips nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def test_reply_text_releases_all_text_but_the_stop_string():
    reply = ReplyText(CharTokenizer(), ["cd"])
    pieces = [reply.push(t) for t in (0, 1, 2)]  # a b c: "c" held back
    assert pieces == ["a", "b", ""]
    assert reply.push(3) == "" and reply.stop_string == "cd" and reply.text == "ab"
    tail = ReplyText(CharTokenizer(), ["cd"])
    tail.push(0)
    tail.push(2)
    assert tail.finish() == "c" and tail.text == "ac" and tail.stop_string is None


class PairTokenizer:
    """Token i is a two-letter string, so a stop string can take the end of one token and the start of the next."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) + chr(97 + (i * 7 + 3) % 26) for i in ids)


def test_engine_stops_at_a_stop_string_across_a_token_boundary():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    tok = PairTokenizer()
    prompt = [5, 17, 33, 2, 60]
    engine = Engine(model, slots=2, max_len=128, eos_ids=[], tokenizer=tok)
    free = engine.generate([Request(prompt, Sampling(temperature=0), max_new_tokens=30)])[0].samples[0]
    full = tok.decode(free.token_ids)
    assert free.text == full and free.finish_reason == "length"
    # The last letter of token k and the first of token k+1, at the first place that pair appears.
    k = next(k for k in range(1, 29) if full.find(full[2 * k - 1:2 * k + 1]) == 2 * k - 1)
    stop = full[2 * k - 1:2 * k + 1]
    request = Request(prompt, Sampling(temperature=0), max_new_tokens=30, stop_strings=["never there", stop])
    events = list(engine.stream(request))
    sample = events[-1].handle.result().samples[0]
    assert sample.finish_reason == "stop" and sample.stop_string == stop
    assert sample.text == full[:2 * k - 1]
    assert sample.token_ids == free.token_ids[:k + 1]
    assert "".join(e.text for e in events) == sample.text
    # Token k-1's second letter (the stop string's start) was held back, never streamed.
    assert "".join(e.text for e in events[:k]) == full[:2 * k - 1]
    assert engine.idle and engine.rows == [None, None]


def test_reply_text_over_a_real_byte_level_tokenizer_rebuilds_the_text(tok):
    """Chinese characters span several byte tokens: no piece holds half of one, and the pieces add up."""
    text = "Hello there 我们今天学习模型。 The model learns 训练数据 again"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    reply = ReplyText(tok, [])
    pieces = [reply.push(t) for t in ids] + [reply.finish()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)
    stopped = ReplyText(tok, ["学习模"])
    released = []
    for token in ids:
        released.append(stopped.push(token))
        if stopped.stop_string:
            break
    assert stopped.stop_string == "学习模" and "".join(released) == stopped.text
    assert stopped.text == tok.decode(ids, skip_special_tokens=True).split("学习模")[0]
