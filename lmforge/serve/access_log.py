"""The access log of `lmforge serve`: one line per request, written when its answer has been sent (a
streamed reply: when its last chunk has), so the duration is what the client waited:

    2026-12-07T02:41:09Z 127.0.0.1:53422 "POST /v1/chat/completions" 200 tokens 25 in 12 out 0.412s

Requests refused before a prompt was read (401, 413, a 400 for a bad body) log `tokens - in - out`. The
route handlers leave their token counts in `request.state.lmforge_tokens`, which is the scope's state."""

from __future__ import annotations

import logging
import sys
import time

ACCESS_LOG = "lmforge.serve.access"


class AccessLog:
    """ASGI middleware; outermost, so requests the guard refuses are logged too."""

    def __init__(self, app, logger: logging.Logger | None = None):
        self.app, self.log = app, logger or logging.getLogger(ACCESS_LOG)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [None]
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.log.info(access_line(scope, status[0], state.get("lmforge_tokens"), time.perf_counter() - started))


def access_line(scope, status: int | None, tokens: list[int] | None, seconds: float) -> str:
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "-"
    counts = f"tokens {tokens[0]} in {tokens[1]} out" if tokens else "tokens - in - out"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # the path as sent, escaped: a client's bytes must not forge log lines
    path = scope.get("path", "").encode("unicode_escape").decode("ascii")
    return f'{when} {where} "{scope.get("method", "-")} {path}" {status or "-"} {counts} {seconds:.3f}s'


def log_to_stderr() -> None:
    """Send the access log to stderr, one plain line each (the server calls it when the log is on)."""
    logger = logging.getLogger(ACCESS_LOG)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
