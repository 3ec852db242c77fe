"""Grading answers about the demo world: its records read through the one grading rule
(`lmforge.data.grading`), so the demo's own checks and every evaluation agree."""

from __future__ import annotations

from lmforge.data import grading


def answer_is_correct(record: dict, response: str) -> bool:
    """True when `response` states the record's answer and no other value of the same attribute.

    Numbers (sums, ages) are compared numerically: every number in the response, after removing a restated
    question (the record's `subject`, "7 + 5"), must equal the answer. Other values are matched as whole words
    (English) or characters (Chinese), against the record's `distractors`, so "red or blue" is wrong.
    """
    return grading.answer_match(response, str(record["answer"]), record.get("subject") or "",
                                record.get("distractors"))


def exact_match(record: dict, response: str) -> bool:
    """True when `response` is the record's reference (last) assistant reply, up to whitespace and
    full-width forms (`lmforge.data.grading.exact_match`)."""
    reference = [m["content"] for m in record["messages"] if m["role"] == "assistant"][-1]
    return grading.exact_match(response, reference)
