"""The server's conversations: one decode state each, matched by their messages, least recently
used evicted first.

A request names its conversation by its messages (system prompt, then user/assistant turns, as
sent back by the client). ``checkout(system, history)`` returns a session whose messages are
exactly those, in the cheapest way available:

1. a cached session holding them (its KV cache and codebook continue: only the new message is
   encoded and prefilled);
2. an evicted one's saved state (``Session.to_dict``: the codes each message was given and the
   codebook), restored exactly and prefilled once: replies stay what they would have been;
3. otherwise a new session built from the messages (they are encoded at the next send).

The caller sends the new message, then ``checkin``s the session under its new messages. States
are held for at most ``slots`` conversations and ``budget_bytes`` of KV cache; evicted ones keep
their saved state (small: lists of ints) for up to ``slots * 16`` conversations.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from z2z_chat.backends.engine.session import Session

Key = tuple[str | None, tuple[tuple[str, str], ...]]
log = logging.getLogger("z2z-chat.serve")


def key_of(system: str | None, messages: list[dict[str, str]]) -> Key:
    return system, tuple((m["role"], m["content"]) for m in messages)


@dataclass
class Counters:
    hits: int = 0  # the conversation's state was held: only the new message was prefilled
    restores: int = 0  # rebuilt exactly from an evicted conversation's saved state
    misses: int = 0  # unknown conversation: built from its messages
    evictions: int = 0


class Conversations:
    def __init__(self, runtime: Any, slots: int = 4, budget_bytes: int = 1 << 30):
        self.rt, self.slots, self.budget = runtime, max(1, slots), budget_bytes
        self.live: OrderedDict[Key, Session] = OrderedDict()  # oldest first
        self.saved: OrderedDict[Key, dict[str, Any]] = OrderedDict()
        self.counters = Counters()
        self._lock = threading.Lock()  # the worker changes it; /metrics reads it

    def checkout(self, system: str | None, history: list[dict[str, str]]) -> tuple[Session, str]:
        """A session holding exactly these messages, and how it was found: hit | restored | new."""
        key = key_of(system, history)
        with self._lock:
            session = self.live.pop(key, None)
            saved = self.saved.pop(key, None)
        if session is not None:
            self.counters.hits += 1
            return session, "hit"
        session = self.rt.session(system=system)
        if saved is not None:
            try:
                session.restore(saved)
                self.counters.restores += 1
                return session, "restored"
            except ValueError as e:  # our own snapshots restore; rebuilt from the messages if not
                log.warning("a saved conversation could not be restored (%s); rebuilding it from its messages", e)
        session.restore_or_rebuild(None, history)
        self.counters.misses += 1
        return session, "new"

    def checkin(self, session: Session) -> None:
        key = key_of(session.system, session.messages)
        with self._lock:
            self.live[key] = session
            self.saved.pop(key, None)
            while len(self.live) > self.slots or (len(self.live) > 1 and self.kv_bytes() > self.budget):
                old_key, old = self.live.popitem(last=False)
                self.saved[old_key] = old.to_dict()
                old.state.close()
                self.counters.evictions += 1
            while len(self.saved) > self.slots * 16:
                self.saved.popitem(last=False)

    def kv_bytes(self) -> int:
        return sum(s.state.kv_bytes() for s in self.live.values())

    def close(self) -> None:
        with self._lock:
            for s in self.live.values():
                s.state.close()
            self.live.clear()
