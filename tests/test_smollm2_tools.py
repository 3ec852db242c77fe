"""The path of bench/smollm2_tools.py in seconds: tool-calling SFT on a glaive-style record (LLaMA-Factory's
sharegpt `function_call` / `observation` turns and `tools` column, named in a dataset_info.json), then the
trained model served by the real engine behind `lmforge serve`'s app and asked through the official openai
client with `tools`: the call comes back parsed, and the tool's result gets the trained answer. The tiny model
learns one conversation by heart, so greedy decoding must reproduce it; and the bench's own split and scoring."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"name": "get_weather", "description": "weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
RESULT = '{"sky": "sunny", "high": 21}'
GLAIVE = {"conversations": [{"from": "human", "value": "Weather in Paris for two days?"},
                            {"from": "function_call", "value": json.dumps(CALL)},
                            {"from": "observation", "value": RESULT},
                            {"from": "gpt", "value": "Sunny, with a high of 21."}],
          "tools": json.dumps(TOOLS)}
OPENAI_TOOLS = [{"type": "function", "function": tool} for tool in TOOLS]


def _bench():
    spec = importlib.util.spec_from_file_location("smollm2_tools", ROOT / "bench" / "smollm2_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    root = tmp_path_factory.mktemp("glaive")
    (root / "glaive.json").write_text(json.dumps([GLAIVE] * 4), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps({"glaive_toolcall_en_demo": {
        "file_name": "glaive.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}}))
    out = root / "sft"
    cfg = load_config(ROOT / "examples" / "sft_smollm2_tools.yaml",
                      [f"model.name_or_path={base}", "model.finetuning=full", f"data.dataset_dir={root}",
                       "data.train=[glaive_toolcall_en_demo]", "data.packing=false", "train.epochs=1",
                       "train.max_steps=200", "train.batch_size=1", "train.lr=1e-2", "train.warmup_ratio=0",
                       f"train.output_dir={out}", "log.progress=false", "log.report_to=[]"])
    STAGE_RUNNERS["sft"](cfg)
    return out


@pytest.fixture()
def client(trained):
    from lmforge.data.templates import end_of_turn_ids
    from lmforge.models.load import load_for_inference
    from lmforge.serve.app import create_app
    from lmforge.serve.batcher import Batcher

    model, tokenizer = load_for_inference(str(trained))
    batcher = Batcher(model, tokenizer, end_of_turn_ids(tokenizer), max_batch_size=4, queue_size=4).start()
    try:
        http = TestClient(create_app(model, tokenizer, "tiny", batcher, access_log=False))
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    finally:
        batcher.stop()


def test_a_glaive_trained_model_served_returns_parsed_tool_calls_to_the_openai_client(client):
    ask = [{"role": "user", "content": GLAIVE["conversations"][0]["value"]}]
    choice = client.chat.completions.create(model="tiny", messages=ask, tools=OPENAI_TOOLS, temperature=0,
                                            max_tokens=160).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice.message.content
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (CALL["name"], CALL["arguments"])
    history = [*ask, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=OPENAI_TOOLS, temperature=0,
                                            max_tokens=64).choices[0]
    assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == \
        ("Sunny, with a high of 21.", None, "stop")
    bench = _bench()  # the bench's scoring reads this reply as a right call with the record's arguments
    held = bench.request(GLAIVE, 0, 1)
    assert held["messages"] == ask and held["tools"] == OPENAI_TOOLS
    assert bench.score(held, choice.message) | {"content": None} == {
        "record": 0, "kind": "call", "called": ["get_weather"], "content": None, "ok": True,
        "arguments": CALL["arguments"], "exact_arguments": True}


def test_the_bench_holds_out_requests_it_never_trains_on_and_scores_them_strictly():
    bench = _bench()
    no_tools = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "tools": ""}
    text_first = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Which city?"}],
                  "tools": json.dumps(TOOLS)}
    records = [no_tools, text_first, *[{**GLAIVE, "n": i} for i in range(6)], text_first]
    train, held = bench.split(records, every=3, text_requests=1)
    assert [h["record"] for h in held] == [1, 4, 7]  # the first text record, every 3rd record with a call
    assert [h["expected"] for h in held] == [None, CALL, CALL]
    assert [r.get("n") for r in train] == [0, 1, 3, 4, None]  # no tools-less record, no held-out one
    # each cut after its first call (or first reply): the user's turn and the model's
    assert [[t["from"] for t in r["conversations"]] for r in train] == [["human", "function_call"]] * 4 + \
        [["human", "gpt"]]
    message = SimpleNamespace

    def reply(name=None, arguments="{}", content=None):
        calls = [message(function=message(name=name, arguments=arguments))] if name else None
        return message(tool_calls=calls, content=content)

    call, text = held[1], held[0]
    assert bench.score(call, reply("get_weather", json.dumps(CALL["arguments"])))["exact_arguments"]
    wrong = [reply("get_news"), reply("get_weather", "not json"), reply("get_weather", "[1]"), reply(content="Paris")]
    assert [bench.score(call, r)["ok"] for r in wrong] == [False] * 4
    loose = bench.score(call, reply("get_weather", '{"city": "paris"}'))
    assert (loose["ok"], loose["exact_arguments"]) == (True, False)
    cut = reply(content='<tool_call>\n{"name": "get_weather", "arguments": {')  # max_tokens ended it
    assert [bench.score(text, r)["ok"] for r in (reply(content="Which city?"), reply("get_weather"), cut)] == \
        [True, False, False]
    rows = [bench.score(call, reply("get_weather", json.dumps(CALL["arguments"]))), loose,
            bench.score(call, wrong[0]), bench.score(text, reply(content="ok"))]
    assert bench.summary(rows) == {"call_requests": 3, "parsed_right_name_valid_json": 2,
                                   "of_which_exact_arguments": 1, "any_parsed_call": 3,
                                   "text_requests": 1, "text_requests_answered_without_call": 1}


def test_data_inspect_shows_a_tool_record_as_the_trainer_renders_it(world_tokenizer_dir, tmp_path, capsys):
    """`lmforge data inspect` once rendered glaive records without their tools and with each call as plain
    reply text: not what the trainer trains on. Now its tokens and loss marks are the trainer's."""
    from transformers import AutoTokenizer

    from lmforge.cli import main
    from lmforge.config.schema import DataConfig
    from lmforge.data.build import _sft_tokens
    from lmforge.data.errors import ErrorLog
    from lmforge.data.formats import RowFormat, to_example
    from lmforge.data.inspect import plain_marked

    data = tmp_path / "glaive.json"
    data.write_text(json.dumps([GLAIVE]), encoding="utf-8")
    assert main(["data", "inspect", "--stage", "sft", "-n", "1", f"model.name_or_path={world_tokenizer_dir}",
                 "model.template=chatml", f"data.train={data}", "data.max_length=2048"]) == 0
    shown = re.sub(r"\s", "", capsys.readouterr().out)  # the console wraps long lines
    tokenizer = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    example = to_example(json.loads(json.dumps(GLAIVE)), RowFormat(formatting="sharegpt"))
    trained = _sft_tokens({**{k: [example[k]] for k in ("messages", "chat", "tools")}, "source": ["g:1"]},
                          tokenizer, DataConfig(max_length=2048), ErrorLog())
    ids, labels = trained["input_ids"][0], trained["labels"][0]
    assert f"{len(ids)}tokens,{sum(label != -100 for label in labels)}withloss" in shown
    assert "<tools>" in shown and "[[<tool_call>" in shown
    assert re.sub(r"\s", "", plain_marked(tokenizer, ids, labels)) in shown
