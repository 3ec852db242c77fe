"""Issue 24: tokenizing a large file shows how far it is. The tokenizer is told after each slice of records
how many it did, and the rows are exactly those of one pass over the whole table, under both error modes,
also when a whole slice is refused."""

from __future__ import annotations

import json

import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data import build
from lmforge.data.build import load_splits, tokenize_preference, tokenize_sft
from lmforge.data.errors import ErrorLog

N = 4500


def sft_file(path, refused=range(0)) -> str:
    """N dialogues; those in `refused` open with a system turn, which NO_SYSTEM refuses at tokenization."""
    lines = []
    for i in range(1, N + 1):
        system = [{"role": "system", "content": "be brief"}] if i in refused else []
        lines.append(json.dumps({"messages": [*system, {"role": "user", "content": f"question {i}"},
                                              {"role": "assistant", "content": f"reply {i}"}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def loaded(path, tmp_path, on_error="skip"):
    cfg = DataConfig(train=[DatasetSpec(path=path)], eval_split=0.0, on_error=on_error, max_length=64,
                     max_bad_fraction=0.9)
    errors = ErrorLog(cfg.on_error, cfg.max_bad_fraction)
    train, _, _ = load_splits(cfg, errors, str(tmp_path / "cache"))
    return cfg, errors, train


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_progress_counts_every_record_and_changes_no_row(tok, tmp_path, on_error):
    cfg, errors, train = loaded(sft_file(tmp_path / "sft.jsonl"), tmp_path, on_error)
    told: list[int] = []
    counted = tokenize_sft(train, tok, cfg, errors, False, told.append)
    whole = tokenize_sft(train, tok, cfg, ErrorLog(on_error, 0.9), False)
    assert told == [build.PROGRESS_ROWS, build.PROGRESS_ROWS, N - 2 * build.PROGRESS_ROWS]
    assert len(counted) == len(whole) == N
    assert counted["input_ids"] == whole["input_ids"] and counted["labels"] == whole["labels"]


NO_SYSTEM = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'system' %}" \
            "{{ raise_exception('no system role') }}{% endif %}{% endfor %}"


def test_a_slice_whose_every_record_is_refused_joins_the_others(tok, tmp_path):
    tok.chat_template = NO_SYSTEM
    refused = range(build.PROGRESS_ROWS + 1, 2 * build.PROGRESS_ROWS + 1)  # the whole second slice
    cfg, errors, train = loaded(sft_file(tmp_path / "sft.jsonl", refused), tmp_path)
    told: list[int] = []
    out = tokenize_sft(train, tok, cfg, errors, False, told.append)
    assert sum(told) == N and len(out) == N - build.PROGRESS_ROWS
    assert out.column_names == ["input_ids", "labels"]


def test_preference_pairs_are_counted_too(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q {i}", "chosen": "yes", "rejected": "no"})
                              for i in range(2500)) + "\n", encoding="utf-8")
    cfg = DataConfig(train=[DatasetSpec(path=str(path))], eval_split=0.0, max_length=32)
    errors = ErrorLog(cfg.on_error, cfg.max_bad_fraction)
    pairs, _, _ = load_splits(cfg, errors, str(tmp_path / "cache"), kind="pair")
    told: list[int] = []
    out = tokenize_preference(pairs, tok, cfg, errors, "pair", told.append)
    assert told == [build.PROGRESS_ROWS, 500] and len(out) == 2500


def test_a_stage_shows_its_tokenizing_bar_without_a_terminal(world_dir, world_tokenizer_dir, tmp_path, capsys,
                                                             monkeypatch):
    """Under a scheduler (no terminal) the SFT stage prints where tokenizing is: its records counted, train and
    held-out together (the bar is quiet for tasks under QUIET_S; here the threshold is 0)."""
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS, common

    monkeypatch.setattr(common, "QUIET_S", 0.0)
    cfg = load_config(None, [
        "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}", f"data.train={world_dir}/sft/train.jsonl",
        f"data.eval={world_dir}/sft/eval.jsonl", "data.max_length=64", "train.batch_size=8", "train.max_steps=1",
        "sft.eval_generate=0", f"train.output_dir={tmp_path}"], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    records = sum(1 for _ in open(f"{world_dir}/sft/train.jsonl", encoding="utf-8")) + \
        sum(1 for _ in open(f"{world_dir}/sft/eval.jsonl", encoding="utf-8"))
    assert f"Tokenizing: {records}/{records} done in" in capsys.readouterr().out
