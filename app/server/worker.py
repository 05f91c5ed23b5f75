"""The one thread that owns the model: jobs come through a bounded queue, events go back to the
event loop that waits for them.

``Worker.submit(job)`` raises ``queue.Full`` when ``max_queue`` jobs wait (the HTTP layer answers
429). A job runs one turn: check out the conversation, send the new message, stream text deltas
(held back while they could be the start of a stop string), cut the text at a stop string, check
the conversation back in. ``job.cancel`` (a client that went away, shutdown) stops it within a
decode step. Events, in order: ``("delta", text)`` ..., then ``("done", finish_reason, stats)``
or ``("error", APIError)``.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any
from collections.abc import Callable
from dataclasses import dataclass, field

from z2z_chat.backends.engine.events import Done, GenerationSettings, Token

from z2z_chat.backends.engine.prompt import ContextFullError
from z2z_chat.backends.errors import Z2ZError

from z2z_chat.app.server.conversations import Conversations
from z2z_chat.app.server.openai_shapes import APIError, ChatRequest

log = logging.getLogger("z2z-chat.serve")


class StopText:
    """Streams text while watching for stop strings: holds back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> str:
        """The text that is safe to send now."""
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = min(self.hold, len(self.buf))
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass
class Job:
    request: ChatRequest
    emit: Callable[[tuple], None]  # thread-safe: hands an event to the waiting request
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_codes: int = 0
    completion_codes: int = 0
    cached_tokens: int = 0
    errors: int = 0
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
            except APIError as e:
                job.emit(("error", e))
            except Exception as e:  # a bug: the request gets a 500 and the server keeps serving
                log.exception("internal error while answering a request")
                self.totals.errors += 1
                job.emit(("error", APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")))
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
                job.emit(("error", APIError(503, "the server is shutting down", "server_error")))
        self.jobs.put(None)

    def _run(self, job: Job) -> None:
        req = job.request
        if job.cancel.is_set():
            return
        self.totals.requests += 1
        session, how = self.conversations.checkout(req.system, req.history)
        stops = StopText(req.stop)
        text: list[str] = []
        done: Done | None = None
        settings = GenerationSettings.from_values(self.defaults | req.settings, drop_old_turns=False)
        try:
            for ev in session.send(req.message, settings, job.cancel):
                if isinstance(ev, Token) and ev.text:
                    out = stops.feed(ev.text)
                    if out:
                        text.append(out)
                        job.emit(("delta", out))
                    if stops.hit:
                        job.cancel.set()  # stops within a step; the rest of the reply is not wanted
                elif isinstance(ev, Done):
                    done = ev
        except ContextFullError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
        except Z2ZError as e:
            raise APIError(400, str(e)) from e
        finally:
            if stops.hit:
                # the conversation continues from the text the client got, not from the codes
                # written past the stop string: rebuild it from the messages (encoded at the next turn)
                session.messages[-1]["content"] = "".join(text)
                session.restore_or_rebuild(None, session.messages)
            self.conversations.checkin(session)
        if not stops.hit:
            tail = stops.flush()
            if tail:
                text.append(tail)
                job.emit(("delta", tail))
        assert done is not None
        st = done.stats
        t = self.totals
        t.prompt_tokens += st.context_tokens
        t.completion_tokens += st.reply_tokens
        t.prompt_codes += st.context_codes
        t.completion_codes += st.reply_codes
        t.cached_tokens += st.cached_tokens
        if done.reason == "cancelled" and not stops.hit:
            t.cancelled += 1
        finish = "stop" if done.reason == "stop" or stops.hit else "length"
        job.emit(("done", finish, st, how))
