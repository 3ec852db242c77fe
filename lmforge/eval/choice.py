"""Multiple-choice evaluation (C-Eval, CMMLU, MMLU and JSON layouts) by the log-likelihood of each option.

A question is shown with its options listed by letter and an "Answer:" cue; each option's text is then
scored as the continuation, and the model's pick is the option it finds most likely: summed over the
option's tokens (`choice_accuracy`, lm-evaluation-harness's `acc`) or per character of the continuation
(`choice_accuracy_norm`, its `acc_norm`, which does not favour short options).

Layouts, detected from the file:

- C-Eval CSV: header `id,question,A,B,C,D,answer[,explanation]`
- CMMLU CSV: header `,Question,A,B,C,D,Answer` (an unnamed index column); column names in any case
- MMLU CSV: no header, `question,A,B,C,D,answer` (any number of options between question and answer)
- JSON lines or a JSON list of objects with `question`, `A`, `B`, ... (two or more consecutive letters),
  `answer` (a letter, or a 0-based index) and optionally `id`
- a folder: each `.csv`, `.jsonl` and `.json` file in it (sorted), ids prefixed by the file's name
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import torch

from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.preference import pad_sequences, sequence_with_labels
from lmforge.data.readers import decoded_lines
from lmforge.data.templates import render_prompt
from lmforge.losses.preference import sequence_logps

LETTERS = string.ascii_uppercase
CHOICE_SUFFIXES = (".csv", ".jsonl", ".json")
ANSWER_CUE = "Answer:"


@dataclass
class ChoiceQuestion:
    id: str
    question: str
    options: list[str]
    """Two or more, lettered A, B, C, ... in this order."""
    answer: int
    """Index into `options` of the right one."""
    line: int
    """1-based line of the question in its file (where its CSV row or JSON record starts)."""

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


# ---- reading ---------------------------------------------------------------------------------------------

def read_choice_file(path: str | Path) -> list[ChoiceQuestion]:
    """Every question in a file or in a folder's files; a bad row is a DataError naming file and line."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CHOICE_SUFFIXES)
        if not files:
            raise DataError(str(path), "directory", f"no {', '.join(CHOICE_SUFFIXES)} files")
        return [replace(q, id=f"{f.stem}/{q.id}") for f in files for q in _read_one(f)]
    if not path.is_file():
        raise DataError(str(path), "path", "no such file or directory")
    return _read_one(path)


def _read_one(path: Path) -> list[ChoiceQuestion]:
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json}
    if path.suffix.lower() not in readers:
        raise DataError(str(path), "file", f"unsupported extension {path.suffix!r}; use {CHOICE_SUFFIXES}")
    questions = list(readers[path.suffix.lower()](path))
    if not questions:
        raise DataError(str(path), "file", "empty file: no questions")
    return questions


def _at(path: Path, line: int, problem: str) -> DataError:
    """A bad row, named as the data readers name one: `file:line N: problem`."""
    return DataError(str(path), f"line {line}", problem)


def _make_question(path: Path, line: int, qid: str, question, options: list, answer) -> ChoiceQuestion:
    def fail(problem: str) -> DataError:
        return _at(path, line, problem)

    if question is not None and not isinstance(question, str):
        raise fail(f"question must be text, got {type(question).__name__}")
    if not question or not question.strip():
        raise fail("empty question")
    texts = [o.strip() if isinstance(o, str) else str(o) for o in options]
    while texts and not texts[-1]:  # a five-option file in which this question has only four
        texts.pop()
    if len(texts) < 2:
        raise fail(f"fewer than 2 options ({len(texts)}); options are columns or keys A, B, C, ...")
    if "" in texts:
        raise fail(f"option {LETTERS[texts.index('')]} is empty")
    return ChoiceQuestion(qid, question.strip(), texts, _answer_index(answer, len(texts), fail), line)


def _answer_index(answer, count: int, fail) -> int:
    letters = f"{LETTERS[0]}-{LETTERS[count - 1]}"
    if isinstance(answer, int) and not isinstance(answer, bool):  # JSON only: a 0-based index
        if not 0 <= answer < count:
            raise fail(f"answer index {answer} is out of range for {count} options (0-based)")
        return answer
    if not isinstance(answer, str) or not answer.strip():
        raise fail("empty answer" if answer in (None, "") else f"answer must be a letter, got {answer!r}")
    letter = answer.strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:count]:
        raise fail(f"answer {answer!r} is not among the options {letters}")
    return LETTERS.index(letter)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(file line where the row starts, fields) for each non-blank row; quoted fields may span lines."""
    physical: list[int] = []

    def lines() -> Iterator[str]:
        for number, text in decoded_lines(path, ErrorLog("raise")):  # utf-8-sig, CRLF, bad bytes name a line
            physical.append(number)
            yield text + "\n"

    reader = csv.reader(lines())
    consumed = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _at(path, physical[min(consumed, len(physical) - 1)], f"bad CSV ({exc})") from exc
        start, consumed = physical[consumed], reader.line_num
        if any(cell.strip() for cell in row):
            yield start, row


def _read_csv(path: Path) -> Iterator[ChoiceQuestion]:
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        return
    names = [cell.strip().lower() for cell in first[1]]
    # C-Eval and CMMLU name their columns; an MMLU row may hold options "a" and "b" but ends with a letter.
    named_options = "a" in names and "b" in names and not _is_letter(names[-1])
    if "question" in names or "answer" in names or named_options:
        yield from _headed_csv(path, first, rows)
    else:
        yield from _headerless_csv(path, chain([first], rows))


def _is_letter(cell: str) -> bool:
    return len(cell) == 1 and cell.upper() in LETTERS


def _headed_csv(path: Path, header: tuple[int, list[str]], rows) -> Iterator[ChoiceQuestion]:
    line, cells = header
    names = [cell.strip().lower() for cell in cells]
    for key in ("question", "answer"):
        if key not in names:
            raise _at(path, line, f"missing column {key!r} (the header has {cells}); "
                            "C-Eval: id,question,A,B,C,D,answer; CMMLU: ,Question,A,B,C,D,Answer")
    letters = []  # the option columns: a, b, c, ... as far as they run without a gap
    for letter in LETTERS.lower():
        if letter not in names:
            break
        letters.append(letter)
    id_column = names.index("id") if "id" in names else 0 if names[0] == "" else None  # CMMLU: unnamed index
    for index, (number, row) in enumerate(rows):
        if len(row) != len(names):
            raise _at(path, number, f"{len(row)} fields, the header has {len(names)}")
        field = dict(zip(names, row))
        qid = row[id_column].strip() if id_column is not None and row[id_column].strip() else str(index)
        options = [field[c] for c in letters]
        yield _make_question(path, number, qid, field["question"], options, field["answer"])


def _headerless_csv(path: Path, rows) -> Iterator[ChoiceQuestion]:
    width = None
    for index, (number, row) in enumerate(rows):
        width = width or len(row)
        if width < 4:
            raise _at(path, number, f"{width} fields; a file without a header needs "
                            "question, two or more options, answer letter (MMLU: question,A,B,C,D,answer)")
        if len(row) != width:
            raise _at(path, number, f"{len(row)} fields where the first row has {width}")
        yield _make_question(path, number, str(index), row[0], row[1:-1], row[-1])


def _record_question(path: Path, line: int, index: int, record) -> ChoiceQuestion:
    if not isinstance(record, dict):
        raise _at(path, line, f"expected a JSON object, got {type(record).__name__}")
    keys = {str(k).strip().lower(): v for k, v in record.items()}
    for key in ("question", "answer"):
        if key not in keys:
            raise _at(path, line, f"missing key {key!r} (the record has {list(record)})")
    options = []
    for letter in LETTERS.lower():
        if keys.get(letter) is None:
            break
        options.append(keys[letter])
    qid = str(keys["id"]) if keys.get("id") is not None else str(index)
    return _make_question(path, line, qid, keys["question"], options, keys["answer"])


def _read_jsonl(path: Path) -> Iterator[ChoiceQuestion]:
    index = 0
    for number, text in decoded_lines(path, ErrorLog("raise")):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _at(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
        yield _record_question(path, number, index, record)
        index += 1


def _read_json(path: Path) -> Iterator[ChoiceQuestion]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _at(path, line, f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _at(path, exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, list):
        raise _at(path, 1, f"expected a list of question objects, got {type(data).__name__}")
    # The file parsed, so walk it again element by element only to learn the line each record starts on.
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    for index in range(len(data)):
        gap = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", gap, pos)
        record, end = decoder.raw_decode(text, pos)
        yield _record_question(path, line, index, record)
        line += text.count("\n", pos, end)
        pos = end


# ---- scoring ---------------------------------------------------------------------------------------------

def format_question(question: ChoiceQuestion) -> str:
    """The question, its options by letter, and the answer cue: the context every option is scored after."""
    options = [f"{LETTERS[i]}. {text}" for i, text in enumerate(question.options)]
    return "\n".join([question.question, *options, ANSWER_CUE])


def _uses_chat(tokenizer, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("choice_eval(chat=True) needs a tokenizer with a chat template")
    return has_template if chat is None else chat


def _context(tokenizer, question: ChoiceQuestion, chat: bool, few_shot: Sequence[ChoiceQuestion]) -> str:
    if chat:
        messages = []
        for shot in few_shot:
            messages += [{"role": "user", "content": format_question(shot)},
                         {"role": "assistant", "content": shot.options[shot.answer]}]
        return render_prompt(tokenizer, [*messages, {"role": "user", "content": format_question(question)}])
    shots = [f"{format_question(s)} {s.options[s.answer]}\n\n" for s in few_shot]
    return "".join(shots) + format_question(question)


def _continuations(question: ChoiceQuestion, chat: bool) -> list[str]:
    # The option's text, not "A. text": the options are already listed above, so the letter-and-text form
    # is a copy of the context whose only informative token is the letter, which small or base models
    # have not learnt to use; the text alone measures whether the model knows the answer (the "cloze"
    # form of lm-evaluation-harness). In plain text it follows "Answer:" after a space, in a chat it
    # starts the assistant's reply.
    return list(question.options) if chat else [f" {text}" for text in question.options]


def _encode_pair(tokenizer, context: str, context_ids: list[int], continuation: str, specials: bool):
    """(ids of context + continuation, how many of them are context).

    The pair is encoded whole, as lm-evaluation-harness does, so that tokenizers which mark a word's start
    (SentencePiece) see the continuation as they would in running text."""
    whole = tokenizer(context + continuation, add_special_tokens=specials)["input_ids"]
    if whole[: len(context_ids)] != context_ids or len(whole) == len(context_ids):  # merged at the seam
        whole = context_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return whole, len(context_ids)


@torch.no_grad()
def score_options(model, tokenizer, questions: Sequence[ChoiceQuestion], batch_size: int = 16,
                  chat: bool | None = None, few_shot: Sequence[ChoiceQuestion] = ()) -> list[list[float]]:
    """The summed log-likelihood of each option of each question, as its continuation of the context."""
    chat = _uses_chat(tokenizer, chat)
    rows = []  # one (ids, context length) per option of each question
    for question in questions:
        context = _context(tokenizer, question, chat, few_shot)
        context_ids = tokenizer(context, add_special_tokens=not chat)["input_ids"]
        for continuation in _continuations(question, chat):
            rows.append(_encode_pair(tokenizer, context, context_ids, continuation, not chat))
    scores = iter(_sequence_logps(model, rows, tokenizer.pad_token_id or 0, batch_size))
    return [[next(scores) for _ in q.options] for q in questions]


def _sequence_logps(model, rows: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> list[float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            # Right padding: positions stay 0, 1, 2, ...; only the continuation carries labels.
            batch = pad_sequences([sequence_with_labels(ids[:n], ids[n:]) for ids, n in chunk], pad_id)
            # Logits only from the earliest continuation on: a [B, T, V] tensor over long (few-shot)
            # contexts would be most of the memory and none of the answer.
            keep = batch["input_ids"].shape[1] - min(n for _, n in chunk) + 1
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False, logits_to_keep=keep).logits
            logps, _ = sequence_logps(logits[:, -keep:], batch["labels"][:, -keep:].to(device))
            scores += logps.tolist()
    finally:
        model.train(was_training)
    return scores


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def choice_eval(model, tokenizer, questions: Sequence[ChoiceQuestion], batch_size: int = 16,
                chat: bool | None = None, few_shot: Sequence[ChoiceQuestion] = ()) -> dict:
    """Accuracy of the most likely option, by summed and by per-character log-likelihood.

    `chat`: None uses the tokenizer's chat template when it has one (the question is a user turn, the
    option begins the assistant's reply), False plain text. `few_shot`: solved questions shown first.
    `batch_size` counts sequences (one per option). Empty when there is nothing to answer."""
    if not questions:
        return {}
    chat = _uses_chat(tokenizer, chat)
    scores = score_options(model, tokenizer, questions, batch_size, chat, few_shot)
    right = right_norm = 0
    per_question = []
    for question, logps in zip(questions, scores):
        # Per character of the scored continuation (its leading space included), as the harness's acc_norm.
        chars = [len(text) for text in _continuations(question, chat)]
        pick, pick_norm = _argmax(logps), _argmax([lp / n for lp, n in zip(logps, chars)])
        right += pick == question.answer
        right_norm += pick_norm == question.answer
        per_question.append({"id": question.id, "predicted": LETTERS[pick], "answer": question.answer_letter})
    n = len(questions)
    return {"choice_accuracy": right / n, "choice_accuracy_norm": right_norm / n, "answered": n,
            "per_question": per_question}
