"""Whole inputs that lmforge must refuse as one, naming the file (or folder, or dataset_info.json entry) and
the place: empty and truncated files, files in another encoding, damaged Parquet, folders without data,
and dataset_info.json entries with bad columns, tags, types or keys. Used by test_fuzz_data.py."""

from __future__ import annotations

import json

GOOD = b'{"instruction": "Say hi.", "output": "Hi."}\n'
INFO_DATA = {"d.jsonl": GOOD}


def _info(entry) -> dict:
    return {"dataset_info.json": json.dumps({"x": entry}).encode(), **INFO_DATA}


def _parquet_bytes(rows: list[dict], schema=None) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def file_cases() -> list[tuple]:
    """Whole inputs that fail as one: (id, kind, files, spec path or `name:x`, source it must name, where,
    problem, and for on_error=skip a different (where, problem) or None)."""
    import pyarrow as pa

    good_json = json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)], indent=1).encode()
    good_parquet = _parquet_bytes([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 50)
    deep = b"[" * 100_000 + b"]" * 100_000
    no_rows = _parquet_bytes([], pa.schema([("instruction", pa.string()), ("output", pa.string())]))
    return [
        ("empty-jsonl", "sft", {"d.jsonl": b""}, "d.jsonl", "d.jsonl", "file", "no usable records", None),
        ("empty-csv", "pair", {"d.csv": b""}, "d.csv", "d.csv", "file", "no usable records", None),
        ("header-only-csv", "sft", {"d.csv": b"instruction,output\r\n"}, "d.csv", "d.csv", "file", "no usable", None),
        ("empty-txt", "pt", {"d.txt": b""}, "d.txt", "d.txt", "file", "no usable records", None),
        ("whitespace-txt", "pt", {"d.txt": b"  \n\t\r\n\n"}, "d.txt", "d.txt", "file", "no usable records", None),
        ("empty-json", "kto", {"d.json": b""}, "d.json", "d.json", "line 1", "invalid JSON", None),
        ("empty-json-list", "prompt", {"d.json": b"[]"}, "d.json", "d.json", "file", "no usable records", None),
        ("truncated-json", "sft", {"d.json": good_json[:-40]}, "d.json", "d.json", r"line \d+", "invalid JSON", None),
        ("deep-json", "sft", {"d.json": deep}, "d.json", "d.json", "line 1", "nested too deeply", None),
        ("overlong-int-json", "pair", {"d.json": b"[" + b"7" * 9000 + b"]"}, "d.json", "d.json", "line 1",
         "Exceeds the limit", None),
        ("json-number", "sft", {"d.json": b"42"}, "d.json", "d.json", "top level", "expected a list", None),
        ("json-ragged-columns", "sft", {"d.json": b'{"instruction": ["a"], "output": []}'}, "d.json", "d.json",
         "top level", "equal length", None),
        ("utf16-json", "sft", {"d.json": good_json.decode().encode("utf-16")}, "d.json", "d.json", "line 1",
         "invalid UTF-8", None),
        ("utf16-jsonl", "sft", {"d.jsonl": (GOOD * 3).decode().encode("utf-16")}, "d.jsonl", "d.jsonl", "line 1",
         "invalid UTF-8", ("file", "no usable records")),
        ("all-bad-jsonl", "kto", {"d.jsonl": b"[1]\n{}\n"}, "d.jsonl", "d.jsonl", "line 1",
         "expected a JSON object", ("file", "no usable records")),
        ("zero-byte-parquet", "sft", {"d.parquet": b""}, "d.parquet", "d.parquet", "file", "not a readable Parquet",
         None),
        ("cut-parquet", "pair", {"d.parquet": good_parquet[: len(good_parquet) // 2]}, "d.parquet", "d.parquet",
         "file", "not a readable Parquet", None),
        ("zero-row-parquet", "sft", {"d.parquet": no_rows}, "d.parquet", "d.parquet", "file", "no usable", None),
        ("empty-folder", "sft", {"dir/": None}, "dir", "dir", "directory", "no data files", None),
        ("folder-without-data", "pt", {"dir/notes.md": b"x", "dir/.cache/a.jsonl": GOOD}, "dir", "dir", "directory",
         "no data files", None),
        ("glob-without-match", "sft", {}, "nothing*.jsonl", "nothing*.jsonl", "path", "no such file", None),
        ("unsupported-extension", "sft", {"d.xml": b"<a/>"}, "d.xml", "d.xml", "file", "unsupported extension", None),
        ("info-invalid-json", "sft", {"dataset_info.json": b'{"x": {'}, "name:x", "dataset_info.json", "line 1",
         "invalid JSON", None),
        ("info-invalid-utf8", "sft", {"dataset_info.json": b'{"x": {"file_name": "caf\xe9"}}'}, "name:x",
         "dataset_info.json", "line 1", "invalid UTF-8", None),
        ("info-deep", "sft", {"dataset_info.json": deep}, "name:x", "dataset_info.json", "line 1", "nested", None),
        ("info-a-list", "sft", {"dataset_info.json": b"[]"}, "name:x", "dataset_info.json", "top level",
         "expected an object", None),
        ("info-missing", "sft", INFO_DATA, "name:x", "dataset_info.json", "file", "not found", None),
        ("info-no-entry", "sft", {"dataset_info.json": b'{"y": {"file_name": "d.jsonl"}}', **INFO_DATA}, "name:x",
         "dataset_info.json", "entry 'x'", "no such dataset", None),
        ("info-entry-a-string", "sft", _info("d.jsonl"), "name:x", "dataset_info.json", "entry 'x'",
         "must be an object", None),
        ("info-hub-only", "sft", _info({"hf_hub_url": "org/set"}), "name:x", "dataset_info.json", "entry 'x'",
         "org/set; lmforge reads local files only", None),
        ("info-file-name-number", "sft", _info({"file_name": 5}), "name:x", "dataset_info.json", "entry 'x'",
         "file_name must be", None),
        ("info-columns-a-list", "sft", _info({"file_name": "d.jsonl", "columns": ["prompt"]}), "name:x",
         "dataset_info.json", "entry 'x'", "columns must be an object", None),
        ("info-column-a-list", "sft", _info({"file_name": "d.jsonl", "columns": {"prompt": ["a"]}}), "name:x",
         "dataset_info.json", "entry 'x'", "columns.prompt must be", None),
        ("info-tag-a-number", "sft", _info({"file_name": "d.jsonl", "tags": {"role_tag": 5}}), "name:x",
         "dataset_info.json", "entry 'x'", "tags.role_tag must be", None),
        ("info-num-samples-text", "sft", _info({"file_name": "d.jsonl", "num_samples": "10"}), "name:x",
         "dataset_info.json", "entry 'x'", "num_samples must be", None),
        ("info-num-samples-zero", "sft", _info({"file_name": "d.jsonl", "num_samples": 0}), "name:x",
         "dataset_info.json", "entry 'x'", "num_samples must be", None),
        ("info-formatting-xml", "sft", _info({"file_name": "d.jsonl", "formatting": "xml"}), "name:x",
         "dataset_info.json", "entry 'x'", "unknown formatting", None),
        ("info-formatting-number", "sft", _info({"file_name": "d.jsonl", "formatting": 5}), "name:x",
         "dataset_info.json", "entry 'x'", "formatting must be a string", None),
        ("info-misspelt-key", "sft", _info({"file_name": "d.jsonl", "colums": {}}), "name:x", "dataset_info.json",
         "entry 'x'", "unknown keys", None),
        ("info-hub-split", "sft", _info({"file_name": "d.jsonl", "split": "test"}), "name:x", "dataset_info.json",
         "entry 'x'", "only apply to hub", None),
        ("info-ranking-for-sft", "sft", _info({"file_name": "d.jsonl", "ranking": True}), "name:x",
         "dataset_info.json", "entry 'x'", "is preference data", None),
        ("info-plain-for-dpo", "pair", _info({"file_name": "d.jsonl"}), "name:x", "dataset_info.json", "entry 'x'",
         "is not preference data", None),
        ("info-file-absent", "sft", _info({"file_name": "absent.jsonl"}), "name:x", "absent.jsonl", "path",
         "no such file", None),
    ]
