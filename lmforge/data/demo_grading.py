"""Grading answers about the demo world: is a response right, and is it the exact reference?"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_OPERATOR = r"\s*(?:\+|-|−|plus|minus|加上|加|减去|减)\s*"


def _normalise(text: str) -> str:
    # Lower-case, punctuation (ASCII or full-width) to spaces, and pad so " plums " matches whole words only.
    return " " + " ".join(re.sub(r"[^\w]+", " ", text.lower()).split()) + " "


def _mentions(normalised: str, term: str) -> bool:
    if _CJK.search(term):  # Chinese has no word boundaries: match characters, ignoring spaces
        return _normalise(term).replace(" ", "") in normalised.replace(" ", "")
    return _normalise(term) in normalised


def _states_number(response: str, expected: int, question: str = "") -> bool:
    operands = _NUMBER.findall(question)
    if len(operands) == 2:  # drop a restated question ("7 + 5 = 12") so its operands are not read as answers
        pattern = rf"(?<!\d){operands[0]}{_OPERATOR}{operands[1]}(?!\d)"
        response = re.sub(pattern, " ", response, flags=re.IGNORECASE)
    numbers = [int(n) for n in _NUMBER.findall(response)]
    return bool(numbers) and all(n == expected for n in numbers)


def answer_is_correct(record: dict, response: str) -> bool:
    """True when `response` states the record's answer and no other value of the same attribute.

    Numbers (sums, ages) are compared numerically: every number in the response, after removing a restated
    question, must equal the answer. Other values are matched as whole words (English) or substrings
    (Chinese), against the record's `distractors`, so "red or blue" is wrong.
    """
    answer = str(record["answer"])
    if record.get("kind") == "arith":
        return _states_number(response, int(answer), record.get("subject", ""))
    if answer.isdigit():
        return _states_number(response, int(answer))
    normalised = _normalise(response)
    if not _mentions(normalised, answer):
        return False
    return not any(_mentions(normalised, d) for d in record.get("distractors", ()))


def exact_match(record: dict, response: str) -> bool:
    """True when `response` is the record's reference (last) assistant reply, up to surrounding whitespace."""
    reference = [m["content"] for m in record["messages"] if m["role"] == "assistant"][-1]
    return response.strip() == reference.strip()
