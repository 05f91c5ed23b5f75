"""The Textual chat UI: ``app.Z2ZChat`` (the screen, its list and status), ``turn`` (a reply being
written), ``dialogs`` (everything opened from a key), ``common`` (the error boundary)."""

from z2z_chat.app.tui.app import Z2ZChat, run_app
from z2z_chat.app.widgets import ReplyView

__all__ = ["ReplyView", "Z2ZChat", "run_app"]
