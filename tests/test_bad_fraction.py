"""data.on_error's default skips and counts bad records, up to data.max_bad_fraction of a file; past that the
run stops with one line naming the file and its first bad lines (the lowest, though records are shuffled)."""

from __future__ import annotations

import json

import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_splits
from lmforge.data.errors import DataError, ErrorLog

GOOD = {"instruction": "Add 2 and 3.", "output": "5"}


def write(path, n: int, bad: set[int]) -> str:
    """n alpaca records; the 1-based lines in `bad` are invalid JSON."""
    lines = ['{"instruction": "x", "output": }' if i in bad else json.dumps(GOOD) for i in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def load(path: str, tmp_path, **data):
    cfg = DataConfig(train=[DatasetSpec(path=path)], eval_split=0.1, **data)
    errors = ErrorLog(cfg.on_error, cfg.max_bad_fraction)
    train, evaluation, _ = load_splits(cfg, errors, str(tmp_path / "cache"))
    return len(train) + len(evaluation), errors


def test_default_skips_and_counts_a_few_bad_records():
    cfg = DataConfig()
    assert (cfg.on_error, cfg.max_bad_fraction) == ("skip", 0.05)


def test_few_bad_records_are_skipped_and_counted(tmp_path):
    path = write(tmp_path / "a.jsonl", 100, {3, 50, 97})  # 3% bad: under the default 5%
    kept, errors = load(path, tmp_path)
    assert kept == 97
    assert errors.by_file()[path] == {"read": 100, "kept": 97, "skipped": 3,
                                      "skipped_by_reason": {"invalid JSON": 3}}


def test_too_many_bad_records_stop_naming_the_file_and_the_first_bad_lines(tmp_path):
    bad = {91, 3, 40, 17, 77, 60}  # 6% bad; the records are shuffled, the error still quotes the lowest lines
    path = write(tmp_path / "a.jsonl", 100, bad)
    with pytest.raises(DataError) as caught:
        load(path, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:file: 6 of 100 records are bad (6%, more than data.max_bad_fraction=0.05)")
    assert "the first: line 3: invalid JSON" in message and "; line 17: " in message and "; line 40: " in message
    assert "line 60" not in message and "line 91" not in message
    assert message.endswith("fix them or raise data.max_bad_fraction")


def test_the_fraction_is_a_setting(tmp_path):
    path = write(tmp_path / "a.jsonl", 100, set(range(1, 31)))
    kept, errors = load(path, tmp_path, max_bad_fraction=0.5)
    assert kept == 70 and errors.total_skipped == 30
    with pytest.raises(DataError, match="30 of 100 records are bad"):
        load(path, tmp_path, max_bad_fraction=0.25)


def test_raise_still_stops_at_the_first_bad_record(tmp_path):
    path = write(tmp_path / "a.jsonl", 100, {50})
    with pytest.raises(DataError, match=r"a\.jsonl:line 50: invalid JSON"):
        load(path, tmp_path, on_error="raise")
