"""Preference data: every pair form users bring, bad pairs named by file and line, and the encoding."""

from __future__ import annotations

import json
import tempfile

import pytest
from conftest import SHARED_DATA
from transformers import AutoTokenizer

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples, tokenize_preference
from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.formats import RowFormat
from lmforge.data.preference import collate_pairs, encode_pair, to_kto, to_pair
from lmforge.data.templates import apply_template_choice

USER = [{"role": "user", "content": "Where is Nobe?"}]


def pair(prompt=USER, chosen="North.", rejected="South."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.mark.parametrize("row", [
    {"prompt": "Where is Nobe?", "chosen": "North.", "rejected": "South."},  # TRL standard
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "North."}],  # TRL conversational
     "rejected": [{"role": "assistant", "content": "South."}]},
    {"chosen": [*USER, {"role": "assistant", "content": "North."}],  # TRL implicit prompt
     "rejected": [*USER, {"role": "assistant", "content": "South."}]},
    {"conversations": [{"from": "human", "value": "Where is Nobe?"}],  # LLaMA-Factory ranking, sharegpt
     "chosen": {"from": "gpt", "value": "North."}, "rejected": {"from": "gpt", "value": "South."}},
    {"instruction": "Where is Nobe?", "input": "", "chosen": "North.", "rejected": "South."},  # LF alpaca
    {"conversations": [{"from": "human", "value": "Where is Nobe?"}], "chosen": "North.",  # MedicalGPT
     "rejected": "South."},
    {"question": "Where is Nobe?", "response_chosen": "North.", "response_rejected": "South."},
])
def test_every_pair_form_becomes_one_normal_form(row):
    assert to_pair(row, RowFormat()) == pair()


def test_system_prompt_is_kept():
    row = {"system": "Be brief.", "prompt": "Where is Nobe?", "chosen": "North.", "rejected": "South."}
    assert to_pair(row, RowFormat())["prompt"] == [{"role": "system", "content": "Be brief."}, *USER]


@pytest.mark.parametrize(("row", "problem"), [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty response"),
    ({"prompt": "q", "chosen": "a"}, "needs chosen and rejected"),
    ({"chosen": [*USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "must share every turn"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "end with a user turn"),
])
def test_bad_pairs_name_the_problem(row, problem):
    with pytest.raises(ValueError, match=problem):
        to_pair(row, RowFormat())


def test_kto_forms():
    lf = {"messages": [*USER, {"role": "assistant", "content": "North."}], "label": True}
    trl = {"prompt": "Where is Nobe?", "completion": "South.", "label": False}
    assert to_kto(lf, RowFormat(columns={"kto_tag": "label"})) == {"prompt": USER, "completion": "North.",
                                                                    "label": True}
    assert to_kto(trl, RowFormat()) == {"prompt": USER, "completion": "South.", "label": False}
    with pytest.raises(ValueError, match="must be true or false"):
        to_kto({**trl, "label": "yes"}, RowFormat())


def load(specs, kind, **cfg):
    errors = ErrorLog(cfg.pop("on_error", "raise"))
    config = DataConfig(dataset_dir=str(SHARED_DATA), **cfg)
    with tempfile.TemporaryDirectory() as cache:
        dataset, _ = load_examples(specs, config, errors, cache, kind=kind)
        return list(dataset), errors


@pytest.mark.parametrize("name", ["dpo_en_demo", "dpo_zh_demo"])
def test_llamafactory_ranking_files(name):
    rows, errors = load([DatasetSpec(name=name)], "pair")
    raw = json.loads((SHARED_DATA / f"{name}.json").read_text(encoding="utf-8"))
    assert len(rows) == len(raw) and errors.total_skipped == 0
    first = raw[0]
    assert rows[0]["prompt"][-1]["content"] == first["conversations"][-1]["value"]
    assert rows[0]["chosen"] == first["chosen"]["value"]
    assert rows[0]["rejected"] == first["rejected"]["value"]


def test_llamafactory_kto_file():
    rows, _ = load([DatasetSpec(name="kto_en_demo")], "kto")
    raw = json.loads((SHARED_DATA / "kto_en_demo.json").read_text(encoding="utf-8"))
    assert len(rows) == len(raw)
    assert [r["label"] for r in rows] == [r["label"] for r in raw]
    assert rows[0]["completion"] == raw[0]["messages"][-1]["content"]


def test_sft_data_is_refused_as_pairs_and_pairs_as_sft():
    with pytest.raises(DataError, match="is not preference data"):
        load([DatasetSpec(name="alpaca_en_demo")], "pair")
    with pytest.raises(DataError, match="is preference data"):
        load([DatasetSpec(name="dpo_en_demo")], "sft")


def test_bad_pair_names_file_and_line_and_skip_counts(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path.write_text("\n".join([good, json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}), good]) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:line 2: chosen and rejected are identical"):
        load([DatasetSpec(path=str(path))], "pair")
    rows, errors = load([DatasetSpec(path=str(path))], "pair", on_error="skip")
    assert len(rows) == 2 and errors.total_skipped == 1


@pytest.fixture(scope="module")
def tok(world_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    apply_template_choice(tokenizer, "auto")
    return tokenizer


def test_encoding_puts_labels_on_responses_only(tok):
    encoded = encode_pair(tok, pair(), max_length=64)
    prompt_text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert encoded["prompt_ids"] == tok.encode(prompt_text, add_special_tokens=False)
    assert tok.decode(encoded["chosen_ids"]) == "North.<|im_end|>"
    assert tok.decode(encoded["rejected_ids"]) == "South.<|im_end|>"
    batch = collate_pairs([encoded, encoded], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    n_prompt = len(encoded["prompt_ids"])
    assert (batch["labels"][:, :n_prompt] == -100).all()
    assert batch["labels"][0, n_prompt:n_prompt + len(encoded["chosen_ids"])].tolist() == encoded["chosen_ids"]


def test_prompt_longer_than_limit_is_dropped_and_counted_under_skip_and_one_line_under_raise(tok):
    import datasets
    from rich.console import Console

    from lmforge.data.inspect import inspect_pairs

    long_prompt = pair(prompt=[{"role": "user", "content": "word " * 200}])
    rows = datasets.Dataset.from_list([{**long_prompt, "source": "f.jsonl:line 7"},
                                       {**pair(), "source": "f.jsonl:line 8"}])
    errors = ErrorLog("skip")
    errors.loaded["f.jsonl"] = 2
    out = tokenize_preference(rows, tok, DataConfig(max_length=32), errors, "pair")
    assert len(out) == 1 and errors.total_skipped == 0
    summary = errors.summary()
    assert (summary["dropped_too_long"], summary["loaded_records"], summary["records_read"]) == (1, 1, 2)
    assert summary["truncation"] == {"prompt_cut": 0, "reply_cut": 0, "turns_dropped": 0, "dropped_no_room": 1}
    with pytest.raises(DataError) as caught:
        tokenize_preference(rows, tok, DataConfig(max_length=32), ErrorLog("raise"), "pair")
    message = str(caught.value)
    assert message.startswith("f.jsonl:line 7: the prompt has ") and "max_length=32" in message
    assert "\n" not in message and "data.on_error: skip" in message
    console = Console(record=True, width=200)
    inspect_pairs(tok, [{**long_prompt, "source": "f.jsonl:line 7"}], 5, 32, console)  # no traceback
    assert "(dropped: the prompt has " in console.export_text()


def test_alpaca_history_becomes_earlier_turns():
    row = {"instruction": "And Tuvel?", "chosen": "West.", "rejected": "East.",
           "history": [["Where is Nobe?", "North."]]}
    assert to_pair(row, RowFormat())["prompt"] == [*USER, {"role": "assistant", "content": "North."},
                                                   {"role": "user", "content": "And Tuvel?"}]


def test_cut_responses_are_counted_and_pairs_equal_after_cutting_are_bad(tok):
    import datasets

    long_pair = pair(chosen="North " * 50, rejected="South " * 50)
    same_head = pair(chosen="North " * 50 + "and more", rejected="North " * 50 + "or less")
    rows = datasets.Dataset.from_list([{**long_pair, "source": "f:line 1"}, {**same_head, "source": "f:line 2"}])
    errors = ErrorLog("skip")
    out = tokenize_preference(rows, tok, DataConfig(max_length=32), errors, "pair")
    assert len(out) == 1 and errors.truncated == 1
    assert errors.examples == ["f:line 2: chosen and rejected are identical once cut to max_length=32"]
