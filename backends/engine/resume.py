"""Saving, resuming and rewinding a ``Session`` (a mixin over its fields: ``messages``, ``marks``,
``codec``, ``stream``, ``fed_text``, ``state``).

``to_dict``/``restore`` save and resume a conversation as JSON data (``state.SessionState``); its KV
cache is rebuilt by one prefill at the next send, or taken from a ``SavedKV`` exported with it
when the backend can (``SavesKV``) and it holds exactly the start of the stream. ``rewind_to``
and ``rewind`` go back to an earlier point of the same stream by trimming the KV cache and
dropping the hyper entries made since, so only what follows is read again.
"""

from __future__ import annotations

from typing import Any

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.engine.kv_store import SavedKV, codes_digest
from z2z_chat.backends.engine.state import SessionState
from z2z_chat.backends.engine.steps import Stream
from z2z_chat.backends.errors import BackendError
from z2z_chat.backends.protocol import SavesKV


class Resumable:
    def saved_kv(self) -> SavedKV | None:
        """The conversation's KV cache as bytes, with what it holds (None: this backend cannot, or
        nothing was read yet)."""
        if not isinstance(self.state, SavesKV) or self.fed == 0:
            return None
        try:
            data, n = self.state.export_kv()
        except BackendError:  # a cache kind it does not save (a sliding window): read it again instead
            return None
        if n != self.fed:  # the cache and the stream disagree: not worth keeping
            return None
        return SavedKV(data, n, codes_digest(self.codes[:n]))

    def _import_kv(self, kv: SavedKV | None) -> str | None:
        """On a fresh state after ``restore``'s ``_set``: take ``kv`` (and the entries' vectors saved
        with it) when it holds exactly the start of this stream. Returns why it was not taken (the
        caller then registers the entries and the next send reads the conversation again)."""
        if kv is None:
            return "no saved KV cache"
        if not isinstance(self.state, SavesKV):
            return "this backend cannot reuse a saved KV cache"
        if not 0 < kv.fed <= len(self.codes) or kv.digest != codes_digest(self.codes[:kv.fed]):
            return "the saved KV cache does not match the conversation"
        try:
            self.state.import_kv(kv.data, kv.fed, list(self.codec.codebook.items()), self.codec.candidate())
        except BackendError as e:
            return f"the saved KV cache was refused ({e})"
        self.stream.fed = kv.fed
        return None

    def to_dict(self) -> dict[str, Any]:
        """The conversation as JSON data (``state.SessionState``): what the history stores."""
        return SessionState(self.system, self.position_mode, self.messages, self.codes, self.fed, self.fed_text,
                            self.codec, self.marks).to_dict()

    def restore(self, d: dict[str, Any], kv: SavedKV | None = None) -> str | None:
        """Resume a saved conversation. Its KV cache is ``kv`` when that holds the start of this
        stream (only the rest is read at the next send), else rebuilt by one prefill at the next
        send; returns why ``kv`` was not used, or None. A state that does not fit this model
        raises ``ValueError`` and changes nothing."""
        saved = SessionState.from_dict(d, self.codec_config)
        self._clear_stream()
        self._set(saved)
        self.stream.fed = 0
        self.codec.take_new_entries()
        why = self._import_kv(kv)
        if why is not None:
            self.state.add_entries(list(self.codec.codebook.items()), self.codec.candidate())
        return None if kv is None else why

    def restore_or_rebuild(self, d: dict[str, Any] | None, messages: list[dict[str, str]],
                           kv: SavedKV | None = None) -> str | None:
        """Resume from ``d`` (and ``kv``, see ``restore``); when it is unusable, rebuild the
        conversation from ``messages`` (re-encoded at the next send). Returns a note for the user
        when it had to rebuild."""
        if d:
            try:
                self.restore(d, kv)  # a cache that does not fit is dropped quietly: it is only a cache
                return None
            except ValueError as e:
                note = f"the saved model state was unusable ({e}); it was rebuilt from the messages"
        else:
            note = None
        self.reset()
        self.messages = [dict(m) for m in messages]
        self.marks = [None] * len(messages)
        return note

    def rewind_to(self, n: int) -> bool:
        """Go back to just before message ``n`` (to edit it, or answer it again): the KV cache is
        trimmed to that point and the hyper entries made since are dropped, so only what follows
        is read. Where the boundary is not known (the message was re-read with dropped turns), the
        conversation is rebuilt from its first ``n`` messages instead. True when the cache was kept."""
        mark = self.marks[n] if n < len(self.marks) else None
        if mark is None:
            messages = self.messages[:n]
            self.reset()
            self.messages, self.marks = messages, [None] * n
            return False
        n_codes, n_text = mark
        codec = CodecSession(self.codec_config)
        for c in self.codes[:n_codes]:
            codec.push(c)
        codec.fresh = self.codec.fresh  # entries the state has are not new
        self._rewind(SessionState(self.system, self.position_mode, [dict(m) for m in self.messages[:n]],
                                  self.codes[:n_codes], min(self.fed, n_codes), self.fed_text[:n_text], codec,
                                  self.marks[:n]))
        return True

    def cut_reply(self, text: str) -> None:
        """The last reply ends at ``text`` (a stop string cut it): the KV cache goes back to where
        the reply began and the kept text is read with the next send, so the conversation goes on
        from what the client got, not from the codes written past the cut."""
        n = len(self.messages) - 1
        if n < 0 or self.messages[n]["role"] != "assistant":
            raise ValueError("the conversation does not end with a reply")
        self.rewind_to(n)
        self.follow([{"role": "assistant", "content": text}])

    def follow(self, messages: list[dict[str, str]]) -> None:
        """Messages of another branch after the current end (a branch switched to): they are read
        with the next send, which continues the stream from here."""
        self.messages += [dict(m) for m in messages]
        self.marks += [None] * len(messages)

    def rewind(self, d: dict[str, Any]) -> None:
        """Go back to an earlier ``to_dict()`` of this session (e.g. to regenerate a reply),
        trimming the KV cache and dropping the hyper entries created since, instead of rebuilding."""
        self._rewind(SessionState.from_dict(d, self.codec_config), d)

    def _rewind(self, saved: SessionState, d: dict[str, Any] | None = None) -> None:
        if self.codes[:len(saved.codes)] != saved.codes:
            self.restore(d if d is not None else saved.to_dict())  # not an earlier state of this stream
            return
        keep = min(saved.fed, self.fed)
        fresh = saved.codec.fresh
        self.state.trim(self.fed - keep)
        self._set(saved)
        self.stream.fed = keep
        # the state had every entry the snapshot had handed over; the rest come with the next sync
        self.state.drop_entries(fresh)

    def _set(self, saved: SessionState) -> None:
        self.system, self.messages, self.marks = saved.system, saved.messages, list(saved.marks)
        self.codec, self.fed_text = saved.codec, saved.fed_text
        self.stream = Stream(self.position_mode)
        self.stream.extend(saved.codes, saved.codec)
