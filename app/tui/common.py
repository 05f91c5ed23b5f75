"""What the chat app's parts share: the error boundary of UI handlers and small helpers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from z2z_chat.app.store import default_path


def log_path() -> Path:
    return default_path().parent / "z2z-chat.log"


def guarded(method):
    """Run a UI handler; a bug in it is logged and shown instead of closing the app."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the boundary: report, keep running
            self.report(e)
            return None

    return wrapper


def _is_file(text: str) -> bool:
    """A line that names a file (a pasted path is offered as an attachment); a long line of text
    is no name at all (the OS refuses it: ENAMETOOLONG)."""
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / 2**20:.1f} MB"
