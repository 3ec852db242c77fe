"""Seeded malformed records for every reader and row format lmforge reads (used by test_fuzz_data.py).

A `FuzzFile` is one data file (jsonl, json, csv, txt or parquet) of one stage kind, and for each record
in it what lmforge must do: load it, keeping its marker text, or reject it with a problem matching a
pattern. Each record is a valid row of one of the kind's templates with one mutation applied: wrong
types, missing and extra keys, empty turns, roles out of order or unknown, lone surrogates, NUL bytes,
1 MB strings, deep nesting, over-long integers, truncated lines, invalid UTF-8 and Latin-1 lines, a BOM
in mid-file, stray carriage returns. Files vary in BOM, CRLF line ends and blank lines between records.
Everything comes from one `random.Random(seed)`: the same seed writes the same bytes.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import random
from dataclasses import dataclass, field

KINDS = ("pt", "sft", "pair", "kto", "prompt")
EXTENSIONS = {"pt": ("jsonl", "json", "csv", "txt"), "sft": ("jsonl", "json", "csv"),
              "pair": ("jsonl", "json", "csv"), "kto": ("jsonl", "json", "csv"), "prompt": ("jsonl", "json", "csv")}

# What the problem text of a rejection must say, per kind of damage.
WRONG_TYPE = r"must|missing|empty|needs|no prompt|cannot tell|expected|unknown role|non-empty"
EMPTY = r"empty"
ROLE_ORDER = r"roles out of order|must end"
UNKNOWN_ROLE = r"unknown role"
SURROGATE = r"lone surrogate \\ud[89a-f]"
BAD_JSON = r"invalid JSON|invalid UTF-8"
BAD_UTF8 = r"invalid UTF-8"
NOT_OBJECT = r"expected a JSON object"
BAD_CSV = r"malformed CSV"
EXTRA_FIELDS = r"more fields than the header has"
TOO_DEEP = r"nested too deeply"
OVERLONG_INT = r"invalid JSON \(Exceeds the limit"

BIG = 1 << 20
NEWLINE = b"\n"


@dataclass(frozen=True)
class Template:
    """A valid row shape: `required` paths must hold their value, `reply` is a free-text path that may
    grow (never the prompt: a huge prompt leaves no room under max_length), `turns` a list of messages."""

    name: str
    build: object  # (marker) -> row
    required: tuple
    empty: tuple
    reply: tuple
    turns: tuple | None = None
    role_key: str = "role"
    flat: bool = True  # every value a string: can be a CSV row


def _turn(role_key: str, role: str, text: str) -> dict:
    return {role_key: role, "value" if role_key == "from" else "content": text}


TEMPLATES = {
    "pt": [
        Template("text", lambda m: {"text": f"Document {m} about rivers and hills."}, (("text",),), ("text",),
                 ("text",)),
        Template("alpaca", lambda m: {"instruction": f"Say {m}.", "input": "", "output": f"Said {m}."},
                 (("instruction",), ("output",)), ("output",), ("output",)),
    ],
    "sft": [
        Template("alpaca", lambda m: {"instruction": f"Say {m}.", "input": "", "output": f"Said {m}."},
                 (("instruction",), ("output",)), ("output",), ("output",)),
        Template("sharegpt", lambda m: {"conversations": [_turn("from", "human", f"Hi {m}"),
                                                          _turn("from", "gpt", f"Hello {m}")]},
                 (("conversations",), ("conversations", 0, "value"), ("conversations", 1, "value")),
                 ("conversations", 1, "value"), ("conversations", 1, "value"), ("conversations",), "from", False),
        Template("openai", lambda m: {"messages": [_turn("role", "system", "Be brief."),
                                                   _turn("role", "user", f"Hi {m}"),
                                                   _turn("role", "assistant", f"Hello {m}")]},
                 (("messages",), ("messages", 1, "content"), ("messages", 2, "content")),
                 ("messages", 2, "content"), ("messages", 2, "content"), ("messages",), "role", False),
    ],
    "pair": [
        Template("trl", lambda m: {"prompt": f"Pick {m}", "chosen": f"Good {m}", "rejected": f"Bad {m}"},
                 (("prompt",), ("chosen",), ("rejected",)), ("chosen",), ("chosen",)),
        Template("ranking", lambda m: {"conversations": [_turn("from", "human", f"Pick {m}")],
                                       "chosen": _turn("from", "gpt", f"Good {m}"),
                                       "rejected": _turn("from", "gpt", f"Bad {m}")},
                 (("conversations",), ("chosen", "value"), ("rejected", "value")), ("chosen", "value"),
                 ("chosen", "value"), ("conversations",), "from", False),
        Template("alpaca", lambda m: {"instruction": f"Pick {m}", "input": "", "chosen": f"Good {m}",
                                      "rejected": f"Bad {m}"},
                 (("chosen",), ("rejected",)), ("rejected",), ("rejected",)),
    ],
    "kto": [
        Template("messages", lambda m: {"messages": [_turn("role", "user", f"Rate {m}"),
                                                     _turn("role", "assistant", f"Reply {m}")], "label": True},
                 (("messages",), ("messages", 1, "content"), ("label",)), ("messages", 1, "content"),
                 ("messages", 1, "content"), ("messages",), "role", False),
        Template("trl", lambda m: {"prompt": f"Rate {m}", "completion": f"Reply {m}", "label": False},
                 (("prompt",), ("completion",), ("label",)), ("completion",), ("completion",)),
    ],
    "prompt": [
        Template("trl", lambda m: {"prompt": f"Solve {m}", "answer": f"{m} done"}, (("prompt",),), ("prompt",),
                 ("answer",)),
        Template("medical", lambda m: {"question": f"Why {m}?", "response": f"Because {m}."}, (("question",),),
                 ("question",), ("response",)),
        Template("alpaca", lambda m: {"instruction": f"Ask {m}", "output": f"Told {m}"}, (("instruction",),),
                 ("instruction",), ("output",)),
        Template("messages", lambda m: {"messages": [_turn("role", "user", f"Solve {m}"),
                                                     _turn("role", "assistant", f"Done {m}")]},
                 (("messages",), ("messages", 0, "content")), ("messages", 0, "content"),
                 ("messages", 1, "content"), ("messages",), "role", False),
    ],
}


@dataclass
class FuzzRecord:
    payload: object
    """A row (dict) that the file's format writes itself, or the raw bytes of its line / JSON element."""
    mutation: str
    problem: str | None
    """Pattern the rejection's problem must match; None: the record must load."""
    marker: str
    where: str = ""
    """`line N` / `record N`, set when the file is rendered."""


@dataclass
class FuzzFile:
    kind: str
    ext: str
    records: list[FuzzRecord]
    bom: bool = False
    crlf: bool = False
    blank_lines: bool = False
    text_columns: list[str] = field(default_factory=list)


def _get(row, path):
    for key in path:
        row = row[key]
    return row


def _set(row, path, value):
    _get(row, path[:-1])[path[-1]] = value


def _delete(row, path):
    del _get(row, path[:-1])[path[-1]]


def _raw_with(row: dict, path: tuple, raw_value: str) -> bytes:
    """The row's JSON text with the value at `path` replaced by raw JSON text (deep nesting, huge numbers)."""
    row = copy.deepcopy(row)
    _set(row, path, "@@RAW@@")
    return json.dumps(row, ensure_ascii=False).replace('"@@RAW@@"', raw_value, 1).encode()


WRONG_VALUES = (5, 2.5, True, None, ["x"], {"k": "v"}, [], "yes")


def _wrong_type(rng, t, row, ext):
    path = rng.choice(t.required)
    original = _get(row, path)
    # A string where a message list was is a valid one-turn prompt in several formats, not a wrong type.
    choices = [v for v in WRONG_VALUES if type(v) is not type(original) and not isinstance(v, str)] \
        if isinstance(original, (str, list)) else [v for v in WRONG_VALUES if type(v) is not type(original)]
    _set(row, path, copy.deepcopy(rng.choice(choices)))
    return row, WRONG_TYPE


def _missing(rng, t, row, ext):
    _delete(row, rng.choice(t.required))
    return row, WRONG_TYPE


def _empty(rng, t, row, ext):
    _set(row, t.empty, rng.choice(["", " ", "\t\n  ", "\u3000"]))
    return row, EMPTY


def _roles(rng, t, row, ext):
    turns = _get(row, t.turns)
    if len(turns) < 2 or rng.random() < 0.4:
        rng.choice(turns)[t.role_key] = rng.choice(["bot", "Human", "", "narrator"])
        return row, UNKNOWN_ROLE
    turns[-1], turns[-2] = turns[-2], turns[-1]
    return row, ROLE_ORDER


def _extra_keys(rng, t, row, ext):
    extra = {"meta_note": "x" * rng.randint(0, 40), "zz_score": rng.random(), "zz_tags": ["a", "b"],
             "zz_nested": {"a": [1, {"b": None}]}}
    for key in rng.sample(sorted(extra), 2):
        row[key] = extra[key] if ext != "csv" else str(extra[key])
    return row, None


def _grow_reply(rng, t, row, text: str):
    _set(row, t.reply, _get(row, t.reply) + text)
    return row, None


MUTATIONS = {
    # name: (formats it applies to, weight, function)
    "control": (("jsonl", "json", "csv", "txt", "parquet"), 6, lambda rng, t, row, ext: (row, None)),
    "extra_keys": (("jsonl", "json", "csv"), 3, _extra_keys),
    "nul_in_text": (("jsonl", "json", "csv", "txt"), 2, lambda rng, t, row, ext: _grow_reply(rng, t, row, " a\x00b")),
    "unicode_text": (("jsonl", "json", "csv", "txt"), 2,
                     lambda rng, t, row, ext: _grow_reply(rng, t, row, " 日本語 🙂 עברית \u200b\x1b[31m")),
    "one_mb_string": (("jsonl", "json", "csv", "txt"), 1, lambda rng, t, row, ext: _grow_reply(rng, t, row, " z" * (BIG // 2))),
    "wrong_type": (("jsonl", "json"), 6, _wrong_type),
    "missing_key": (("jsonl", "json"), 4, _missing),
    "empty_turn": (("jsonl", "json", "csv"), 4, _empty),
    "roles": (("jsonl", "json"), 4, _roles),
}
RAW_MUTATIONS = ("truncated", "invalid_utf8", "latin1_line", "bom_mid_file", "raw_nul", "not_an_object",
                 "lone_surrogate", "deep_nesting", "overlong_integer", "nan_value", "deep_but_fine", "lone_cr",
                 "short_row", "long_row")
RAW_FORMATS = {"truncated": ("jsonl",), "invalid_utf8": ("jsonl", "csv", "txt"), "latin1_line": ("jsonl", "csv", "txt"),
               "bom_mid_file": ("jsonl",), "raw_nul": ("jsonl",), "not_an_object": ("jsonl", "json"),
               "lone_surrogate": ("jsonl", "json"), "deep_nesting": ("jsonl",), "overlong_integer": ("jsonl",),
               "nan_value": ("jsonl", "json"), "deep_but_fine": ("jsonl", "json"), "lone_cr": ("csv",),
               "short_row": ("csv",), "long_row": ("csv",)}


def _raw_mutation(name: str, rng: random.Random, t: Template, row: dict, ext: str, columns: list[str]):
    """(raw bytes of the line or JSON element, expected problem) for the byte-level mutations."""
    text = json.dumps(row, ensure_ascii=False).encode() if ext != "csv" else _csv_line(row, columns)
    if ext == "txt":
        text = row["text"].encode()
    if name == "truncated":
        return text[: rng.randint(1, len(text) - 1)], BAD_JSON
    if name == "invalid_utf8":
        cut = rng.randint(1, len(text) - 1)
        return text[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + text[cut:], BAD_UTF8
    if name == "latin1_line":
        return text.decode().replace(" ", " café ", 1).encode("latin-1", errors="replace"), BAD_UTF8
    if name == "bom_mid_file":
        return b"\xef\xbb\xbf" + text, BAD_JSON
    if name == "raw_nul":
        cut = rng.randint(0, len(text))
        return text[:cut] + b"\x00" + text[cut:], BAD_JSON
    if name == "not_an_object":
        return rng.choice([b"[1, 2]", b'"just text"', b"42", b"null", b"true"]), NOT_OBJECT if ext == "jsonl" else r"expected an object"
    if name == "lone_surrogate":
        return _raw_with(row, t.reply, rng.choice(['"a\\ud800b"', '"\\udfff"', '"x\\udbff"'])), SURROGATE
    if name == "deep_nesting":
        depth = rng.choice([5_000, 100_000])
        return _raw_with(row, t.reply, "[" * depth + "]" * depth), TOO_DEEP
    if name == "overlong_integer":
        return _raw_with(row, t.reply, "9" * rng.randint(4_400, 20_000)), OVERLONG_INT
    if name == "nan_value":
        return _raw_with(row, rng.choice(t.required), rng.choice(["NaN", "Infinity", "-Infinity"])), WRONG_TYPE
    if name == "deep_but_fine":  # deep, but within reach, and in a column no format reads
        return _raw_with({**row, "zz_deep": 0}, ("zz_deep",), "[" * 60 + "]" * 60), None
    if name == "lone_cr":
        cut = rng.randint(1, len(text) - 2)
        return text[:cut].replace(b'"', b"") + b"\r" + text[cut:].replace(b'"', b""), BAD_CSV
    if name == "short_row":  # the columns after the cut read as missing (None)
        fields = text.split(b",")
        kept = rng.randint(1, len(columns) - 1)
        while not b"".join(fields[:kept]).strip():  # an empty line is no record at all
            kept += 1
        lost = set(columns[kept:]) & {path[0] for path in t.required}
        return b",".join(fields[:kept]), WRONG_TYPE if lost else None
    if name == "long_row":
        return text + b",surplus", EXTRA_FIELDS
    raise KeyError(name)


def _csv_line(row: dict, columns: list[str]) -> bytes:
    buffer = io.StringIO()
    # The line end must be "\n" for the writer to quote fields that hold one; it is cut off after.
    csv.writer(buffer, lineterminator="\n").writerow([row.get(c, "") for c in columns])
    return buffer.getvalue()[:-1].encode()


def fuzz_file(rng: random.Random, kind: str, ext: str, n_records: int, tag: str,
              template_names: tuple[str, ...] | None = None, big_records: int = 2) -> FuzzFile:
    """n_records records of one kind in one format; the first is always a valid one, so a BOM opens a
    good line and a BOM in mid-file is known to be one."""
    templates = [t for t in TEMPLATES[kind] if (t.flat or ext not in ("csv", "txt"))
                 and (template_names is None or t.name in template_names)]
    if ext == "txt":
        templates = [t for t in templates if t.name == "text"]
    if ext == "csv":  # one shape per file: a CSV row has every column, so shapes would blur into each other
        templates = [rng.choice(templates)]
    columns = sorted(templates[0].build("m")) + ["meta_note", "zz_score"] if ext == "csv" else []
    options = [(name, w) for name, (formats, w, _) in MUTATIONS.items() if ext in formats]
    options += [(name, 2) for name in RAW_MUTATIONS if ext in RAW_FORMATS[name]]
    names, weights = zip(*options)
    big_left = big_records  # 1 MB records are costly to tokenize: one or two per file
    records = []
    for i in range(n_records):
        template = rng.choice(templates)
        marker = f"mk{tag}r{i}q"
        row = template.build(marker)
        name = "control" if i == 0 else rng.choices(names, weights)[0]
        if name == "one_mb_string":
            big_left -= 1
            name = name if big_left >= 0 else "control"
        if name == "roles" and template.turns is None:
            name = "missing_key"
        if name in MUTATIONS:
            payload, problem = MUTATIONS[name][2](rng, template, row, ext)
            if ext == "txt":
                payload = payload["text"].encode()
        else:
            payload, problem = _raw_mutation(name, rng, template, row, ext, columns)
        records.append(FuzzRecord(payload, name, problem, marker))
    return FuzzFile(kind, ext, records, bom=rng.random() < 0.25, crlf=rng.random() < 0.3,
                    blank_lines=rng.random() < 0.3, text_columns=columns)


def render(file: FuzzFile) -> bytes:
    """The file's bytes; sets each record's `where` the way lmforge names it."""
    if file.ext == "parquet":
        raise ValueError("parquet files are written with write_parquet")
    end = b"\r\n" if file.crlf else b"\n"
    lines: list[bytes] = []
    if file.ext == "csv":
        lines.append(",".join(file.text_columns).encode())
    if file.ext == "json":
        lines.append(b"[")
    for index, record in enumerate(file.records):
        payload = record.payload
        if isinstance(payload, dict):
            payload = _csv_line(payload, file.text_columns) if file.ext == "csv" else \
                json.dumps(payload, ensure_ascii=bool(index % 2)).encode()
        if file.ext == "json":
            record.where = f"record {index}"
            lines.append(payload + (b"," if index < len(file.records) - 1 else b""))
            continue
        if file.blank_lines and index % 3 == 2:
            lines.append(b"   " if file.ext != "csv" else b"")
        # Quoted CSV fields may hold line breaks: a record's line is one past the breaks before it.
        line_number = sum(line.count(NEWLINE) + 1 for line in lines) + 1
        record.where = f"line {line_number}"
        lines.append(payload)
    if file.ext == "json":
        lines.append(b"]")
    data = end.join(lines) + end
    return (b"\xef\xbb\xbf" + data) if file.bom else data


def fuzz_files(seed: int, records_per_file: int, big_records: int = 2,
               big_formats: tuple[str, ...] = ("jsonl", "json", "csv", "txt")) -> list[FuzzFile]:
    """One file per (kind, format), with a per-file seed so files do not shift when one changes."""
    files = []
    for kind in KINDS:
        for ext in EXTENSIONS[kind]:
            rng = random.Random(f"{seed}:{kind}:{ext}")
            big = big_records if ext in big_formats else 0
            files.append(fuzz_file(rng, kind, ext, records_per_file, f"{kind}{ext}", big_records=big))
    return files


PARQUET_DAMAGE = {"control": None, "int_column": 7, "list_column": ["x", "y"], "struct_column": {"k": "v"},
                  "null_column": None, "binary_column": b"\xffbytes", "missing_column": None}


def parquet_files(seed: int, rows_per_file: int) -> list[FuzzFile]:
    """Per kind, a Parquet file per schema: the right one, and a required column of the wrong type
    (integer, list, struct, all-null, binary) or missing — the same damage on every row."""
    files = []
    for kind in KINDS:
        rng = random.Random(f"{seed}:{kind}:parquet")
        for damage, value in PARQUET_DAMAGE.items():
            template = rng.choice(TEMPLATES[kind])
            # A column holds one type: damage a whole top-level column (a nested one could not be written).
            path = rng.choice([p for p in template.required if len(p) == 1])
            records = []
            for i in range(rows_per_file):
                marker = f"mk{kind}pq{damage}r{i}q"
                row = {**template.build(marker), "meta_note": "kept"}  # never a table without columns
                if damage == "missing_column":
                    _delete(row, path)
                elif damage != "control":
                    _set(row, path, copy.deepcopy(value))
                records.append(FuzzRecord(row, damage, None if damage == "control" else WRONG_TYPE, marker,
                                          f"record {i}"))
            files.append(FuzzFile(kind, "parquet", records))
    return files


def write_parquet(file: FuzzFile, path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([r.payload for r in file.records]), path)
