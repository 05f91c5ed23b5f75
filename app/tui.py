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
import functools
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Collapsible, Footer, ListView, LoadingIndicator, Static

from z2z_chat.backends.errors import Z2ZError

from z2z_chat.app.controller import ChatController, TurnEnd
from z2z_chat.app.keys import ACTIONS, SLASH_COMMANDS
from z2z_chat.app.options import AppOptions
from z2z_chat.app.screens import ConfirmDialog, ModelScreen, PromptDialog, SearchScreen, SettingsScreen, StatsScreen
from z2z_chat.app.store import NotSaved, default_path, open_store
from z2z_chat.app.widgets import ChatInput, ConversationItem, EntryAction, ReplyView, UserView


def log_path() -> Path:
    return default_path().parent / "z2z-chat.log"


def guarded(method):
    """Run a UI handler; a bug in it is logged and shown instead of closing the app."""

    @functools.wraps(method)
    def wrapper(self: Z2ZChat, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the boundary: report, keep running
            self.report(e)
            return None

    return wrapper


class Z2ZChat(App):
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
        self.cancel = threading.Event()
        self.reply: ReplyView | None = None
        self.started, self.progress = 0.0, None  # the reply being waited for: when it was asked, its reading
        self.editing: int | None = None  # the entry being edited (its index), while it is
        self.reply_saved = True
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
            loop.add_signal_handler(sig, lambda code=code: self.call_next(self.leave, code))

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
        if self.generating or not self.reply_saved:
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

    @property
    def generating(self) -> bool:
        return any(w.is_running for w in self.workers if w.group == "gen")

    # --- chatting -------------------------------------------------------------------------

    # --- attachments ------------------------------------------------------------------------

    def attach_files(self, paths: list[str]) -> bool:
        """Read and hold files for the next message; a file that cannot be attached is named in a
        notification and nothing is attached (the typed command stays in the input)."""
        from z2z_chat.app.attachments import AttachmentError, read_attachment

        try:
            new = [read_attachment(p) for p in paths]
        except AttachmentError as e:
            self.notify(str(e), severity="error", timeout=15)
            return False
        self.attachments += new
        self.show_attachments()
        return True

    def show_attachments(self) -> None:
        bar = self.query_one("#attached", Static)
        bar.display = bool(self.attachments)
        sizes = ", ".join(self._describe(a) for a in self.attachments)
        bar.update(f"attached: {sizes} - sent with the next message")

    def _describe(self, a) -> str:
        """name (size, base tokens, positions it takes against this conversation's codebook)."""
        session = self.ctl.session if self.ctl is not None else None
        if session is None:
            return f"{a.name} ({_size(a.size)})"
        tokens, positions = session.measure(a.text)
        return f"{a.name} ({_size(a.size)}, {tokens:,} tokens, {positions:,} positions)"

    def action_search(self) -> None:
        from z2z_chat.app.archive import search

        def done(found: tuple[int, int] | None) -> None:
            if found is None:
                return
            if self.generating or not self.reply_saved:
                self.notify("Stop the reply first (Esc)", severity="warning")
                return
            cid, mid = found
            self.editing = None
            opened = self.ctl.open_at(cid, mid)
            self.render_messages(opened.messages)
            self.highlight_open()
            for note in opened.notes:
                self.notify(note, severity="warning", timeout=15)
            index = next(i for i, m in enumerate(opened.messages) if m.id == mid)
            self.call_after_refresh(lambda: (self.entries()[index].focus(), self.entries()[index].scroll_visible()))

        self.push_screen(SearchScreen(lambda text: search(self.ctl.store, text)), done)

    def action_attach(self) -> None:
        def done(value: str | None) -> None:
            if value and value.strip():
                self.attach_files(shlex.split(value))

        self.push_screen(PromptDialog("Attach a text file (path; several separated by spaces)", paths=True), done)

    def _attach_command(self, text: str) -> bool:
        """``/file PATH ...``, or a lone path to an existing file: attach instead of sending; ``/help``
        and unknown ``/word`` commands are answered here, never sent to the model."""
        word = text.split(maxsplit=1)[0] if text.strip() else ""
        if re.fullmatch(r"/[A-Za-z]+", word) and word != "/file" and not _is_file(text):
            listed = "\n".join(f"{c}: {h}" for c, h in SLASH_COMMANDS)
            if word == "/help":
                self.notify(listed, title="commands", timeout=12)
                self.query_one(ChatInput).accepted(text)
            else:
                self.notify(f"{word} is not a command; the commands are:\n{listed}", severity="warning", timeout=10)
            return True
        if text.startswith("/file"):
            paths = shlex.split(text[len("/file"):])
            if not paths:
                self.notify("/file needs a path: /file notes.txt", severity="warning")
                return True
            if self.attach_files(paths):
                self.query_one(ChatInput).accepted(text)
            return True
        if "\n" not in text and _is_file(text):
            if self.attach_files([text]):
                self.query_one(ChatInput).accepted(text)
                self.notify(f"{Path(text).name} is attached; type your question about it", timeout=6)
            return True
        return False

    @guarded
    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        # refused messages stay in the input: nothing the user typed is thrown away
        if self._attach_command(event.text):
            return
        if self.ctl.runtime is None:
            self.notify("No model is loaded yet (F9 opens one); your message is kept in the input",
                        severity="error")
            return
        if self.generating or not self.reply_saved:
            self.notify("A reply is still running (Esc stops it); your message is kept in the input",
                        severity="warning")
            return
        from z2z_chat.backends.engine.prompt import ContextFullError

        from z2z_chat.app.attachments import compose

        message, files = compose(event.text, self.attachments), self.attachments
        try:
            self.ctl.session.check_fits(message, self.ctl.generation_settings())
        except ContextFullError as e:  # before anything changes: an edit stays an edit
            self.notify(f"Too long: {e}. Your message is kept in the input.", severity="error", timeout=20)
            return
        if self.editing is not None:  # the edited message starts a new branch at its place
            self.ctl.prepare_edit(self.editing)
            self.render_messages(self.ctl.store.messages(self.ctl.conv_id)[:self.editing])
            self.editing = None
        new = self.ctl.conv_id is None
        try:
            self.ctl.begin_turn(message)
        except NotSaved as e:
            self.notify(str(e), severity="warning", timeout=15)
        self.query_one(ChatInput).accepted(event.text)
        self.attachments = []
        self.show_attachments()
        if new:
            self.refresh_history()
        chat = self.query_one("#chat", VerticalScroll)
        views = [Collapsible(Static(a.text, markup=False), title=self._describe(a), collapsed=True,
                             classes="attachment") for a in files]  # collapsed: in the message, not in the way
        views.append(UserView(event.text))
        chat.mount_all(views)
        self.last_sent = (event.text, files, views)  # what Esc during a long read takes back
        self.start_reply(message)

    def start_reply(self, text: str) -> None:
        self.reply = ReplyView(coloured=self.coloured, who=self.who())
        self.query_one("#chat", VerticalScroll).mount(self.reply)
        self.cancel.clear()
        self.reply_saved = False
        self.started, self.progress = time.monotonic(), None
        self.update_status(running=True)
        self.ticker = self.set_interval(0.1, self._tick)
        self._generate(text, self.reply, self.ctl.generation_settings())

    SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def _waiting(self) -> str:
        """From Enter to the end of the reply: a spinner and the time taken, or the reading progress."""
        elapsed = time.monotonic() - self.started
        if self.progress is not None and not (self.reply and self.reply.units):
            p = self.progress
            return f"reading {p.done:,} / {p.total:,} positions, about {p.eta_s:.0f} s left (Esc cancels)"
        spin = self.SPINNER[int(elapsed * 10) % len(self.SPINNER)]
        if self.reply is None or not self.reply.units:
            return f"{spin} waiting for the first token, {elapsed:.1f} s (Esc stops)"
        return f"{spin} writing a reply, {elapsed:.1f} s (Esc stops)"

    def _tick(self) -> None:
        if self.reply_saved:
            self.ticker.stop()
        else:
            self.update_status(running=True)

    @work(thread=True, exclusive=True, group="gen")
    def _generate(self, text: str, reply: ReplyView, settings) -> None:
        from z2z_chat.backends.engine.events import Notice, Progress, Token

        def show(ev) -> None:
            if isinstance(ev, Token):
                self.call_from_thread(reply.append, ev.text, ev.span)
            elif isinstance(ev, Progress) and ev.elapsed_s >= 1.0:  # a long input: say how far it has read
                self.call_from_thread(self.show_progress, ev)
            elif isinstance(ev, Notice):
                self.call_from_thread(self.notify, ev.text, severity="warning", timeout=10)

        try:
            end = self.ctl.run_turn(text, settings, self.cancel, show)
        except Exception as e:  # noqa: BLE001 - the worker's boundary
            self.call_from_thread(self.report, e)
            end = TurnEnd("error")
        self.call_from_thread(self.finish_reply, reply, end)

    def show_progress(self, p) -> None:
        self.progress = p  # the ticker shows it

    @guarded
    def finish_reply(self, reply: ReplyView, end: TurnEnd) -> None:
        if self.reply_saved:
            return
        self.reply_saved = True
        saved = True
        try:
            self.ctl.finish_turn(end)
        except NotSaved as e:
            saved = False
            self.notify(str(e), severity="warning", timeout=15)
        if end.reason == "withdrawn":
            self._withdrawn(reply)
            return
        stats = end.stats
        if stats is not None:
            speed = (f" | {stats.decode_tok_s:.1f} tok/s ({stats.decode_codes_s:.1f} codes/s)"
                     if stats.meaningful_speed else "")
            if stats.drafted_codes:
                speed += f" | lookahead {stats.codes_per_forward:.2f} codes/forward"
            self.status_text = (f"ttft {stats.ttft_s * 1000:.0f} ms{speed}" if stats.reply_codes
                                else f"{end.note or 'ended'} before the first token")
        reply.finish(end.note)
        if saved:  # a queued reply is not in the history yet: it has no branches to show
            self.show_branches()
        self.update_status()

    def _withdrawn(self, reply: ReplyView) -> None:
        """Esc while a long message was being read: it was taken back; it goes back in the input."""
        if self.ctl.conv_id is None:
            self.refresh_history()
        text, files, views = self.last_sent
        for view in (*views, reply):
            view.remove()
        self.attachments = files + self.attachments
        self.show_attachments()
        box = self.query_one(ChatInput)
        if not box.text.strip():
            box.load_text(text)
        self.status_text = "cancelled: the message was not sent"
        self.update_status()

    def action_stop(self) -> None:
        if not self.reply_saved:  # a reply is pending, whether or not its worker has started yet
            self.cancel.set()
        elif self.editing is not None:
            self.editing = None
            self.query_one(ChatInput).load_text("")
            self.status_text = "edit cancelled"
            self.update_status()

    @guarded
    def action_regenerate(self) -> None:
        text = None if self.generating else self.ctl.prepare_regenerate()
        if text is None:
            self.notify("Nothing to regenerate", severity="warning")
            return
        replies = self.query(ReplyView)
        if replies:
            replies.last().remove()
        self.start_reply(text)

    @guarded
    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        self.editing = None
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

    @guarded
    def action_export(self) -> None:
        if self.ctl.conv_id is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        self.notify(f"Exported to {self.ctl.export()}", timeout=15)

    def action_export_all(self) -> None:
        import time

        from z2z_chat.app.archive import export_jsonl
        from z2z_chat.app.controller import export_dir

        path = export_dir() / f"z2z-chat-all-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            n = export_jsonl(self.ctl.store, path)
        except (OSError, Z2ZError) as e:
            self.report(e)
            return
        self.notify(f"Exported {n} conversation(s), every branch, to {path}", timeout=15)

    def action_import_file(self) -> None:
        from z2z_chat.app.archive import import_file

        def done(value: str | None) -> None:
            if not value or not value.strip():
                return
            try:
                added, skipped, notes = import_file(self.ctl.store, Path(value.strip()).expanduser())
            except Z2ZError as e:  # a malformed file names its line; nothing was imported
                self.report(e)
                return
            more = f" ({skipped} already in the history)" if skipped else ""
            self.notify("\n".join([f"Imported {added} conversation(s) from {value.strip()}{more}", *notes]),
                        timeout=10)
            self.refresh_history()

        self.push_screen(PromptDialog("Import conversations from (JSON Lines, or a JSON list of {role, content})",
                                      paths=True), done)

    def action_system_prompt(self) -> None:
        def done(value: str | None) -> None:
            if value is not None:
                self.ctl.set_system(value.strip() or None)
                self.notify("System prompt saved: it applies from the next message" if value.strip()
                            else "System prompt removed", timeout=5)
                self.update_status()

        current = self.ctl.session.system if self.ctl.session else self.options.system
        self.push_screen(PromptDialog("System prompt", current or "", multiline=True), done)

    def action_settings(self) -> None:
        def done(result: tuple[dict, bool] | None) -> None:
            if result is not None:
                self.ctl.apply_settings(*result)
                self.notify("Settings saved" + (" (also for new chats)" if result[1] else ""), timeout=4)
                self.update_status()

        self.push_screen(SettingsScreen(dict(self.ctl.settings), self.ctl.check_settings), done)

    def action_rename(self) -> None:
        cid = self.ctl.conv_id
        if cid is None:
            self.notify("Nothing to rename yet: this chat is saved with its first message", severity="warning")
            return

        def done(value: str | None) -> None:
            if value is None:
                return
            if not value.strip():
                self.notify("A title needs at least one visible character; the title was not changed",
                            severity="warning")
                return
            self.ctl.rename(cid, " ".join(value.split()))
            self.notify("Renamed", timeout=3)
            self.refresh_history()

        self.push_screen(PromptDialog("Rename conversation", self.ctl.store.get(cid).title), done)

    def action_delete(self) -> None:
        cid = self.ctl.conv_id
        if cid is None or self.generating:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.ctl.delete(cid)
                self.action_new_chat()
                self.refresh_history()

        self.push_screen(ConfirmDialog(f"Delete “{self.ctl.store.get(cid).title}”? This cannot be undone."), done)

    def action_open_model(self) -> None:
        from z2z_chat.app.options import recent_models

        def done(value: str | None) -> None:
            if value is not None:
                self.options.model = value or None  # "": the embedded default
                self.load_model(self.options.model)

        loaded = self.options.model or ""
        self.push_screen(ModelScreen(loaded, recent_models()), done)

    def get_system_commands(self, screen) -> Any:
        yield from super().get_system_commands(screen)
        for a in ACTIONS:
            yield SystemCommand(a.title, a.help, getattr(self, f"action_{a.name}"))

    async def action_quit(self) -> None:
        await self.leave()

    async def leave(self, return_code: int = 0) -> None:
        if self.generating and self.reply is not None:
            self.cancel.set()
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


def _is_file(text: str) -> bool:
    """A line that names a file (a pasted path is offered as an attachment); a long line of text
    is no name at all (the OS refuses it: ENAMETOOLONG)."""
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / 2**20:.1f} MB"


def run_app(options: AppOptions) -> int:
    app = Z2ZChat(options)
    app.run()
    return app.return_code or 0
