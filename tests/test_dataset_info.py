"""LLaMA-Factory `dataset_info.json` entries read as LLaMA-Factory users have them (the shared demo data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_formats import assistant, load, user

from lmforge.config.schema import DatasetSpec
from lmforge.data.errors import DataError
from lmforge.data.registry import resolve_spec

LLAMAFACTORY = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory"
needs_llamafactory = pytest.mark.skipif(not (LLAMAFACTORY / "dataset_info.json").is_file(),
                                        reason=f"LLaMA-Factory demo data not found at {LLAMAFACTORY}")


def llamafactory_records(file_name: str) -> list[dict]:
    path = LLAMAFACTORY / file_name
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".txt":
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lf-cache")


def load_named(name: str, cache: Path, **spec):
    dataset, errors = load([DatasetSpec(name=name, **spec)], cache, dataset_dir=str(LLAMAFACTORY))
    assert errors.total_skipped == 0
    return dataset


@needs_llamafactory
def test_alpaca_en_demo(lf_cache):
    raw = llamafactory_records("alpaca_en_demo.json")
    dataset = load_named("alpaca_en_demo", lf_cache)
    assert len(dataset) == len(raw) == 999
    assert dataset[0]["messages"] == [user("Describe a process of making crepes."), assistant(raw[0]["output"])]
    assert dataset[0]["messages"][1]["content"].startswith("Making crepes is an easy and delicious process!")
    assert dataset[0]["source"] == f"{LLAMAFACTORY / 'alpaca_en_demo.json'}:record 0"
    # Record 5 is the first with an input: it joins the instruction with a newline.
    assert dataset[5]["messages"][0] == user(
        "Given the parameters of a triangle, find out its perimeter.\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8")


@needs_llamafactory
def test_alpaca_zh_demo(lf_cache):
    raw = llamafactory_records("alpaca_zh_demo.json")
    dataset = load_named("alpaca_zh_demo", lf_cache)
    assert len(dataset) == len(raw) == 1000
    assert dataset[0]["messages"] == [user("识别并解释给定列表中的两个科学理论：细胞理论和日心说。"),
                                      assistant(raw[0]["output"])]
    assert dataset[0]["messages"][1]["content"].startswith("细胞理论是生物科学的一个理论")


@needs_llamafactory
def test_identity_with_replacements(lf_cache):
    raw = llamafactory_records("identity.json")
    dataset = load_named("identity", lf_cache, replacements={"{{name}}": "Forge", "{{author}}": "LMForge Team"})
    assert len(dataset) == len(raw) == 91
    assert dataset[0]["messages"] == [
        user("hi"), assistant("Hello! I am Forge, an AI assistant developed by LMForge Team. How can I assist you today?"),
    ]
    contents = [m["content"] for row in dataset["messages"] for m in row]
    assert not any("{{" in c for c in contents)

    def filled(text: str) -> str:
        return text.replace("{{name}}", "Forge").replace("{{author}}", "LMForge Team")

    assert dataset["messages"] == [[user(filled(r["instruction"])), assistant(filled(r["output"]))] for r in raw]
    assert sum("{{name}}" in r["output"] for r in raw) == 77  # the placeholders really were there


@needs_llamafactory
@pytest.mark.parametrize(("name", "file_name", "count"), [("c4_demo", "c4_demo.jsonl", 300),
                                                           ("wiki_demo", "wiki_demo.txt", 30)])
def test_raw_text_corpora_become_text_examples(lf_cache, name, file_name, count):
    _, fmt = resolve_spec(DatasetSpec(name=name), str(LLAMAFACTORY))
    assert (fmt.formatting, fmt.columns) == ("text", {"prompt": "text"})
    raw = llamafactory_records(file_name)
    dataset = load_named(name, lf_cache)
    assert len(dataset) == len(raw) == count
    assert dataset["text"][0] == raw[0]["text"]
    assert dataset["text"][-1] == raw[-1]["text"]
    assert all(messages == [] for messages in dataset["messages"])
    assert dataset[0]["source"] == f"{LLAMAFACTORY / file_name}:line 1"


@needs_llamafactory
def test_glaive_toolcall_keeps_tools_and_calls_for_the_template(lf_cache):
    raw = llamafactory_records("glaive_toolcall_en_demo.json")
    dataset = load_named("glaive_toolcall_en_demo", lf_cache)
    assert len(dataset) == len(raw) == 300
    first = dataset[0]
    turns = raw[0]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "function_call", "observation", "gpt",
                                          "human", "gpt"]
    assert json.loads(first["tools"]) == [{"type": "function", "function": f} for f in json.loads(raw[0]["tools"])]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant", "tool",
                                                      "assistant", "user", "assistant"]
    assert [m["content"] for m in first["messages"]] == [t["value"] for t in turns]
    call = json.loads(first["chat"])[3]
    assert json.loads(call["tool_calls"])[0]["function"] == json.loads(turns[3]["value"])


@needs_llamafactory
def test_hub_only_entry_says_local_files_only(lf_cache):
    with pytest.raises(DataError) as info:
        load_named("alpaca_en", lf_cache)
    assert info.value.source == str(LLAMAFACTORY / "dataset_info.json")
    assert info.value.where == "entry 'alpaca_en'"
    assert info.value.problem == ("points to llamafactory/alpaca_en; lmforge reads local files only "
                                  "(download it and set file_name)")


@needs_llamafactory
def test_unknown_name_is_an_error(lf_cache):
    with pytest.raises(DataError, match=r"entry 'no_such_dataset'.*no such dataset"):
        load_named("no_such_dataset", lf_cache)


def test_missing_or_bad_dataset_info(tmp_path):
    with pytest.raises(DataError, match="dataset_info.json not found"):
        resolve_spec(DatasetSpec(name="x"), str(tmp_path))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"odd": {"file_name": "a.json", "colums": {}}, "weird": {"file_name": "a.json",
                                                                          "formatting": "xml"}}),
        encoding="utf-8")
    with pytest.raises(DataError, match=r"entry 'odd'.*unknown keys \['colums'\]"):
        resolve_spec(DatasetSpec(name="odd"), str(tmp_path))
    with pytest.raises(DataError, match=r"entry 'weird'.*unknown formatting 'xml'"):
        resolve_spec(DatasetSpec(name="weird"), str(tmp_path))


def test_registry_columns_tags_and_spec_overrides(tmp_path):
    info = {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                     "tags": {"role_tag": "who", "content_tag": "said", "user_tag": "me", "assistant_tag": "bot"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"dialog": [{"who": "me", "said": "ping"}, {"who": "bot", "said": "pong {{x}}"}]}) + "\n",
        encoding="utf-8")
    path, fmt = resolve_spec(DatasetSpec(name="chat", replacements={"{{x}}": "!"}), str(tmp_path))
    assert path == str(tmp_path / "chat.jsonl")
    assert fmt.formatting == "sharegpt" and fmt.columns == {"messages": "dialog"}
    assert fmt.tags["user_tag"] == "me" and fmt.replacements == {"{{x}}": "!"}
    dataset, _ = load([DatasetSpec(name="chat", replacements={"{{x}}": "!"})], tmp_path, dataset_dir=str(tmp_path))
    assert dataset["messages"] == [[user("ping"), assistant("pong !")]]
