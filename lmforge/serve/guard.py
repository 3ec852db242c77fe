"""What stands between a client and the app of `lmforge serve`: an ASGI middleware that checks the API key
before reading anything else, then reads the body whole but never past the size limit (a chunked upload
has no Content-Length to check, so bytes are counted as they arrive), and an h11 connection that must
deliver each request complete within a deadline (a slow-loris client sending its headers a byte at a
time would otherwise hold its socket forever: uvicorn's keep-alive timeout only runs between requests),
which also answers past the connection limit with a 503 in the API's error shape, and drops a client that
stops reading its reply."""

from __future__ import annotations

import json
import secrets
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.serve.protocol import error_body


class RequestGuard:
    """ASGI middleware: 401 for a missing or wrong key, 413 for a body over `max_body_bytes`; the app then
    receives the body in one message, so nothing downstream reads an unbounded stream."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # names arrive lower-cased
        if self.expected is not None and not secrets.compare_digest(headers.get(b"authorization", b""),
                                                                    self.expected):
            await refuse(send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                         "authentication_error")
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await refuse(send, 413, f"request body over {self.max_body_bytes} bytes")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await refuse(send, 413, f"request body over {self.max_body_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body read already, then passes on what the client sends next
    (a disconnect, which a streaming reply listens for)."""
    given = False

    async def replayed():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


async def refuse(send, status: int, message: str, kind: str = "invalid_request_error",
                 extra_headers: tuple = ()) -> None:
    """An error in OpenAI's shape, and the connection closed after it: the body may be partly unread."""
    payload = json.dumps(error_body(message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *extra_headers]})
    await send({"type": "http.response.body", "body": payload})


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a deadline: from the moment a connection opens, and again after each
    response, the client has `request_timeout` seconds to send one whole request (headers and body);
    otherwise the connection is closed. A request received whole is never cut, however long the reply takes."""

    request_timeout = 20.0
    _deadline = None
    _write_deadline = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own --limit-concurrency answers a plain-text 503; the same limit is kept here instead, so
        # the answer has the API's JSON error shape like every other error.
        self.connection_limit, self.limit_concurrency = self.limit_concurrency, None
        if self.connection_limit is not None:
            self.app = partial(self._within_limit, self.app)

    async def _within_limit(self, app, scope, receive, send) -> None:
        # Both counts include this connection and this request's task: over the limit means one too many.
        if scope["type"] == "http" and max(len(self.connections), len(self.tasks)) > self.connection_limit:
            await refuse(send, 503, f"server busy (more than {self.connection_limit} connections); retry later",
                         "server_busy", ((b"retry-after", b"1"),))
            return
        await app(scope, receive, send)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._disarm_write()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The reply is waiting for a client that does not read it: such a client has `request_timeout`
        seconds to take some, else the connection is dropped (which cancels its rows), so it cannot hold a
        connection slot and its reply's memory forever."""
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.request_timeout, self._drop_if_still_paused)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_write()

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _drop_if_still_paused(self) -> None:
        self._write_deadline = None
        if self.flow.write_paused:
            self.transport.abort()  # close() would wait to flush what the client does not read

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.request_timeout, self._drop_if_incomplete)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop_if_incomplete(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def protocol_with_deadline(seconds: float) -> type[DeadlineH11Protocol]:
    """The protocol class for `uvicorn.run(http=...)`, which builds one instance per connection."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"request_timeout": float(seconds)})
