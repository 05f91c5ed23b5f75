"""The Textual chat app: a conversation list, a streamed Markdown chat, and zip2zip made visible.

The model runs in a thread worker (``_generate``) that drives the engine's ``Session.send`` and
hands each event to the UI with ``call_from_thread``; Esc sets the engine's cancel event, which
it honours between decode steps, so the UI never blocks. Every message is committed to the
history store as it completes; the engine state needed to resume (codec snapshot and code
stream) is stored with the conversation after each reply.
"""

from __future__ import annotations

import re
import threading
from argparse import Namespace
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message as TMessage
from textual.widgets import Footer, Label, ListItem, ListView, LoadingIndicator, Markdown, Static, TextArea

from .screens import ConfirmDialog, PromptDialog, StatsScreen
from .store import Message, Store, open_store

# Unit colours: mid-luminance so they read on dark and light themes alike.
UNIT_STYLES = {1: "", 2: "bold #2f80ed", 3: "bold #e67e22"}


class ChatInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Shift+Enter where the terminal has it) breaks the line."""

    BINDINGS = [Binding("enter", "submit", "Send", priority=True),
                Binding("ctrl+j,shift+enter", "newline", "New line", show=False, priority=True),
                Binding("escape", "app.stop", "Stop reply", show=False)]

    class Submitted(TMessage):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.post_message(self.Submitted(text))
            self.clear()

    def action_newline(self) -> None:
        self.insert("\n")


class UserView(Static):
    def __init__(self, text: str):
        super().__init__(Text(text), classes="user")


class ReplyView(Vertical):
    """A streamed reply: Markdown, or coloured by unit (base token / 2-token / 3+-token hypertoken)."""

    def __init__(self, units: list[list[Any]] | None = None, coloured: bool = False):
        super().__init__(classes="reply")
        self.units: list[list[Any]] = units or []
        self.coloured = coloured

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.units)

    def compose(self) -> ComposeResult:
        yield Markdown(self.text, classes="body")
        yield Static(self.coloured_text(), classes="units")
        yield Static("", classes="meta")

    def on_mount(self) -> None:
        self.set_coloured(self.coloured)

    def coloured_text(self) -> Text:
        out = Text()
        for text, span in self.units:
            out.append(text, style=UNIT_STYLES[min(span, 3)] if span else "")
        return out

    def append(self, text: str, span: int) -> None:
        self.units.append([text, span])
        if not text:
            return
        if self.coloured:
            self.query_one(".units", Static).update(self.coloured_text())
        else:
            self.query_one(Markdown).append(text)

    def set_coloured(self, on: bool) -> None:
        self.coloured = on
        md, units = self.query_one(Markdown), self.query_one(".units", Static)
        if on:
            units.update(self.coloured_text())
        else:
            md.update(self.text)
        md.display, units.display = not on, on

    def finish(self, note: str) -> None:
        self.query_one(".meta", Static).update(Text(note, style="italic dim"))


class Z2ZChat(App):
    TITLE = "z2z-chat"
    AUTO_FOCUS = "ChatInput"
    CSS = """
    #sidebar { width: 28; border-right: solid $panel; }
    #sidebar-title { background: $panel; text-style: bold; padding: 0 1; }
    #chat { padding: 0 1; }
    .user { background: $boost; padding: 0 1; margin: 1 0 0 0; }
    .reply { height: auto; margin: 1 0 0 0; }
    .reply Markdown { margin: 0; padding: 0; }
    .meta { color: $text-muted; }
    #input { height: 5; border: tall $accent; }
    #status { height: 1; background: $panel; color: $text; padding: 0 1; }
    #loading { height: 1; display: none; }
    #dialog { width: 70; height: auto; max-height: 80%; border: thick $accent; padding: 1 2; background: $surface; }
    #dialog TextArea { height: 10; }
    PromptDialog, ConfirmDialog { align: center middle; }
    #buttons { height: auto; align: right middle; }
    #stats-table { height: auto; max-height: 60%; }
    #stats-chart { height: 3; margin: 1 2; }
    """
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+t", "toggle_units", "Hypertokens"),
        Binding("f3", "stats", "Stats"),
        Binding("f4", "export", "Export"),
        Binding("f5", "system_prompt", "System prompt", show=False),
        Binding("f8", "settings", "Settings", show=False),
        Binding("f2", "rename", "Rename", show=False),
        Binding("f12", "delete", "Delete chat", show=False),
        Binding("f9", "open_model", "Open model", show=False),
    ]

    def __init__(self, args: Namespace, store_path: Path | None = None):
        super().__init__()
        self.args = args
        self.store_path = store_path
        self.store: Store | None = None
        self.runtime = None
        self.session = None
        self.conv_id: int | None = None
        self.coloured = False
        self.cancel = threading.Event()
        self.reply: ReplyView | None = None
        self.reply_saved = True
        self.turns: list[dict[str, Any]] = []
        self.before_last: dict[str, Any] | None = None
        self.settings = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
        self.last_stats = ""

    # --- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Static("Chats", id="sidebar-title")
                yield ListView(id="history")
            with Vertical():
                yield VerticalScroll(id="chat")
                yield LoadingIndicator(id="loading")
                yield ChatInput(id="input", placeholder="Message (Enter sends, Ctrl+J new line)")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.store = open_store(self.store_path)
        if self.store.warning:
            self.notify(self.store.warning, severity="warning", timeout=20)
        self.refresh_history()
        self.query_one("#chat", VerticalScroll).anchor()
        self.load_model(self.args.model)

    # --- model ----------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, model: str | None) -> None:
        from backends.runtime import RuntimeOpenError, open_runtime

        self.call_from_thread(self._loading, True, f"loading {model or 'the default model'} ...")
        try:
            rt = open_runtime(model, self.args.backend, self.args.device, self.args.dtype, base=self.args.base)
        except (RuntimeOpenError, ValueError, OSError) as e:
            self.call_from_thread(self._load_failed, str(e))
            return
        self.call_from_thread(self._loaded, rt)

    def _loading(self, on: bool, text: str = "") -> None:
        self.query_one("#loading").display = on
        if text:
            self.query_one("#status", Static).update(text)

    def _load_failed(self, error: str) -> None:
        self._loading(False, "no model loaded: F9 opens one")
        self.notify(f"Could not load the model: {error}", severity="error", timeout=30)

    def _loaded(self, rt) -> None:
        if self.runtime is not None:
            self.runtime.backend.close()
        self.runtime = rt
        self.session = rt.session(system=self.args.system)
        self._loading(False)
        if self.conv_id is not None:
            self.open_conversation(self.conv_id)
        self.update_status()

    def update_status(self) -> None:
        if self.runtime is None:
            return
        tok = sum(t.get("prompt_tokens", 0) + t.get("reply_tokens", 0) for t in self.turns)
        codes = sum(t.get("prompt_codes", 0) + t.get("reply_codes", 0) for t in self.turns)
        n, C = (len(self.session.codec), self.runtime.codec.max_codebook_size) if self.session else (0, 0)
        saved = f"saved {tok - codes}/{tok} tok" if tok else "saved -"
        self.query_one("#status", Static).update(
            f"{self.runtime.describe()} | {self.last_stats or 'ready'} | {saved} | codebook {n}/{C}")

    # --- conversations --------------------------------------------------------------------

    def refresh_history(self) -> None:
        lv = self.query_one("#history", ListView)
        lv.clear()
        for c in self.store.conversations():
            lv.append(ListItem(Label(c.title), id=f"conv-{c.id}"))

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        self.open_conversation(int(event.item.id.removeprefix("conv-")))

    def open_conversation(self, cid: int) -> None:
        conv = self.store.get(cid)
        self.conv_id = cid
        chat = self.query_one("#chat", VerticalScroll)
        chat.remove_children()
        self.turns = []
        for m in self.store.messages(cid):
            if m.role == "user":
                chat.mount(UserView(m.content))
            else:
                view = ReplyView(m.units or [[m.content, 0]], self.coloured)
                chat.mount(view)
                self.call_after_refresh(view.finish, "stopped" if m.stopped else "")
                if m.stats:
                    self.turns.append(m.stats)
        self.settings.update(conv.settings)
        state = conv.state or {}
        self.before_last = state.get("before_last")
        if self.session is not None:
            self.session.reset()
            self.session.system = conv.system
            if state.get("engine"):
                try:
                    self.session.restore(state["engine"])
                except ValueError as e:
                    self.notify(f"{e}; the history is shown but the model starts fresh", severity="warning")
        self.update_status()

    @property
    def generating(self) -> bool:
        return any(w.is_running for w in self.workers if w.group == "gen")

    # --- chatting -------------------------------------------------------------------------

    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        if self.runtime is None:
            self.notify("No model is loaded yet (F9 opens one)", severity="error")
            return
        if self.generating:
            self.notify("A reply is still running (Esc stops it)", severity="warning")
            return
        if self.conv_id is None:
            title = re.sub(r"\s+", " ", event.text)[:40]
            self.conv_id = self.store.create(title, self.runtime.model_name, self.session.system, self.settings)
            self.refresh_history()
        self.store.add_message(self.conv_id, Message("user", event.text))
        self.query_one("#chat", VerticalScroll).mount(UserView(event.text))
        self.start_reply(event.text)

    def start_reply(self, text: str) -> None:
        self.before_last = self.session.to_dict()
        self.reply = ReplyView(coloured=self.coloured)
        self.query_one("#chat", VerticalScroll).mount(self.reply)
        self.cancel.clear()
        self.reply_saved = False
        self._generate(text, self.reply)

    @work(thread=True, exclusive=True, group="gen")
    def _generate(self, text: str, reply: ReplyView) -> None:
        from backends.engine import ContextFullError, Done, GenerationSettings, Notice, Token
        from backends.sampling import SamplingSettings

        st = self.settings
        settings = GenerationSettings(int(st["max_tokens"]), SamplingSettings(
            temperature=float(st["temperature"]), top_p=float(st["top_p"]), seed=self.args.seed))
        note, stats = "", None
        try:
            for ev in self.session.send(text, settings, self.cancel):
                if isinstance(ev, Token):
                    self.call_from_thread(reply.append, ev.text, ev.span)
                elif isinstance(ev, Notice):
                    self.call_from_thread(self.notify, ev.text, severity="warning", timeout=10)
                elif isinstance(ev, Done):
                    stats = ev.stats
                    note = {"cancelled": "stopped", "length": "max tokens reached",
                            "context": "context window full"}.get(ev.reason, "")
        except (ContextFullError, RuntimeError, ValueError) as e:
            note = "error"
            self.call_from_thread(self.notify, f"The model failed: {e}", severity="error", timeout=20)
        self.call_from_thread(self.finish_reply, reply, note, stats)

    def finish_reply(self, reply: ReplyView, note: str, stats, save_state: bool = True) -> None:
        if self.reply_saved:
            return
        self.reply_saved = True
        d = stats.to_dict() if stats else None
        if d:
            self.turns.append(d)
            self.last_stats = (f"ttft {stats.ttft_s * 1000:.0f} ms | {stats.decode_tok_s:.1f} tok/s "
                               f"({stats.decode_codes_s:.1f} codes/s)")
        reply.finish(note)
        self.store.add_message(self.conv_id, Message("assistant", reply.text, reply.units, note == "stopped", d))
        if save_state and self.session is not None and note != "error":
            self.store.update(self.conv_id, state={"engine": self.session.to_dict(), "before_last": self.before_last})
        self.update_status()

    def action_stop(self) -> None:
        if not self.reply_saved:  # a reply is pending, whether or not its worker has started yet
            self.cancel.set()

    def action_regenerate(self) -> None:
        if self.generating or self.conv_id is None or self.before_last is None:
            self.notify("Nothing to regenerate", severity="warning")
            return
        msgs = self.store.messages(self.conv_id)
        if not msgs or msgs[-1].role != "assistant" or len(msgs) < 2:
            self.notify("Nothing to regenerate", severity="warning")
            return
        self.store.delete_message(msgs[-1].id)
        replies = self.query(ReplyView)
        if replies:
            replies.last().remove()
        if self.turns:
            self.turns.pop()
        self.session.rewind(self.before_last)  # the state before the last user message was added
        self.start_reply(msgs[-2].content)

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc)", severity="warning")
            return
        self.conv_id, self.turns, self.before_last, self.last_stats = None, [], None, ""
        self.query_one("#chat", VerticalScroll).remove_children()
        if self.session is not None:
            self.session.reset()
            self.session.system = self.args.system
        self.query_one(ChatInput).focus()
        self.update_status()

    def action_toggle_units(self) -> None:
        self.coloured = not self.coloured
        for view in self.query(ReplyView):
            view.set_coloured(self.coloured)
        if self.coloured:
            self.notify("Colours: plain = base token, blue = 2-token, orange = 3+-token hypertoken", timeout=6)

    def action_stats(self) -> None:
        title = self.store.get(self.conv_id).title if self.conv_id else "this conversation"
        self.push_screen(StatsScreen(title, self.turns))

    def action_export(self) -> None:
        if self.conv_id is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        conv = self.store.get(self.conv_id)
        lines = [f"# {conv.title}", ""]
        if conv.system:
            lines += [f"*System:* {conv.system}", ""]
        for m in self.store.messages(self.conv_id):
            lines += [f"## {'You' if m.role == 'user' else 'Assistant'}", "", m.content, ""]
        safe = re.sub(r"[^\w-]+", "-", conv.title).strip("-")[:40] or "chat"
        path = Path.cwd() / f"z2z-chat-{conv.id}-{safe}.md"
        path.write_text("\n".join(lines))
        self.notify(f"Exported to {path}")

    def action_system_prompt(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            if self.session is not None:
                self.session.system = value or None
            self.args.system = value or None
            if self.conv_id is not None:
                self.store.update(self.conv_id, system=value or None)

        current = self.session.system if self.session else self.args.system
        self.push_screen(PromptDialog("System prompt", current or "", multiline=True), done)

    def action_settings(self) -> None:
        def done(value: str | None) -> None:
            if value is None:
                return
            try:
                new = dict(self.settings)
                for part in value.split():
                    k, v = part.split("=", 1)
                    if k not in new:
                        raise ValueError(f"unknown setting {k}")
                    new[k] = int(v) if k == "max_tokens" else float(v)
                from backends.sampling import SamplingSettings

                SamplingSettings(temperature=new["temperature"], top_p=new["top_p"])
                if new["max_tokens"] < 1:
                    raise ValueError("max_tokens must be >= 1")
            except ValueError as e:
                self.notify(f"Settings not changed: {e}", severity="error")
                return
            self.settings = new
            if self.conv_id is not None:
                self.store.update(self.conv_id, settings=new)

        cur = " ".join(f"{k}={v}" for k, v in self.settings.items())
        self.push_screen(PromptDialog("Settings (temperature, top_p, max_tokens)", cur), done)

    def action_rename(self) -> None:
        if self.conv_id is None:
            return

        def done(value: str | None) -> None:
            if value:
                self.store.update(self.conv_id, title=value)
                self.refresh_history()

        self.push_screen(PromptDialog("Rename conversation", self.store.get(self.conv_id).title), done)

    def action_delete(self) -> None:
        if self.conv_id is None or self.generating:
            return
        cid = self.conv_id

        def done(yes: bool | None) -> None:
            if yes:
                self.store.delete(cid)
                self.action_new_chat()
                self.refresh_history()

        self.push_screen(ConfirmDialog(f"Delete “{self.store.get(cid).title}”? This cannot be undone."), done)

    def action_open_model(self) -> None:
        def done(value: str | None) -> None:
            if value:
                self.args.model = value
                self.load_model(value)

        self.push_screen(PromptDialog("Model (zip2zip checkpoint directory or repo id)", self.args.model or ""), done)

    def get_system_commands(self, screen) -> Any:
        yield from super().get_system_commands(screen)
        for name, title, help_ in [
            ("new_chat", "New chat", "Start a new conversation"),
            ("regenerate", "Regenerate last reply", "Drop the last reply and answer again"),
            ("stop", "Stop reply", "Stop the reply being written"),
            ("toggle_units", "Toggle hypertoken colours", "Colour replies by base token / hypertoken"),
            ("stats", "Conversation statistics", "Compression per turn"),
            ("export", "Export to Markdown", "Write this conversation to a .md file"),
            ("system_prompt", "Edit system prompt", "Change the system prompt of this conversation"),
            ("settings", "Sampling settings", "temperature, top_p, max_tokens"),
            ("rename", "Rename conversation", "Change the title"),
            ("delete", "Delete conversation", "Delete it from the history"),
            ("open_model", "Open model", "Load another zip2zip checkpoint"),
        ]:
            yield SystemCommand(title, help_, getattr(self, f"action_{name}"))

    async def action_quit(self) -> None:
        if self.generating and self.reply is not None:
            self.cancel.set()
            # save what was said before leaving; the engine state stays at the previous reply
            self.finish_reply(self.reply, "stopped", None, save_state=False)
        self.exit()

    def on_unmount(self) -> None:
        if self.store is not None:
            self.store.close()


def run_app(args: Namespace) -> int:
    Z2ZChat(args).run()
    return 0
