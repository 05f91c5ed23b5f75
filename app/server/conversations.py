"""The server's conversations: matched by their longest common prefix of whole messages, held in
memory (least recently used out first) and parked on disk.

A request names its conversation by its messages (system prompt, then user/assistant turns, as
sent back by the client, and the new message). ``checkout`` picks, among the held and the parked
conversations with the same system prompt, the one sharing the most leading messages, and makes
it hold exactly the request's history:

- all of them: the conversation goes on (only the new message is read);
- the request is the same messages again (a regenerate, a retry): the held conversation goes back
  to where its last reply began and answers again from the logits kept there (``Found.regenerate``;
  greedy, the first reply again);
- some of them (an edit of an earlier message, another branch): it goes back to the last shared
  message (``Session.rewind_to``: the KV cache is trimmed, not rebuilt) and reads only what
  differs. The branch it leaves is first parked on disk, so a client that continues it finds it.

Parked conversations (evicted, and every held one at shutdown) go to a ``KVStore``: the KV cache
and hyper vectors the backend exports, with the messages and the engine state (codes, codebook)
in its header; one restored answers exactly as if it had been kept. A damaged, truncated or
foreign file is refused with a log line and the conversation is read again. Without a store
(``--no-disk-cache``) parked conversations keep their engine state in memory and are prefilled
again when they return (a re-read can answer slightly differently: see docs/SERVER.md).
"""

from __future__ import annotations

import base64
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from z2z_chat.backends.engine.kv_store import KVStore, SavedKV, codes_digest
from z2z_chat.backends.engine.session import Session

log = logging.getLogger("z2z-chat.serve")
Messages = list[dict[str, str]]


@dataclass
class Found:
    how: str  # hit | rewound | disk | new
    reused: int  # leading messages of the request the conversation already held
    regenerate: bool = False  # answer the last message again (the same messages were sent again)


@dataclass
class Counters:
    hits: int = 0  # held, continued as it was
    rewinds: int = 0  # held, taken back to a shared message (edit, regenerate, another branch)
    restores: int = 0  # parked on disk, taken back
    misses: int = 0  # nothing shared: read from its messages
    evictions: int = 0
    parked: int = 0  # written to disk


def shared(a: Messages, b: Messages) -> int:
    """How many leading messages ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x["role"] != y["role"] or x["content"] != y["content"]:
            break
        n += 1
    return n


class Conversations:
    def __init__(self, runtime: Any, slots: int = 4, budget_bytes: int = 1 << 30, store: KVStore | None = None):
        self.rt, self.slots, self.budget, self.store = runtime, max(1, slots), budget_bytes, store
        self.live: OrderedDict[str, Session] = OrderedDict()  # oldest first
        self.parked: OrderedDict[str, dict[str, Any]] = OrderedDict()  # id -> {system, messages[, state]}
        if store is not None:
            for cid, meta in store.entries():
                if isinstance(meta.get("messages"), list) and isinstance(meta.get("state"), dict):
                    self.parked[cid] = {"system": meta.get("system"), "messages": meta["messages"]}
        self.out: dict[int, str] = {}  # id(session) checked out -> its conversation id
        self.counters = Counters()
        self._lock = threading.Lock()  # the worker changes it; /metrics reads it

    # --- matching ---------------------------------------------------------------------------

    def checkout(self, system: str | None, history: Messages, message: str,
                 prefix: str = "") -> tuple[Session, Found]:
        """A session holding exactly ``history`` (or, for a regenerate, ``history`` and ``message``
        with its reply taken back), and how it was found."""
        full = history + [{"role": "user", "content": message}]
        best, best_n, held = None, 0, 0
        with self._lock:
            for cid, msgs, is_live in self._candidates(system):
                n = shared(msgs, full)
                if n > best_n or (n == best_n and n and is_live and not held):
                    best, best_n, held = cid, n, is_live
                    if n == len(msgs) == len(history):
                        break  # an exact continuation: nothing beats it
            session = self.live.pop(best) if held else None
        if best is None:
            self.counters.misses += 1
            return self._new(system, history), Found("new", 0)
        regenerate = best_n == len(full) and not prefix
        keep = best_n if regenerate else min(best_n, len(history))
        if session is None:
            session = self._restore(best)
            if session is None:
                self.counters.misses += 1
                return self._new(system, history), Found("new", 0)
            self.counters.restores += 1
            how = "disk"
        else:
            how = "hit" if keep == len(session.messages) else "rewound"
        if keep < len(session.messages):
            if how != "disk":
                self._park(best, session, close=False)  # the branch left may be continued by another client
                self.counters.rewinds += 1
            session.rewind_to(keep)
        elif how == "hit":
            self.counters.hits += 1
        session.follow(history[keep:])  # messages of the request the conversation never read
        self.out[id(session)] = uuid.uuid4().hex if keep < best_n or how != "hit" else best
        if how == "hit" or (how == "disk" and keep == len(self.parked.get(best, {}).get("messages", ()))):
            self._forget(best)  # the conversation went on: its parked copy is a prefix of it
        return session, Found(how, keep, regenerate)

    def _candidates(self, system: str | None):
        for cid, s in reversed(self.live.items()):  # most recent first: ties go to the freshest
            if s.system == system:
                yield cid, s.messages, True
        for cid, meta in reversed(self.parked.items()):
            if meta.get("system") == system:
                yield cid, meta["messages"], False

    def _new(self, system: str | None, history: Messages) -> Session:
        session = self.rt.session(system=system)
        session.restore_or_rebuild(None, history)
        self.out[id(session)] = uuid.uuid4().hex
        return session

    # --- holding and parking ----------------------------------------------------------------

    def checkin(self, session: Session) -> None:
        cid = self.out.pop(id(session), None) or uuid.uuid4().hex
        with self._lock:
            self.live[cid] = session
            while len(self.live) > self.slots or (len(self.live) > 1 and self.kv_bytes() > self.budget):
                old_id, old = self.live.popitem(last=False)
                self._park(old_id, old, close=True)
                self.counters.evictions += 1

    def _park(self, cid: str, session: Session, close: bool) -> None:
        """Keep a conversation out of memory: on disk with its KV cache, or its engine state in memory."""
        meta = {"system": session.system, "messages": [dict(m) for m in session.messages]}
        state = session.to_dict()
        if self.store is not None:
            kv = session.saved_kv() or SavedKV(b"", 0, codes_digest([]))
            extra = {"state": state}
            if session.prompt_logits is not None:  # a regenerate after a restart gives the first reply again
                digest, logits = session.prompt_logits
                extra["logits"] = {"digest": digest, "dtype": logits.dtype.str,
                                   "data": base64.b64encode(np.ascontiguousarray(logits).tobytes()).decode()}
            why = self.store.save(cid, SavedKV(kv.data, kv.fed, kv.digest, meta | extra))
            if why is None:
                self.counters.parked += 1
                self.parked[cid] = meta
            else:
                log.warning("conversation %s was not parked on disk (%s): it will be read again", cid[:8], why)
        else:
            self.parked[cid] = meta | {"state": state}
            while len(self.parked) > self.slots * 16:
                self.parked.popitem(last=False)
        if cid in self.parked:
            self.parked.move_to_end(cid)
        if close:
            session.state.close()

    def _restore(self, cid: str) -> Session | None:
        """A parked conversation as a session (its KV cache taken back where it was saved)."""
        meta = self.parked.get(cid)
        kv = self.store.load(cid) if self.store is not None else None
        saved = kv.meta if kv is not None else meta or {}
        state = saved.get("state")
        if meta is None or state is None:
            self._forget(cid)
            return None
        session = self.rt.session(system=meta.get("system"))
        try:
            why = session.restore(state, kv if kv is not None and kv.fed else None)
        except ValueError as e:
            log.warning("a parked conversation could not be restored (%s); it is read again from its messages", e)
            self._forget(cid)
            session.state.close()
            return None
        if why and kv is not None and kv.fed:
            log.warning("a parked conversation's KV cache was not used (%s); it is read again", why)
        kept = saved.get("logits")
        if why is None and isinstance(kept, dict):
            try:
                logits = np.frombuffer(base64.b64decode(kept["data"]), dtype=np.dtype(kept["dtype"]))
                session.keep_prompt_logits((str(kept["digest"]), logits))
            except (KeyError, ValueError, TypeError):
                log.warning("a parked conversation's kept logits were unreadable; a regenerate reads its message again")
        return session

    def _forget(self, cid: str) -> None:
        self.parked.pop(cid, None)
        if self.store is not None:
            self.store.drop(cid)

    def kv_bytes(self) -> int:
        return sum(s.state.kv_bytes() for s in self.live.values())

    def close(self) -> None:
        """At shutdown: every held conversation is parked (on disk when there is a store)."""
        with self._lock:
            for cid, s in list(self.live.items()):
                if self.store is not None:
                    self._park(cid, s, close=False)
                s.state.close()
            self.live.clear()
