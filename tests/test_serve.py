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

from lmforge.rollout.generate import generate
from lmforge.rollout.stream import Row, RowDecoder, generate_rows

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(base):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "LMFORGE_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(base), "--port", str(port),
                                "--name", "tiny", "--max-batch-size", "4", "--queue-size", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read().decode())
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
    expected = generate(*local, [QUESTION], max_new_tokens=12)[0]
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("stop" if expected.stopped else "length")
    assert reply.usage.completion_tokens == len(expected.token_ids)
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12,
                                                stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected.text and len([p for p in pieces if p]) > 1  # it did stream
    assert reasons[-1] == reply.choices[0].finish_reason
    two = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12, n=2)
    assert [c.message.content for c in two.choices] == [expected.text] * 2


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


def test_rows_decode_together_with_their_own_limits(local):
    """generate_rows: per-row token limits and greedy rows equal to one-by-one greedy decoding."""
    model, tokenizer = local
    prompts = [tokenizer("The capital of", add_special_tokens=False)["input_ids"],
               tokenizer("Once upon a time there", add_special_tokens=False)["input_ids"]]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    ends: dict[int, tuple] = {}
    rows = [Row(p, limit, temperature=0.0, on_text=pieces[i].append, on_done=lambda r, n, i=i: ends.setdefault(i, (r, n)))
            for i, (p, limit) in enumerate(zip(prompts, [3, 9]))]
    generate_rows(model, tokenizer, rows, stop_ids=[tokenizer.eos_token_id])
    assert ends[0] == ("length", 3) and ends[1][1] <= 9
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=rows[i].max_new_tokens, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = alone[0, len(prompt):].tolist()
        new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert "".join(pieces[i]) == tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd")


def test_decoder_holds_back_a_possible_stop_string_and_cuts_at_it():
    class Chars:  # a tokenizer whose tokens are characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    pieces, ends = [], []
    decoder = RowDecoder(Chars(), Row([], 100, stop_texts=["END"], on_text=pieces.append,
                                      on_done=lambda r, n: ends.append((r, n))), stop_ids={0})
    for ch in "abcENxyzEND!":
        decoder.push(ord(ch))
    # "E" and "EN" wait until "x" shows they do not start "END"; the reply ends before "END".
    assert pieces == ["a", "b", "c", "ENx", "y", "z"] and ends == [("stop", 11)]


def test_per_row_sampling_keeps_each_rows_own_nucleus_and_greedy():
    from lmforge.rollout.stream import _PerRowSampling

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    rows = [Row([], 1, temperature=1.0, top_p=0.7), Row([], 1, temperature=0.0), Row([], 1, temperature=1.0)]
    out = _PerRowSampling(rows, "cpu")(None, logits.clone())
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]  # greedy: the arg-max alone
    assert torch.allclose(out[2], logits[2])  # temperature 1, top_p 1: untouched


class _Bytes:
    """A tokenizer whose tokens are bytes (decoded as UTF-8, a partial character as U+FFFD, as byte-level
    BPE does), counting the ids it is asked to decode."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def _decode_all(text: bytes, stops: list[str], stop_ids=frozenset({0})):
    tokenizer, pieces, ends = _Bytes(), [], []
    decoder = RowDecoder(tokenizer, Row([], len(text), stop_texts=stops, on_text=pieces.append,
                                        on_done=lambda r, n: ends.append((r, n))), stop_ids=set(stop_ids))
    began = time.perf_counter()
    for byte in text:
        decoder.push(byte)
    return time.perf_counter() - began, tokenizer.decoded, decoder, pieces, ends


def test_stop_matching_and_decoding_cost_linear_work_per_token():
    """The issue's stall: the whole reply was decoded again and every stop string's prefixes compared with
    its end at every token (quadratic). Now each token decodes a window of a few tokens and each new
    character moves each stop string's matcher amortised once."""
    from lmforge.serve.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS

    # Worst case for naive matching: the reply is all "a" and every stop string nearly matches it throughout.
    stops = ["a" * (MAX_STOP_CHARS - 1) + c for c in "bcdefgh"[:MAX_STOP_STRINGS]]
    text = b"a" * 4000
    plain = min(_decode_all(text, [])[0] for _ in range(3))
    seconds, decoded, decoder, pieces, ends = min(_decode_all(text, stops) for _ in range(3))
    assert "".join(pieces) == text.decode() and ends == [("length", len(text))]  # no false match
    assert decoded <= 3 * len(text)  # a window of at most two tokens, decoded twice
    assert decoder.matcher.steps <= 2 * len(text) * len(stops)  # KMP's amortised bound
    assert seconds < 10 * plain + 0.05, (seconds, plain)
    # 200,000-character stop strings (the case) are refused by the API; the decoder alone stays linear.
    huge = ["a" * 199_999 + c for c in "bcde"]
    assert _decode_all(b"a" * 2000, huge)[2].matcher.steps <= 2 * 2000 * 4


def test_decoder_cuts_at_the_earliest_stop_and_waits_for_whole_characters():
    from lmforge.rollout.stream import WAIT_TOKENS, StopMatcher

    _, _, _, pieces, ends = _decode_all(b"xabcdy", ["bc", "abcd"])
    assert "".join(pieces) == "xa" and ends == [("stop", 4)]  # "bc" was complete first: nothing after it
    assert StopMatcher(["bc", "abcd"]).feed("xabcdy") == 1  # both in one new piece: the earlier start wins
    _, _, _, pieces, ends = _decode_all("é€x".encode(), [])
    assert pieces == ["é", "€", "x"]  # never half a character
    _, _, _, pieces, ends = _decode_all("ab€".encode()[:-1] + b"\x00", [])
    assert "".join(pieces) == "ab" and ends == [("stop", 5)]  # a cut character at the end is dropped
    # Bytes that never form a character: the decoder stops waiting (linear work), emitting U+FFFD.
    _, decoded, _, pieces, ends = _decode_all(b"\xff" * 500 + b"ok", ["o"])
    assert "".join(pieces) == "\ufffd" * 500 and ends == [("stop", 501)]
    assert decoded <= 502 * 4 * WAIT_TOKENS  # windows of at most twice WAIT_TOKENS, decoded twice
