"""Data readers and bad-record reporting: every record names its file and line, nothing is dropped silently.

Covers `lmforge.data.readers` (each file type, directories, globs, BOM, CRLF, errors) and the
`on_error` behaviour of `lmforge.data.build.load_examples` on malformed records.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples
from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.readers import RawRecord, read_file, resolve_files

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
BOM = b"\xef\xbb\xbf"


def records(path: Path, on_error: str = "raise", text_split: str = "line") -> tuple[list[RawRecord], ErrorLog]:
    errors = ErrorLog(on_error)
    return list(read_file(path, errors, text_split)), errors


def rows_and_wheres(raw: list[RawRecord]) -> list[tuple[dict, str]]:
    return [(r.row, r.where) for r in raw]


def load(specs: list[DatasetSpec], cache_root: Path, **cfg):
    """load_examples with a fresh cache folder; returns (dataset, error log)."""
    config = DataConfig(**cfg)
    errors = ErrorLog(config.on_error)
    cache = tempfile.mkdtemp(dir=cache_root)
    dataset, _ = load_examples(specs, config, errors, cache)
    return dataset, errors


def data_error_behind(call) -> DataError:
    """The DataError a call fails with: raised itself or chained as the cause of what was raised.

    `load_examples` re-raises the DataError itself (`test_load_examples_raises_data_error_itself`);
    streaming datasets still raise it from inside `datasets`, so the checks below look through chains.
    """
    try:
        call()
    except Exception as exc:  # the type is checked right below
        found: BaseException | None = exc
        while found is not None and not isinstance(found, DataError):
            found = found.__cause__ or found.__context__
        assert found is not None, f"no DataError behind {exc!r}"
        return found
    pytest.fail("expected a DataError")


# --------------------------------------------------------------------------- plain files, one type each


def test_txt_one_record_per_nonblank_line_named_by_line():
    raw, errors = records(FIXTURES / "blocks.txt")
    assert rows_and_wheres(raw) == [
        ({"text": "Alpha one."}, "line 1"),
        ({"text": "Alpha two."}, "line 2"),
        ({"text": "Beta one."}, "line 4"),
        ({"text": "Gamma one."}, "line 7"),
        ({"text": "Gamma two."}, "line 8"),
        ({"text": "Gamma three."}, "line 9"),
    ]
    assert {r.source for r in raw} == {str(FIXTURES / "blocks.txt")}
    assert errors.total_skipped == 0


def test_txt_blank_line_blocks_named_by_first_line():
    raw, _ = records(FIXTURES / "blocks.txt", text_split="blank")
    assert rows_and_wheres(raw) == [
        ({"text": "Alpha one.\nAlpha two."}, "line 1"),
        ({"text": "Beta one."}, "line 4"),
        ({"text": "Gamma one.\nGamma two.\nGamma three."}, "line 7"),
    ]


def test_text_split_reaches_the_reader_through_load_examples(tmp_path):
    spec = DatasetSpec(path=str(FIXTURES / "blocks.txt"))
    by_line, _ = load([spec], tmp_path)
    by_block, _ = load([spec], tmp_path, text_split="blank")
    assert len(by_line) == 6
    assert by_block["text"] == ["Alpha one.\nAlpha two.", "Beta one.", "Gamma one.\nGamma two.\nGamma three."]
    assert by_block["source"] == [f"{FIXTURES / 'blocks.txt'}:line {n}" for n in (1, 4, 7)]
    assert by_block["messages"] == [[], [], []]


def test_jsonl_rows_keep_their_physical_line_numbers():
    raw, _ = records(FIXTURES / "alpaca.jsonl")
    assert rows_and_wheres(raw) == [
        ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "line 1"),
        ({"instruction": "Translate to Chinese.", "input": "hello", "output": "你好"}, "line 3"),
        ({"instruction": "Name a color.", "output": "Blue", "system": "Be brief."}, "line 4"),
    ]


def test_json_list_of_records_named_by_index():
    raw, _ = records(FIXTURES / "rows.json")
    assert [r.where for r in raw] == ["record 0", "record 1"]
    assert raw[0].row == {"instruction": "First question", "output": "First answer"}
    assert raw[1].row["conversations"][1] == {"from": "gpt", "value": "Second answer"}


def test_json_object_of_lists_becomes_rows():
    raw, _ = records(FIXTURES / "columns.json")
    assert rows_and_wheres(raw) == [
        ({"instruction": "q0", "input": "", "output": "a0"}, "record 0"),
        ({"instruction": "q1", "input": "ctx1", "output": "a1"}, "record 1"),
        ({"instruction": "q2", "input": "", "output": "a2"}, "record 2"),
    ]


def test_csv_rows_named_by_line_with_quoting():
    raw, _ = records(FIXTURES / "table.csv")
    assert rows_and_wheres(raw) == [
        ({"instruction": "Say hi", "input": "", "output": "Hi!"}, "line 2"),
        ({"instruction": "Quote, with comma", "input": "extra", "output": 'He said "yes"'}, "line 3"),
    ]


def test_parquet_rows_named_by_index(tmp_path):
    path = tmp_path / "table.parquet"
    pd.DataFrame({"instruction": ["p0", "p1", "p2"], "output": ["o0", "o1", "o2"]}).to_parquet(path)
    raw, _ = records(path)
    assert rows_and_wheres(raw) == [
        ({"instruction": f"p{i}", "output": f"o{i}"}, f"record {i}") for i in range(3)
    ]
    dataset, errors = load([DatasetSpec(path=str(path))], tmp_path)
    assert dataset["messages"][2] == [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "o2"}]
    assert dataset["source"][2] == f"{path}:record 2"
    assert errors.total_skipped == 0


def test_every_file_type_normalises_through_load_examples(tmp_path):
    dataset, _ = load([DatasetSpec(path=str(FIXTURES / "alpaca.jsonl"))], tmp_path)
    assert dataset["messages"] == [
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Translate to Chinese.\nhello"}, {"role": "assistant", "content": "你好"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
         {"role": "assistant", "content": "Blue"}],
    ]
    assert dataset["source"] == [f"{FIXTURES / 'alpaca.jsonl'}:line {n}" for n in (1, 3, 4)]
    # A .json file may mix formats row by row (alpaca, then sharegpt).
    mixed, _ = load([DatasetSpec(path=str(FIXTURES / "rows.json"))], tmp_path)
    assert mixed["messages"][1] == [{"role": "user", "content": "Second question"},
                                    {"role": "assistant", "content": "Second answer"}]
    table, _ = load([DatasetSpec(path=str(FIXTURES / "table.csv"))], tmp_path)
    assert table["messages"][1][0] == {"role": "user", "content": "Quote, with comma\nextra"}


def test_max_samples_limits_good_records(tmp_path):
    dataset, _ = load([DatasetSpec(path=str(FIXTURES / "alpaca.jsonl"), max_samples=2)], tmp_path)
    assert dataset["source"] == [f"{FIXTURES / 'alpaca.jsonl'}:line {n}" for n in (1, 3)]


def test_streaming_yields_the_same_examples(tmp_path):
    spec = DatasetSpec(path=str(FIXTURES / "alpaca.jsonl"))
    eager, _ = load([spec], tmp_path)
    streamed, _ = load([spec], tmp_path, streaming=True)
    assert [row["source"] for row in streamed] == eager["source"]
    assert [row["messages"] for row in streamed] == eager["messages"]


# --------------------------------------------------------------------------- directories and globs


def test_directory_reads_supported_files_recursively_in_sorted_order(tmp_path):
    tree = FIXTURES / "tree"
    assert resolve_files(str(tree)) == [tree / "a.jsonl", tree / "sub" / "b.json"]  # notes.md is ignored
    dataset, _ = load([DatasetSpec(path=str(tree))], tmp_path)
    assert dataset["text"] == ["tree a first", "tree a second", "tree b only"]
    assert dataset["source"] == [f"{tree / 'a.jsonl'}:line 1", f"{tree / 'a.jsonl'}:line 2",
                                 f"{tree / 'sub' / 'b.json'}:record 0"]


def test_glob_matches_files(tmp_path):
    tree = FIXTURES / "tree"
    assert resolve_files(str(tree / "**" / "*.json")) == [tree / "sub" / "b.json"]
    assert resolve_files(str(tree / "*.json*")) == [tree / "a.jsonl"]
    dataset, _ = load([DatasetSpec(path=str(tree / "**" / "*.json*"))], tmp_path)
    assert dataset["text"] == ["tree a first", "tree a second", "tree b only"]


def test_single_file_path_resolves_to_itself():
    assert resolve_files(str(FIXTURES / "table.csv")) == [FIXTURES / "table.csv"]


def test_unsupported_extension_is_rejected(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<rows/>", encoding="utf-8")
    with pytest.raises(DataError) as info:
        resolve_files(str(path))
    assert info.value.source == str(path)
    assert "unsupported extension '.xml'" in info.value.problem
    # A glob that matches an unsupported file is rejected too, not silently narrowed.
    with pytest.raises(DataError, match=r"notes\.md:file: unsupported extension '\.md'"):
        resolve_files(str(FIXTURES / "tree" / "*"))


def test_empty_directory_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        resolve_files(str(empty))
    assert (info.value.source, info.value.where) == (str(empty), "directory")
    assert "no data files" in info.value.problem
    (empty / "readme.md").write_text("only docs here", encoding="utf-8")
    with pytest.raises(DataError, match="no data files"):
        resolve_files(str(empty))


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file, directory or glob match"):
        resolve_files(str(tmp_path / "nope" / "*.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load([DatasetSpec(path=str(tmp_path / "missing.jsonl"))], tmp_path)


# --------------------------------------------------------------------------- BOM and CRLF


def test_bom_is_stripped_in_every_text_format(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(BOM + b'{"text": "first"}\n{"text": "second"}\n')
    raw, _ = records(jsonl)
    assert rows_and_wheres(raw) == [({"text": "first"}, "line 1"), ({"text": "second"}, "line 2")]

    csv = tmp_path / "bom.csv"
    csv.write_bytes(BOM + b"instruction,output\nq,a\n")
    raw, _ = records(csv)
    assert rows_and_wheres(raw) == [({"instruction": "q", "output": "a"}, "line 2")]

    txt = tmp_path / "bom.txt"
    txt.write_bytes(BOM + "第一行\nsecond\n".encode())
    raw, _ = records(txt)
    assert rows_and_wheres(raw) == [({"text": "第一行"}, "line 1"), ({"text": "second"}, "line 2")]

    json_file = tmp_path / "bom.json"
    json_file.write_bytes(BOM + b'[{"text": "only"}]')
    raw, _ = records(json_file)
    assert rows_and_wheres(raw) == [({"text": "only"}, "record 0")]


def test_crlf_line_endings_leave_no_carriage_return(tmp_path):
    jsonl = tmp_path / "crlf.jsonl"
    jsonl.write_bytes(b'{"instruction": "q1", "output": "a1"}\r\n\r\n{"instruction": "q2", "output": "a2"}\r\n')
    raw, _ = records(jsonl)
    assert rows_and_wheres(raw) == [({"instruction": "q1", "output": "a1"}, "line 1"),
                                    ({"instruction": "q2", "output": "a2"}, "line 3")]

    txt = tmp_path / "crlf.txt"
    txt.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    raw, _ = records(txt)
    assert rows_and_wheres(raw) == [({"text": "one"}, "line 1"), ({"text": "two"}, "line 2"),
                                    ({"text": "three"}, "line 4")]
    raw, _ = records(txt, text_split="blank")
    assert rows_and_wheres(raw) == [({"text": "one\ntwo"}, "line 1"), ({"text": "three"}, "line 4")]

    csv = tmp_path / "crlf.csv"
    csv.write_bytes(b"instruction,output\r\nq,a\r\nq2,a2\r\n")
    raw, _ = records(csv)
    assert rows_and_wheres(raw) == [({"instruction": "q", "output": "a"}, "line 2"),
                                    ({"instruction": "q2", "output": "a2"}, "line 3")]


# --------------------------------------------------------------------------- bad records: file and line

GOOD_ALPACA = b'{"instruction": "Add 2 and 3.", "output": "5"}'
GOOD_OPENAI = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'
INVALID_JSON = b'{"instruction": "x", "output": }'

# (id, the bad line, the exact problem text the error must carry)
BAD_LINES = [
    ("invalid-json", INVALID_JSON,
     f"invalid JSON (Expecting value at column {INVALID_JSON.index(b'}') + 1})"),
    ("invalid-utf8", b'{"instruction": "caf\xe9", "output": "x"}',
     "invalid UTF-8 (invalid continuation byte at byte 20)"),
    ("not-an-object", b'["instruction", "output"]', "expected a JSON object, got list"),
    ("output-is-a-number", b'{"instruction": "Add 2 and 3.", "output": 5}',
     "field 'output' must be a string, got int"),
    ("missing-output", b'{"instruction": "Add 2 and 3."}', "missing field 'output'"),
    ("empty-instruction", b'{"instruction": "", "output": "5"}', "turn 0 (user) is empty"),
    ("empty-reply",
     b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}',
     "turn 1 (assistant) is empty"),
    ("assistant-first",
     b'{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},'
     b' {"role": "assistant", "content": "c"}]}',
     "roles out of order: turn 0 is 'assistant' first"),
    ("two-users-in-a-row",
     b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},'
     b' {"role": "assistant", "content": "c"}]}',
     "roles out of order: turn 1 is 'user' after 'user'"),
    ("unknown-role",
     b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     "turn 1 has unknown role 'bot' (known: user, assistant, system, tool, function_call)"),
    ("ends-with-user",
     b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},'
     b' {"role": "user", "content": "c"}]}',
     "the dialogue must end with an assistant reply"),
    ("turns-not-a-list", b'{"messages": "hello"}', "field 'messages' must be a non-empty list of turns"),
    ("unknown-format", b'{"prompt": "x"}', "cannot tell the format from the keys (prompt); set formatting and columns"),
]


@pytest.mark.parametrize(("line", "problem"), [case[1:] for case in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_record_raises_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD_ALPACA + b"\n" + GOOD_OPENAI + b"\n" + line + b"\n")
    error = data_error_behind(lambda: load([DatasetSpec(path=str(path))], tmp_path, on_error="raise"))
    assert (error.source, error.where, error.problem) == (str(path), "line 3", problem)
    assert str(error) == f"{path}:line 3: {problem}"


def test_skip_loads_good_records_and_counts_every_bad_one(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD_ALPACA]
    for _, bad, _ in BAD_LINES:
        lines += [bad, b""]  # blank lines are not records and must not be counted
    lines.append(GOOD_OPENAI)
    path.write_bytes(b"\n".join(lines) + b"\n")
    total = sum(1 for line in lines if line.strip())

    dataset, errors = load([DatasetSpec(path=str(path))], tmp_path, on_error="skip")
    last_line = len(lines)
    assert dataset["source"] == [f"{path}:line 1", f"{path}:line {last_line}"]
    assert errors.skipped == {str(path): len(BAD_LINES)}
    assert len(dataset) + errors.total_skipped == total
    assert errors.summary()["skipped_records"] == len(BAD_LINES)
    # Each bad record is reported with its own line: bad case k sits on line 2 + 2k.
    assert errors.examples == [f"{path}:line {2 + 2 * k}: {problem}" for k, (_, _, problem) in enumerate(BAD_LINES)]


def test_skip_counts_per_file_across_a_directory(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(GOOD_ALPACA + b"\n" + b'{"instruction": "q"}\n' + GOOD_ALPACA + b"\n")
    (folder / "b.jsonl").write_bytes(b"[1]\n[2]\n" + GOOD_OPENAI + b"\n")
    dataset, errors = load([DatasetSpec(path=str(folder))], tmp_path, on_error="skip")
    assert len(dataset) == 3
    assert errors.skipped == {str(folder / "a.jsonl"): 1, str(folder / "b.jsonl"): 2}
    assert len(dataset) + errors.total_skipped == 6


def test_reader_raises_directly_under_raise(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD_ALPACA + b"\n\n" + INVALID_JSON + b"\n")
    with pytest.raises(DataError) as info:
        records(path)
    assert (info.value.source, info.value.where) == (str(path), "line 3")


def test_invalid_utf8_in_txt_skips_only_that_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good one\nbad \xff\xfe line\ngood two\n")
    raw, errors = records(path, on_error="skip")
    assert rows_and_wheres(raw) == [({"text": "good one"}, "line 1"), ({"text": "good two"}, "line 3")]
    assert errors.skipped == {str(path): 1}
    assert errors.examples == [f"{path}:line 2: invalid UTF-8 (invalid start byte at byte 4)"]
    with pytest.raises(DataError, match=r":line 2: invalid UTF-8"):
        records(path, on_error="raise")


def test_broken_json_file_is_fatal_even_under_skip(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n',
                    encoding="utf-8")
    with pytest.raises(DataError) as info:
        records(path, on_error="skip")
    assert info.value.where == "line 3"
    assert info.value.problem.startswith("invalid JSON (Expecting ',' delimiter")


def test_invalid_utf8_in_json_names_its_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "caf\xe9", "output": "a"}\n]\n')
    with pytest.raises(DataError) as info:
        records(path, on_error="skip")
    assert (info.value.where, info.value.problem) == ("line 3", "invalid UTF-8 (invalid continuation byte)")


def test_invalid_utf8_in_json_with_bom_names_its_line(tmp_path):
    path = tmp_path / "bom_latin1.json"
    path.write_bytes(BOM + b'{"text": [\n"ok",\n"\xe9t\xe9"\n]}\n')  # the bad byte opens line 3's string
    with pytest.raises(DataError) as info:
        records(path, on_error="skip")
    assert info.value.where == "line 3"


def test_json_non_object_element_is_skipped_by_index(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"text": "a"}, "stray string", {"text": "b"}]', encoding="utf-8")
    raw, errors = records(path, on_error="skip")
    assert rows_and_wheres(raw) == [({"text": "a"}, "record 0"), ({"text": "b"}, "record 2")]
    assert errors.examples == [f"{path}:record 1: expected an object, got str"]


@pytest.mark.parametrize(("content", "problem"), [
    ('{"instruction": ["a", "b"], "output": ["x"]}', "an object must map every column to a list of equal length"),
    ('{"instruction": "a", "output": "x"}', "an object must map every column to a list of equal length"),
    ("42", "expected a list of records or an object of lists, got int"),
])
def test_json_top_level_shape_errors(tmp_path, content, problem):
    path = tmp_path / "shape.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        records(path, on_error="skip")
    assert (info.value.where, info.value.problem) == ("top level", problem)


def test_csv_row_with_extra_fields_names_its_line(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("instruction,output\nq1,a1\nq2,a2,surplus\nq3,a3\n", encoding="utf-8")
    raw, errors = records(path, on_error="skip")
    assert rows_and_wheres(raw) == [({"instruction": "q1", "output": "a1"}, "line 2"),
                                    ({"instruction": "q3", "output": "a3"}, "line 4")]
    assert errors.examples == [f"{path}:line 3: more fields than the header has"]


def test_csv_multiline_quoted_field_is_one_record(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('instruction,output\n"two\nlines",ok\nlast,one\n', encoding="utf-8")
    raw, _ = records(path)
    assert [r.row for r in raw] == [{"instruction": "two\nlines", "output": "ok"},
                                    {"instruction": "last", "output": "one"}]
    assert raw[1].where == "line 4"


def test_csv_line_numbers_survive_a_skipped_invalid_utf8_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"instruction,output\nq1,a1\ncaf\xe9,a2\nq3,a3\n")
    raw, errors = records(path, on_error="skip")
    assert errors.examples == [f"{path}:line 3: invalid UTF-8 (invalid continuation byte at byte 3)"]
    assert rows_and_wheres(raw) == [({"instruction": "q1", "output": "a1"}, "line 2"),
                                    ({"instruction": "q3", "output": "a3"}, "line 4")]


def test_load_examples_raises_data_error_itself(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD_ALPACA + b"\n" + GOOD_OPENAI + b"\n" + INVALID_JSON + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:line 3: invalid JSON"):
        load([DatasetSpec(path=str(path))], tmp_path, on_error="raise")


@pytest.mark.parametrize("content", [b"", b'{"instruction": "q", "output": 5}\n'], ids=["empty", "all-bad"])
def test_file_without_usable_records_is_a_data_error(tmp_path, content):
    path = tmp_path / "nothing.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="no usable records"):
        load([DatasetSpec(path=str(path))], tmp_path, on_error="skip")


def test_streaming_raise_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD_ALPACA + b"\n" + b'{"instruction": "q"}\n')
    dataset, _ = load([DatasetSpec(path=str(path))], tmp_path, streaming=True)
    error = data_error_behind(lambda: list(dataset))
    assert str(error) == f"{path}:line 2: missing field 'output'"
