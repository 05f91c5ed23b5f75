"""The chat app's state and rules, without Textual: runtime, engine session, history store, turns,
settings, export. The UI (``tui.py``) renders what this returns; tests drive it directly.

Contract:
- What the user typed is written to the store before anything can fail (``begin_turn``).
- A turn is ``begin_turn`` (main thread), ``run_turn`` (a worker thread: the engine streams the
  reply to the UI's callback; nothing is written there) and ``finish_turn`` (main thread: the
  reply, marked stopped when cancelled, and the engine state; a withdrawn message is taken out).
  The UI renders events and says how the turn ended (``TurnEnd.note``); it decides nothing.
- Store writes that fail with ``NotSaved`` (a lock held by another process, a read-only database,
  a full disk) stay queued (``PendingWrites``) and are retried with the next write or ``flush()``;
  ``NotSaved`` reaches the caller only to tell the user.
- Opening a conversation opens what can be opened: messages with bad bytes are shown repaired,
  an unusable saved engine state is rebuilt from the messages; ``notes`` says what happened.
- Leaving a conversation (another one, a new chat, a model switch, quitting) keeps its KV cache
  on disk where the backend can export it (``backends/engine/kv_store.py``); opening it again takes that cache
  instead of reading the conversation again, when it still matches.
- Settings start from the command line's ``AppOptions`` and are validated the same way
  (``SettingsError``) whether typed on the command line or in the app.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from z2z_chat.backends.loading.assets import cache_dir
from z2z_chat.backends.engine.events import Done, Event, GenerationSettings, Token, TurnStats
from z2z_chat.backends.errors import SettingsError
from z2z_chat.backends.engine.kv_store import KVStore

from z2z_chat.app.options import AppOptions
from z2z_chat.backends.engine.settings import CHAT_KEYS, TABLE
from z2z_chat.app.store import Message, NotSaved, PendingWrites, Store


def export_dir() -> Path:
    """Where F4 writes Markdown exports: ``<data dir>/exports`` (``Z2Z_DATA_DIR`` overrides)."""
    from z2z_chat.app.store import default_path

    return default_path().parent / "exports"


@dataclass
class ConvRef:
    """The open conversation's id, shared by the writes queued for it: a conversation created by
    a queued write (the database was locked) gets its id when that write runs, and the queued
    messages follow it, even after the user has moved to another chat."""

    id: int | None = None
    creating: bool = False  # its creation is queued


@dataclass
class Opened:
    messages: list[Message]
    notes: list[str] = field(default_factory=list)


@dataclass
class TurnEnd:
    """How a turn ended: the engine's reason ("stop", "length", "context", "cancelled",
    "withdrawn"), or "error" (then no stats); ``stats`` is None when it did not finish (an error,
    or quitting mid-reply), and the engine state is then not saved."""

    reason: str
    stats: TurnStats | None = None

    @property
    def note(self) -> str:
        """What the UI shows under the reply."""
        return {"cancelled": "stopped", "length": "max tokens reached", "context": "context window full",
                "error": "error"}.get(self.reason, "")


class ChatController:
    """The app's state and rules without Textual. Over 250 lines on purpose: every rule that changes
    the open conversation (open, send, edit, branch, regenerate, settings, model) keeps the history,
    the engine session and the KV cache consistent together, and is easiest to check in one place."""

    def __init__(self, options: AppOptions, store: Store):
        self.options, self.store = options, store
        self.runtime: Any = None
        self.session: Any = None
        self.ref = ConvRef()
        self.turns: list[TurnStats] = []
        self.before_last: dict[str, Any] | None = None
        self.settings: dict[str, Any] = dict(options.settings)
        self.cancel = threading.Event()  # the running turn's (``stop``)
        self.reply_pending = False  # a reply was asked for and is not saved yet
        self.pending = PendingWrites()
        self.kv: KVStore | None = None

    @property
    def conv_id(self) -> int | None:
        return self.ref.id

    # --- settings -----------------------------------------------------------------------------

    def generation_settings(self) -> GenerationSettings:
        return self.options.generation(self.settings)

    def set_settings(self, text: str) -> None:
        """Apply ``key=value ...`` (SettingsError names the bad key; nothing changes then)."""
        new = dict(self.settings)
        for part in text.split():
            k, eq, v = part.partition("=")
            if not eq or k not in new:
                raise SettingsError(f"unknown setting {part!r}; the settings are {', '.join(CHAT_KEYS)}")
            new[k] = TABLE[k].parse(v)
        self.apply_settings(new)

    def check_settings(self, new: dict[str, Any]) -> str | None:
        """Why ``new`` cannot be used (the message names the setting), or None."""
        try:
            self.options.generation(new)
        except SettingsError as e:
            return str(e)
        return None

    def apply_settings(self, new: dict[str, Any], as_defaults: bool = False) -> None:
        """Use ``new`` for this conversation (and as the defaults of the next ones); SettingsError
        changes nothing."""
        self.options.generation(new)  # validates
        self.settings = dict(new)
        if as_defaults:
            from z2z_chat.app.options import save_defaults

            self.options.settings = dict(new)
            save_defaults(new)
        if self.conv_id is not None:
            ref = self.ref
            self.write(lambda: self.store.update(ref.id, settings=new))

    # --- the store ----------------------------------------------------------------------------

    def write(self, fn) -> Any:
        """A store write that survives a locked database (queued, retried with the next one)."""
        return self.pending.run(fn)

    def write_all(self, *fns) -> None:
        """Several writes in order; all are queued even when the first is not saved (NotSaved is
        raised after, once, to tell the user)."""
        busy = None
        for fn in fns:
            try:
                self.write(fn)
            except NotSaved as e:
                busy = e
        if busy is not None:
            raise busy

    def flush(self) -> None:
        if self.pending.queue:
            self.pending.run(lambda: None)

    # --- model --------------------------------------------------------------------------------

    def attach(self, runtime: Any) -> list[str]:
        """Use a newly loaded model; the open conversation (if any) is re-opened on it."""
        notes = []
        if self.runtime is not None:
            notes += self.keep_kv()
            self.runtime.close()
        self.runtime = runtime
        self.kv = KVStore(cache_dir() / "kv", runtime.identity)
        self.session = runtime.session(system=self.options.system)
        return notes + (self.open(self.conv_id).notes if self.conv_id is not None else [])

    def _kv_key(self, cid: int) -> str:
        return f"{self.store.path.absolute()}|{cid}"

    def keep_kv(self) -> list[str]:
        """Save the open conversation's KV cache (before leaving it); a note when it could not be."""
        if self.kv is None or self.session is None or self.conv_id is None:
            return []
        snap = self.session.saved_kv()
        if snap is None:
            return []
        why = self.kv.save(self._kv_key(self.conv_id), snap)
        if why:
            return [f"the conversation's KV cache could not be kept in {self.kv.root} ({why}); "
                    "it will be read again when reopened"]
        return []

    # --- conversations ------------------------------------------------------------------------

    def open(self, cid: int) -> Opened:
        leaving = self.keep_kv() if cid != self.conv_id else []
        conv = self.store.get(cid)
        self.store.repaired = 0
        msgs = self.store.messages(cid)
        notes = leaving
        if self.store.repaired:
            notes.append(f"{self.store.repaired} stored value(s) of this conversation were damaged "
                         "and are shown as far as they could be read")
        self.ref = ConvRef(cid)
        self.turns = [TurnStats.from_dict(m.stats) for m in msgs if m.role == "assistant" and m.stats]
        self.settings.update({k: v for k, v in conv.settings.items() if k in CHAT_KEYS})
        state = conv.state or {}
        self.before_last = state.get("before_last") if isinstance(state.get("before_last"), dict) else None
        if self.session is not None:
            self.session.system = conv.system
            history = [{"role": m.role, "content": m.content} for m in msgs]
            engine = state.get("engine")
            if isinstance(engine, dict) and engine.get("messages") != history:
                # saved before the last messages were (a crash mid-reply): the messages are the truth
                engine = None
                notes.append("the saved model state was older than the messages (the app stopped during a "
                             "reply?); it was rebuilt from the messages")
            kv = self.kv.load(self._kv_key(cid)) if self.kv is not None and engine is not None else None
            note = self.session.restore_or_rebuild(engine, history, kv)
            if note:
                notes.append(note)
                self.before_last = None
        return Opened(msgs, notes)

    def new_chat(self) -> list[str]:
        """A new conversation starts from the defaults (the command line's, or those saved with F8),
        not from the settings or system prompt the previous one was given."""
        notes = self.keep_kv()
        self.ref, self.turns, self.before_last = ConvRef(), [], None
        self.settings = dict(self.options.settings)
        if self.session is not None:
            self.session.reset()
            self.session.system = self.options.system
        return notes

    def begin_turn(self, text: str, title: str | None = None) -> None:
        """Record the user's message (creating the conversation on the first one, titled by
        ``title``: what the user typed, not the files attached). ``NotSaved`` means both are
        queued: they are written, in order, once the store takes writes again."""
        self.before_last = self.session.to_dict()
        ref, writes = self.ref, []
        if ref.id is None and not ref.creating:
            title = re.sub(r"\s+", " ", text if title is None else title).strip()[:40] or "chat"
            model, system, settings = self.runtime.model_name if self.runtime else "", self.session.system, dict(self.settings)

            def create() -> None:
                ref.id = self.store.create(title, model, system, settings)

            ref.creating = True
            writes.append(create)
        writes.append(lambda: self.store.add_message(ref.id, Message("user", text)))
        self.write_all(*writes)

    def withdraw_turn(self) -> None:
        """The message was cancelled before its reply began (the engine took it back): remove it
        from the history too, and the conversation if it was its first message."""
        ref = self.ref

        def undo() -> None:
            msgs = self.store.messages(ref.id)
            if msgs and msgs[-1].role == "user":
                self.store.delete_message(msgs[-1].id)
            if len(msgs) <= 1:
                self.store.delete(ref.id)
                ref.id = None

        self.write(undo)
        if ref.id is None:
            ref.creating = False

    def start_reply(self) -> None:
        """A reply is asked for: ``stop`` cancels it, ``finish_turn`` saves it once."""
        self.cancel.clear()
        self.reply_pending = True

    def stop(self) -> None:
        """Esc, a signal, quitting: the reply being written stops within a decode step (or its
        message is taken back during its prefill)."""
        if self.reply_pending:
            self.cancel.set()

    def run_turn(self, text: str, settings: GenerationSettings, cancel: threading.Event | None,
                 show: Callable[[Event], None]) -> TurnEnd:
        """The reply to ``text`` (after ``begin_turn``), each event passed to ``show`` as it comes;
        ``cancel``: another event than the turn's own (``stop``). Runs on a worker thread: it writes
        nothing (``finish_turn`` does)."""
        cancel = cancel or self.cancel
        self.reply_pending = True  # also when no start_reply came first (scripts, tests)
        self.reply_units: list[list[Any]] = []
        end = TurnEnd("error")
        for ev in self.session.send(text, settings, cancel):
            if isinstance(ev, Token):
                self.reply_units.append([ev.text, ev.span])
            elif isinstance(ev, Done):
                end = TurnEnd(ev.reason, ev.stats)
            show(ev)
        return end

    def finish_turn(self, end: TurnEnd) -> bool:
        """Write how the turn ended, once (see the module docstring): False when it was already
        written (the worker and a quitting app can both end a turn). ``NotSaved``: queued, to tell
        the user."""
        if not self.reply_pending:
            return False
        self.reply_pending = False
        if end.reason == "withdrawn":
            self.withdraw_turn()
            return True
        units = list(getattr(self, "reply_units", []))  # a copy: quitting mid-reply, the worker still runs
        if end.stats is not None:
            self.turns.append(end.stats)
        ref = self.ref
        msg = Message("assistant", "".join(t for t, _ in units), units, end.reason == "cancelled",
                      end.stats.to_dict() if end.stats else None)
        writes = [lambda: self.store.add_message(ref.id, msg)]
        if end.stats is not None:
            state = {"engine": self.session.to_dict(), "before_last": self.before_last}
            writes.append(lambda: self.store.update(ref.id, state=state))
        self.write_all(*writes)
        return True

    def prepare_regenerate(self) -> tuple[str, bool] | None:
        """Answer the last message again: the engine goes back to before it and the old reply
        stays as a branch; a last message left unanswered (its reply failed) is answered. Returns
        the user text to answer and whether it had a reply, or None."""
        if self.conv_id is None or self.session is None:
            return None
        msgs = self.store.messages(self.conv_id)
        if msgs and msgs[-1].role == "user":  # unanswered: the reply goes after it
            self._rewind(msgs, len(msgs) - 1)
            self.before_last = self.session.to_dict()
            return msgs[-1].content, False
        if len(msgs) < 2 or msgs[-1].role != "assistant" or msgs[-2].role != "user":
            return None
        cid, user = self.conv_id, msgs[-2]
        self.write(lambda: self.store.set_head(cid, user.id, descend=False))  # the new reply: a sibling
        if self.turns:
            self.turns.pop()
        self._rewind(msgs, len(msgs) - 2)  # the state before the user message: send() adds it again
        self.before_last = self.session.to_dict()
        return user.content, True

    def prepare_edit(self, index: int) -> str:
        """Edit the user message at ``index`` of the branch shown: the engine goes back to before it
        (only what follows the edit is read) and the next ``begin_turn`` starts a new branch there;
        the old branch is kept. Returns the message's text."""
        msgs = self.store.messages(self.conv_id)
        target = msgs[index]
        if target.role != "user":
            raise ValueError(f"message {index} is a reply; only your messages can be edited")
        cid = self.conv_id
        self.write(lambda: self.store.set_head(cid, target.parent, descend=False))
        self.turns = [TurnStats.from_dict(m.stats) for m in msgs[:index] if m.role == "assistant" and m.stats]
        self._rewind(msgs, index)
        return target.content

    def switch_branch(self, index: int, step: int) -> list[Message] | None:
        """Show the previous (-1) or next (+1) branch at message ``index``; the engine keeps what the
        branches share and reads the rest with the next message. None when there is no such branch."""
        msgs = self.store.messages(self.conv_id)
        siblings = self.store.siblings(msgs[index].id)
        j = siblings.index(msgs[index].id) + step
        if not 0 <= j < len(siblings):
            return None
        return self._show_branch(msgs, siblings[j])

    def open_at(self, cid: int, mid: int) -> Opened:
        """Open a conversation showing the branch that holds message ``mid`` (a search result)."""
        opened = self.open(cid)
        if any(m.id == mid for m in opened.messages):
            return opened
        return Opened(self._show_branch(opened.messages, mid), opened.notes)

    def _show_branch(self, shown: list[Message], through: int) -> list[Message]:
        """Show the branch through message ``through``: the engine keeps the part it shares with
        ``shown`` and reads the rest with the next message."""
        cid = self.conv_id
        self.write(lambda: self.store.set_head(cid, through))
        branch = self.store.messages(cid)
        common = next((i for i, (a, b) in enumerate(zip(shown, branch)) if a.id != b.id), min(len(shown), len(branch)))
        self._rewind(shown, common)
        self.session.follow([{"role": m.role, "content": m.content} for m in branch[common:]])
        self.turns = [TurnStats.from_dict(m.stats) for m in branch if m.role == "assistant" and m.stats]
        self.before_last = None
        state = {"engine": self.session.to_dict(), "before_last": None}
        self.write(lambda: self.store.update(cid, state=state))
        return branch

    def _rewind(self, branch: list[Message], index: int) -> None:
        """The engine back to before ``branch[index]``: trimmed where it holds that point, else rebuilt
        from the messages before it (turns it dropped to fit the window, or a state out of step)."""
        engine = self.session.messages
        offset = len(branch) - len(engine)  # turns the engine dropped to fit the window
        shown = [{"role": m.role, "content": m.content} for m in branch[max(offset, 0):]]
        if offset >= 0 and index >= offset and engine == shown:
            self.session.rewind_to(index - offset)
        else:
            self.session.restore_or_rebuild(None, [{"role": m.role, "content": m.content} for m in branch[:index]])

    def delete(self, cid: int) -> None:
        self.write(lambda: self.store.delete(cid))
        if self.kv is not None:
            self.kv.drop(self._kv_key(cid))
        if cid == self.conv_id:
            self.ref = ConvRef()  # nothing to keep of a deleted conversation
            self.new_chat()

    def rename(self, cid: int, title: str) -> None:
        self.write(lambda: self.store.update(cid, title=title))

    def set_system(self, value: str | None) -> None:
        """This conversation's system prompt (a new chat starts from the launch's, ``--system``)."""
        if self.session is not None:
            self.session.system = value
        if self.conv_id is not None:
            ref = self.ref
            self.write(lambda: self.store.update(ref.id, system=value))

    def export(self) -> Path:
        """The conversation, every branch, as Markdown (UTF-8) in ``export_dir()``; returns the file written."""
        from z2z_chat.app.archive import markdown

        conv = self.store.get(self.conv_id)
        safe = re.sub(r"[^\w-]+", "-", conv.title).strip("-")[:40] or "chat"
        out = export_dir()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"z2z-chat-{conv.id}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}.md"
        path.write_text(markdown(self.store, conv.id), encoding="utf-8")
        return path


__all__ = ["ChatController", "NotSaved", "Opened", "TurnEnd", "export_dir"]
