"""The one answer-grading rule (lmforge.data.grading) on what users' data and models really produce, and on
hostile strings: empty, None, numbers, full-width, invisible characters and megabyte replies in linear time."""

from __future__ import annotations

import time

import pytest

from lmforge.data.grading import answer_match, exact_match, final_answer, normalise


@pytest.mark.parametrize("reply, reference, expected", [
    ("  The answer\n is   15. ", "The answer is 15.", True),       # whitespace runs and ends do not count
    ("The answer is 15.", "The answer is 15", False),              # punctuation counts
    ("the answer is 15.", "The answer is 15.", False),             # case counts
    ("Ｆｕｓｏｖｅｌ　ｌｉｅｓ　ｓｏｕｔｈ．", "Fusovel lies south.", True),  # full-width forms read as ASCII
    ("红色，对吗？", "红色,对吗?", True),                                  # full-width Chinese punctuation too
    ("15\u200b", "15", True),                                      # zero-width space
    ("\ufeffHello", "Hello", True),                                # a byte-order mark
    ("", "", False),                                               # an empty reference matches nothing
    ("   ", " \n ", False),
    (None, "x", False),
    ("15", 15, True),                                              # a numeric reference reads as its text
    ("15.0", 15, False),                                           # ... but exact is exact: "15.0" is not "15"
])
def test_exact_match(reply, reference, expected):
    assert exact_match(reply, reference) is expected


def test_grading_refuses_what_is_not_text():
    with pytest.raises(TypeError, match="must be text, got list"):
        exact_match(["15"], "15")
    with pytest.raises(TypeError, match="got bool"):
        answer_match(True, "True")


@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),  # GSM8K
    ("#### 1,000\nThat is all.", "1,000"),
    ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),           # nested braces
    ("first \\boxed{3} then \\boxed{4}", "4"),                     # the last one
    ("\\boxed{never closed", "never closed"),
    ("Step one. The answer is 3.5. Done.", "3.5"),                  # to the end of the sentence, not of "3."
    ("Answer: Paris", "Paris"),
    ("I think the answer is: red, surely!", "red, surely"),
    ("The answer is 3. No wait, the final answer is 4.", "4"),      # the last marker
    ("答案是：１５。还有别的吗？", "15"),
    ("答案为红色", "红色"),
    ("No marker at all.", "No marker at all."),
    ("This answers nothing: 4", "This answers nothing: 4"),         # "answers" is not "answer:"
    ("", ""),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize("reply, expected, ok", [
    ("#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", True),   # a GSM8K solution as the answer
    ("48/2 = 24, 48 + 24 = 72\n#### 72", "72", True),              # working before the marker is not graded
    ("48/2 = 24, 48 + 24 = 72", "72", False),                      # without one every number must be the answer
    ("\\boxed{1,000}", "1000", True),
    ("It costs $1,000.", "1,000", True),
    ("The answer is 3.0.", "3", True),
    ("3.5", "3", False),
    ("It is 15.", "$15", True),
    ("50% of them", "50%", True),
    ("The answer is −4.", "-4", True),                              # U+2212 minus
    ("The answer is 4.", "-4", False),
    ("１５", "15", True),                                            # full-width digits
    ("他今年34岁。", "34", True),                                     # CJK next to digits is a boundary
    ("Velmora is 290 years old.", "29", False),
    ("16 or 15", "15", False),
    ("I don't know.", "15", False),
    ("The answer is PARIS.", "paris", True),                       # text: case-insensitive whole words
    ("It is a plum.", "plums", False),
    ("Nobe 是红色的。", "红色", True),
    ("", "15", False),
    (None, "15", False),
    ("15", "", False),                                             # nothing to match matches nothing
    ("anything", "#### ", False),
    ("anything", None, False),
])
def test_answer_match(reply, expected, ok):
    assert answer_match(reply, expected) is ok


def test_answer_match_drops_the_restated_question_and_refuses_distractors():
    assert answer_match("7 plus 8 equals 15.", "15", "What is 7 plus 8?")
    assert answer_match("7 加 8 等于 15。", "15", "7 加 8 等于多少？")
    assert not answer_match("7 plus 8 equals 15.", "15")           # without the question 7 and 8 are answers
    assert not answer_match("9 plus 8 equals 15.", "15", "What is 7 plus 8?")
    assert answer_match("Nobe is red.", "red", distractors=["blue", "green"])
    assert not answer_match("Red or blue.", "red", distractors=["blue", "green"])
    assert not answer_match("The answer is red, not blue.", "red", distractors=["blue"])
    assert not answer_match("红色或蓝色", "红色", distractors=["蓝色"])
    assert not answer_match("red or blue", "red", distractors="blue")  # one distractor, not its letters
    assert answer_match("red", "red", distractors=[None, 7, ""])      # empty distractors exclude nothing


def test_normalise_is_nfkc_without_invisible_characters_and_with_single_spaces():
    assert normalise("  Ａ\u3000b\u200b\n\tc  ") == "A b c"
    assert normalise(None) == ""


HOSTILE = {
    "digits then a letter": "1" * 400_000 + "a",
    "thousands groups": "1" + ",000" * 100_000 + "x",
    "operators without operands": "1 x " * 100_000,
    "spaces between numbers": "7" + " " * 400_000 + "8",
    "opened boxes": "\\boxed{" + "{" * 400_000,
    "answer markers": "the answer is " * 40_000,
    "grouped text": "ab " * 150_000,
    "restated sums": "7 + 8 " * 60_000,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_grading_time_is_linear_on_hostile_replies(name):
    reply = HOSTILE[name]
    start = time.perf_counter()
    exact_match(reply, reply)
    answer_match(reply, "15", "What is 7 plus 8? " + reply[:10_000])
    answer_match(reply, "ab ab ab ab ab ab ab ab ab ab ab ab x", distractors=[reply[:1000]])
    # A quadratic pass over 400k characters takes minutes; a linear one well under a second here.
    assert time.perf_counter() - start < 3.0, name
