"""The one answer-grading rule. SFT/DPO held-out answers, the RL rewards, `lmforge eval` and the demo grader
all call these two functions, so a stage's `eval_exact_match` and the pipeline's `exact_match` are one number.

`exact_match(reply, reference)`: the reply *is* the reference, up to Unicode compatibility forms (NFKC:
full-width letters, digits and punctuation read as their ASCII forms), zero-width characters and whitespace
(runs collapse to one space, the ends are stripped). Case and punctuation count. An empty reference matches
nothing.

`answer_match(reply, expected, question, distractors)`: the reply states the expected answer. Both sides are
NFKC-normalised and reduced to their final answer (`final_answer`): the last `\\boxed{...}`, else what follows
the last `####` (GSM8K), else the sentence after the last "the answer is" / "answer:" / "答案是" / "答案：",
else the whole text. A numeric expected answer ("72", "1,000", "3.0", "$18", "50%", "-4") is compared as a
number: every number in the reply's final answer must equal it (so "16 or 15" is wrong), after removing
"a op b" expressions whose operands both come from the question ("7 plus 8 equals 15" states 15 only). "1,000"
reads as 1000 (commas group thousands); "1.000,5" (European) is not understood. Any other expected answer must
appear case-insensitively as whole words (as characters, ignoring spaces, when it holds Chinese, Japanese or
Korean), and no distractor may appear. An empty expected answer matches nothing.

Every function here runs in time linear in its inputs (no nested quantifiers), so a hostile megabyte reply
costs milliseconds.
"""

from __future__ import annotations

import collections
import math
import numbers
import re
import unicodedata
from collections.abc import Iterable

# Format characters that render as nothing but make two equal-looking strings differ.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_NUM = r"[-−]?\d+(?:,\d{3})*(?:\.\d+)?"
# Latin letters and digits are word boundaries; CJK characters are not ("他今年34岁" states 34).
_NUMBER = re.compile(rf"(?<![0-9A-Za-z_.]){_NUM}(?![0-9A-Za-z_])")
_OPERATOR = re.compile(r"\s*(?:\+|-|−|×|\*|/|÷|x|plus|minus|times|multiplied by|divided by|加上|加|减去|减|乘以|乘|除以)\s*",
                       re.IGNORECASE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b|:|=)|答案\s*(?:是|为|:)", re.IGNORECASE)
_BRACE = re.compile(r"[{}]")
_SENTENCE_END = re.compile(r"[.!?;](?:\s|$)|[。！？；\n]")
# What may surround a final answer without being part of it: "**72**.", "(B)", "$18", "50%".
_EDGES = " \t\r\n.,;:!?。、\"'“”‘’()[]{}<>*$€£¥%"


def _text(value, name: str) -> str:
    """A reply or reference as text: None is empty, a number is its text; anything else is a caller's bug."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"grading: {name} must be text, got {type(value).__name__}")


def _clean(value, name: str = "text") -> str:
    return unicodedata.normalize("NFKC", _text(value, name)).translate(_INVISIBLE)


def normalise(text) -> str:
    """NFKC, zero-width characters removed, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(_clean(text).split())


def exact_match(reply, reference) -> bool:
    """True when the reply is the reference up to NFKC forms and whitespace (see the module docstring)."""
    expected = normalise(reference)
    return bool(expected) and normalise(reply) == expected


def _boxed(text: str, start: int) -> str:
    """The contents of the `\\boxed{` opened at `start`, braces balanced; to the end when never closed."""
    depth = 1
    for brace in _BRACE.finditer(text, start):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start:brace.start()]
    return text[start:]


def final_answer(text) -> str:
    """The part of a text that states its final answer, normalised; the whole text when it marks none."""
    text = _clean(text)
    at = text.rfind("\\boxed{")
    if at >= 0:
        return normalise(_boxed(text, at + len("\\boxed{")))
    at = text.rfind("####")
    if at >= 0:
        return normalise(text[at + 4:].split("\n", 1)[0])
    markers = collections.deque(_ANSWER_PHRASE.finditer(text), maxlen=1)  # the last one, in one pass
    if markers:
        start = markers[0].end()
        end = _SENTENCE_END.search(text, start)
        return normalise(text[start:end.start() if end else len(text)]).lstrip(": ")
    return normalise(text)


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("−", "-"))


def _numeric(answer: str) -> float | None:
    core = answer.strip(_EDGES)
    return _number(core) if re.fullmatch(_NUM, core) else None


def _stated_numbers(reply: str, operands: set[float]) -> list[float]:
    """The numbers of a reply, less each "a op b" whose operands both come from the question. Pairs are
    found between neighbouring numbers (not by one regex over the text) so the scan stays linear."""
    spans = [m.span() for m in _NUMBER.finditer(reply)]
    values = [_number(reply[a:b]) for a, b in spans]
    kept, i = [], 0
    while i < len(values):
        if (i + 1 < len(values) and values[i] in operands and values[i + 1] in operands
                and _OPERATOR.fullmatch(reply, spans[i][1], spans[i + 1][0])):
            i += 2  # a restated "a op b"
            continue
        kept.append(values[i])
        i += 1
    return kept


def _states_number(reply: str, expected: float, question: str) -> bool:
    operands = {_number(n) for n in _NUMBER.findall(question)}
    found = _stated_numbers(reply, operands)
    return bool(found) and all(math.isclose(n, expected, rel_tol=1e-9, abs_tol=1e-9) for n in found)


def _words(text: str) -> str:
    # Case-folded, punctuation to spaces, padded so " plums " matches whole words only.
    return " " + " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split()) + " "


def _mentions(words: str, term: str) -> bool:
    term_words = _words(term)
    if not term_words.strip():
        return False
    if _CJK.search(term):  # no word boundaries in Chinese or Japanese: match characters, ignoring spaces
        return term_words.replace(" ", "") in words.replace(" ", "")
    return term_words in words


def answer_match(reply, expected, question: str = "", distractors: Iterable | None = None) -> bool:
    """True when the reply's final answer states `expected` and none of the `distractors` (see the module
    docstring). `question` is the prompt, whose restated operands are not read as answers."""
    answer = final_answer(expected).strip(_EDGES)
    if not answer:
        return False
    stated = final_answer(reply)
    words = _words(stated)
    value = _numeric(answer)
    right = _states_number(stated, value, normalise(question)) if value is not None else _mentions(words, answer)
    if not right:
        return False
    if isinstance(distractors, (str, numbers.Number)):
        distractors = [distractors]  # one distractor, not its characters
    return not any(_mentions(words, normalise(_text(d, "distractor"))) for d in distractors or ())
