"""Bad records: every malformed record names its file and line, `on_error=skip` counts it, and nothing
is dropped silently (`lmforge.data.readers` and `lmforge.data.build.load_examples`)."""

from __future__ import annotations

import pytest
from test_readers import BOM, load, records, rows_and_wheres

from lmforge.config.schema import DatasetSpec
from lmforge.data.errors import DataError


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


def test_a_streamed_dataset_counts_its_records_once_however_many_epochs(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([GOOD_ALPACA, BAD_LINES[0][1], GOOD_OPENAI]) + b"\n")
    dataset, errors = load([DatasetSpec(path=str(path))], tmp_path, on_error="skip", streaming=True)
    for _ in range(3):  # three epochs: the generator runs three times
        assert len(list(dataset)) == 2
    assert errors.summary()["records_read"] == 3
    assert (errors.total_loaded, errors.total_skipped) == (2, 1)


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
    dataset, _ = load([DatasetSpec(path=str(path))], tmp_path, streaming=True, on_error="raise")
    error = data_error_behind(lambda: list(dataset))
    assert str(error) == f"{path}:line 2: missing field 'output'"


def test_file_with_no_good_record_under_skip_quotes_the_first_bad_one(tmp_path):
    path = tmp_path / "all-bad.jsonl"
    path.write_bytes(b"\n" + INVALID_JSON + b"\n" + b'{"instruction": "q"}\n' + b"[1]\n")
    with pytest.raises(DataError) as caught:
        load([DatasetSpec(path=str(path))], tmp_path, on_error="skip")
    first = f"{path}:line 2: {BAD_LINES[0][2]}"
    assert str(caught.value) == f"{path}:file: no usable records: all 3 skipped as bad; the first, {first}"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b"", b'{"instruction": "q", "output": 5}\n'], ids=["empty", "all-bad"])
def test_a_streamed_file_without_usable_records_is_the_same_one_line_error(tmp_path, content):
    path = tmp_path / "nothing.jsonl"
    path.write_bytes(content)
    dataset, _ = load([DatasetSpec(path=str(path))], tmp_path, on_error="skip", streaming=True)
    error = data_error_behind(lambda: list(dataset))  # before: an empty stream, trained on silently
    assert str(error).startswith(f"{path}:file: no usable records")
    if content:
        assert str(error).endswith(f"the first, {path}:line 1: field 'output' must be a string, got int")
