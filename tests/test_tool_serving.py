"""Tool calls and reasoning through `lmforge serve`: the reply parsers, then the app called with the official
openai client over a scripted engine (the reply text is chosen by the test, so what the client gets is known)."""

from __future__ import annotations

import json
import logging
import random
import threading
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from lmforge.config.templates import builtin_template
from lmforge.data.replies import ReplyStream, split_reply
from lmforge.data.tool_calls import call_format, parse_tool_calls
from lmforge.serve.app import create_app

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_hermes_calls_are_read_and_anything_unfinished_stays_text():
    two = f'Let me check.\n{CALL}\n<tool_call>{{"name": "f", "arguments": "{{\\"a\\": 1}}"}}</tool_call>\n'
    parsed = parse_tool_calls(two, "hermes")
    assert parsed.content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls] == \
        [("get_weather", {"city": "Paris"}), ("f", {"a": 1})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed.calls)
    assert len({c["id"] for c in parsed.calls}) == 2
    for broken in ['<tool_call>{"name": "f", "arguments": {</tool_call>',     # bad JSON
                   '<tool_call>{"arguments": {}}</tool_call>',                  # no name
                   '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',    # arguments not an object
                   '<tool_call>{"name": "f", "arguments": {}}',                 # cut by max_tokens
                   f"{CALL} and then more text",                                # text after the call
                   f"{CALL}\n<tool_call>[1]</tool_call>",                       # one bad call of two
                   "<tool_call>" + "[" * 5000 + "</tool_call>"]:               # nesting past the JSON parser
        parsed = parse_tool_calls(broken, "hermes")
        assert parsed.calls == [] and parsed.content == broken, broken
    mistral = parse_tool_calls('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 2}}]', "mistral")
    assert mistral.content == "" and json.loads(mistral.calls[0]["function"]["arguments"]) == {"x": 2}
    assert call_format(builtin_template("qwen3")) == "hermes" and call_format(builtin_template("chatml")) == "hermes"
    assert call_format(builtin_template("llama3")) is None and call_format(None) is None


HOSTILE = ["<think>\nfirst </thi then</think>\n\nThe answer. " + CALL + "\n",
           "  plain text that mentions <think> and <tool_ca", "<think>cut while thinking </th", " <thinking> no",
           "<tool_call>{bad}</tool_call>", "Sure.\n" + CALL + CALL, "", "   ", "<think></think>", "x </think> y"]


@pytest.mark.parametrize("opened", [False, True])
@pytest.mark.parametrize("fmt", [None, "hermes"])
def test_streamed_parts_join_to_the_whole_reply_split(opened, fmt):
    rng = random.Random(0)
    for text in HOSTILE:
        whole = split_reply(text, opened, fmt)
        for _ in range(25):
            stream, got, at = ReplyStream(opened, fmt), {"reasoning_content": "", "content": ""}, 0
            while at < len(text):
                size = rng.randint(1, 5)
                for key, piece in stream.feed(text[at:at + size]).items():
                    got[key] += piece
                at += size
            last, reply = stream.finish()
            for key, piece in last.items():
                got[key] += piece
            assert got == {"reasoning_content": whole.reasoning or "", "content": whole.content or ""}, text
            assert [c["function"] for c in reply.calls] == [c["function"] for c in whole.calls]
    first = split_reply(HOSTILE[0], False, "hermes")
    assert (first.reasoning, first.content, len(first.calls)) == ("first </thi then", "The answer.", 1)
    assert split_reply(" no think block \n", False, None).content == " no think block \n"  # kept as written


class ScriptedBatcher:
    """Stands in for the engine: every sample of a request "generates" `reply`, in pieces of 3 characters."""

    max_len, steps, rows_decoded, rows_cancelled, tokens_generated = 1024, 0, 0, 0, 0

    def __init__(self):
        self.reply, self.requests = "", []

    def submit(self, request, listener):
        self.requests.append(request)
        handle, reply = SimpleNamespace(done=False), self.reply

        def run():
            for sample in range(request.n):
                pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)]
                for piece in pieces:
                    listener(sample, "text", piece)
                listener(sample, "done", ("stop", len(pieces) + 1))
            handle.done = True
        threading.Thread(target=run).start()
        return handle

    def cancel(self, handle):
        pass


@pytest.fixture(scope="module")
def served(world_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(world_tokenizer_dir)  # lmforge's ChatML: Hermes tool calls
    batcher = ScriptedBatcher()
    http = TestClient(create_app(None, tokenizer, "tiny", batcher))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    return SimpleNamespace(client=client, batcher=batcher, tokenizer=tokenizer, http=http)


def _prompt_text(served) -> str:
    return served.tokenizer.decode(served.batcher.requests[-1].prompt_ids)


def test_tools_reach_the_template_and_the_reply_comes_back_as_tool_calls(served):
    served.batcher.reply = "I will look it up.\n" + CALL
    reply = served.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    assert "<tools>" in _prompt_text(served) and '"get_weather"' in _prompt_text(served)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will look it up."
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == \
        ("function", "get_weather", {"city": "Paris"})
    content, calls, reasons = "", {}, []
    for chunk in served.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            calls[c.index] = (c.function.name, json.loads(c.function.arguments))
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "I will look it up." and calls == {0: ("get_weather", {"city": "Paris"})}
    assert reasons[-1] == "tool_calls"


def test_malformed_calls_and_tool_choice_none_give_plain_text(served):
    served.batcher.reply = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    reply = served.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    assert reply.choices[0].message.content == served.batcher.reply and reply.choices[0].finish_reason == "stop"
    assert not reply.choices[0].message.tool_calls
    served.batcher.reply = CALL
    reply = served.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert "<tools>" not in _prompt_text(served)  # "none" renders without the tools
    assert reply.choices[0].message.content == CALL and not reply.choices[0].message.tool_calls
    served.batcher.reply = CALL + "\n" + CALL.replace("Paris", "Rome")
    one = served.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], parallel_tool_calls=False)
    assert [json.loads(c.function.arguments)["city"] for c in one.choices[0].message.tool_calls] == ["Paris"]


def test_reasoning_comes_apart_from_content_plain_and_streamed(served):
    served.batcher.reply = "<think>\nParis is in France.\n</think>\n\nIt is sunny."
    message = served.client.chat.completions.create(model="tiny", messages=ASK).choices[0].message
    assert message.content == "It is sunny." and message.model_extra["reasoning_content"] == "Paris is in France."
    parts = {"reasoning_content": "", "content": ""}
    for chunk in served.client.chat.completions.create(model="tiny", messages=ASK, stream=True):
        delta = chunk.choices[0].delta
        parts["content"] += delta.content or ""
        parts["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
    assert parts == {"reasoning_content": "Paris is in France.", "content": "It is sunny."}
    served.batcher.reply = "No block here."
    plain = served.client.chat.completions.create(model="tiny", messages=ASK).choices[0].message
    assert plain.content == "No block here." and "reasoning_content" not in (plain.model_extra or {})


def test_tool_results_and_earlier_calls_render_as_in_training(served):
    from lmforge.data.templates import render_prompt

    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    served.batcher.reply = "It is sunny."
    reply = served.client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is sunny."
    trained = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"sky": "sunny"}'}]
    expected = render_prompt(served.tokenizer, trained, tools=[WEATHER])
    assert served.batcher.requests[-1].prompt_ids == served.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert "<tool_response>\n{\"sky\": \"sunny\"}\n</tool_response>" in expected


def _post(served, body: dict):
    answer = served.http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body})
    return answer.status_code, answer.json()


def test_what_cannot_be_honoured_is_refused_with_the_field_named(served, world_tokenizer_dir):
    cases = [({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "not supported"),
             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
              "tool_choice", "not supported"),
             ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be"),
             ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "no function name"),
             ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
                 {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages", "JSON"),
             ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
                 {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages", "assistant"),
             ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "may not set")]
    for body, field, words in cases:
        status, answer = _post(served, body)
        assert status == 400 and (answer["error"]["param"] or "").startswith(field), (body, answer)
        assert words in answer["error"]["message"], (body, answer)
    plain = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    plain.chat_template = builtin_template("llama3").replace("<|eot_id|>", "<|im_end|>")
    http = TestClient(create_app(None, plain, "tiny", ScriptedBatcher()))
    answer = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "tools": [WEATHER]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "tools"
    assert "no tool-call format" in answer.json()["error"]["message"]


def test_access_log_has_one_line_per_request(served, caplog):
    served.batcher.reply = "Hello there."
    with caplog.at_level(logging.INFO, logger="lmforge.serve.access"):
        served.client.chat.completions.create(model="tiny", messages=ASK)
        list(served.client.chat.completions.create(model="tiny", messages=ASK, stream=True))
        _post(served, {"tools": [WEATHER], "tool_choice": "required"})
    lines = [r.getMessage() for r in caplog.records if r.name == "lmforge.serve.access"]
    assert len(lines) == 3
    prompt_tokens = len(served.batcher.requests[-1].prompt_ids)
    out_tokens = len([served.batcher.reply[i:i + 3] for i in range(0, len(served.batcher.reply), 3)]) + 1
    for line in lines[:2]:
        assert '"POST /v1/chat/completions" 200' in line and "testclient:" in line
        assert f"tokens {prompt_tokens} in {out_tokens} out" in line and line.endswith("s")
    assert '"POST /v1/chat/completions" 400 tokens - in - out' in lines[2]


TOOL_RECORD = {
    "tools": [WEATHER],
    "messages": [{"role": "system", "content": "You help with the weather."}, *ASK,
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "{\"sky\": \"sunny\", \"high\": 21}"},
                 {"role": "assistant", "content": "Sunny, with a high of 21."}]}


def _trainer_prompts(tokenizer, data_cfg) -> list[list[int]]:
    """What the SFT trainer rendered (its own row normalisation and tokenizer function): the ids before each
    reply that carries loss, i.e. the prompt the model learnt to answer at each assistant turn."""
    from lmforge.data.build import _sft_tokens
    from lmforge.data.errors import ErrorLog
    from lmforge.data.formats import RowFormat, to_example

    example = to_example(json.loads(json.dumps(TOOL_RECORD)), RowFormat())
    batch = {key: [example[key]] for key in ("messages", "chat", "tools")}
    encoded = _sft_tokens({**batch, "source": ["tools.jsonl:1"]}, tokenizer, data_cfg, ErrorLog())
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    starts = [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]
    assert len(starts) == 2  # the call and the answer carry loss, nothing else
    return [ids[:start] for start in starts]


def test_train_export_serve_chat_render_the_same_tokens(base, tmp_path, monkeypatch):
    """Issue 22's parity: for a tool conversation, the tokens the SFT trainer rendered before each reply equal
    what `serve` renders for the same messages (sent through the openai client), what `chat` renders after
    reading the model's call back into its history, and what the exported GGUF's embedded template renders."""
    import gguf

    import lmforge.inference.chat as chat
    from lmforge.cli import main
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(TOOL_RECORD) + "\n", encoding="utf-8")
    trained = tmp_path / "sft"
    cfg = load_config(None, [f"model.name_or_path={base}", "model.finetuning=lora", "lora.r=4", f"data.train={data}",
                             "data.eval_split=0", "data.max_length=1024", "train.max_steps=2", "train.batch_size=1",
                             f"train.output_dir={trained}", "log.progress=false", "log.report_to=[]"], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    expected = _trainer_prompts(tokenizer, cfg.data)
    call_turn, tool_turn = TOOL_RECORD["messages"][:2], TOOL_RECORD["messages"][:4]

    batcher = ScriptedBatcher()  # serve: the request path up to the engine
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                           http_client=TestClient(create_app(None, tokenizer, "tiny", batcher)))
    for messages in (call_turn, tool_turn):
        client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    assert [r.prompt_ids for r in batcher.requests] == expected

    seen, replies = [], iter(['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
                              '</tool_call>', "Sunny, with a high of 21."])

    class Engine:  # chat: its own history, its own rendering and tokenizing, a scripted model
        def stream(self, request):
            seen.append(request.prompt_ids)
            return [SimpleNamespace(text=next(replies))]

    monkeypatch.setattr(chat, "chat_engine", lambda model, tok: Engine())
    typed = iter(["/system You help with the weather.", ASK[0]["content"], "/tool " + TOOL_RECORD["messages"][3]["content"],
                  "/exit"])
    chat.chat_loop(None, tokenizer, read=lambda _: next(typed), write=lambda _: None, tools=[WEATHER])
    assert seen == expected

    out = tmp_path / "exported"
    assert main(["export", str(trained), "--out", str(out), "--gguf"]) == 0
    field = gguf.GGUFReader(out / "model-f32.gguf").fields["tokenizer.chat_template"]
    embedded = AutoTokenizer.from_pretrained(out)
    embedded.chat_template = bytes(field.parts[field.data[0]]).decode()
    trained_form = [*call_turn[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": TOOL_RECORD["messages"][3]["content"]}]
    rendered = [embedded.apply_chat_template(m, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
                for m in (trained_form[:2], trained_form)]
    assert [embedded(text, add_special_tokens=False)["input_ids"] for text in rendered] == expected
    assert "<tool_call>" in rendered[1] and "<tool_response>" in rendered[1]  # the call and result are in it
