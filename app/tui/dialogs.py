"""The chat screen's dialogs and commands: search, attachments and slash commands, export and import,
system prompt, settings, rename, delete and another model. A mixin of ``Z2ZChat``."""

from __future__ import annotations


import re
import shlex
from pathlib import Path

from textual.widgets import Static

from z2z_chat.backends.errors import Z2ZError

from z2z_chat.app.keys import SLASH_COMMANDS
from z2z_chat.app.screens import ConfirmDialog, ModelScreen, PromptDialog, SearchScreen, SettingsScreen
from z2z_chat.app.widgets import ChatInput

from z2z_chat.app.tui.common import _is_file, _size, guarded


class Dialogs:
    def action_search(self) -> None:
        from z2z_chat.app.archive import search

        def done(found: tuple[int, int] | None) -> None:
            if found is None:
                return
            if self.generating or self.ctl.reply_pending:
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
        self._warn_if_too_long()
        return True

    def _warn_if_too_long(self) -> None:
        """Said when attached, not at every send: the files alone do not fit the context window."""
        from z2z_chat.app.attachments import compose
        from z2z_chat.backends.engine.prompt import ContextFullError

        if self.ctl.session is None or not self.attachments:
            return
        try:
            self.ctl.session.check_fits(compose("", self.attachments), self.ctl.generation_settings())
        except ContextFullError as e:
            self.notify(f"The attached files do not fit the context window ({e}); /detach removes them",
                        severity="warning", timeout=20)

    def detach(self, name: str = "") -> None:
        """``/detach [NAME]``: remove a pending attachment (the last one named NAME), or all of them."""
        if not self.attachments:
            self.notify("Nothing is attached", severity="warning")
            return
        if name:
            idx = [i for i, a in enumerate(self.attachments) if a.name == name]
            if not idx:
                names = ", ".join(a.name for a in self.attachments)
                self.notify(f"No attachment named {name}; attached: {names}", severity="warning")
                return
            del self.attachments[idx[-1]]
        else:
            self.attachments = []
        self.show_attachments()

    def show_attachments(self) -> None:
        bar = self.query_one("#attached", Static)
        bar.display = bool(self.attachments)
        sizes = ", ".join(self._describe(a) for a in self.attachments)
        bar.update(f"attached: {sizes} - sent with the next message (/detach NAME removes one)")

    def _describe(self, a) -> str:
        """name (size, base tokens, positions it takes against this conversation's codebook)."""
        session = self.ctl.session if self.ctl is not None else None
        if session is None:
            return f"{a.name} ({_size(a.size)})"
        tokens, positions = session.measure(a.text)
        return f"{a.name} ({_size(a.size)}, {tokens:,} tokens, {positions:,} positions)"

    def _attach_command(self, text: str) -> bool:
        """``/file PATH ...``, or a lone path to an existing file: attach instead of sending; ``/help``
        and unknown ``/word`` commands are answered here, never sent to the model."""
        word = text.split(maxsplit=1)[0] if text.strip() else ""
        if word == "/detach":
            self.detach(text[len("/detach"):].strip())
            self.query_one(ChatInput).accepted(text)
            return True
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
