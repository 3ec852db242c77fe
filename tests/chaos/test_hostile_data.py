"""Hostile data, second round (issue 19 points 3-5, issue 24's long preference prompts): dialogues built
to break truncation (role names and template markers as content, placeholder-like characters, a
thousand turns, max_length 1), line ends of every kind, files with no good record, preference
prompts with no room, and the data cache of failed and killed runs.

Every case must end in a sample whose reply keeps the assistant header before it and its end-of-turn
token after it, with each cut counted by kind, or in one DataError line naming the file and line:
never another exception (a traceback) and never a silent cut."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import CACHE_PREFIX, data_cache_dir, load_examples, tokenize_preference, tokenize_sft
from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.tokenize import IGNORE, encode_sft

FIGURES: Counter = Counter()
LONG = " ".join(["the model learns from data"] * 40)
HEADER = "<|im_end|>\n<|im_start|>assistant\n"


def turn(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


DIALOGUES = {
    "role-names-as-content": [{"role": "system", "content": "system"}, *turn("user " * 60, "assistant")],
    "template-markers-in-text": turn("<|im_end|>\n<|im_start|>assistant\n" * 20 + LONG, "fine " * 30),
    "placeholder-characters": turn("\ue0000\ue001 \ue0001\ue001 " * 30, "\ue0002\ue001 ok"),
    "huge-system-prompt": [{"role": "system", "content": LONG}, *turn("hi", "hello there")],
    "long-reply": turn("hi", LONG),
    "long-both": turn(LONG, LONG),
    "whitespace-padded": turn("   " + LONG + "   \n", "  hello  "),
    "many-turns": [m for i in range(40) for m in turn(f"q{i}", f"a{i}")],
    "chinese": turn("我们今天学习模型训练数据" * 40, "好的" * 40),
}


def check_sample(tok, name: str, messages: list[dict], max_length: int, mask_history: bool) -> None:
    """One hostile dialogue: either dropped and counted, or within max_length with the header right
    before each loss span and the end-of-turn token ending it, and any shortening counted."""
    FIGURES["cases_tried"] += 1
    cuts: Counter = Counter()
    try:
        encoded = encode_sft(tok, messages, max_length, mask_history=mask_history, cuts=cuts)
        full = encode_sft(tok, messages, 10**9, mask_history=mask_history)
    except Exception as exc:  # noqa: BLE001 - counted as a traceback, the figure that must stay 0
        FIGURES["tracebacks"] += 1
        raise AssertionError(f"{name}: {exc!r}") from exc
    if encoded is None:
        assert cuts == {"dropped_no_room": 1}, (name, cuts)
        FIGURES["handled_cleanly"] += 1
        return
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) <= max_length, name
    header = tok.encode(HEADER, add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    assert spans, name
    for begin, stop in spans:
        assert ids[begin - len(header):begin] == header, f"{name}: the header is not right before the reply"
        assert ids[stop - 1] == end, f"{name}: the reply lost its end-of-turn token"
    if len(ids) < len(full["input_ids"]) - 1:  # more than the template's closing newline went
        if not cuts:
            FIGURES["silent"] += 1
        assert cuts, f"{name}: cut from {len(full['input_ids'])} to {len(ids)} tokens without a count"
    FIGURES["handled_cleanly"] += 1


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_hostile_dialogues_keep_their_structure_or_are_dropped_and_counted(tok, name):
    for max_length in (1, 8, 24, 40, 64, 200):
        for mask_history in (False, True):
            check_sample(tok, name, DIALOGUES[name], max_length, mask_history)


def test_a_file_of_hostile_dialogues_counts_each_cut_once_per_record(tok, tmp_path):
    path = tmp_path / "hostile.jsonl"
    # Old Mac line ends: one record per \r, not one record for the file.
    path.write_bytes(b"\r".join(json.dumps({"messages": m}).encode() for m in DIALOGUES.values()) + b"\r")
    cfg = DataConfig(max_length=40, streaming=True)
    errors = ErrorLog("raise")
    examples, _ = load_examples([DatasetSpec(path=str(path))], cfg, errors, tempfile.mkdtemp(dir=tmp_path))
    tokens = tokenize_sft(examples, tok, cfg, errors, pack=False)
    counts = [len(list(tokens)) for _ in range(3)]
    summary = errors.summary()
    expected = Counter()
    for messages in DIALOGUES.values():
        encode_sft(tok, messages, 40, cuts=expected)
    assert counts == [len(DIALOGUES) - expected["dropped_no_room"]] * 3
    assert summary["truncation"] == {k: expected[k] for k in summary["truncation"]}
    assert summary["records_read"] == len(DIALOGUES)
    assert summary["loaded_records"] == len(DIALOGUES) - expected["dropped_no_room"]
    FIGURES["cases_tried"] += 1
    FIGURES["handled_cleanly"] += 1


def test_preference_prompt_with_no_room_is_counted_or_one_line(tok, tmp_path):
    import datasets

    row = {"prompt": [{"role": "user", "content": LONG}], "chosen": "yes", "rejected": "no",
           "source": f"{tmp_path}/p.jsonl:line 3"}
    for on_error in ("skip", "raise"):
        FIGURES["cases_tried"] += 1
        errors = ErrorLog(on_error)
        try:
            out = tokenize_preference(datasets.Dataset.from_list([row]), tok, DataConfig(max_length=16), errors,
                                      "pair")
            assert on_error == "skip" and len(out) == 0 and errors.summary()["dropped_too_long"] == 1
        except DataError as exc:
            assert on_error == "raise" and str(exc).startswith(f"{tmp_path}/p.jsonl:line 3: the prompt has")
        FIGURES["handled_cleanly"] += 1


def test_a_killed_runs_data_cache_is_removed_by_the_next_start(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from lmforge.data.build import data_cache_dir; "
            f"print(data_cache_dir({str(out)!r}), flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    stale = Path(child.stdout.readline().strip())
    assert stale.is_dir() and stale.name.startswith(f"{CACHE_PREFIX}{child.pid}-")
    alive = data_cache_dir(str(out))  # the owner still runs: its folder stays
    assert stale.is_dir()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    foreign = out / f"{CACHE_PREFIX}someone-else"  # no owner record: not ours to judge
    foreign.mkdir()
    mine = data_cache_dir(str(out))
    assert not stale.exists() and Path(alive).is_dir() and Path(mine).is_dir() and foreign.is_dir()
    FIGURES["cases_tried"] += 1
    FIGURES["handled_cleanly"] += 1


def test_a_failed_stage_leaves_no_data_cache_and_quotes_the_first_bad_record(chat_tokenizer_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"instruction": "q"}\n[1]\n')
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "train", "sft", "model.scratch=test",
         f"model.tokenizer={chat_tokenizer_dir}", f"data.train={data}", "data.on_error=skip",
         f"train.output_dir={out}", "log.report_to=[]", "log.progress=false"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in text, text[-2000:]
    assert f"{data}:line 1: missing field 'output'" in " ".join(text.split()), text[-2000:]
    assert out.is_dir() and not list(out.glob(f"{CACHE_PREFIX}*"))
    FIGURES["cases_tried"] += 1
    FIGURES["handled_cleanly"] += 1


def test_figures():
    print("hostile_data figures:", json.dumps(dict(sorted(FIGURES.items()))))
    assert FIGURES["tracebacks"] == 0 and FIGURES["silent"] == 0
    assert FIGURES["handled_cleanly"] == FIGURES["cases_tried"]
