"""The one thread that owns the model: jobs come through a bounded queue, events go back to the
event loop that waits for them.

``Worker.submit(job)`` raises ``queue.Full`` when ``max_queue`` jobs wait (the HTTP layer answers
429). A job runs one turn: check out the conversation (``conversations.py``), send the new message
(or answer the last one again), stream text deltas (held back while they could be the start of a
stop string), cut the reply and the conversation at a stop string, check the conversation back
in. ``job.cancel`` (a client that went away, shutdown) stops it within a decode step. Events, in
order: ``Delta`` ..., then ``Finished`` or ``Failed``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from z2z_chat.app.server.conversations import Conversations, Found
from z2z_chat.app.server.openai_shapes import APIError, ChatRequest
from z2z_chat.backends.engine.events import Done, Event, GenerationSettings, Token, TurnStats
from z2z_chat.backends.engine.grammar import Grammar
from z2z_chat.backends.engine.prompt import ContextFullError
from z2z_chat.backends.errors import Z2ZError

log = logging.getLogger("z2z-chat.serve")


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish: str  # OpenAI's finish_reason: stop | length
    stats: TurnStats
    found: Found  # how the conversation was found (hit, rewound, disk, new)


@dataclass
class Failed:
    error: APIError


WorkerEvent = Delta | Finished | Failed


class StopText:
    """Streams text while watching for stop strings: holds back a tail that could start one;
    after a stop string, nothing more passes. ``sent`` is every text let through."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit, self.sent = stops, "", False, ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> str:
        """The text that is safe to send now."""
        if self.hit:
            return ""
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
        else:
            keep = min(self.hold, len(self.buf))
            out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        self.sent += out
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        self.sent += out
        return out


@dataclass
class Job:
    request: ChatRequest
    emit: Callable[[WorkerEvent], None]  # thread-safe: hands an event to the waiting request
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_codes: int = 0
    completion_codes: int = 0
    cached_tokens: int = 0
    errors: int = 0  # answered 5xx (a bug)
    client_errors: int = 0  # answered 4xx (counted by the HTTP layer)
    cancelled: int = 0


class Worker(threading.Thread):
    def __init__(self, conversations: Conversations, max_queue: int = 16, defaults: dict[str, Any] | None = None):
        super().__init__(name="z2z-model-worker", daemon=True)
        self.conversations = conversations
        self.defaults = defaults or {}  # settings of requests that give none (the settings table's names)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.totals = Totals()
        self.current: Job | None = None
        self._stopping = False

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise queue.Full
        self.jobs.put_nowait(job)

    def queued(self) -> int:
        return self.jobs.qsize()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.current = job
            try:
                self._run(job)
            except APIError as e:  # counted by the HTTP layer, which answers it
                job.emit(Failed(e))
            except Exception as e:  # a bug: the request gets a 500 and the server keeps serving
                log.exception("internal error while answering a request")
                self.totals.errors += 1
                job.emit(Failed(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")))
            finally:
                self.current = None

    def stop(self) -> None:
        """Cancel what runs and what waits; the thread exits after the current step."""
        if self._stopping:
            return
        self._stopping = True
        if self.current is not None:
            self.current.cancel.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit(Failed(APIError(503, "the server is shutting down", "server_error")))
        self.jobs.put(None)

    def _run(self, job: Job) -> None:
        req = job.request
        if job.cancel.is_set():
            return
        self.totals.requests += 1
        settings = GenerationSettings.from_values(self.defaults | req.settings, drop_old_turns=False)
        session, found = self.conversations.checkout(req.system, req.history, req.message, req.prefix)
        stops = StopText(req.stop)
        done: Done | None = None
        try:
            for ev in self._turn(session, found, req, settings, job.cancel):
                if isinstance(ev, Token) and ev.text:
                    out = stops.feed(ev.text)
                    if out:
                        job.emit(Delta(out))
                    if stops.hit:
                        job.cancel.set()  # stops within a step; the rest of the reply is not wanted
                elif isinstance(ev, Done):
                    done = ev
        except ContextFullError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
        except Z2ZError as e:
            raise APIError(400, str(e)) from e
        finally:
            if stops.hit and session.messages and session.messages[-1]["role"] == "assistant":
                session.cut_reply(req.prefix + stops.sent)  # the conversation goes on from what the client got
            self.conversations.checkin(session)
        tail = stops.flush()
        if tail:
            job.emit(Delta(tail))
        assert done is not None
        self._count(done, stops.hit)
        finish = "stop" if done.reason == "stop" or stops.hit else "length"
        job.emit(Finished(finish, done.stats, found))

    @staticmethod
    def _turn(session: Any, found: Found, req: ChatRequest, settings: GenerationSettings,
              cancel: threading.Event) -> Iterator[Event]:
        grammar = Grammar.json(session.tok, req.schema, session.stop_ids) if req.json else None
        if found.regenerate:  # the same messages again: from where the first reply began
            return session.regenerate(settings, cancel, grammar=grammar)
        return session.send(req.message, settings, cancel, prefix=req.prefix, grammar=grammar)

    def _count(self, done: Done, stopped: bool) -> None:
        st, t = done.stats, self.totals
        t.prompt_tokens += st.context_tokens
        t.completion_tokens += st.reply_tokens
        t.prompt_codes += st.context_codes
        t.completion_codes += st.reply_codes
        t.cached_tokens += st.cached_tokens
        if done.reason in ("cancelled", "withdrawn") and not stopped:
            t.cancelled += 1
