"""``backends/engine/detok.py``: incremental detokenization never splits a character."""

from __future__ import annotations

import pytest

from z2z_chat.backends.engine.detok import Detokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("text", ["plain words here", "Über die Brücke 🙂 日本語", "a🙂🙂b", "  spaces\n\ttabs  "])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_detokenizer_streams_exact_text(tok, text, chunk):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    parts = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [d.flush()]
    assert "".join(parts) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in parts)


def test_detokenizer_holds_back_split_characters(tok):
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji is split across byte-level tokens
    d = Detokenizer(tok)
    assert [d.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1:]) == "🙂"


def test_detokenizer_flushes_incomplete_bytes(tok):
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    assert d.add(ids[:1]) == ""
    assert d.flush() == "\ufffd"  # what was generated is shown, not lost
