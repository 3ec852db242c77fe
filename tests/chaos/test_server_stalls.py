"""One request must not stall the others, against a real `lmforge serve` process (a tiny random model on
loopback): a client that leaves before its non-streaming answer frees its batch row, a too-long stop
string is refused, and the connection limit answers in the API's JSON error shape. How long stop strings
cost per token is measured on the matcher itself (tests/test_generation_stops.py), not through the server's
timing."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from client_harness import ServerProcess, make_tiny_model, post_json, request

from lmforge.serve.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS

KEY = "stall-key-Qp27"
CHAT = "/v1/chat/completions"
MAX_CONNECTIONS = 3
LONG = 1000
"""Tokens of the long request: most of the tiny model's 1,024-token context. Greedy, the random model runs
to this limit (about 10 s on one CPU thread) without ending its turn."""


@pytest.fixture(scope="module")
def server(chat_tokenizer_dir, tmp_path_factory):
    model = make_tiny_model(chat_tokenizer_dir, tmp_path_factory.mktemp("stall-model") / "tiny")
    process = ServerProcess(model, tmp_path_factory.mktemp("stall-server"), api_key=KEY,
                            extra=("--max-connections", str(MAX_CONNECTIONS), "--request-timeout", "5",
                                   "--max-batch-size", "4"))
    try:
        yield process.start()
    finally:
        process.stop()


def chat(content: str = "hi", **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def health(server) -> dict:
    status, answer = request(server.port, "GET", "/health", headers=server.auth_headers())
    assert status == 200
    return json.loads(answer)


def assert_error_shape(answer: bytes, kind: str) -> dict:
    error = json.loads(answer)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == kind and error["message"]
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_leaves_frees_its_row_and_others_do_not_wait(server, stream):
    """The issue: a non-streaming request went on generating for a client that had gone, and a small request
    behind it waited for all of it (22 s instead of 0.4 s)."""
    before = health(server)
    payload = json.dumps(chat(max_tokens=LONG, stream=stream)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        # Leave early: an idle machine decodes the tiny model at several hundred tokens/s, so a long wait here
        # would let most of the reply be generated before the client leaves, and the count below would
        # measure the machine rather than the cancel (the server's counters move only when a batch ends).
        time.sleep(0.1)
    began = time.monotonic()
    status, answer = post_json(server.port, CHAT, chat(max_tokens=4), key=KEY, timeout=60)
    waited = time.monotonic() - began
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] <= 4
    assert waited < 4.0, waited  # far from the ~10 s the long reply takes
    after = health(server)
    assert after["rows_cancelled"] == before["rows_cancelled"] + 1, (before, after)
    spent = after["tokens_generated"] - before["tokens_generated"] - 4
    assert spent < LONG // 2, spent  # stopped soon after the client left, not after LONG tokens


def test_a_short_request_joins_the_running_batch_and_gets_its_own_greedy_tokens(server):
    """Continuous batching: a short request sent while a long one decodes is answered at once (it joins the
    running batch at the next step), not after the long one, with the tokens it gets alone."""
    short = chat("what now?", max_tokens=6)
    status, alone = post_json(server.port, CHAT, short, key=KEY)
    assert status == 200
    ended: dict[str, float] = {}

    def long_request():
        post_json(server.port, CHAT, chat(max_tokens=LONG), key=KEY, timeout=120)
        ended["long"] = time.monotonic()

    runner = threading.Thread(target=long_request)
    long_began = time.monotonic()
    runner.start()
    time.sleep(0.3)  # the long request is decoding by now (it runs for over a second)
    short_began = time.monotonic()
    status, joined = post_json(server.port, CHAT, short, key=KEY)
    ended["short"] = time.monotonic()
    runner.join(timeout=120)
    assert status == 200 and "long" in ended
    assert json.loads(joined)["choices"] == json.loads(alone)["choices"]
    assert json.loads(joined)["usage"] == json.loads(alone)["usage"]
    # The short one did not wait for the long one: it ended first, in a small part of the long one's time.
    assert ended["long"] > ended["short"], ended
    assert ended["short"] - short_began < (ended["long"] - long_began) / 3, (short_began, long_began, ended)


def test_a_too_long_stop_string_is_refused_and_the_longest_accepted(server):
    for stop in ("x" * (MAX_STOP_CHARS + 1), ["\n", "y" * 200_000]):
        status, answer = post_json(server.port, CHAT, chat(stop=stop, max_tokens=2), key=KEY)
        assert status == 400
        error = assert_error_shape(answer, "invalid_request_error")
        assert error["param"] == "stop" and f"at most {MAX_STOP_CHARS}" in error["message"], error
    # The most the API allows, each string a near-match of a reply of one repeated token: still answered.
    stops = [("a" * (MAX_STOP_CHARS - 1)) + c for c in "bcdefgh"[:MAX_STOP_STRINGS]]
    status, answer = post_json(server.port, CHAT, chat(stop=stops, max_tokens=200), key=KEY)
    assert status == 200 and json.loads(answer)["choices"][0]["finish_reason"] in ("stop", "length")


def test_past_the_connection_limit_the_503_has_the_error_shape(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the server has accepted them: the limit is reached
        status, answer = post_json(server.port, CHAT, chat(max_tokens=2), key=KEY)
        assert status == 503, answer
        assert "retry" in assert_error_shape(answer, "server_busy")["message"]
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert post_json(server.port, CHAT, chat(max_tokens=2), key=KEY)[0] == 200  # and served again once freed


class _Transport:
    """The part of an asyncio transport that uvicorn's h11 protocol uses, recording how it was closed."""

    def __init__(self):
        self.aborted = self.closing = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name in ("sockname", "peername") else default

    def is_closing(self):
        return self.closing or self.aborted

    def abort(self):
        self.aborted = True

    def close(self):
        self.closing = True

    def write(self, data):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


@pytest.mark.parametrize("reads_again", [False, True], ids=["never reads", "reads in time"])
def test_a_client_that_stops_reading_its_reply_is_dropped(reads_again):
    """A client that read nothing of a long reply held its connection slot, and the reply's text in the
    server's memory, for as long as it liked; now it has the request deadline to take some. (Through real
    sockets the kernel's buffers take the first megabytes, more than the tiny model writes, so the
    connection's own flow-control calls are driven here.)"""
    import uvicorn
    from uvicorn.server import ServerState

    from lmforge.serve.guard import protocol_with_deadline

    async def run() -> _Transport:
        config = uvicorn.Config(app=lambda scope, receive, send: None, log_level="warning")
        connection = protocol_with_deadline(0.2)(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        connection.connection_made(transport)
        connection.pause_writing()  # what asyncio calls when the reply waits in the buffer over 64 KiB
        await asyncio.sleep(0.1)
        if reads_again:
            connection.resume_writing()
        await asyncio.sleep(0.3)
        connection.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert transport.aborted is (not reads_again)
