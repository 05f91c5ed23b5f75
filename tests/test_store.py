"""The history store (``app/store.py``) on real SQLite files: corrupt, foreign, locked, read-only
and full storage. Needs neither torch nor Textual."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from z2z_chat.app.store import (
    Message,
    NotSaved,
    PendingWrites,
    StoreFull,
    StoreReadOnly,
    open_store,
)


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (tmpfs), or a skip where this machine may not mount one."""
    where = Path(tempfile.mkdtemp())
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       check=False, capture_output=True)
    if r.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not permitted'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def test_corrupt_or_locked_database_starts_fresh_and_leaves_the_file(tmp_path):
    bad = tmp_path / "history.db"
    bad.write_bytes(b"this is not a database" * 100)
    store = open_store(bad)
    assert store.warning and "left untouched" in store.warning and store.path != bad
    assert bad.read_bytes().startswith(b"this is not a database")
    store.close()
    good = tmp_path / "locked.db"
    open_store(good).close()
    holder = sqlite3.connect(good)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        s2 = open_store(good)
        assert s2.warning and "locked" in s2.warning
        s2.close()
    finally:
        holder.rollback()
        holder.close()


def test_corrupt_history_uses_one_fallback_and_foreign_sqlite_is_untouched(tmp_path):
    db = tmp_path / "history.db"
    db.write_bytes(b"garbage" * 100)
    first = open_store(db)
    first.create("after the damage", "m", None, {})
    first.close()
    second = open_store(db)
    assert second.path == first.path and [c.title for c in second.conversations()] == ["after the damage"]
    second.close()
    foreign = tmp_path / "other.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    s = open_store(foreign)
    assert s.path != foreign and "not a z2z-chat" in s.warning
    s.close()
    assert foreign.read_bytes() == before and not Path(str(foreign) + "-wal").exists()
    # ours but damaged inside: moved aside once, a fresh one at the usual path
    ours = tmp_path / "ours.db"
    open_store(ours).close()
    data = bytearray(ours.read_bytes())
    data[100:4096] = b"\x00" * (4096 - 100)
    ours.write_bytes(bytes(data))
    s = open_store(ours)
    assert s.path == ours and "moved" in s.warning and list(tmp_path.glob("ours.db.corrupt-*"))
    s.close()


def test_messages_written_while_locked_at_launch_are_shown_at_the_next_launch(tmp_path):
    db = tmp_path / "history.db"
    s = open_store(db)
    s.add_message(s.create("before", "m", None, {}), Message("user", "old"))
    s.close()
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = open_store(db)
        assert locked.path != db
        cid = locked.create("while locked", "m", "be brief", {"max_tokens": 9})
        locked.add_message(cid, Message("user", "hi"))
        locked.add_message(cid, Message("assistant", "hello", [["hello", 1]], True, {"ttft_s": 0.1}))
        locked.close()
    finally:
        holder.rollback()
        holder.close()
    again = open_store(db)
    assert again.path == db and "moved into" in again.warning
    convs = {c.title: c for c in again.conversations()}
    assert set(convs) == {"before", "while locked"} and convs["while locked"].system == "be brief"
    msgs = again.messages(convs["while locked"].id)
    assert [(m.role, m.content, m.units, m.stopped, m.stats) for m in msgs] == [
        ("user", "hi", None, False, None), ("assistant", "hello", [["hello", 1]], True, {"ttft_s": 0.1})]
    again.close()
    third = open_store(db)  # moved, not copied: nothing is merged twice
    assert third.warning is None and len(third.conversations()) == 2
    third.close()


def test_a_full_disk_keeps_the_writes_queued_and_says_they_are_not_saved():
    with tmpfs("1m") as where:
        s = open_store(where / "history.db")
        cid = s.create("chat", "m", None, {})
        pending = PendingWrites()
        filler = where / "filler"
        # fill what is left of the filesystem
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        big = "a long message " * 2000
        with pytest.raises(StoreFull, match="full.*NOT saved"):
            pending.run(lambda: s.add_message(cid, Message("user", big)))
        with pytest.raises(NotSaved):
            pending.run(lambda: s.add_message(cid, Message("assistant", "the reply")))
        assert len(pending.queue) == 2
        filler.unlink()  # space freed: the next write flushes the queue in order
        pending.run(lambda: s.add_message(cid, Message("user", "next")))
        assert [m.content for m in s.messages(cid)] == [big, "the reply", "next"] and not pending.queue
        s.close()


def test_a_history_on_a_read_only_filesystem_is_shown_and_not_written():
    with tmpfs("1m") as where:
        db = where / "history.db"
        s = open_store(db)
        s.add_message(s.create("kept", "m", None, {}), Message("user", "hello"))
        s.close()
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        before = db.read_bytes()
        ro = open_store(db)
        assert ro.read_only and "read-only" in ro.warning and "nothing new is saved" in ro.warning
        assert [c.title for c in ro.conversations()] == ["kept"]
        with pytest.raises(StoreReadOnly, match="NOT saved"):
            ro.create("new", "m", None, {})
        ro.close()
        assert db.read_bytes() == before and not list(where.glob("*.corrupt-*"))


def test_a_history_file_the_user_may_not_write_is_shown_and_not_moved_aside(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write any file; the read-only filesystem test covers this path as root")
    db = tmp_path / "history.db"
    s = open_store(db)
    s.create("mine", "m", None, {})
    s.close()
    db.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        before = db.read_bytes()
        ro = open_store(db)
        assert ro.read_only and [c.title for c in ro.conversations()] == ["mine"]
        with pytest.raises(StoreReadOnly):
            ro.create("new", "m", None, {})
        ro.close()
        assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["history.db"]
    finally:
        tmp_path.chmod(0o755)


def test_no_history_directory_keeps_the_session_in_memory(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    s = open_store(blocker / "history.db")
    assert "cannot be created" in s.warning and "NOT saved" in s.warning
    cid = s.create("chat", "m", None, {})
    s.add_message(cid, Message("user", "hi"))
    assert [m.content for m in s.messages(cid)] == ["hi"]
    s.close()


FIXTURE = Path(__file__).parent / "data" / "history-before-branches.db"  # written by the store before branches


def test_a_history_from_before_branches_opens_with_every_message(tmp_path):
    import shutil

    db = tmp_path / "history.db"
    shutil.copy(FIXTURE, db)
    s = open_store(db)
    assert s.warning is None
    convs = {c.title: c for c in s.conversations()}
    assert set(convs) == {"Capitals", "Code"} and convs["Capitals"].system == "be brief"
    msgs = s.messages(convs["Capitals"].id)
    assert [(m.role, m.content, m.units, m.stopped, m.stats) for m in msgs] == [
        ("user", "What is the capital of France?", None, False, None),
        ("assistant", "Paris.", [["Par", 1], ["is.", 2]], False, {"ttft_s": 0.12, "reply_codes": 2}),
        ("user", "And of Italy? ünïcödé 🙂", None, False, None),
        ("assistant", "Rome", [["Rome", 1]], True, None)]
    assert [m.parent for m in msgs] == [None] + [m.id for m in msgs[:-1]]  # each follows the one before
    assert s.get(convs["Capitals"].id).state == {"engine": {"version": 1, "messages": []}, "before_last": None}
    assert [m.content for m in s.messages(convs["Code"].id)] == ["def f(x):\n    return x", "```python\nf(1)\n```"]
    s.add_message(convs["Code"].id, Message("user", "thanks"))
    assert s.messages(convs["Code"].id)[-1].content == "thanks"
    s.close()


def test_edits_and_regenerations_are_branches_that_are_all_kept(tmp_path):
    s = open_store(tmp_path / "h.db")
    cid = s.create("t", "m", None, {})
    u1 = s.add_message(cid, Message("user", "first"))
    a1 = s.add_message(cid, Message("assistant", "reply 1"))
    u2 = s.add_message(cid, Message("user", "second"))
    s.add_message(cid, Message("assistant", "reply 2"))
    # edit the second message: a sibling of it, after the first reply
    u2b = s.add_message(cid, Message("user", "second, edited"), parent=a1)
    a2b = s.add_message(cid, Message("assistant", "reply 2b"))
    assert [m.content for m in s.messages(cid)] == ["first", "reply 1", "second, edited", "reply 2b"]
    assert s.siblings(u2b) == [u2, u2b] and s.siblings(u1) == [u1]
    # regenerate: another reply to the same message
    a2c = s.add_message(cid, Message("assistant", "reply 2c"), parent=u2b)
    assert s.siblings(a2c) == [a2b, a2c]
    s.set_head(cid, u2)  # back to the first branch: down to its newest message
    assert [m.content for m in s.messages(cid)] == ["first", "reply 1", "second", "reply 2"]
    s.set_head(cid, u2b)
    assert s.messages(cid)[-1].content == "reply 2c"
    s.close()


def test_a_damaged_search_index_is_found_and_rebuilt(tmp_path):
    db = tmp_path / "history.db"
    s = open_store(db)
    if not s.fts:
        pytest.skip("this SQLite has no FTS5")
    cid = s.create("chat", "m", None, {})
    s.add_message(cid, Message("user", "the sieve of Eratosthenes"))
    with s.db:  # the index disagrees with the messages: integrity_check cannot see it
        s.db.execute("INSERT INTO messages_fts(rowid, content) VALUES (999, 'ghost words')")
    s.close()
    again = open_store(db)
    assert again.warning and "search index" in again.warning and "rebuilt" in again.warning
    assert [r[4] for r in again.search("sieve")] == ["the sieve of Eratosthenes"] and not again.search("ghost")
    again.close()
    assert open_store(db).warning is None


def test_a_history_that_is_a_directory_is_said_and_left_alone(tmp_path):
    db = tmp_path / "history.db"
    db.mkdir()
    s = open_store(db)
    assert "is a directory" in s.warning and db.is_dir()


def test_a_fallback_file_still_written_by_another_instance_is_not_merged_away(tmp_path):
    """A starts while the history is locked (it writes the fallback file); the lock goes; B starts:
    B must not move A's conversations away, or A's next messages fail (FOREIGN KEY) while A says
    they are saved. They are moved at a launch after A ends."""
    db = tmp_path / "history.db"
    open_store(db).close()
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    a = open_store(db)
    holder.rollback()
    holder.close()
    assert a.path != db
    cid = a.create("from A", "m", None, {})
    a.add_message(cid, Message("user", "first"))
    b = open_store(db)  # the history is free now
    assert b.path == db and "still writes" in (b.warning or "")
    a.add_message(cid, Message("assistant", "second"))  # A goes on: nothing is lost
    assert [m.content for m in a.messages(cid)] == ["first", "second"]
    b.close()
    a.close()
    c = open_store(db)  # A has ended: its conversation is moved in now
    assert "moved" in (c.warning or "")
    (conv,) = [x for x in c.conversations() if x.title == "from A"]
    assert [m.content for m in c.messages(conv.id)] == ["first", "second"]
