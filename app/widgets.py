"""The chat app's widgets: the message input and the two kinds of chat entries.

Chat entries take the focus (Tab, or a click) and then have their own keys, shown in the footer:
``e`` edits your message (a new branch), ``c`` copies the message, ``y`` copies a reply's code
blocks (each block also has a copy button), ``<`` and ``>`` switch between the branches at that message. They post ``EntryAction``;
the app does the work. Any other printable key goes to the message box (``Entry``).

``ReplyView`` shows a streamed reply either as Markdown (a reply that is code without a fence as a
code block: ``render.py``) or, with hypertoken colouring on, as plain text coloured by unit (base token / 2-token / 3+-token hypertoken). The coloured text is
built incrementally (one append per token); Textual coalesces the repaints per frame.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from typing import Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message as TMessage
from textual.widgets import Label, ListItem, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownFence

from z2z_chat.app.render import as_markdown, looks_like_code

# Unit colours: mid-luminance so they read on dark and light themes alike.
UNIT_STYLES = {1: "", 2: "bold #2f80ed", 3: "bold #e67e22"}


class ChatInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Shift+Enter where the terminal has it) breaks the line.
    The text stays in the input until the app accepts it (``accepted(text)``)."""

    BINDINGS = [Binding("enter", "submit", "Send"),  # shown in the footer; handled in _on_key
                Binding("ctrl+j,shift+enter", "newline", "New line", show=False, priority=True),
                Binding("escape", "app.stop", "Stop reply", show=False)]

    class Submitted(TMessage):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recall: list[str] = []  # messages sent before, oldest first (Up/Down, as shells do)
        self._at: int | None = None  # the one shown, while it is shown unchanged

    async def _on_key(self, event: events.Key) -> None:
        # Enter is taken here, in the order keys arrive. As a priority binding it ran when the key was
        # dispatched, ahead of the keys typed just before it (tmux, "Write a story" + Enter at once,
        # sent "W" and the rest was cleared away).
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
            return
        if event.key == "tab" and self.text.startswith("/file ") and "\n" not in self.text:
            event.stop()
            event.prevent_default()
            self._complete_path()
            return
        if event.key in ("up", "down") and self._recalling():
            event.stop()
            event.prevent_default()
            self._recall(-1 if event.key == "up" else 1)
            return
        await super()._on_key(event)

    def _complete_path(self) -> None:
        """Tab after ``/file``: complete the last path as far as the matches agree; list them when
        there are several."""
        from z2z_chat.app.attachments import complete_path

        head, last = _last_path(self.text)
        done, matches = complete_path(last)
        if done != last:  # quoted when it holds a space: /file splits its paths as a shell does
            self.load_text(f"{head} {shlex.quote(done) if ' ' in done else done}")
            self.move_cursor(self.document.end)
        if len(matches) > 1:
            shown = ", ".join(m.rstrip("/").rpartition("/")[2] + ("/" if m.endswith("/") else "") for m in matches[:12])
            self.app.notify(shown + (" ..." if len(matches) > 12 else ""), title="matches", timeout=6)
        elif not matches:
            self.app.notify(f"no file matches {last or '(empty)'}", severity="warning", timeout=4)

    def _recalling(self) -> bool:
        """Up/Down recall only in an empty input, or one showing a recalled message unchanged."""
        if not self.recall:
            return False
        return not self.text or (self._at is not None and self.text == self.recall[self._at])

    def _recall(self, step: int) -> None:
        at = (len(self.recall) if self._at is None else self._at) + step
        if at >= len(self.recall):
            self._at = None
            self.load_text("")
        else:
            self._at = max(at, 0)
            self.load_text(self.recall[self._at])
            self.move_cursor(self.document.end)

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.post_message(self.Submitted(text))

    def accepted(self, text: str) -> None:
        """The app took ``text``: remove it, keeping whatever was typed after it in the meantime."""
        if not self.recall or self.recall[-1] != text:
            self.recall.append(text)
        self._at = None
        current = self.text.lstrip()
        self.load_text(current[len(text):].lstrip() if current.startswith(text) else current)

    def action_newline(self) -> None:
        self.insert("\n")


class ConversationItem(ListItem):
    """One conversation in the sidebar: its title (cut with an ellipsis) and when it was last
    written. The id is an attribute, not a widget id, so refreshing the list can never collide
    with items still being removed."""

    def __init__(self, conv_id: int, title: str, updated: float = 0.0):
        super().__init__(Label(title, classes="title"), Label(when(updated), classes="when"))
        self.conv_id = conv_id


def when(ts: float, now: float | None = None) -> str:
    """A short local date: the time today, the day this year, else the day and year."""
    import time

    if not ts:
        return ""
    t, today = time.localtime(ts), time.localtime(now)
    if t[:3] == today[:3]:
        return time.strftime("%H:%M", t)
    return time.strftime("%d %b" if t.tm_year == today.tm_year else "%d %b %Y", t).lstrip("0")


class EntryAction(TMessage):
    """A key on a chat entry: ``edit``, ``copy``, ``copy_code``, ``branch`` (``step`` -1 or +1)."""

    def __init__(self, entry: Any, action: str, step: int = 0):
        super().__init__()
        self.entry, self.action, self.step = entry, action, step


ENTRY_BINDINGS = [Binding("c", "entry('copy')", "Copy"),
              Binding("less_than_sign", "entry('branch', -1)", "Previous branch"),
              Binding("greater_than_sign", "entry('branch', 1)", "Next branch")]


def branch_label(at: int, of: int) -> Text:
    return Text(f"‹ {at}/{of} ›  (< > switch)", style="dim") if of > 1 else Text("")


class Entry:
    """What both chat entries do with keys: their bindings post ``EntryAction``; any other printable
    key goes to the message box with the focus, so typing after a search opened a message (or after
    Shift+Tab) is not lost."""

    BINDINGS: list[Binding]

    def action_entry(self, action: str, step: int = 0) -> None:
        self.post_message(EntryAction(self, action, step))

    def on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character and all(b.key != event.key for b in self.BINDINGS):
            event.stop()
            box = self.app.query_one(ChatInput)
            box.focus()
            box.insert(event.character)


class UserView(Entry, Static, can_focus=True):
    BINDINGS = [Binding("e", "entry('edit')", "Edit"), *ENTRY_BINDINGS]

    def __init__(self, text: str):
        super().__init__(self._body(text), classes="user")
        self.text = text

    @staticmethod
    def _body(text: str) -> Text:
        return Text("You", style="bold") + Text("\n") + Text(text)

    def set_branch(self, at: int, of: int) -> None:
        self.update(self._body(self.text) + (Text("\n") + branch_label(at, of) if of > 1 else Text("")))


class CopyButton(Static):
    """The small button on a code block: a click copies the block's code (OSC 52)."""

    def __init__(self, fence: MarkdownFence):
        super().__init__("⧉ copy", classes="copy")
        self.fence = fence

    def on_click(self, event: events.Click) -> None:
        event.stop()
        self.app.copy_to_clipboard(self.fence.code)
        n = self.fence.code.count("\n") + 1
        self.app.notify(f"Copied the code block ({n} line{'s' if n > 1 else ''})", timeout=3)


class CodeBlock(MarkdownFence):
    def compose(self) -> ComposeResult:
        yield CopyButton(self)
        yield from super().compose()


class ReplyMarkdown(Markdown):
    """A reply's Markdown: code blocks carry a copy button."""

    BLOCKS = {**Markdown.BLOCKS, "fence": CodeBlock, "code_block": CodeBlock}


class ReplyView(Entry, Vertical, can_focus=True):
    BINDINGS = [Binding("y", "entry('copy_code')", "Copy code"), *ENTRY_BINDINGS]

    def __init__(self, units: list[list[Any]] | None = None, coloured: bool = False, who: str = "model"):
        super().__init__(classes="reply")
        self.who = who  # the model's name, over the reply
        self.units: list[list[Any]] = []
        self.coloured = coloured
        self._code = False  # shown as one code block (render.looks_like_code)
        self._redraw: Any = None  # the timer of the next redraw of that block
        self._coloured_text = Text()
        for text, span in units or []:
            self._add(text, span)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.units)

    def compose(self) -> ComposeResult:
        yield Static(Text(self.who, style="bold"), classes="who")
        yield ReplyMarkdown(self._markdown(), classes="body")
        yield Static(self._coloured_text, classes="units")
        yield Static("", classes="meta")

    def on_mount(self) -> None:
        self.set_coloured(self.coloured)
        self._meta()

    def _add(self, text: str, span: int) -> None:
        self.units.append([text, span])
        self._coloured_text.append(text, style=UNIT_STYLES[min(span, 3)] if span else "")

    def append(self, text: str, span: int) -> None:
        self._add(text, span)
        if not text:
            return
        if self.coloured:
            self.query_one(".units", Static).update(self._coloured_text)
        elif self._code or ("\n" in text and looks_like_code(self.text)):
            # Markdown.append cannot follow an update still in flight (it parses from a stale
            # line), so a code block is redrawn whole, at most ten times a second
            self._code = True
            if self._redraw is None:
                self._redraw = self.set_timer(0.1, self._redraw_code)
        else:
            self.query_one(Markdown).append(text)

    def _redraw_code(self) -> None:
        self._redraw = None
        self.query_one(Markdown).update(self._markdown())

    def _markdown(self) -> str:
        self._code = looks_like_code(self.text)
        return as_markdown(self.text)

    def set_coloured(self, on: bool) -> None:
        self.coloured = on
        md, units = self.query_one(Markdown), self.query_one(".units", Static)
        if on:
            units.update(self._coloured_text)
        else:
            md.update(self._markdown())
        md.display, units.display = not on, on

    def finish(self, note: str) -> None:
        self.note = note
        if not self.coloured and self._code != looks_like_code(self.text):  # e.g. a fence came later
            self.query_one(Markdown).update(self._markdown())
        self._meta()

    def set_branch(self, at: int, of: int) -> None:
        self.branch = (at, of)
        self._meta()

    def _meta(self) -> None:
        """The line under the reply: how it ended, and its branches (kept until it is composed)."""
        meta = self.query(".meta")
        if meta:
            at, of = getattr(self, "branch", (1, 1))
            text = Text(getattr(self, "note", ""), style="italic dim")
            meta.first(Static).update(text + Text("  ") + branch_label(at, of) if of > 1 else text)

    def code_blocks(self) -> list[str]:
        """The fenced code blocks of the reply, without their fences."""
        import re

        return [m.group(1) for m in re.finditer(r"```[^\n]*\n(.*?)(?:```|\Z)", self.text, re.S)]


def _last_path(text: str) -> tuple[str, str]:
    """(what comes before, the path being typed) in ``/file A B``: the last word, or a longer tail
    that is quoted or whose directory (with a space in its name) exists, so a path with spaces is
    completed whole."""
    for i in (i for i, ch in enumerate(text) if ch == " "):
        raw = text[i + 1:]
        tail = raw.strip("'\"")
        parent = Path(tail).expanduser().parent
        if tail and (raw[:1] in "'\"" or (" " in str(parent) and parent.is_dir())):
            return text[:i], tail
    head, _, last = text.rpartition(" ")
    return head, last
