"""The FastAPI app of `lmforge serve`: routes behind the API-key and body-size guard (serve.guard), and
errors in OpenAI's shape (a bad request gets a 400 with a message, a full queue a 503, never a dropped
connection)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.data.replies import Reply, ReplyStream, split_reply
from lmforge.generation import Handle, RequestError, Sampling
from lmforge.generation import Request as GenerationRequest
from lmforge.serve import protocol
from lmforge.serve.access_log import AccessLog
from lmforge.serve.batcher import Batcher, QueueFull
from lmforge.serve.chat_prompt import ChatPrompt, chat_prompt
from lmforge.serve.guard import RequestGuard
from lmforge.serve.logprobs import chat_logprobs, completion_logprobs
from lmforge.serve.protocol import ApiError


class Collector:
    """The n samples of one request, and the events the engine's thread sends them on the event loop."""

    def __init__(self, n: int, batcher: Batcher):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.n, self.batcher = n, batcher
        self.handle: Handle | None = None

    def submit(self, request: GenerationRequest) -> None:
        self.handle = self.batcher.submit(request, self._send)

    def _send(self, index: int, kind: str, value) -> None:  # on the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, value))

    async def events_until_done(self):
        finished: set[int] = set()
        while len(finished) < self.n:
            index, kind, value = await self.events.get()
            if index in finished:
                continue
            if kind == "done":
                finished.add(index)
            yield index, kind, value

    def cancel(self) -> None:
        if self.handle is not None and not self.handle.done:
            self.batcher.cancel(self.handle)


def create_app(model, tokenizer, name: str, batcher: Batcher, api_key: str | None = None,
               default_max_tokens: int = 256, max_body_bytes: int = 1 << 20, access_log: bool = True) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    context = batcher.max_len  # the engine's rows hold this many positions (prompt and reply)
    # No token is longer (in characters) than its vocabulary entry, so a prompt this long cannot fit the
    # context: refused before tokenizing, which would block the event loop for a second per megabyte.
    longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)
    max_prompt_chars = 2 * context * (longest_token + 1)
    prompt_tokenizer = copy.deepcopy(tokenizer)  # the batcher's thread decodes with the original
    # Rendering and tokenizing a prompt (up to a second for a megabyte) run on one thread of their own, so the
    # event loop goes on serving other clients meanwhile; one thread, as a tokenizer is not shared safely.
    prompt_thread = ThreadPoolExecutor(1, thread_name_prefix="lmforge-prompt")

    # Added last, so it runs first: nothing is parsed for a client without the key or with too big a body.
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    if access_log:  # outside the guard: its refusals are logged too
        app.add_middleware(AccessLog)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return _error(error.status, error.message, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, error: RequestValidationError):
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in error.errors()[:5]]
        problems = "; ".join(f"{where}: {e['msg']}" for where, e in zip(fields, error.errors()))
        return _error(400, f"invalid request: {problems}", fields[0] if fields else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):  # logged by Starlette; the client still gets JSON
        return _error(500, f"internal error ({type(error).__name__})", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "steps": batcher.steps, "rows_decoded": batcher.rows_decoded,
                "rows_cancelled": batcher.rows_cancelled, "tokens_generated": batcher.tokens_generated}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lmforge"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: protocol.ChatRequest, request: Request):
        _check_model(body.model, name)
        return await _answer(body, request, partial(_chat_prompt_ids, body), chat=True)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_model(body.model, name)
        return await _answer(body, request, lambda: (_prompt_ids(body.prompt, "prompt"), None), chat=False)

    def _chat_prompt_ids(body: protocol.ChatRequest) -> tuple[list[int], ChatPrompt]:
        prompt = chat_prompt(prompt_tokenizer, body)
        return _prompt_ids(prompt.text, "messages"), prompt

    def _prompt_ids(prompt: str, field: str) -> list[int]:
        if len(prompt) > max_prompt_chars:
            raise ApiError(400, f"the prompt has {len(prompt)} characters, more than the model's context of "
                           f"{context} tokens can hold", field, kind="context_length_exceeded")
        return prompt_tokenizer(prompt, add_special_tokens=False)["input_ids"]

    async def _answer(body, request: Request, make_prompt_ids, chat: bool):
        prompt_ids, prompt = await asyncio.get_running_loop().run_in_executor(prompt_thread, make_prompt_ids)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        request.state.lmforge_tokens = [len(prompt_ids), 0]  # read by the access log (serve.access_log)
        reading = partial(ReplyStream, prompt.opened, prompt.call_format) if chat else None
        limit = _token_limit(len(prompt_ids), body.token_limit, context, default_max_tokens)
        collector = Collector(body.n, batcher)
        logprobs, top = body.logprob_request
        # Completions count text offsets from the prompt's start, as the legacy API did.
        shape = chat_logprobs if chat else partial(completion_logprobs, offset=len(body.prompt))
        try:
            collector.submit(GenerationRequest(prompt_ids, Sampling(temperature=body.temperature, top_p=body.top_p,
                                                                    seed=body.seed),
                                               max_new_tokens=limit, stop_strings=body.stop_texts, n=body.n,
                                               logprobs=logprobs, top_logprobs=top))
        except RequestError as refused:  # what the engine cannot hold (n over its rows, ...)
            raise ApiError(400, str(refused), _param(str(refused))) from None
        except QueueFull as full:
            return _error(503, f"server busy ({full}); retry later", kind="server_busy", headers={"Retry-After": "1"})
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        first_call_only = chat and not body.parallel_tool_calls
        if body.stream:
            return StreamingResponse(_stream(collector, rid, len(prompt_ids), reading, body.include_usage,
                                             shape if logprobs else None, request.state.lmforge_tokens,
                                             first_call_only),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collecting = asyncio.ensure_future(_collect(collector))
        gone = asyncio.ensure_future(_client_gone(request))
        try:  # a client that leaves before its answer frees its rows, as a streaming one does
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            collecting.cancel()
            collector.cancel()
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)  # nobody reads it; uvicorn drops it on a closed connection
        texts, reasons, tokens, entries = collecting.result()
        request.state.lmforge_tokens[1] = tokens
        failed = next((r for r in reasons if r.startswith("error")), None)
        if failed:
            return _error(500, f"generation failed ({failed})", kind="server_error")
        shaped = [shape(e) for e in entries] if logprobs else None
        if not chat:
            return protocol.completion_response(rid, name, texts, reasons, len(prompt_ids), tokens, shaped)
        replies = [_first_call(split_reply(t, prompt.opened, prompt.call_format), first_call_only) for t in texts]
        reasons = [_finish_reason(reason, reply) for reason, reply in zip(reasons, replies)]
        return protocol.chat_response(rid, name, replies, reasons, len(prompt_ids), tokens, shaped)

    async def _stream(collector: Collector, rid: str, prompt_tokens: int, reading, include_usage: bool,
                      shape, counts: list[int], first_call_only: bool):
        """Server-sent chunks; with `shape` (log-probs asked for) each chunk carries the entries of the tokens
        whose text it releases (text held back for a possible stop string comes with a later chunk). A chat
        reply (`reading` makes its ReplyStream) streams its reasoning and content apart; its tool calls come
        whole in its last chunk."""
        tokens, pending = 0, [[] for _ in range(collector.n)]
        chat = reading is not None
        replies = [reading() for _ in range(collector.n)] if chat else []
        try:
            if chat:
                for index in range(collector.n):
                    yield _sse(protocol.chat_chunk(rid, name, index, {"role": "assistant", "content": ""}, None))
            async for index, kind, value in collector.events_until_done():
                if kind == "logprob":
                    pending[index].append(value)
                    continue
                if kind == "done":
                    reason, used = value
                    tokens += used
                    counts[1] = tokens
                    if reason.startswith("error"):
                        yield _sse(protocol.error_body(f"generation failed ({reason})", "server_error"))
                        return
                if chat:
                    delta, reason = _chat_delta(replies[index], kind, value, first_call_only)
                    if not delta and reason is None:
                        continue  # held back: its log-probs wait for the text they belong to
                logprobs = shape(pending[index]) if shape is not None and pending[index] else None
                pending[index] = []
                if chat:
                    chunk = protocol.chat_chunk(rid, name, index, delta, reason, logprobs)
                else:
                    chunk = protocol.completion_chunk(rid, name, index, value if kind == "text" else "",
                                                      value[0] if kind == "done" else None, logprobs)
                yield _sse(chunk)
            if include_usage:
                kind = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(protocol.usage_chunk(rid, name, kind, prompt_tokens, tokens))
            yield "data: [DONE]\n\n"
        finally:  # the client left mid-stream: its rows stop at the next decoding step
            collector.cancel()

    return app


def _chat_delta(reply: ReplyStream, kind: str, value, first_call_only: bool) -> tuple[dict, str | None]:
    """The delta (and, at the end, the finish reason) of one event of a streamed chat choice."""
    if kind == "text":
        return reply.feed(value), None
    delta, whole = reply.finish()
    whole = _first_call(whole, first_call_only)
    if whole.calls:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(whole.calls)]
    return delta, _finish_reason(value[0], whole)


def _first_call(reply: Reply, first_only: bool) -> Reply:
    """parallel_tool_calls false: a reply's first call alone (OpenAI's meaning: at most one per reply)."""
    return replace(reply, calls=reply.calls[:1]) if first_only and len(reply.calls) > 1 else reply


def _finish_reason(engine_reason: str, reply: Reply) -> str:
    return "tool_calls" if reply.calls and engine_reason == "stop" else engine_reason


async def _collect(collector: Collector) -> tuple[list[str], list[str], int, list[list[dict]]]:
    """Each choice's text, finish reason and log-prob entries, and the tokens generated."""
    texts, reasons, tokens = [""] * collector.n, [""] * collector.n, 0
    entries: list[list[dict]] = [[] for _ in range(collector.n)]
    async for index, kind, value in collector.events_until_done():
        if kind == "text":
            texts[index] += value
        elif kind == "logprob":
            entries[index].append(value)
        else:
            reasons[index], used = value
            tokens += used
    return texts, reasons, tokens, entries


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed its connection: the server tells the app so on receive() (the
    body has been read whole by then, so receive() has nothing else to give)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # not expected after a whole body; never spin if it happens


def _param(message: str) -> str | None:
    """The API field behind an engine's refusal ("request.n: ..." -> "n")."""
    field = message.split(":", 1)[0].removeprefix("request.")
    return {"max_new_tokens": "max_tokens", "prompt_ids": "messages"}.get(field, field if field.isidentifier() else None)


def _check_model(asked: str, served: str) -> None:
    if asked != served:
        raise ApiError(404, f"model {asked!r} is not served here; this server serves {served!r}", "model",
                       kind="model_not_found")


def _token_limit(prompt_tokens: int, asked: int | None, context: int, default: int) -> int:
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {context} tokens",
                       "messages", kind="context_length_exceeded")
    if asked is None:
        return min(default, room)
    if asked > room:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) exceeds the model's "
                       f"context of {context} tokens", "max_tokens", kind="context_length_exceeded")
    return asked


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param), status_code=status, headers=headers)
