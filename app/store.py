"""Conversation history in SQLite (WAL, one commit per message), in the user data directory.

Tables: ``conversations`` (title, model, settings, the engine state needed to resume: codec
snapshot and code stream, and ``head``: the last message of the branch shown) and ``messages``
(role, content, the reply's units for colouring, whether it was stopped, its statistics, and
``parent``: the message it answers or follows). Messages form a tree: an edited message or a
regenerated reply is a sibling of the one it replaces, and both branches are kept;
``messages(cid)`` is the branch from the root to ``head``. Files written before branches existed
are migrated when opened (each message's parent is the one before it).

``open_store(path)`` looks at the file read-only before writing anything:
- a file that is not a z2z-chat database (another program's SQLite file, or not SQLite at all
  but readable) is never written to: the store opens ``<name>-fallback.db`` next to it instead,
  always the same file, so history written meanwhile stays visible at every launch;
- a corrupt z2z-chat database (its integrity check fails) is moved aside once to
  ``<name>.corrupt-<time>`` and a fresh one is created at the usual path;
- a database locked by another process at launch also uses the fallback file; at the next launch
  that finds the database free, what the fallback file holds is moved into it;
- a database the user may not write (read-only file, directory or filesystem) is opened read-only:
  the history is shown, nothing new is saved, and the warning says so and how to fix it; where
  there is no readable history at all (the data directory cannot be created) an in-memory store
  keeps the session going, with the same kind of warning.
``Store.warning`` says what happened, naming both paths.

``search(text)`` finds messages on every branch: SQLite FTS5 (an index kept by triggers, built
once for older files) matching words that start with what was typed, or a plain ``LIKE`` scan
where this SQLite has no FTS5 or the file cannot be written.

During a session every write retries for up to ``BUSY_WAIT_S`` while another process holds the
lock, then raises ``StoreBusy``; a read-only database raises ``StoreReadOnly`` and a full disk
``StoreFull``. All three are ``NotSaved``: nothing is lost in the running app because the caller
keeps the write queued (``PendingWrites``) and retries it with the next one. Text that is not
valid UTF-8 or JSON that does not parse is read as what can be read (U+FFFD, or an empty value)
and counted in ``Store.repaired``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from z2z_chat.backends.errors import Z2ZError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two instances there can still race
    fcntl = None

BUSY_WAIT_S = 5.0
T = TypeVar("T")
TABLES = {"conversations": {"id", "title", "model", "system", "settings", "state", "created", "updated", "head",
                           "uid"},
          "messages": {"id", "conversation", "role", "content", "units", "stopped", "stats", "created", "parent"}}
ADDED = {"conversations": {"head", "uid"}, "messages": {"parent"}}  # columns newer than the first version


class NotSaved(Z2ZError):
    """A write did not reach the disk; the message says why and what happens to it."""


class StoreBusy(NotSaved):
    """Another process holds the history database's lock for longer than ``BUSY_WAIT_S``."""


class StoreReadOnly(NotSaved):
    """The history database cannot be written (read-only file, directory or filesystem)."""


class StoreFull(NotSaved):
    """The disk holding the history database is full."""


def _not_saved(e: sqlite3.OperationalError, path: Path) -> NotSaved | None:
    """The NotSaved that a failed write means, or None when it is none of them (a bug: re-raise)."""
    msg = str(e).lower()
    if "readonly" in msg or "read-only" in msg:
        return StoreReadOnly(f"the history database {path} is read-only: what you write is kept while the "
                             "app runs but NOT saved. Make the file and its directory writable, or set "
                             "Z2Z_DATA_DIR to a writable directory")
    if "full" in msg:
        return StoreFull(f"the disk holding {path} is full: what you write is kept while the app runs and "
                         "saved with the next message once space is freed; it is NOT saved yet")
    return None

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    system TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    state TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    head INTEGER,
    uid TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    units TEXT,
    stopped INTEGER NOT NULL DEFAULT 0,
    stats TEXT,
    created REAL NOT NULL,
    parent INTEGER
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, id);
"""
FTS = "messages_fts"
FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE {FTS} USING fts5(content, content='messages', content_rowid='id');
CREATE TRIGGER {FTS}_ai AFTER INSERT ON messages BEGIN
  INSERT INTO {FTS}(rowid, content) VALUES (new.id, new.content); END;
CREATE TRIGGER {FTS}_ad AFTER DELETE ON messages BEGIN
  INSERT INTO {FTS}({FTS}, rowid, content) VALUES ('delete', old.id, old.content); END;
CREATE TRIGGER {FTS}_au AFTER UPDATE OF content ON messages BEGIN
  INSERT INTO {FTS}({FTS}, rowid, content) VALUES ('delete', old.id, old.content);
  INSERT INTO {FTS}(rowid, content) VALUES (new.id, new.content); END;
INSERT INTO {FTS}({FTS}) VALUES ('rebuild');
"""
MIGRATE = """
ALTER TABLE conversations ADD COLUMN head INTEGER;
ALTER TABLE messages ADD COLUMN parent INTEGER;
UPDATE messages SET parent = (SELECT max(p.id) FROM messages p
                              WHERE p.conversation = messages.conversation AND p.id < messages.id);
UPDATE conversations SET head = (SELECT max(m.id) FROM messages m WHERE m.conversation = conversations.id);
"""


def default_path() -> Path:
    env = os.environ.get("Z2Z_DATA_DIR")
    if env:
        return Path(env) / "history.db"
    import platformdirs

    return platformdirs.user_data_path("z2z-chat") / "history.db"


@dataclass
class Message:
    role: str
    content: str
    units: list[list[Any]] | None = None  # [[text, span], ...] for replies
    stopped: bool = False
    stats: dict[str, Any] | None = None
    id: int | None = None
    parent: int | None = None


@dataclass
class Conversation:
    id: int
    title: str
    model: str = ""
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    updated: float = 0.0


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path, warning: str | None = None, read_only: bool = False):
        self.db, self.path, self.warning, self.read_only = conn, path, warning, read_only
        self.in_use: int | None = None  # a lock held on a fallback file while this store writes it
        self.repaired = 0  # stored values that could only be read in part
        conn.text_factory = self._text
        self.fts = _has_fts(conn)

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.repaired += 1
            return raw.decode("utf-8", errors="replace")

    def _json(self, raw: str | None, default: Any) -> Any:
        if not raw:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            self.repaired += 1
            return default

    def _write(self, fn: Callable[[], T]) -> T:
        """Run one write transaction, retrying while another process holds the lock."""
        if self.read_only:
            raise _not_saved(sqlite3.OperationalError("readonly"), self.path)
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                with self.db:
                    return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise (_not_saved(e, self.path) or e) from e
                if time.monotonic() > deadline:
                    raise StoreBusy(f"the history database {self.path} is locked by another program; "
                                    "what you wrote is kept and will be saved when it is released") from None
                time.sleep(0.1)

    # rows: the columns each query selects, in order, and the dataclass they make
    CONVERSATION = "id, title, model, system, settings, state, updated"
    LISTED = "id, title, model, system, settings, NULL, updated"  # the list does not read saved states
    MESSAGE = "role, content, units, stopped, stats, id, parent"

    def _conversation(self, row: tuple) -> Conversation:
        cid, title, model, system, settings, state, updated = row
        settings, state = self._json(settings, {}), self._json(state, None)
        return Conversation(cid, title, model, system, settings if isinstance(settings, dict) else {},
                            state if isinstance(state, dict) else None, updated)

    def _message(self, row: tuple) -> Message:
        role, content, units, stopped, stats, mid, parent = row
        units, stats = self._json(units, None), self._json(stats, None)
        return Message(role, content, units if isinstance(units, list) else None, bool(stopped),
                       stats if isinstance(stats, dict) else None, mid, parent)

    # conversations
    def conversations(self) -> list[Conversation]:
        """Every conversation, the most recently written first (``state`` None)."""
        rows = self.db.execute(f"SELECT {self.LISTED} FROM conversations "
                               "ORDER BY updated DESC, id DESC").fetchall()
        return [self._conversation(r) for r in rows]

    def get(self, cid: int) -> Conversation:
        r = self.db.execute(f"SELECT {self.CONVERSATION} FROM conversations WHERE id = ?", (cid,)).fetchone()
        if r is None:
            raise KeyError(f"no conversation {cid}")
        return self._conversation(r)

    def create(self, title: str, model: str, system: str | None, settings: dict[str, Any]) -> int:
        now = time.time()
        cur = self._write(lambda: self.db.execute(
            "INSERT INTO conversations (title, model, system, settings, created, updated, uid) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (title, model, system, json.dumps(settings), now, now, uuid.uuid4().hex)))
        return int(cur.lastrowid)

    def uid(self, cid: int) -> tuple[str, float, float]:
        """The conversation's lasting id (the same in every export) and its created/updated times."""
        r = self.db.execute("SELECT uid, created, updated FROM conversations WHERE id = ?", (cid,)).fetchone()
        if r is None:
            raise KeyError(f"no conversation {cid}")
        return r[0] or "", r[1], r[2]

    def import_conversations(self, convs: list[dict[str, Any]]) -> int:
        """Add conversations in one transaction (all or none); those whose ``uid`` the history
        already holds are skipped, so importing a file twice adds nothing. Returns how many were added.
        Each: title, model, system, settings, uid, created, updated, head, and ``messages``
        (``Message``s whose ``id``/``parent`` number them within the conversation, or None: in order)."""
        def write() -> int:
            added = 0
            for c in convs:
                if self.db.execute("SELECT 1 FROM conversations WHERE uid = ?", (c["uid"],)).fetchone():
                    continue
                now = time.time()
                cid = self.db.execute(
                    "INSERT INTO conversations (title, model, system, settings, created, updated, uid) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", (c["title"], c["model"], c["system"], json.dumps(c["settings"]),
                                                     c.get("created") or now, c.get("updated") or now,
                                                     c["uid"])).lastrowid
                ids: dict[int | None, int | None] = {None: None}
                last = None
                for m in c["messages"]:
                    parent = last if m.id is None else ids[m.parent]
                    last = self.db.execute(
                        "INSERT INTO messages (conversation, role, content, units, stopped, stats, created, parent) "
                        "VALUES (?, ?, ?, NULL, ?, NULL, ?, ?)",
                        (cid, m.role, m.content, int(m.stopped), c.get("updated") or now, parent)).lastrowid
                    if m.id is not None:
                        ids[m.id] = last
                head = ids.get(c.get("head")) if isinstance(c.get("head"), int) else None
                self.db.execute("UPDATE conversations SET head = ? WHERE id = ?", (head or last, cid))
                added += 1
            return added

        return self._write(write)

    def update(self, cid: int, **fields: Any) -> None:
        cols = {k: (json.dumps(v) if k in ("settings", "state") and v is not None else v) for k, v in fields.items()}
        cols["updated"] = time.time()
        self._write(lambda: self.db.execute(
            f"UPDATE conversations SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?", (*cols.values(), cid)))

    def delete(self, cid: int) -> None:
        self._write(lambda: self.db.execute("DELETE FROM conversations WHERE id = ?", (cid,)))  # messages cascade

    # messages
    def messages(self, cid: int) -> list[Message]:
        """The branch shown: from the first message to the conversation's ``head`` (its newest
        message when ``head`` is missing or names no message: rows written by other means)."""
        rows = self.db.execute(
            "WITH RECURSIVE branch(id) AS (SELECT coalesce((SELECT c.head FROM conversations c JOIN messages h "
            "ON h.id = c.head AND h.conversation = c.id WHERE c.id = ?1), "
            "(SELECT max(id) FROM messages WHERE conversation = ?1)) "
            "UNION ALL SELECT m.parent FROM messages m JOIN branch b ON m.id = b.id WHERE m.parent IS NOT NULL) "
            f"SELECT {self.MESSAGE} FROM messages WHERE id IN (SELECT id FROM branch) ORDER BY id", (cid,)).fetchall()
        return [self._message(r) for r in rows]

    def search(self, text: str, limit: int = 200) -> list[tuple[int, int, str, str, str]]:
        """(message id, conversation id, title, role, content) of messages on any branch that contain
        ``text``: with FTS5, words starting with each word typed; else the text anywhere
        (case-insensitive for ASCII). Newest first."""
        words = [w for w in text.split() if w]
        if not words:
            return []
        if self.fts:
            query = " ".join('"' + w.replace('"', '""') + '"*' for w in words)
            sql = (f"SELECT m.id, m.conversation, c.title, m.role, m.content FROM {FTS} f "
                   f"JOIN messages m ON m.id = f.rowid JOIN conversations c ON c.id = m.conversation "
                   f"WHERE {FTS} MATCH ? ORDER BY m.id DESC LIMIT ?")
            return self.db.execute(sql, (query, limit)).fetchall()
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return self.db.execute(
            "SELECT m.id, m.conversation, c.title, m.role, m.content FROM messages m "
            "JOIN conversations c ON c.id = m.conversation WHERE m.content LIKE ? ESCAPE '\\' "
            "ORDER BY m.id DESC LIMIT ?", (pattern, limit)).fetchall()

    def tree(self, cid: int) -> list[Message]:
        """Every message of the conversation, on every branch, oldest first (parents before children)."""
        rows = self.db.execute(f"SELECT {self.MESSAGE} FROM messages WHERE conversation = ? ORDER BY id",
                               (cid,)).fetchall()
        return [self._message(r) for r in rows]

    def siblings(self, mid: int) -> list[int]:
        """Ids of the messages that are alternatives to ``mid`` (same parent, same role), itself
        included, oldest first: the branches an edit or a regenerate made there."""
        return [r[0] for r in self.db.execute(
            "SELECT s.id FROM messages s JOIN messages m ON m.id = ? WHERE s.conversation = m.conversation "
            "AND s.role = m.role AND s.parent IS m.parent ORDER BY s.id", (mid,))]

    def set_head(self, cid: int, mid: int | None, descend: bool = True) -> None:
        """Show the branch through ``mid``: down to its newest descendant, or ending at ``mid`` when
        not ``descend`` (the next message then starts a new branch there; None: before the first)."""
        def write() -> None:
            leaf = mid
            while descend and leaf is not None:
                child = self.db.execute("SELECT max(id) FROM messages WHERE parent = ?", (leaf,)).fetchone()[0]
                if child is None:
                    break
                leaf = child
            self.db.execute("UPDATE conversations SET head = ?, updated = ? WHERE id = ?", (leaf, time.time(), cid))

        self._write(write)

    def sent(self, limit: int = 500) -> list[str]:
        """What the user sent, in every conversation, oldest first (the input's Up/Down recall)."""
        rows = self.db.execute("SELECT content FROM messages WHERE role = 'user' ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()
        return [r[0] for r in reversed(rows) if isinstance(r[0], str)]

    def add_message(self, cid: int, m: Message, parent: int | None | str = "head") -> int:
        """Add ``m`` after ``parent`` (default: the branch's last message) and show its branch."""
        def write() -> sqlite3.Cursor:
            after = (self.db.execute("SELECT head FROM conversations WHERE id = ?", (cid,)).fetchone() or [None])[0] \
                if parent == "head" else parent
            cur = self.db.execute(
                "INSERT INTO messages (conversation, role, content, units, stopped, stats, created, parent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, m.role, m.content, json.dumps(m.units) if m.units is not None else None, int(m.stopped),
                 json.dumps(m.stats) if m.stats is not None else None, time.time(), after))
            self.db.execute("UPDATE conversations SET updated = ?, head = ? WHERE id = ?",
                            (time.time(), cur.lastrowid, cid))
            return cur

        return int(self._write(write).lastrowid)

    def delete_message(self, mid: int) -> None:
        """Remove a message that has no replies (a withdrawn one); its branch shows its parent."""
        def write() -> None:
            row = self.db.execute("SELECT conversation, parent FROM messages WHERE id = ?", (mid,)).fetchone()
            self.db.execute("DELETE FROM messages WHERE id = ?", (mid,))
            if row is not None:
                self.db.execute("UPDATE conversations SET head = ? WHERE id = ? AND head = ?", (row[1], row[0], mid))

        self._write(write)

    def close(self) -> None:
        self.db.close()
        if self.in_use is not None:  # the fallback file may be merged by the next launch
            os.close(self.in_use)
            self.in_use = None


class PendingWrites:
    """Writes that could not be made yet (``NotSaved``: locked, read-only, full), retried in order."""

    def __init__(self) -> None:
        self.queue: list[Callable[[], Any]] = []

    def run(self, write: Callable[[], T]) -> T | None:
        """Flush what is queued, then ``write``; on ``NotSaved`` the write stays queued (first, in
        order) and the error is re-raised. Any other error is a bug: it propagates and that write
        is dropped, so it cannot block the ones after it."""
        self.queue.append(write)
        result = None
        while self.queue:
            head = self.queue.pop(0)
            try:
                result = head()
            except NotSaved:
                self.queue.insert(0, head)
                raise
        return result


class NotOurs(Exception):
    """The file is a readable database, but not a z2z-chat one."""


def _check_ours(path: Path, how: str = "mode=ro") -> None:
    """Read-only look at an existing file: NotOurs if it is not a z2z-chat database (or empty)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise NotOurs("it is not an SQLite database")
    ro = sqlite3.connect(f"{path.as_uri()}?{how}", uri=True, timeout=1.0)
    try:
        tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        tables = {t for t in tables if not t.startswith(f"{FTS}")}  # the search index and its shadow tables
        if not tables:
            return
        if tables != set(TABLES):
            raise NotOurs(f"it holds other tables ({', '.join(sorted(tables))})")
        for t, cols in TABLES.items():
            have = {r[1] for r in ro.execute(f"PRAGMA table_info({t})")}
            if not cols - ADDED[t] <= have <= cols:
                raise NotOurs(f"its table {t} has other columns")
    finally:
        ro.close()


def _has_fts(conn: sqlite3.Connection) -> bool:
    """Whether the search index exists, creating it where it can (FTS5 compiled in, file writable)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (FTS,)).fetchone():
        return True
    try:
        with conn:
            conn.executescript(FTS_SCHEMA)
        return True
    except sqlite3.OperationalError:  # no FTS5 in this SQLite, or a read-only file: LIKE then
        return False


def _needs_migration(conn: sqlite3.Connection) -> bool:
    return "parent" not in {r[1] for r in conn.execute("PRAGMA table_info(messages)")}


def _migrate(conn: sqlite3.Connection) -> None:
    """A file from before branches: every message follows the one before it; one from before
    conversation ids (what makes an import idempotent): each gets one. One transaction each."""
    if _needs_migration(conn):
        with conn:
            for statement in MIGRATE.strip().split(";\n"):
                conn.execute(statement)
    with conn:
        if "uid" not in {r[1] for r in conn.execute("PRAGMA table_info(conversations)")}:
            conn.execute("ALTER TABLE conversations ADD COLUMN uid TEXT")
        conn.execute("UPDATE conversations SET uid = lower(hex(randomblob(16))) WHERE uid IS NULL")
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS conversations_by_uid ON conversations(uid)")


def _check_fts(conn: sqlite3.Connection) -> str | None:
    """FTS5's own check of the search index (``integrity_check`` does not look inside it); a damaged
    index is rebuilt from the messages. A note when it was."""
    if not _has_fts(conn):
        return None
    try:
        with conn:  # an INSERT opens a transaction: end it, or the file stays locked
            conn.execute(f"INSERT INTO {FTS}({FTS}, rank) VALUES ('integrity-check', 1)")
        return None
    except sqlite3.DatabaseError as e:
        with conn:
            conn.execute(f"INSERT INTO {FTS}({FTS}) VALUES ('rebuild')")
        return f"the history's search index was damaged ({e}) and was rebuilt from the messages"


def _connect(path: Path) -> sqlite3.Connection:
    _check_ours(path)
    conn = sqlite3.connect(path, timeout=1.0, check_same_thread=False)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; crash-safe commits
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("integrity check failed")
        with conn:
            conn.executescript(SCHEMA)
        _migrate(conn)
        conn.execute("BEGIN IMMEDIATE")  # fails now, not at the first message, if another writer holds it
        conn.rollback()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _writable(path: Path) -> bool:
    """Whether SQLite can write here: the file (if any) and its directory (WAL's side files)."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def _read_only(path: Path, why: str) -> Store:
    """The history opened for reading only (it is shown; nothing new is saved)."""
    for how in ("mode=ro", "immutable=1"):  # immutable: a WAL database whose side files cannot be made
        try:
            _check_ours(path, how)
            conn = sqlite3.connect(f"{path.as_uri()}?{how}", uri=True, timeout=1.0, check_same_thread=False)
            conn.execute("SELECT count(*) FROM messages").fetchone()
            break
        except NotOurs as e:
            return _in_memory(f"History database {path} {why} and is not a z2z-chat database ({e})")
        except sqlite3.Error as e:
            error = e
    else:
        return _in_memory(f"History database {path} {why} and cannot be read either ({error})")
    if _needs_migration(conn):
        mem = sqlite3.connect(":memory:", check_same_thread=False)  # a file from before branches: shown
        conn.backup(mem)  # migrated in memory, the file stays as it is
        conn.close()
        conn = mem
        _migrate(conn)
    return Store(conn, path, f"History database {path} {why}: your conversations are shown, but nothing "
                             "new is saved. Make it writable, or set Z2Z_DATA_DIR to a writable directory.",
                 read_only=True)


def _in_memory(why: str) -> Store:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(SCHEMA)
    return Store(conn, Path(":memory:"), f"{why}. This session's messages are kept in memory only and are "
                                         "NOT saved; set Z2Z_DATA_DIR to a writable directory.")


def _in_use_lock(fallback: Path, exclusive: bool) -> int | None:
    """A lock on ``<fallback>.lock`` (its descriptor), or None when it cannot be had now: every
    instance that writes the fallback file holds a shared one for as long as it runs; a merge needs
    the exclusive one. (Without ``fcntl``, on Windows, a descriptor without a lock.)"""
    try:
        fd = os.open(f"{fallback}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def _merge_fallback(store: Store, fallback: Path) -> str | None:
    """Move what a fallback file holds (written while the database was locked at launch) into the
    database, in one transaction: conversations keep their order, messages their order and fields.
    Not while another instance still writes the fallback file (it holds its lock): moving its
    conversations away would make its next messages fail; they are moved at a later launch."""
    if not fallback.exists() or not _writable(fallback):
        return None
    lock = _in_use_lock(fallback, exclusive=True)
    if lock is None:
        return (f"Another z2z-chat still writes {fallback} (it started while {store.path} was locked); "
                "its conversations are moved into the history at a launch after it ends.")
    try:
        return _move_fallback(store, fallback)
    finally:
        os.close(lock)


def _move_fallback(store: Store, fallback: Path) -> str | None:
    try:
        _check_ours(fallback)
    except (NotOurs, sqlite3.Error):
        return None
    db = store.db
    db.execute("ATTACH DATABASE ? AS fb", (str(fallback),))
    try:
        branched = "parent" in {r[1] for r in db.execute("PRAGMA fb.table_info(messages)")}
        convs = db.execute("SELECT id, title, model, system, settings, state, created, updated, "
                           f"{'head' if branched else 'NULL'} FROM fb.conversations ORDER BY id").fetchall()
        if not convs:
            return None
        with db:
            for old, *fields, head in convs:
                new = db.execute("INSERT INTO conversations (title, model, system, settings, state, created, "
                                 "updated) VALUES (?, ?, ?, ?, ?, ?, ?)", fields).lastrowid
                ids: dict[int | None, int | None] = {None: None}
                last = None
                for mid, parent, *row in db.execute(
                        f"SELECT id, {'parent' if branched else 'NULL'}, role, content, units, stopped, stats, "
                        "created FROM fb.messages WHERE conversation = ? ORDER BY id", (old,)).fetchall():
                    last = ids[mid] = db.execute(
                        "INSERT INTO messages (conversation, role, content, units, stopped, stats, created, parent) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (new, *row, ids.get(parent) if branched else last)).lastrowid
                db.execute("UPDATE conversations SET head = ? WHERE id = ?", (ids.get(head, last) if branched else last, new))
            db.execute("DELETE FROM fb.messages")
            db.execute("DELETE FROM fb.conversations")
    finally:
        db.execute("DETACH DATABASE fb")
    return (f"{len(convs)} conversation(s) written to {fallback} while {store.path} was locked were moved "
            f"into {store.path}.")


def open_store(path: Path | None = None) -> Store:
    path = path or default_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _in_memory(f"The history directory {path.parent} cannot be created ({e.strerror})")
    fallback = path.with_name(f"{path.stem}-fallback{path.suffix}")
    if not _writable(path):
        return _read_only(path, "is read-only (file, directory or filesystem)")
    if path.is_dir():
        return _in_memory(f"The history database {path} is a directory, not a file; move it away or set "
                          "Z2Z_DATA_DIR to another directory")
    try:
        conn = _connect(path)
        note = _check_fts(conn)
        store = Store(conn, path)
        store.warning = _merge_fallback(store, fallback) or note
        _migrate(conn)  # conversations moved in from the fallback get their lasting ids
        return store
    except NotOurs as e:
        why = f"is not a z2z-chat history database ({e}); it was left untouched"
    except sqlite3.Error as e:
        if "locked" in str(e) or "busy" in str(e):
            why = "is locked by another program (another z2z-chat?); it was left untouched"
        elif "readonly" in str(e) or "read-only" in str(e):  # e.g. a read-only mount that access() misses
            return _read_only(path, "is on a read-only filesystem")
        else:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            for ext in ("-wal", "-shm"):
                side = path.with_name(path.name + ext)
                if side.exists():
                    os.replace(side, aside.with_name(aside.name + ext))
            return Store(_connect(path), path, f"History database {path} was unreadable ({e}); it was moved "
                                               f"to {aside} and a new one was started at {path}.")
    store = Store(_connect(fallback), fallback,
                  f"History database {path} {why}. This session uses {fallback} (the same file every time).")
    store.in_use = _in_use_lock(fallback, exclusive=False)  # a merge waits for every instance that uses it
    return store
