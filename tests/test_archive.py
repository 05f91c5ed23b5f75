"""``app/archive.py``: JSON Lines export and import, and the Markdown export, keep every branch of a conversation."""

from __future__ import annotations

import json

import pytest

from z2z_chat.app.archive import ArchiveError, export_jsonl, import_file, markdown
from z2z_chat.app.store import Message, open_store


def test_every_branch_survives_an_export_and_an_import(tmp_path):
    a = open_store(tmp_path / "a.db")
    cid = a.create("branches", "m", "be brief", {"max_tokens": 9})
    a.add_message(cid, Message("user", "first"))
    reply = a.add_message(cid, Message("assistant", "reply 1"))
    old = a.add_message(cid, Message("user", "second"))
    a.add_message(cid, Message("assistant", "reply 2", stopped=True))
    a.add_message(cid, Message("user", "second, edited"), parent=reply)
    a.add_message(cid, Message("assistant", "reply 2b"))
    a.set_head(cid, old)  # the branch shown is the first one
    out = tmp_path / "all.jsonl"
    assert export_jsonl(a, out) == 1
    b = open_store(tmp_path / "b.db")
    assert import_file(b, out) == 1
    (cid_b,) = [c.id for c in b.conversations()]

    def shape(store, c):
        tree = store.tree(c)
        local = {m.id: i for i, m in enumerate(tree)}
        return ([(m.role, m.content, m.stopped, local.get(m.parent)) for m in tree],
                [m.content for m in store.messages(c)])

    assert shape(b, cid_b) == shape(a, cid)
    assert shape(b, cid_b)[1] == ["first", "reply 1", "second", "reply 2"]
    again = tmp_path / "again.jsonl"
    export_jsonl(b, again)
    assert again.read_text() == out.read_text()


def test_the_markdown_export_shows_every_branch_the_one_shown_first(tmp_path):
    s = open_store(tmp_path / "a.db")
    cid = s.create("branches", "m", "be brief", {})
    s.add_message(cid, Message("user", "first"))
    reply = s.add_message(cid, Message("assistant", "reply 1"))
    s.add_message(cid, Message("user", "second"))
    s.add_message(cid, Message("assistant", "reply 2", stopped=True))
    edited = s.add_message(cid, Message("user", "second, edited"), parent=reply)
    s.add_message(cid, Message("assistant", "reply 2b"))
    s.set_head(cid, edited)
    text = markdown(s, cid)
    assert text.startswith("# branches\n\n*System:* be brief")
    one, two = text.split("## Branch 1 of 2 (shown in the app)")[1].split("## Branch 2 of 2")
    assert [ln for ln in one.splitlines() if ln and not ln.startswith("###")] == [
        "first", "reply 1", "second, edited", "reply 2b"]
    assert [ln for ln in two.splitlines() if ln and not ln.startswith("###")] == [
        "*The first 2 message(s) as in branch 1.*", "second", "reply 2", "*(stopped)*"]
    single = s.create("one", "m", None, {})
    s.add_message(single, Message("user", "hi"))
    assert markdown(s, single) == "# one\n\n## You\n\nhi\n"


def test_a_parent_that_does_not_come_first_is_refused_and_nothing_is_imported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "t", "messages": [{"id": 1, "parent": 2, "role": "user", "content": "x"},
                                                          {"id": 2, "parent": None, "role": "user", "content": "y"}]}))
    s = open_store(tmp_path / "s.db")
    with pytest.raises(ArchiveError, match="bad.jsonl:1: message 1 has a bad id or a parent"):
        import_file(s, bad)
    assert s.conversations() == []
