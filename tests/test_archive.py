"""``app/archive.py``: JSON Lines export and import, and the Markdown export, keep every branch of a conversation."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert import_file(b, out) == (1, 0, [])
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


def conversation_file(tmp_path, *convs, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    return path


def test_importing_twice_adds_nothing_and_times_are_kept(tmp_path):
    a = open_store(tmp_path / "a.db")
    cid = a.create("one", "m", None, {})
    a.add_message(cid, Message("user", "hi"))
    out = tmp_path / "all.jsonl"
    export_jsonl(a, out)
    b = open_store(tmp_path / "b.db")
    assert import_file(b, out)[:2] == (1, 0)
    assert import_file(b, out)[:2] == (0, 1)
    assert len(b.conversations()) == 1
    assert b.uid(b.conversations()[0].id) == a.uid(cid)
    plain = tmp_path / "openai.json"
    plain.write_text(json.dumps([{"role": "user", "content": [{"type": "text", "text": "hel"},
                                                               {"type": "text", "text": "lo"}]}]))
    assert import_file(b, plain)[:2] == (1, 0) and import_file(b, plain)[:2] == (0, 1)
    assert [m.content for m in b.messages(b.conversations()[0].id)] == ["hello"]


def test_an_import_is_one_transaction(tmp_path):
    s = open_store(tmp_path / "s.db")
    s.db.execute("CREATE TRIGGER boom BEFORE INSERT ON conversations WHEN NEW.title = 'boom' "
                 "BEGIN SELECT RAISE(ABORT, 'boom'); END")
    msgs = [{"role": "user", "content": "x"}]
    path = conversation_file(tmp_path, {"title": "a", "messages": msgs}, {"title": "b", "messages": msgs},
                             {"title": "boom", "messages": msgs})
    with pytest.raises(Exception, match="boom"):
        import_file(s, path)
    assert s.conversations() == []


@pytest.mark.parametrize("raw,match", [
    ('{"title": "t", "messages": [{"role": "user", "content": "a\\ud800"}]}\n', "valid Unicode"),
    ("[" * 2000 + "]" * 2000, "nested too deeply|needs a role|non-empty"),
    ('{"title": "t", "messages": [{"role": "user"}]}\n', "text content"),
    ('{"title": "t", "messages": [{"role": "user", "content": "a", "parent": 1}]}\n', "every message has an id"),
    ('{"title": "t", "messages": [{"id": 1, "role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     "every message has an id"),
])
def test_hostile_import_files_are_refused_and_nothing_is_imported(tmp_path, raw, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(raw, encoding="utf-8")
    s = open_store(tmp_path / "s.db")
    with pytest.raises(ArchiveError, match=match):
        import_file(s, path)
    assert s.conversations() == []


def test_import_refuses_what_is_not_a_file_and_takes_a_bom(tmp_path):
    import os

    s = open_store(tmp_path / "s.db")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, match in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                        (tmp_path / "missing.jsonl", "does not exist"), (tmp_path, "not a regular file")):
        with pytest.raises(ArchiveError, match=match):
            import_file(s, path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"title": "t", "messages": [{"role": "user", "content": "x"}],
                                                   "settings": {"temperature": 99, "top_k": 3, "nope": 1}}).encode())
    added, _, notes = import_file(s, bom)
    assert added == 1 and "temperature" in notes[0] and "nope" in notes[0]
    assert s.get(s.conversations()[0].id).settings == {"top_k": 3}


def test_export_never_overwrites_by_accident(tmp_path):
    s = open_store(tmp_path / "s.db")
    victim = tmp_path / "victim.py"
    victim.write_text("print('keep me')\n")
    with pytest.raises(ArchiveError, match="exists.*--force"):
        export_jsonl(s, victim)
    assert victim.read_text() == "print('keep me')\n"
    assert export_jsonl(s, victim, force=True) == 0 and victim.read_text() == ""
    assert oct(victim.stat().st_mode & 0o777) == oct(0o644)
    for path, match in ((tmp_path / "no" / "dir.jsonl", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(ArchiveError, match=match):
            export_jsonl(s, path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_reply_cut_inside_a_code_fence_does_not_swallow_the_rest_of_the_markdown(tmp_path):
    s = open_store(tmp_path / "s.db")
    cid = s.create("code", "m", None, {})
    s.add_message(cid, Message("user", "write code"))
    s.add_message(cid, Message("assistant", "Here:\n```python\ndef f():\n    return 1", stopped=True))
    s.add_message(cid, Message("user", "thanks"))
    text = markdown(s, cid)
    assert text.count("```") % 2 == 0
    after = text.split("    return 1", 1)[1]
    assert after.lstrip().startswith("```") and "## You\n\nthanks" in after
