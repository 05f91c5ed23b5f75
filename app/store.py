"""Conversation history in SQLite (WAL, one commit per message), in the user data directory.

Tables: ``conversations`` (title, model, settings and the engine state needed to resume: codec
snapshot and code stream) and ``messages`` (role, content, the reply's units for colouring,
whether it was stopped, its statistics). ``open_store(path)`` checks the file first: a database
that is locked by another process or is not a valid z2z-chat database is left untouched, and a
fresh one is opened next to it; ``Store.warning`` then says what happened and where.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    system TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    state TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    units TEXT,
    stopped INTEGER NOT NULL DEFAULT 0,
    stats TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, id);
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
    def __init__(self, conn: sqlite3.Connection, path: Path, warning: str | None = None):
        self.db, self.path, self.warning = conn, path, warning

    # conversations
    def conversations(self) -> list[Conversation]:
        rows = self.db.execute("SELECT id, title, model, system, settings, updated FROM conversations "
                               "ORDER BY updated DESC, id DESC").fetchall()
        return [Conversation(r[0], r[1], r[2], r[3], json.loads(r[4]), None, r[5]) for r in rows]

    def get(self, cid: int) -> Conversation:
        r = self.db.execute("SELECT id, title, model, system, settings, state, updated FROM conversations "
                            "WHERE id = ?", (cid,)).fetchone()
        if r is None:
            raise KeyError(f"no conversation {cid}")
        return Conversation(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]) if r[5] else None, r[6])

    def create(self, title: str, model: str, system: str | None, settings: dict[str, Any]) -> int:
        now = time.time()
        with self.db:
            cur = self.db.execute("INSERT INTO conversations (title, model, system, settings, created, updated) "
                                  "VALUES (?, ?, ?, ?, ?, ?)", (title, model, system, json.dumps(settings), now, now))
        return int(cur.lastrowid)

    def update(self, cid: int, **fields: Any) -> None:
        cols = {k: (json.dumps(v) if k in ("settings", "state") and v is not None else v) for k, v in fields.items()}
        cols["updated"] = time.time()
        with self.db:
            self.db.execute(f"UPDATE conversations SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?",
                            (*cols.values(), cid))

    def delete(self, cid: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE conversation = ?", (cid,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (cid,))

    # messages
    def messages(self, cid: int) -> list[Message]:
        rows = self.db.execute("SELECT role, content, units, stopped, stats, id FROM messages "
                               "WHERE conversation = ? ORDER BY id", (cid,)).fetchall()
        return [Message(r[0], r[1], json.loads(r[2]) if r[2] else None, bool(r[3]),
                        json.loads(r[4]) if r[4] else None, r[5]) for r in rows]

    def add_message(self, cid: int, m: Message) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO messages (conversation, role, content, units, stopped, stats, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cid, m.role, m.content, json.dumps(m.units) if m.units is not None else None, int(m.stopped),
                 json.dumps(m.stats) if m.stats is not None else None, time.time()))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), cid))
        return int(cur.lastrowid)

    def delete_message(self, mid: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE id = ?", (mid,))

    def close(self) -> None:
        self.db.close()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=1.0, check_same_thread=False)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; crash-safe commits
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("integrity check failed")
        with conn:
            conn.executescript(SCHEMA)
        conn.execute("SELECT id, title, model, system, settings, state FROM conversations LIMIT 1")
        conn.execute("SELECT role, content, units, stopped, stats FROM messages LIMIT 1")
        conn.execute("BEGIN IMMEDIATE")  # fails now, not at the first message, if another writer holds it
        conn.rollback()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def open_store(path: Path | None = None) -> Store:
    path = path or default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Store(_connect(path), path)
    except sqlite3.Error as e:
        fresh = path.with_name(f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        what = "locked by another program" if "locked" in str(e) else f"unreadable ({e})"
        warning = (f"History database {path} is {what}; it was left untouched and this session uses "
                   f"{fresh}. Close the other z2z-chat, or move the old file away, to use it again.")
        return Store(_connect(fresh), fresh, warning)
