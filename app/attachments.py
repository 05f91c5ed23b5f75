"""Text files handed to the model with a message (``--file``, standard input, ``/file`` in the app).

``read_attachment(path)`` returns an ``Attachment`` or raises ``AttachmentError`` naming the file and
what is wrong with it: missing, a directory, binary, not UTF-8 (with the byte offset), too large to
be text a context could hold. ``compose(message, attachments)`` is the user message the model
reads: each file as a fenced block under its name, then the message. Files are read whole, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from z2z_chat.backends.errors import Z2ZError

MAX_BYTES = 8 << 20  # 8 MiB of text is ~2M tokens: no context window holds it, compressed or not


class AttachmentError(Z2ZError, ValueError):
    """A file cannot be attached; the message names it and says why."""


@dataclass(frozen=True)
class Attachment:
    name: str
    text: str

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))


def decode_text(data: bytes, name: str) -> str:
    if len(data) > MAX_BYTES:
        raise AttachmentError(f"{name} is {len(data) / 2**20:.1f} MiB: larger than any context window can hold")
    if b"\x00" in data[:65536]:
        raise AttachmentError(f"{name} looks like a binary file (it contains NUL bytes): attach text files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AttachmentError(f"{name} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                              "(convert it first, e.g. iconv -t UTF-8)") from None


def read_attachment(path: str | Path) -> Attachment:
    p = Path(path).expanduser()
    if p.is_dir():
        raise AttachmentError(f"{path} is a directory: attach the files in it one by one")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise AttachmentError(f"{path}: no such file") from None
    except OSError as e:
        raise AttachmentError(f"{path} cannot be read: {e.strerror or e}") from None
    return Attachment(p.name, decode_text(data, str(path)))


def compose(message: str, attachments: list[Attachment]) -> str:
    """The message with its files, each in a fence longer than any backtick run inside it."""
    blocks = []
    for a in attachments:
        fence = "`" * max(3, _longest_backtick_run(a.text) + 1)
        blocks.append(f"File `{a.name}`:\n{fence}\n{a.text.rstrip(chr(10))}\n{fence}")
    return "\n\n".join(blocks + ([message] if message else []))


def _longest_backtick_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def complete_path(partial: str, limit: int = 50) -> tuple[str, list[str]]:
    """Tab completion of a path being typed: (the longest completion all matches share, the
    matches, directories ending in ``/``). Hidden entries only when the name typed starts with a dot."""
    import os

    head, sep, name = partial.rpartition("/")
    prefix = head + sep  # what stays as typed ("~/src/", "/", "")
    folder = Path(os.path.expanduser(prefix or "."))
    try:
        entries = sorted(e for e in os.listdir(folder)
                         if e.startswith(name) and (name.startswith(".") or not e.startswith(".")))
    except OSError:
        return partial, []
    matches = [prefix + e + ("/" if (folder / e).is_dir() else "") for e in entries[:limit]]
    if not matches:
        return partial, []
    return os.path.commonprefix(matches), matches
