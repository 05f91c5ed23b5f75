"""The HTTP side of ``z2z-chat serve``: Starlette routes over the model worker, run by uvicorn.

Routes: ``GET /health`` (public), ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (JSON, or SSE with ``stream``); CORS for
browser clients (any origin, no credentials). Handlers never touch the model: they validate, queue
a job and await its events (``worker.Delta`` ..., ``Finished`` | ``Failed``), so the event loop
keeps answering while a reply is written. A client that goes away, streaming or not, cancels its
job (the reply stops within a decode step and frees the worker). A body over ``max_body`` bytes is
a 413 before it is read whole. Errors have OpenAI's body; user errors are 4xx (counted in
``/metrics``), bugs 500. Every request is logged on ``z2z-chat.access``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from z2z_chat.app.server.conversations import Conversations
from z2z_chat.app.server.openai_shapes import APIError, chunk, completion, new_id, parse_request, usage
from z2z_chat.app.server.worker import Delta, Failed, Finished, Job, Worker, WorkerEvent

access = logging.getLogger("z2z-chat.access")


@dataclass
class Served:
    """What the routes share (``app.state.served``)."""

    worker: Worker
    conversations: Conversations
    model_id: str
    api_key: str | None
    max_body: int
    started: int  # the model's ``created`` time


def _served(request: Request) -> Served:
    return request.app.state.served


def _error(request: Request, e: APIError) -> JSONResponse:
    if e.status < 500:
        _served(request).worker.totals.client_errors += 1
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _authorize(request: Request) -> None:
    key = _served(request).api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                       code="invalid_api_key")


async def _body(request: Request) -> object:
    """The JSON body, refused (413) past the limit before it is read whole."""
    limit = _served(request).max_body
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes; this server takes at most {limit:,} "
                            "(z2z-chat serve --max-body-mb)", code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise APIError(413, f"the request body is over {limit:,} bytes (z2z-chat serve --max-body-mb)",
                           code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


async def health(request: Request) -> Response:
    s = _served(request)
    return JSONResponse({"status": "ok", "model": s.model_id, "queued": s.worker.queued(),
                         "busy": s.worker.current is not None})


async def metrics(request: Request) -> Response:
    try:
        _authorize(request)
    except APIError as e:
        return _error(request, e)
    s = _served(request)
    t, c = s.worker.totals, s.conversations.counters
    rows = [("requests_total", "counter", t.requests), ("request_errors_total", "counter", t.errors),
            ("request_client_errors_total", "counter", t.client_errors),
            ("requests_cancelled_total", "counter", t.cancelled),
            ("prompt_tokens_total", "counter", t.prompt_tokens),
            ("completion_tokens_total", "counter", t.completion_tokens),
            ("prompt_codes_total", "counter", t.prompt_codes),
            ("completion_codes_total", "counter", t.completion_codes),
            ("cached_prompt_tokens_total", "counter", t.cached_tokens),
            ("conversation_cache_hits_total", "counter", c.hits),
            ("conversation_cache_rewinds_total", "counter", c.rewinds),
            ("conversation_cache_restores_total", "counter", c.restores),
            ("conversation_cache_misses_total", "counter", c.misses),
            ("conversation_cache_evictions_total", "counter", c.evictions),
            ("conversations_parked_total", "counter", c.parked),
            ("conversations_held", "gauge", len(s.conversations.live)),
            ("kv_cache_bytes", "gauge", s.conversations.kv_bytes()),
            ("queue_length", "gauge", s.worker.queued())]
    text = "".join(f"# TYPE z2z_{n} {k}\nz2z_{n} {v}\n" for n, k, v in rows)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _model(s: Served) -> dict:
    return {"id": s.model_id, "object": "model", "created": s.started, "owned_by": "z2z-chat"}


async def models(request: Request) -> Response:
    try:
        _authorize(request)
    except APIError as e:
        return _error(request, e)
    return JSONResponse({"object": "list", "data": [_model(_served(request))]})


async def model(request: Request) -> Response:
    s = _served(request)
    try:
        _authorize(request)
        if request.path_params["model"] != s.model_id:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist; this server serves "
                                f"{s.model_id!r}", param="model", code="model_not_found")
    except APIError as e:
        return _error(request, e)
    return JSONResponse(_model(s))


async def chat(request: Request) -> Response:
    s = _served(request)
    try:
        _authorize(request)
        req = parse_request(await _body(request), s.model_id)
    except APIError as e:
        return _error(request, e)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[WorkerEvent] = asyncio.Queue()
    job = Job(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    try:
        s.worker.submit(job)
    except queue.Full:
        return _error(request, APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                                        "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}))
    cid = new_id()
    watcher = asyncio.create_task(_watch(request, job))  # a streaming response watches by itself
    try:
        first = await _next(job, events)
        if isinstance(first, Failed):
            return _error(request, first.error)
        if not req.stream:
            return await _whole(request, job, events, first, cid)
    finally:
        watcher.cancel()
    return StreamingResponse(_sse(request, job, events, first, cid, req.include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _watch(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (until the response starts)."""
    while (await request.receive())["type"] != "http.disconnect":
        continue
    job.cancel.set()


async def _next(job: Job, events: asyncio.Queue) -> WorkerEvent:
    try:
        return await events.get()
    except asyncio.CancelledError:
        job.cancel.set()
        raise


async def _whole(request: Request, job: Job, events: asyncio.Queue, ev: WorkerEvent, cid: str) -> Response:
    text: list[str] = []
    while isinstance(ev, Delta):
        text.append(ev.text)
        ev = await _next(job, events)
    if isinstance(ev, Failed):
        return _error(request, ev.error)
    return JSONResponse(completion(cid, _served(request).model_id, "".join(text), ev.finish, usage(ev.stats)))


async def _sse(request: Request, job: Job, events: asyncio.Queue, ev: WorkerEvent, cid: str,
               include_usage: bool) -> AsyncIterator[str]:
    model_id = _served(request).model_id

    def frame(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield frame(chunk(cid, model_id, {"role": "assistant", "content": ""}))
        while isinstance(ev, Delta):
            yield frame(chunk(cid, model_id, {"content": ev.text}))
            ev = await _next(job, events)
        if isinstance(ev, Failed):
            yield frame(ev.error.body())  # headers are sent: the error travels in the stream
        elif isinstance(ev, Finished):
            yield frame(chunk(cid, model_id, {}, ev.finish))
            if include_usage:
                yield frame(chunk(cid, model_id, None, usage=usage(ev.stats)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a client that went away stops its reply (a no-op once finished)


class AccessLog:
    """One line per request: method, path, status, milliseconds (pure ASGI: streams pass through)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            access.info("%s %s %d %.0f ms", scope["method"], scope["path"], status[0],
                        (time.perf_counter() - t0) * 1000)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(request, APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))


async def _method(request: Request, exc: Exception) -> Response:
    return _error(request, APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                    code="method_not_allowed"))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(request, APIError(500, f"internal error: {type(exc).__name__}", "server_error"))


def build_app(runtime, model_id: str, *, api_key: str | None = None, slots: int = 4, cache_mb: int = 1024,
              max_queue: int = 16, defaults: dict | None = None, store=None, max_body_mb: int = 16) -> Starlette:
    conversations = Conversations(runtime, slots, cache_mb << 20, store)
    worker = Worker(conversations, max_queue, defaults)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            await asyncio.get_running_loop().run_in_executor(None, worker.join, 30)
            conversations.close()  # held conversations are parked on disk

    app = Starlette(routes=[Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
                            Route("/v1/models/{model:path}", model),
                            Route("/v1/chat/completions", chat, methods=["POST"])],
                    middleware=[Middleware(AccessLog),
                                Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                                           allow_headers=["*"])],
                    lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _method, 500: _server_error})
    app.state.served = Served(worker, conversations, model_id, api_key, max_body_mb << 20, int(time.time()))
    app.state.worker, app.state.conversations = worker, conversations
    return app
