"""Dialogs and the stats view of the chat app (no model work happens here)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.suggester import Suggester
from textual.widgets import (
    Button,
    Checkbox,
    DataTable,
    Footer,
    Input,
    Label,
    OptionList,
    Sparkline,
    Static,
    TextArea,
)
from textual.widgets.option_list import Option

from z2z_chat.backends.engine.events import TurnStats
from z2z_chat.backends.engine.settings import TABLE
from z2z_chat.backends.errors import SettingsError


class PathSuggester(Suggester):
    """Suggests how the last path typed continues (as far as the files that match agree)."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        from z2z_chat.app.attachments import complete_path

        head, _, last = value.rpartition(" ")
        done, _ = complete_path(last)
        return f"{head} {done}".lstrip() if head else done


class PromptDialog(ModalScreen[str | None]):
    """Ask for one value (a title, a model path, a setting); Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", multiline: bool = False, paths: bool = False):
        super().__init__()
        self.title_text, self.value, self.multiline, self.paths = title, value, multiline, paths

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text)
            if self.multiline:
                yield TextArea(self.value, id="value")
                yield Label("Ctrl+S saves, Esc cancels", classes="hint")
            else:
                yield Input(self.value, id="value", suggester=PathSuggester() if self.paths else None)
                if self.paths:
                    yield Label("Right arrow takes the suggested completion", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#value").focus()  # typed text goes into the field at once

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def key_ctrl_s(self) -> None:
        if self.multiline:
            self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "no", "No"), Binding("y", "yes", "Yes"), Binding("n", "no", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question)
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


class StatsScreen(Screen):
    """Per-turn compression of the conversation, with a small chart (codes / base tokens)."""

    BINDINGS = [Binding("escape,q,f3", "app.pop_screen", "Back")]

    def __init__(self, title: str, turns: list[TurnStats]):
        super().__init__()
        self.title_text, self.turns = title, turns

    def compose(self) -> ComposeResult:
        yield Static(f"[b]Statistics[/b] of {self.title_text}", id="stats-title")
        table = DataTable(id="stats-table", cursor_type="none", zebra_stripes=True)
        table.add_columns("turn", "prompt tok", "prompt codes", "reply tok", "reply codes", "reply codes/tok",
                          "codebook", "decode tok/s")
        for i, t in enumerate(self.turns, 1):
            table.add_row(str(i), str(t.prompt_tokens), str(t.prompt_codes), str(t.reply_tokens),
                          str(t.reply_codes), f"{t.reply_codes / t.reply_tokens:.2f}" if t.reply_tokens else "-",
                          f"{t.codebook_size}/{t.codebook_capacity}",
                          f"{t.decode_tok_s:.1f}" if t.meaningful_speed else "-")
        yield table
        ratios = [t.reply_codes / t.reply_tokens for t in self.turns if t.reply_tokens]
        tok = sum(t.prompt_tokens + t.reply_tokens for t in self.turns)
        codes = sum(t.prompt_codes + t.reply_codes for t in self.turns)
        yield Label("Reply compression per turn (codes per base token; lower is better):")
        if ratios:  # no chart of nothing: an empty chat drew a full-width block
            yield Label(f"max {max(ratios):.2f}", classes="axis")
            yield Sparkline(ratios, id="stats-chart")
            yield Label(f"min {min(ratios):.2f}    turns 1 .. {len(ratios)} from left to right", classes="axis")
        saved = f"{tok - codes} of {tok} tokens saved ({codes / tok:.2f} codes per token)" if tok else "no turns yet"
        yield Static(f"Whole conversation: {saved}", id="stats-total")
        yield Footer()


class SearchScreen(ModalScreen["tuple[int, int] | None"]):
    """Search every conversation's messages (every branch) as you type; Enter (or a click) on a
    result opens its conversation at that message; Esc closes. Dismisses with (conversation id,
    message id) or None."""

    BINDINGS = [Binding("escape", "cancel", "Close"), Binding("down", "results", "Results", show=False)]

    def __init__(self, search) -> None:
        super().__init__()
        self.search = search  # text -> [archive.Hit]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Search every conversation (words that start with what you type)")
            yield Input(id="query", placeholder="search")
            yield OptionList(id="results")
            yield Label("", id="count", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#query").focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        hits = self.search(event.value) if event.value.strip() else []
        self.hits = hits
        results = self.query_one(OptionList)
        results.clear_options()
        results.add_options([Option(Text.assemble((f"{h.title[:24]:24} ", "bold"), (f"{h.role:9} ", "dim"), h.line[:120]))
                             for h in hits])
        self.query_one("#count", Label).update(f"{len(hits)} message(s)" + (" (the newest)" if len(hits) >= 200 else ""))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if getattr(self, "hits", None):
            self.dismiss((self.hits[0].conversation, self.hits[0].message))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        hit = self.hits[event.option_index]
        self.dismiss((hit.conversation, hit.message))

    def action_results(self) -> None:
        self.query_one(OptionList).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)


class SettingsScreen(ModalScreen["tuple[dict, bool] | None"]):
    """One field per setting, each checked when saved; on an error the dialog stays open with what
    was typed, the field named and focused. Dismisses with (settings, save as defaults) or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: dict, check) -> None:
        super().__init__()
        self.settings, self.check = settings, check  # check(dict) -> error message or None

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Settings of this conversation")
            for key, value in self.settings.items():
                with Horizontal(classes="setting"):
                    yield Label(f"{key:<19}", classes="setting-name")
                    yield Input("off" if value is None else str(value), id=f"set-{key}", classes="setting-value")
                    yield Label(f"{TABLE[key].hint} {TABLE[key].range_text()}", classes="hint")
            yield Checkbox("Save as the defaults for new chats and next launches", id="as-default")
            yield Label("", id="settings-error", classes="error")
            yield Label("Enter or Ctrl+S saves, Esc cancels", classes="hint")

    def on_mount(self) -> None:
        self.query(Input).first().focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        new, error, field = {}, None, None
        for key in self.settings:
            try:
                new[key] = TABLE[key].parse(self.query_one(f"#set-{key}", Input).value)
            except SettingsError as e:
                error, field = str(e), key
                break
        if error is None:
            error = self.check(new)
            field = next((k for k in self.settings if error and k in error), None)
        if error:
            self.query_one("#settings-error", Label).update(error)
            if field:
                self.query_one(f"#set-{field}", Input).focus()
            return
        self.dismiss((new, self.query_one("#as-default", Checkbox).value))

    def action_cancel(self) -> None:
        self.dismiss(None)


class ModelScreen(ModalScreen["str | None"]):
    """F9: the models opened before (the embedded default first) to pick from, or a path typed with
    completion (a checkpoint directory, an MLX or GGUF conversion, or a hub repo id). Dismisses
    with the model ("" for the embedded default) or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, loaded: str, recent: list[str]) -> None:
        super().__init__()
        self.loaded, self.choices = loaded, [""] + [m for m in recent if m]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Open a model: pick one, or type a path (Right takes the completion)")
            yield Input(self.loaded, id="value", suggester=PathSuggester())
            yield OptionList(*[Option("the embedded default model" if m == "" else m) for m in self.choices],
                             id="models")

    def on_mount(self) -> None:
        self.query_one("#value").focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def on_key(self, event) -> None:
        """Up and Down from the path field reach the list of models opened before."""
        models = self.query_one("#models", OptionList)
        if event.key in ("up", "down") and not models.has_focus:
            event.stop()
            models.focus()
            models.highlighted = 0 if event.key == "down" else len(self.choices) - 1

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)
