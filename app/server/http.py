"""The HTTP side of ``z2z-chat serve``: Starlette routes over the model worker, run by uvicorn.

Routes: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
``POST /v1/chat/completions`` (JSON, or SSE with ``stream``). Handlers never touch the model:
they validate, queue a job and await its events, so the event loop keeps answering while a
reply is written. A streaming client that disconnects cancels its job (the reply stops within
a decode step and frees the worker). Errors have OpenAI's body; user errors are 4xx, bugs 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from z2z_chat.app.server.conversations import Conversations
from z2z_chat.app.server.openai_shapes import APIError, chunk, completion, new_id, parse_request, usage
from z2z_chat.app.server.worker import Job, Worker


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(runtime: Any, model_id: str, *, api_key: str | None = None, slots: int = 4,
              cache_mb: int = 1024, max_queue: int = 16, defaults: dict[str, Any] | None = None) -> Starlette:
    conversations = Conversations(runtime, slots, cache_mb << 20)
    worker = Worker(conversations, max_queue, defaults)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "queued": worker.queued(),
                             "busy": worker.current is not None})

    async def metrics(request: Request) -> Response:
        t, c = worker.totals, conversations.counters
        rows = [("requests_total", "counter", t.requests), ("request_errors_total", "counter", t.errors),
                ("requests_cancelled_total", "counter", t.cancelled),
                ("prompt_tokens_total", "counter", t.prompt_tokens),
                ("completion_tokens_total", "counter", t.completion_tokens),
                ("prompt_codes_total", "counter", t.prompt_codes),
                ("completion_codes_total", "counter", t.completion_codes),
                ("cached_prompt_tokens_total", "counter", t.cached_tokens),
                ("conversation_cache_hits_total", "counter", c.hits),
                ("conversation_cache_restores_total", "counter", c.restores),
                ("conversation_cache_misses_total", "counter", c.misses),
                ("conversation_cache_evictions_total", "counter", c.evictions),
                ("conversations_held", "gauge", len(conversations.live)),
                ("kv_cache_bytes", "gauge", conversations.kv_bytes()),
                ("queue_length", "gauge", worker.queued())]
        text = "".join(f"# TYPE z2z_{n} {k}\nz2z_{n} {v}\n" for n, k, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except APIError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "z2z-chat"}]})

    async def chat(request: Request) -> Response:
        try:
            authorize(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            req = parse_request(body, model_id)
        except APIError as e:
            return _error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()
        job = Job(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            worker.submit(job)
        except queue.Full:
            return _error(APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                                   "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}))
        cid = new_id()
        try:
            first = await events.get()  # errors before the first token are proper 4xx responses
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if first[0] == "error":
            return _error(first[1])
        if not req.stream:
            return await _whole(job, events, first, cid)
        return StreamingResponse(_sse(job, events, first, cid, req.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _whole(job: Job, events: asyncio.Queue, ev: tuple, cid: str) -> Response:
        text: list[str] = []
        try:
            while ev[0] == "delta":
                text.append(ev[1])
                ev = await events.get()
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if ev[0] == "error":
            return _error(ev[1])
        _, finish, stats, _ = ev
        return JSONResponse(completion(cid, model_id, "".join(text), finish, usage(stats)))

    async def _sse(job: Job, events: asyncio.Queue, ev: tuple, cid: str, include_usage: bool) -> AsyncIterator[str]:
        def frame(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            yield frame(chunk(cid, model_id, {"role": "assistant", "content": ""}))
            while ev[0] == "delta":
                yield frame(chunk(cid, model_id, {"content": ev[1]}))
                ev = await events.get()
            if ev[0] == "error":
                yield frame(ev[1].body())  # headers are sent: the error travels in the stream
            else:
                _, finish, stats, _ = ev
                yield frame(chunk(cid, model_id, {}, finish))
                if include_usage:
                    yield frame(chunk(cid, model_id, None, usage=usage(stats)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a client that went away stops its reply (a no-op after "done")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            await asyncio.get_running_loop().run_in_executor(None, worker.join, 30)
            conversations.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app = Starlette(routes=[Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
                            Route("/v1/chat/completions", chat, methods=["POST"])],
                    lifespan=lifespan, exception_handlers={404: not_found, 500: server_error})
    app.state.worker, app.state.conversations = worker, conversations
    return app
