"""Incremental detokenization: base ids in, text deltas out, UTF-8 safe.

``add(ids)`` takes the base ids of one code (a hypertoken brings several) and returns the text
that is now final. A character whose bytes are split across tokens is held back until it is
complete (no replacement characters in the stream, no lost bytes); ``flush()`` returns the rest.
The text of the whole stream equals ``tokenizer.decode(all ids)``: each delta is the difference
between decoding a short window with and without the new tokens, the window starting at the
last token boundary where text was final, so byte-level and SentencePiece tokenizers alike
keep their spaces.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[prefix:read] decode to text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end decodes as U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
