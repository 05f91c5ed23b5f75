"""Keep hypertokens from splitting characters: a UTF-8 guard for generated codes.

Byte-level tokenizers cut a CJK character or an emoji into byte fragments, and LZW happily
merges fragments across character boundaries, so a hypertoken can start with the middle of a
character or start a new one where the last is still incomplete. A model that picks such a code
writes U+FFFD, and a model that has just written half a character through a hypertoken may go
on with a base token that starts a new one. ``Utf8Guard.fits(pending, ids)`` says whether the
bytes of ``ids`` can follow ``pending``, the bytes of an incomplete last character
(``Utf8Guard.pending(ids)`` takes them from the ids written so far), without breaking UTF-8;
``generate_codes`` uses it to refuse such codes, base or hyper, and take the model's next choice.
A code that keeps UTF-8 valid is never refused, so text that the model writes correctly is
unchanged.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

import numpy as np


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (what ByteLevel tokenizers store in their vocab)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes each base id stands for (byte-level BPE, SentencePiece byte fallback, or text)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel" or "ByteLevel" in repr(decoder)
    table = _byte_level_table() if byte_level else {}
    out = []
    for i, p in enumerate(pieces):
        if p is None:
            out.append(b"")
        elif byte_level and all(c in table for c in p):
            out.append(bytes(table[c] for c in p))
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            out.append(bytes([int(p[3:5], 16)]))
        elif not byte_level:
            out.append(p.replace("\u2581", " ").encode())
        else:  # an added token (special tokens are plain text)
            out.append(tokenizer.decode([i]).encode())
    return out


def _continuation(b: int) -> bool:
    return b & 0xC0 == 0x80


def _needs(lead: int) -> int:
    """Bytes after a lead byte in its character (0 for ASCII and for bytes no character starts with)."""
    return 1 if 0xC2 <= lead <= 0xDF else 2 if 0xE0 <= lead <= 0xEF else 3 if 0xF0 <= lead <= 0xF4 else 0


# second bytes a lead byte allows (others: 0x80-0xBF); Python's incremental decoder defers this
# check until the character's last byte, so ``\xed\xb7`` passes as a prefix no byte can finish
_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _valid(data: bytes) -> bool:
    """``data`` is valid UTF-8 that may end inside a character some bytes can still finish."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    tail = _incomplete_tail(data)
    if len(tail) < 2:
        return True
    lo, hi = _SECOND.get(tail[0], (0x80, 0xBF))
    return lo <= tail[1] <= hi


def _incomplete_tail(data: bytes) -> bytes:
    tail = data[-4:]
    for back, b in enumerate(reversed(tail)):
        if not _continuation(b):
            return tail[len(tail) - 1 - back:] if _needs(b) > back else b""
    return b""


class Utf8Guard:
    def __init__(self, tokenizer: Any, vocab_size: int):
        self.bytes = token_bytes(tokenizer, vocab_size)
        self._finishers: dict[bytes, np.ndarray] = {}

    def finishers(self, pending: bytes) -> np.ndarray:
        """(V,) bool: the base ids that continue the character ``pending`` started without starting
        another one they leave incomplete: what a reply cut by its token limit may still write, a
        byte at a time if need be. Cached per ``pending``."""
        if pending not in self._finishers:
            ok = np.zeros(len(self.bytes), dtype=bool)
            for i, b in enumerate(self.bytes):
                if not b or not _continuation(b[0]):
                    continue
                data = pending + b
                if not _valid(data):
                    continue
                tail = _incomplete_tail(data)
                ok[i] = not tail or tail == data  # finished, or still the same character
            self._finishers[pending] = ok
        return self._finishers[pending]

    def pending(self, ids: Sequence[int]) -> bytes:
        """The bytes of an incomplete last character of the text of ``ids`` (b"" on a boundary)."""
        return _incomplete_tail(b"".join(self.bytes[i] for i in ids[-4:] if 0 <= i < len(self.bytes)))

    def fits(self, pending: bytes, ids: Sequence[int]) -> bool:
        """Whether ``pending`` followed by the bytes of ``ids`` is valid UTF-8 (which may end
        inside a character: the next code can finish it)."""
        return _valid(pending + b"".join(self.bytes[i] for i in ids if 0 <= i < len(self.bytes)))
