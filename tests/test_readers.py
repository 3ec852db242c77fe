"""Data readers: each file type, directories, globs, BOM and CRLF (`lmforge.data.readers`); every
record is named by its file and line or record index. Bad records: tests/test_bad_records.py."""

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


def test_cr_only_line_endings_split_records_like_any_editor(tmp_path):
    # Old Mac files end lines with a lone \r: three records on lines 1, 2 and 4, not one record.
    jsonl = tmp_path / "mac.jsonl"
    jsonl.write_bytes(b'{"instruction": "q1", "output": "a1"}\r{"instruction": "q2", "output": "a2"}\r\r'
                      b'{"instruction": "q3", "output": "a3"}\r')
    raw, errors = records(jsonl, on_error="skip")
    assert rows_and_wheres(raw) == [({"instruction": "q1", "output": "a1"}, "line 1"),
                                    ({"instruction": "q2", "output": "a2"}, "line 2"),
                                    ({"instruction": "q3", "output": "a3"}, "line 4")]
    assert errors.total_skipped == 0

    txt = tmp_path / "mac.txt"
    txt.write_bytes(b"one\rtwo\r\rthree\r\nfour\nfive")  # mixed endings too: each one ends a line
    raw, _ = records(txt)
    assert rows_and_wheres(raw) == [({"text": "one"}, "line 1"), ({"text": "two"}, "line 2"),
                                    ({"text": "three"}, "line 4"), ({"text": "four"}, "line 5"),
                                    ({"text": "five"}, "line 6")]
    raw, _ = records(txt, text_split="blank")
    assert rows_and_wheres(raw) == [({"text": "one\ntwo"}, "line 1"), ({"text": "three\nfour\nfive"}, "line 4")]


def test_line_ends_split_across_read_chunks_count_once():
    import io

    from lmforge.data.readers import _physical_lines

    data = b"a\rb\r\nc\n\nd" + b"x" * 10 + b"\r\n"
    for size in (1, 2, 3, 5, 100):
        assert list(_physical_lines(io.BytesIO(data), size)) == [b"a", b"b", b"c", b"", b"d" + b"x" * 10]


# --------------------------------------------------------------------------- text_split: file

HARD_WRAPPED = "\n".join(["第一段第一行，", "第一段第二行。", "", "Second paragraph, line one,", "line two.", "", "",
                          "Third paragraph."]) + "\n"


@pytest.mark.parametrize("split, documents", [("line", 5), ("blank", 3), ("file", 1)])
def test_text_split_document_counts_on_hard_wrapped_text(tmp_path, split, documents):
    for i in range(3):
        (tmp_path / f"book{i}.txt").write_text(HARD_WRAPPED, encoding="utf-8")
    dataset, errors = load([DatasetSpec(path=str(tmp_path / "*.txt"))], tmp_path, text_split=split)
    assert len(dataset) == 3 * documents and errors.total_loaded == 3 * documents
    if split == "file":
        assert dataset["text"][0] == HARD_WRAPPED.rstrip("\n")
        assert dataset["source"] == [f"{tmp_path / f'book{i}.txt'}:line 1" for i in range(3)]


def test_a_whole_file_document_with_a_bad_line_is_one_bad_record(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xef\xbb\xbfgood start\r\nbroken \xff line\r\nend\r\n")
    good = tmp_path / "good.txt"
    good.write_bytes(b"\xef\xbb\xbfalpha\r\n\r\nbeta\r\n")
    raw, errors = records(bad, on_error="skip", text_split="file")
    assert raw == [] and errors.examples == [f"{bad}:line 2: invalid UTF-8 (invalid start byte at byte 7)"]
    assert errors.total_skipped == 1
    raw, _ = records(good, text_split="file")
    assert rows_and_wheres(raw) == [({"text": "alpha\n\nbeta"}, "line 1")]  # BOM and CRLF gone
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\n \n")
    assert records(empty, text_split="file")[0] == []
