"""`lmforge serve`: a real server process on a free loopback port, called with the official openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.data.templates import end_of_turn_ids, render_prompt

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    """The server's stderr and stdout (its access log among them), in a file nobody has to drain."""
    return tmp_path_factory.mktemp("serve") / "server.log"


@pytest.fixture(scope="module")
def server(base, server_log):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "LMFORGE_API_KEY": KEY}
    with open(server_log, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(base), "--port", str(port),
                                    "--name", "tiny", "--max-batch-size", "4", "--queue-size", "2"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(server_log.read_text())
        try:
            if _post(url + "/health", None, method="GET")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


def _post(url: str, body, key: str | None = KEY, method: str = "POST", raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def local(base):
    return AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)


def test_chat_plain_and_streamed_equal_in_process_greedy(server, local):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected, stopped, tokens = _hf_greedy_reply(*local, QUESTION, 12)
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
    assert reply.usage.completion_tokens == tokens  # a stop token counts: the model generated it
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12,
                                                stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # it did stream
    assert reasons[-1] == reply.choices[0].finish_reason
    two = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12, n=2)
    assert [c.message.content for c in two.choices] == [expected] * 2


def _hf_greedy_reply(model, tokenizer, messages, max_new_tokens: int) -> tuple[str, bool, int]:
    """transformers' own greedy reply: its text, whether an end-of-turn token ended it, tokens generated."""
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    stops = end_of_turn_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    ended = next((i for i, t in enumerate(new) if t in stops), None)
    text = tokenizer.decode(new if ended is None else new[:ended], skip_special_tokens=True).rstrip("\ufffd")
    return text, ended is not None, len(new) if ended is None else ended + 1


def test_completions_and_stop_strings(server, local):
    model, tokenizer = local
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    prompt = "The capital of"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    done = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=10)
    assert done.choices[0].text == expected.rstrip("\ufffd")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, temperature=0, max_tokens=10, stream=True) if c.choices)
    assert streamed == done.choices[0].text
    stop = expected.strip()[3:6]
    assert stop and stop in expected
    cut = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=10, stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_api_key_and_bad_requests_get_clear_errors(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(server + "/v1/models", None, key=None, method="GET")[0] == 401
    url = server + "/v1/chat/completions"
    cases = {
        "not json": (None, b"{\"model\": \"tiny\", \"messages\": ["),
        "no messages": ({"model": "tiny", "messages": []}, None),
        "bad role": ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, None),
        "negative max_tokens": ({"model": "tiny", "messages": QUESTION, "max_tokens": -1}, None),
        "temperature as text": ({"model": "tiny", "messages": QUESTION, "temperature": "hot"}, None),
        "enormous max_tokens": ({"model": "tiny", "messages": QUESTION, "max_tokens": 10**9}, None),
        "too long prompt": ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}, None),
    }
    for what, (body, raw) in cases.items():
        status, answer = _post(url, body, raw=raw)
        assert status == 400, (what, status, answer)
        assert answer["error"]["message"], what
    assert "context" in _post(url, cases["too long prompt"][0])[1]["error"]["message"]
    status, answer = _post(url, {"model": "gpt-4", "messages": QUESTION})
    assert status == 404 and "tiny" in answer["error"]["message"]


UNSUPPORTED = {"tool_choice": "required", "response_format": {"type": "json_object"}, "presence_penalty": 0.5,
               "frequency_penalty": -1.0, "logit_bias": {"5": 10}, "functions": [{"name": "f"}]}


def test_fields_the_server_does_not_implement_are_refused_not_ignored(server):
    """A client that asks for what the server cannot do must be told so, not handed a reply without it."""
    url = server + "/v1/chat/completions"
    for field, value in UNSUPPORTED.items():
        status, answer = _post(url, {"model": "tiny", "messages": QUESTION, "max_tokens": 2, field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, status, answer)
        assert "not supported" in answer["error"]["message"], field
    off = {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "presence_penalty": 0,
           "response_format": {"type": "text"}, "logit_bias": {}}
    status, answer = _post(url, {"model": "tiny", "messages": QUESTION, "max_tokens": 2, **off})
    assert status == 200 and answer["choices"][0]["logprobs"] is None


def test_the_same_seed_gives_the_same_reply(server):
    """Sampled at temperature 1: a seed fixes the reply whatever else runs; choice i draws with seed + i."""
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

    def replies(seed: int, n: int = 1) -> list[str]:
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1.0, max_tokens=24,
                                                seed=seed, n=n)
        return [c.message.content for c in answer.choices]

    with ThreadPoolExecutor(3) as pool:  # the same seed while other requests share the batch
        first, again, _ = pool.map(lambda s: replies(*s), [(7,), (7,), (99, 2)])
    assert first == again == replies(7)
    assert replies(6, n=2)[1] == first[0]  # choice 1 of seed 6 draws with seed 7
    assert len({replies(s)[0] for s in (1, 2, 3, 4)}) > 1  # the seed does change the reply


def test_access_log_writes_a_line_per_request(server, server_log):
    """On by default: time, client, method and route, status, tokens in and out, seconds."""
    status, answer = _post(server + "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": 3})
    assert status == 200
    usage = answer["usage"]
    assert _post(server + "/v1/models", None, key="wrong", method="GET")[0] == 401
    time.sleep(0.5)
    lines = server_log.read_text().splitlines()
    chat = [line for line in lines if '"POST /v1/chat/completions" 200' in line]
    wanted = f"tokens {usage['prompt_tokens']} in {usage['completion_tokens']} out"
    assert any(wanted in line and line.startswith("20") and " 127.0.0.1:" in line for line in chat), lines[-5:]
    assert any('"GET /v1/models" 401 tokens - in - out' in line for line in lines)


def _forced(model, tokenizer, prompt_ids: list[int], reply_ids: list[int], k: int) -> tuple[list, list]:
    """Teacher-forced log-probs of the reply's tokens and the k most likely (id, log-prob) at each position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + reply_ids])).logits[0, len(prompt_ids) - 1:-1].float()
    logps = torch.log_softmax(logits, -1)
    chosen = logps.gather(-1, torch.tensor(reply_ids)[:, None]).squeeze(-1).tolist()
    best = logps.topk(k, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]


def _greedy_ids(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy reply ids, without the end-of-turn token that ends it."""
    stops = end_of_turn_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    return out[:next((i for i, t in enumerate(out) if t in stops), len(out))]


def test_chat_logprobs_equal_a_teacher_forced_pass_plain_and_streamed(server, local):
    from lmforge.serve.logprobs import TokenText

    model, tokenizer = local
    prompt_ids = tokenizer(render_prompt(tokenizer, QUESTION), add_special_tokens=False)["input_ids"]
    reply_ids = _greedy_ids(model, tokenizer, prompt_ids, 12)
    chosen, best = _forced(model, tokenizer, prompt_ids, reply_ids, 5)
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 12, "logprobs": True,
            "top_logprobs": 5}
    status, answer = _post(server + "/v1/chat/completions", body)
    assert status == 200, answer
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == len(reply_ids)  # one entry per reply token, none for the end-of-turn token
    assert [e["logprob"] for e in content] == pytest.approx(chosen, abs=1e-4)
    text_of = TokenText(tokenizer)
    for entry, ranked in zip(content, best):
        assert [t["bytes"] for t in entry["top_logprobs"]] == [text_of(i)[1] for i, _ in ranked]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([v for _, v in ranked], abs=1e-4)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy: the best
    joined = bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace")
    assert joined.strip() == answer["choices"][0]["message"]["content"].strip()
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    streamed, carrying = [], 0
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                carrying += 1
                streamed += [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in choice.logprobs.content]
    assert streamed == [(e["token"], e["logprob"], [t["token"] for t in e["top_logprobs"]]) for e in content]
    assert carrying > 1  # they came with the text, chunk by chunk
    plain = _post(server + "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": 0})[1]
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]


def test_completion_logprobs_in_the_legacy_shape(server, local):
    model, tokenizer = local
    prompt = "The capital of"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    status, answer = _post(server + "/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0,
                                                         "max_tokens": 8, "logprobs": 3})
    assert status == 200, answer
    choice = answer["choices"][0]
    got = choice["logprobs"]
    reply_ids = _greedy_ids(model, tokenizer, prompt_ids, 8)
    chosen, best = _forced(model, tokenizer, prompt_ids, reply_ids, 3)
    assert got["token_logprobs"] == pytest.approx(chosen, abs=1e-4)
    assert [v for d in got["top_logprobs"] for v in sorted(d.values(), reverse=True)[:3]] == \
        pytest.approx([v for ranked in best for _, v in ranked], abs=1e-4)
    assert "".join(got["tokens"]) == choice["text"]
    assert got["text_offset"][0] == len(prompt)
    assert got["text_offset"][1:] == [len(prompt) + len("".join(got["tokens"][:i])) for i in range(1, len(reply_ids))]
    none = _post(server + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 3, "logprobs": 0})[1]
    assert all(len(d) == 1 for d in none["choices"][0]["logprobs"]["top_logprobs"])  # the drawn token alone


def test_bad_logprob_requests_name_the_field(server):
    chat, completions = server + "/v1/chat/completions", server + "/v1/completions"
    cases = [(chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             (chat, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
             (chat, {"top_logprobs": 3}, "top_logprobs needs logprobs"),
             (completions, {"logprobs": True}, "logprobs"),
             (completions, {"logprobs": 21}, "logprobs"),
             (completions, {"logprobs": 2, "top_logprobs": 2}, "top_logprobs")]
    for url, extra, named in cases:
        body = {"model": "tiny", "max_tokens": 2, **extra,
                **({"messages": QUESTION} if url == chat else {"prompt": "hi"})}
        status, answer = _post(url, body)
        assert status == 400, (extra, answer)
        assert named in answer["error"]["message"] or answer["error"]["param"] == named, (extra, answer)


def test_full_queue_answers_503_and_everything_else_completes(server):
    body = {"model": "tiny", "messages": QUESTION, "temperature": 1.0, "max_tokens": 200}
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: _post(server + "/v1/chat/completions", body), range(24)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503}
    # at least one batch ran and a queue of 2 filled; how many more got in depends on timing
    assert statuses.count(503) > 0 and statuses.count(200) >= 3
    busy = next(answer for status, answer in answers if status == 503)
    assert busy["error"]["type"] == "server_busy" and "retry" in busy["error"]["message"]
    assert all(answer["choices"][0]["message"]["content"] is not None for status, answer in answers if status == 200)
    assert _post(server + "/health", None, method="GET")[0] == 200  # and the server lives on


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_serves_on(local):
    """One worker owns the engine: a step that raises resets it and ends every request it held with a one-line
    error event (no traceback to the client), and the next request is answered normally."""
    import threading

    from lmforge.generation import Request, Sampling
    from lmforge.serve.batcher import Batcher

    model, tokenizer = local
    batcher = Batcher(model, tokenizer, end_of_turn_ids(tokenizer), max_batch_size=2, queue_size=2)
    real_step, calls = batcher.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost\nsecond line")
        return real_step()

    batcher.engine.step = failing_step
    batcher.start()
    try:
        for expected in ("error: RuntimeError: device lost", "length"):
            ends, finished = [], threading.Event()
            batcher.submit(Request([5, 6, 7], Sampling(temperature=0.0), max_new_tokens=3, n=2),
                           lambda i, kind, value, ends=ends, finished=finished:
                           kind == "done" and (ends.append((i, value)), len(ends) == 2 and finished.set()))
            assert finished.wait(30)
            assert sorted(ends) == [(0, (expected, 0 if "error" in expected else 3)),
                                    (1, (expected, 0 if "error" in expected else 3))]
    finally:
        batcher.stop()
