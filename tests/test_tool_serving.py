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

from lmforge.data.replies import ReplyStream, split_reply
from lmforge.data.templates import builtin_template
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
