"""``backends/engine/utf8_guard.py``: the bytes of every token and which codes may follow them.
(The guard inside the decode loop is tested in ``test_engine.py``.)"""

from __future__ import annotations

import pytest

from z2z_chat.backends.engine.utf8_guard import Utf8Guard
from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR

transformers = pytest.importorskip("transformers")


def test_utf8_guard_knows_bytes_and_boundaries():
    tok = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)  # SmolLM2's byte-level BPE, shipped in the repo
    guard = Utf8Guard(tok, len(tok))
    text = "日本語のテキスト。🙂 Le café <|im_start|>user\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(guard.bytes[i] for i in ids) == text.encode()
    data = "é".encode() + "🙂".encode()  # 2 + 4 bytes
    byte_ids = {b[0]: i for i, b in enumerate(guard.bytes) if len(b) == 1}
    lead = [byte_ids[data[0]]]  # the first byte of é: one more owed
    assert guard.pending(lead) == data[:1]
    assert guard.fits(data[:1], [byte_ids[data[1]]]) and not guard.fits(data[:1], [byte_ids[ord("a")]])
    assert not guard.fits(b"", [byte_ids[data[1]]])  # a continuation byte where a character starts
    assert guard.fits(b"", [byte_ids[data[2]], byte_ids[data[3]]])  # a character may stay incomplete
    assert guard.pending([byte_ids[data[2]], byte_ids[data[3]]]) == data[2:4]
    assert not guard.fits(b"\xf0", [byte_ids[0x87]])  # a continuation byte out of the lead's range
    # ranges Python's incremental decoder only checks at the character's last byte: a surrogate's
    # prefix (\xed\xb7) passed, and no byte could finish it, so every later code was masked
    for lead, bad, good in ((0xED, 0xB7, 0x9F), (0xE0, 0x80, 0xA0), (0xF4, 0x90, 0x8F)):
        assert not guard.fits(bytes([lead]), [byte_ids[bad]]) and guard.fits(bytes([lead]), [byte_ids[good]])
        assert not guard.finishers(bytes([lead]))[byte_ids[bad]] and guard.finishers(bytes([lead]))[byte_ids[good]]
    assert guard.pending(ids) == b""
