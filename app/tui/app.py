"""The Textual chat app: a conversation list, a streamed Markdown chat, and zip2zip made visible.

The rules live in ``controller.ChatController`` (store, session, turns, settings); this module
renders them. The model runs in a thread worker (``_generate``) that drives the engine's
``Session.send`` and hands each event to the UI with ``call_from_thread``; Esc sets the engine's
cancel event (honoured between prefill chunks and decode steps), so the UI never blocks.

Errors: the ones we expect (``Z2ZError``) become a notification. Anything else in an action or
in the model worker is logged with its traceback to ``<data dir>/z2z-chat.log`` and shown as an
error notification, and the app keeps running; what the user typed is already in the store
(or queued, when the database is locked) before anything can fail. An exception that escapes
Textual ends the app with a non-zero exit status.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, ListView, LoadingIndicator, Static

from z2z_chat.backends.errors import Z2ZError

from z2z_chat.app.controller import ChatController, TurnEnd
from z2z_chat.app.keys import ACTIONS
from z2z_chat.app.options import AppOptions
from z2z_chat.app.screens import StatsScreen
from z2z_chat.app.store import NotSaved, open_store
from z2z_chat.app.tui.common import guarded, log_path
from z2z_chat.app.tui.dialogs import Dialogs
from z2z_chat.app.tui.turn import ReplyTurns
from z2z_chat.app.widgets import ChatInput, ConversationItem, EntryAction, ReplyView, UserView


SIGNAL_GRACE_S = 4.0  # after SIGTERM/SIGHUP the process ends within this, whatever it was doing


class Z2ZChat(ReplyTurns, Dialogs, App):
    """The chat app: list of chats, messages, status line, keys; the reply turn is ``turn.ReplyTurns``,
    the dialogs ``dialogs.Dialogs``. Near 300 lines because Textual binds keys, actions and messages
    to the App class: what is left here is layout, loading a model, the chat list and the status."""

    TITLE = "z2z-chat"
    AUTO_FOCUS = "ChatInput"
    CSS_PATH = "z2z.tcss"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True),
                Binding("ctrl+c", "quit", "Quit", show=False, priority=True)] + [
        # the message box (a TextArea) takes F5-F7 for selections: the app's actions come first
        Binding(a.keys, a.name, a.title, show=a.show, priority=a.keys in ("f5", "f6", "f7")) for a in ACTIONS]

    def __init__(self, options: AppOptions, store_path: Path | None = None):
        super().__init__()
        self.options = options
        self.store_path = store_path
        self.ctl: ChatController | None = None
        self.coloured = False
        self.reply: ReplyView | None = None
        self.started, self.progress = 0.0, None  # the reply being waited for: when it was asked, its reading
        self.editing: int | None = None  # the entry being edited (its index), while it is
        self.queued = False  # a message was sent while the model loaded
        self.leaving = False  # a signal asked the app to end
        self.status_text = ""
        self.attachments: list = []  # Attachment: files for the next message
        self.last_sent: tuple[str, list, list] = ("", [], [])
        self.sidebar: bool | None = None  # shown or hidden by Ctrl+B; None: by the window's width

    # --- layout and errors --------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Static("Chats", id="sidebar-title")
                yield ListView(id="history")
            with Vertical():
                yield VerticalScroll(id="chat")
                yield LoadingIndicator(id="loading")
                yield Static("", id="attached")
                yield ChatInput(id="input", placeholder="Message (Enter sends, Ctrl+J new line)")
        yield Static("", id="status")
        yield Footer()

    def report(self, error: BaseException) -> None:
        """Show an error; an unexpected one is logged with its traceback first."""
        if isinstance(error, Z2ZError):
            self.notify(str(error), severity="error", timeout=20)
            return
        path = log_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(traceback.format_exception(error)) + "\n")
            where = f"details in {path}"
        except OSError as e:
            where = f"and the log {path} could not be written ({e})"
        unsaved = self.ctl is not None and (self.ctl.pending.queue or self.ctl.store.read_only)
        saved = "Some of your messages are NOT saved (see the warning before)." if unsaved else "Your messages are saved."
        self.notify(f"Something went wrong: {type(error).__name__}: {error} ({where}). {saved}",
                    severity="error", timeout=30)

    def on_mount(self) -> None:
        store = open_store(self.store_path)
        self.ctl = ChatController(self.options, store)
        if store.warning:
            self.notify(store.warning, severity="warning", timeout=30)
        self.refresh_history()
        self.query_one(ChatInput).recall = store.sent()
        self.query_one("#chat", VerticalScroll).anchor()
        self._show_sidebar()
        self.load_model(self.options.model)
        # SIGTERM (kill, logout, a closing terminal's SIGHUP) leaves like Ctrl+Q: the reply being
        # written is saved as stopped, pending writes are flushed
        loop = asyncio.get_running_loop()
        for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
            loop.add_signal_handler(sig, lambda code=code: self._on_signal(code))

    def _on_signal(self, code: int) -> None:
        """Leave as Ctrl+Q does, and make sure the process ends: a worker thread inside the model
        (loading it, a long forward) or a terminal that is gone can keep the app from ending, so
        after ``SIGNAL_GRACE_S`` (or at a second signal) what was written is flushed and the
        process exits at once."""
        if self.leaving:
            self._hard_exit(code)
        self.leaving = True
        self.call_next(self.leave, code)
        timer = threading.Timer(SIGNAL_GRACE_S, self._hard_exit, args=(code,))
        timer.daemon = True
        timer.start()

    def _hard_exit(self, code: int) -> None:
        try:
            if self.ctl is not None:
                self.ctl.flush()
        except NotSaved as e:
            print(f"z2z-chat: {e}; the last messages could not be saved", file=sys.stderr)
        finally:
            os._exit(code)

    # --- model ----------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, model: str | None) -> None:
        from z2z_chat.backends.runtime import open_runtime

        self.call_from_thread(self._loading, True, f"loading {model or 'the default model'} ...")

        def progress(line: str) -> None:
            self.call_from_thread(self._loading, True, line)

        try:
            rt = open_runtime(model, self.options.backend, self.options.device, self.options.dtype, base=self.options.base,
                              progress=progress)
        except Z2ZError as e:
            self.call_from_thread(self._load_failed, str(e))
            return
        except Exception as e:  # noqa: BLE001 - a bug while loading: log it, keep the app
            self.call_from_thread(self.report, e)
            self.call_from_thread(self._load_failed, f"{type(e).__name__}: {e}")
            return
        self.call_from_thread(self._loaded, rt)

    def _loading(self, on: bool, text: str = "") -> None:
        self.query_one("#loading").display = on
        if text:
            self.query_one("#status", Static).update(text)

    def _load_failed(self, error: str) -> None:
        if self.queued:
            self.queued = False
            self.notify("Your message was not sent: it is kept in the input", severity="warning", timeout=15)
        if self.ctl.runtime is None:
            self._loading(False, "no model loaded: F9 opens one")
        else:  # the model loaded before still answers: say so
            self._loading(False)
            self.update_status()
        self.notify(f"Could not load the model: {error}", severity="error", timeout=30)

    def notify(self, message: str, **kwargs: Any) -> None:
        """Our messages are plain text: a path or an install hint like z2z-chat[torch] is not markup."""
        super().notify(message, **{"markup": False, **kwargs})

    @guarded
    def _loaded(self, rt) -> None:
        from z2z_chat.app.options import remember_model

        remember_model(self.options.model)
        self._loading(False)
        for note in self.ctl.attach(rt):
            self.notify(note, severity="warning", timeout=15)
        self.update_status()
        if self.queued:  # a message typed while the model loaded: it is in the input, send it now
            self.queued = False
            self.query_one(ChatInput).action_submit()

    def update_status(self, running: bool = False) -> None:
        ctl = self.ctl
        if ctl is None or ctl.runtime is None:
            return
        n, C = len(ctl.session.codec), ctl.runtime.codec.max_codebook_size
        usage = ctl.session.context_usage(ctl.generation_settings())
        state = self._waiting() if running else (self.status_text or "ready")
        status = self.query_one("#status", Static)
        status.set_class(usage.nearly_full, "warning")
        system = " | system prompt on" if ctl.session.system else ""
        status.update(f"{ctl.runtime.describe()} | {state} | {usage.describe(short=True)} | codebook {n}/{C}{system}")

    # --- conversations --------------------------------------------------------------------

    @work(exclusive=True, group="history")
    async def refresh_history(self) -> None:
        lv = self.query_one("#history", ListView)
        await lv.clear()
        await lv.extend(ConversationItem(c.id, c.title, c.updated) for c in self.ctl.store.conversations())
        self.highlight_open()

    def highlight_open(self) -> None:
        """The open chat is the one highlighted in the list; a new chat (or a relaunch) highlights none."""
        lv = self.query_one("#history", ListView)
        lv.index = next((i for i, item in enumerate(lv.children) if item.conv_id == self.ctl.conv_id), None)

    @guarded
    def on_list_view_selected(self, event: ListView.Selected) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        self.open_conversation(event.item.conv_id)
        self.query_one(ChatInput).focus()

    def open_conversation(self, cid: int) -> None:
        self.editing = None
        opened = self.ctl.open(cid)
        self.render_messages(opened.messages)
        self.highlight_open()
        for note in opened.notes:
            self.notify(note, severity="warning", timeout=15)
        self.status_text = ""
        self.update_status()

    def render_messages(self, messages: list) -> None:
        """Show a branch of the conversation, with where each message has other branches."""
        chat = self.query_one("#chat", VerticalScroll)
        chat.remove_children()
        for m in messages:
            if m.role == "user":
                chat.mount(UserView(m.content))
            else:
                view = ReplyView(m.units or [[m.content, 0]], self.coloured, self.who())
                chat.mount(view)
                self.call_after_refresh(view.finish, "stopped" if m.stopped else "")
        self.call_after_refresh(self.show_branches)

    def entries(self) -> list[UserView | ReplyView]:
        return [w for w in self.query_one("#chat", VerticalScroll).children if isinstance(w, (UserView, ReplyView))]

    def show_branches(self) -> None:
        """Label the entries that have other branches (``‹ 2/3 ›``)."""
        if self.ctl.conv_id is None:
            return
        for view, m in zip(self.entries(), self.ctl.store.messages(self.ctl.conv_id)):
            if m.id is not None:
                siblings = self.ctl.store.siblings(m.id)
                view.set_branch(siblings.index(m.id) + 1, len(siblings))

    @guarded
    def on_entry_action(self, event: EntryAction) -> None:
        entry, action = event.entry, event.action
        if action == "copy":
            self.copy_to_clipboard(entry.text)
            self.notify(f"Copied {len(entry.text):,} characters", timeout=3)
            return
        if action == "copy_code":
            blocks = entry.code_blocks()
            if not blocks:
                self.notify("This reply has no code block (c copies the whole reply)", severity="warning")
                return
            self.copy_to_clipboard("\n\n".join(blocks))
            self.notify(f"Copied {len(blocks)} code block(s)", timeout=3)
            return
        if self.generating or self.ctl.reply_pending:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        if self.ctl.conv_id is None or entry not in self.entries():
            return
        index = self.entries().index(entry)
        if action == "edit":
            self.editing = index
            box = self.query_one(ChatInput)
            box.load_text(entry.text)
            box.move_cursor(box.document.end)
            box.focus()
            self.status_text = "editing: Enter sends it as a new branch (the old one is kept), Esc cancels"
            self.update_status()
        elif action == "branch":
            branch = self.ctl.switch_branch(index, event.step)
            if branch is None:
                self.notify("No other branch that way", severity="warning", timeout=3)
                return
            self.render_messages(branch)
            self.call_after_refresh(lambda: self.entries()[index].focus())

    # --- chatting -------------------------------------------------------------------------

    # --- attachments ------------------------------------------------------------------------

    SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    @guarded
    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        self.editing = None
        self.attachments = []  # files attached for the last chat are not the new one's
        self.show_attachments()
        for note in self.ctl.new_chat():
            self.notify(note, severity="warning", timeout=15)
        self.highlight_open()
        self.status_text = ""
        self.query_one("#chat", VerticalScroll).remove_children()
        self.query_one(ChatInput).focus()
        self.update_status()

    def who(self) -> str:
        """The name over a reply: the model's directory, or repo id."""
        rt = self.ctl.runtime if self.ctl else None
        if rt is None:
            return "model"
        return "default model" if self.options.model is None else Path(rt.model_name).name or rt.model_name

    def on_resize(self, event: events.Resize) -> None:
        self._show_sidebar()

    def _show_sidebar(self) -> None:
        self.query_one("#sidebar").display = self.size.width >= 60 if self.sidebar is None else self.sidebar

    def action_toggle_sidebar(self) -> None:
        self.sidebar = not self.query_one("#sidebar").display
        self._show_sidebar()

    def action_toggle_units(self) -> None:
        self.coloured = not self.coloured
        for view in self.query(ReplyView):
            view.set_coloured(self.coloured)
        if self.coloured:
            self.notify("Plain-text view coloured by unit: plain = base token, blue = 2-token, "
                        "orange = 3+-token hypertoken. Ctrl+T returns to Markdown.", timeout=8)

    def action_stats(self) -> None:
        title = self.ctl.store.get(self.ctl.conv_id).title if self.ctl.conv_id else "this conversation"
        self.push_screen(StatsScreen(title, self.ctl.turns))

    def get_system_commands(self, screen) -> Any:
        yield from super().get_system_commands(screen)
        for a in ACTIONS:
            yield SystemCommand(a.title, a.help, getattr(self, f"action_{a.name}"))

    async def action_quit(self) -> None:
        await self.leave()

    async def leave(self, return_code: int = 0) -> None:
        if self.generating and self.reply is not None:
            self.ctl.stop()
            # save what was said before leaving; the engine state stays at the previous reply
            self.finish_reply(self.reply, TurnEnd("cancelled"))
        self.exit(return_code=return_code)

    def on_unmount(self) -> None:
        if self.ctl is not None:
            if not self.generating:  # a reply cut short may still be in the model's hands
                for note in self.ctl.keep_kv():
                    print(f"z2z-chat: {note}", file=sys.stderr)
            try:
                self.ctl.flush()
            except NotSaved as e:
                print(f"z2z-chat: {e}; the last messages could not be saved")
            self.ctl.store.close()


def run_app(options: AppOptions) -> int:
    app = Z2ZChat(options)
    app.run()
    code = app.return_code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # a worker still inside the model (loading it): the history is closed, nothing is left to
        # save, and Python would wait for the thread before exiting
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
