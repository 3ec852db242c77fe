"""Issue 24: under data.on_error: raise the error names a file's FIRST bad line in file order, also when the
record is found bad only at tokenization (after the held-out split shuffled the records)."""

from __future__ import annotations

import json

import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_splits, tokenize_preference, tokenize_sft
from lmforge.data.errors import DataError, ErrorLog

BAD = (3, 391)
LONG = "the model learns from data " * 40


def write(path, n: int, good, bad) -> str:
    lines = [json.dumps(bad(i) if i in BAD else good(i), ensure_ascii=False) for i in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run(path, tmp_path, tokenize, split, kind="sft"):
    eval_split, seed = split
    cfg = DataConfig(train=[DatasetSpec(path=path)], eval_split=eval_split, seed=seed, on_error="raise",
                     max_length=32)
    errors = ErrorLog(cfg.on_error, cfg.max_bad_fraction)
    train, evaluation, _ = load_splits(cfg, errors, str(tmp_path / "cache"), kind=kind)
    with pytest.raises(DataError) as caught:
        tokenize(train, errors)
        if evaluation is not None:
            tokenize(evaluation, errors)
    return str(caught.value)


# (eval_split, seed): no split; both lines in train with 391 shuffled first; line 3 held out, 391 in train.
SPLITS = [(0.0, 42), (0.05, 1), (0.5, 0)]


@pytest.mark.parametrize("split", SPLITS)
def test_a_too_long_preference_prompt_names_line_3_not_391(tok, tmp_path, split):
    path = write(tmp_path / "pairs.jsonl", 400, lambda i: {"prompt": f"hello {i}", "chosen": "yes", "rejected": "no"},
                 lambda i: {"prompt": LONG, "chosen": "yes", "rejected": "no"})
    message = run(path, tmp_path, lambda rows, errors: tokenize_preference(rows, tok, DataConfig(max_length=32),
                                                                           errors, "pair"), split, "pair")
    assert message.startswith(f"{path}:line 3: the prompt has "), message
    assert "\n" not in message


@pytest.mark.parametrize("split", SPLITS)
def test_an_sft_record_the_template_refuses_names_line_3(tok, tmp_path, split):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'system' %}" \
                        "{{ raise_exception('no system role') }}{% endif %}{% endfor %}"
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write(tmp_path / "sft.jsonl", 400, lambda i: {"messages": talk},
                 lambda i: {"messages": [{"role": "system", "content": "be brief"}, *talk]})
    config = DataConfig(max_length=64, on_error="raise")
    message = run(path, tmp_path, lambda rows, errors: tokenize_sft(rows, tok, config, errors, pack=False), split)
    assert message.startswith(f"{path}:line 3: the chat template refused this conversation"), message
