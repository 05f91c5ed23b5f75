"""The reply turn of the chat screen: a message sent (or answered again), the model's worker thread
that streams the engine's events to the UI with ``call_from_thread``, the wait and progress shown
meanwhile, Esc, and the end of the turn saved through the controller (which owns cancel, take-back
and reply saving). A mixin of ``Z2ZChat``: it reads the app's widgets and controller."""

from __future__ import annotations


import time

from textual import work
from textual.containers import VerticalScroll
from textual.widgets import Collapsible, Static


from z2z_chat.app.controller import TurnEnd
from z2z_chat.app.store import NotSaved
from z2z_chat.app.widgets import ChatInput, ReplyView, UserView

from z2z_chat.app.tui.common import guarded


class ReplyTurns:
    @property
    def generating(self) -> bool:
        return any(w.is_running for w in self.workers if w.group == "gen")

    @guarded
    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        # refused messages stay in the input: nothing the user typed is thrown away
        if self._attach_command(event.text):
            return
        if self.ctl.runtime is None:
            if self.query_one("#loading").display:  # the model is on its way: send it once loaded
                self.queued = True
                self.notify("The model is still loading: your message is sent as soon as it is ready", timeout=8)
            else:
                self.notify("No model is loaded (F9 opens one); your message is kept in the input", severity="error")
            return
        if self.generating or self.ctl.reply_pending:
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
        try:
            self.ctl.begin_turn(message, title=event.text or (files[0].name if files else ""))
        except NotSaved as e:
            self.notify(str(e), severity="warning", timeout=15)
        self.query_one(ChatInput).accepted(event.text)
        self.attachments = []
        self.show_attachments()
        self.refresh_history()  # a new chat joins the list; a continued older one moves to the top
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
        self.ctl.start_reply()
        self.started, self.progress = time.monotonic(), None
        self.update_status(running=True)
        self.ticker = self.set_interval(0.1, self._tick)
        self._generate(text, self.reply, self.ctl.generation_settings())

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
        if not self.ctl.reply_pending:
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
            end = self.ctl.run_turn(text, settings, None, show)
        except Exception as e:  # noqa: BLE001 - the worker's boundary
            self.call_from_thread(self.report, e)
            end = TurnEnd("error")
        self.call_from_thread(self.finish_reply, reply, end)

    def show_progress(self, p) -> None:
        self.progress = p  # the ticker shows it

    @guarded
    def finish_reply(self, reply: ReplyView, end: TurnEnd) -> None:
        saved = True
        try:
            if not self.ctl.finish_turn(end):  # the controller saves a turn once
                return
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
        if self.ctl.reply_pending:  # whether or not its worker has started yet
            self.ctl.stop()
        elif self.editing is not None:
            self.editing = None
            self.query_one(ChatInput).load_text("")
            self.status_text = "edit cancelled"
            self.update_status()

    @guarded
    def action_regenerate(self) -> None:
        if self.generating:
            self.notify("A reply is being written: stop it first (Esc), then Ctrl+R", severity="warning")
            return
        again = self.ctl.prepare_regenerate()
        if again is None:
            self.notify("Nothing to regenerate: send a message first", severity="warning")
            return
        text, answered = again
        if answered:
            if self.ctl.settings.get("temperature", 0) == 0:
                self.notify("Temperature is 0 (greedy): the same reply comes back. Raise it with F8 for another.",
                            timeout=8)
            self.query(ReplyView).last().remove()
        self.start_reply(text)
