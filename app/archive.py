"""Conversations in and out of the history, for backups and scripts.

- ``export_jsonl(store, path)``: every conversation, one JSON object per line:
  ``{"title", "model", "system", "settings", "head", "messages": [{"id", "parent", "role",
  "content", "stopped"}]}`` with every branch: ``id`` numbers the messages within the
  conversation, ``parent`` names the one each follows, ``head`` the last one of the branch shown.
- ``import_file(store, path)``: JSON Lines written by ``export_jsonl``, or one JSON list of
  ``{"role", "content"}`` objects (the OpenAI message format most chat apps export) as a new
  conversation. Everything is checked before anything is written: a malformed file raises
  ``ArchiveError`` naming the line and imports nothing.
- ``markdown(store, cid)``: one conversation as Markdown for reading, every branch: the branch
  shown first, then each other one from where it leaves an earlier one.
- ``search(store, text)``: (conversation id, title, role, the matching line, message id) for
  every message that matches ``text`` on any branch (``Store.search``: FTS5, or ``LIKE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from z2z_chat.backends.engine.settings import CHAT_KEYS, TABLE
from z2z_chat.backends.errors import SettingsError, Z2ZError

from z2z_chat.app.store import Message, Store

ROLES = ("system", "user", "assistant")


class ArchiveError(Z2ZError, ValueError):
    """An import file that cannot be read; the message names the line."""


@dataclass
class Hit:
    conversation: int
    title: str
    role: str
    line: str
    message: int = 0


def export_jsonl(store: Store, path: Path, force: bool = False) -> int:
    """Write every conversation through a temporary file renamed into place; returns how many.
    An existing ``path`` is refused unless ``force``; ``ArchiveError`` says what went wrong."""
    if path.is_dir():
        raise ArchiveError(f"{path} is a directory: name a file to write")
    if path.exists() and not force:
        raise ArchiveError(f"{path} exists; choose another name, or add --force to replace it")
    if not path.parent.is_dir():
        raise ArchiveError(f"the directory {path.parent} does not exist")
    convs = store.conversations()
    lines = []
    for c in reversed(convs):  # oldest first, so an import keeps the order
        tree = store.tree(c.id)
        local = {m.id: i for i, m in enumerate(tree, 1)}  # ids within the conversation
        shown = store.messages(c.id)
        uid, created, updated = store.uid(c.id)
        msgs = [{"id": local[m.id], "parent": local.get(m.parent), "role": m.role, "content": m.content,
                 "stopped": m.stopped} for m in tree]
        lines.append(json.dumps({"uid": uid, "created": created, "updated": updated, "title": c.title,
                                 "model": c.model, "system": c.system, "settings": c.settings,
                                 "head": local[shown[-1].id] if shown else None, "messages": msgs},
                                ensure_ascii=False) + "\n")
    try:
        atomic_write(path, "".join(lines))
    except OSError as e:
        raise ArchiveError(f"{path} cannot be written ({e.strerror or e})") from None
    return len(convs)


def atomic_write(path: Path, text: str) -> None:
    """``text`` to ``path`` whole or not at all: a temporary file beside it, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: an export is as readable as any file written
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markdown(store: Store, cid: int) -> str:
    conv = store.get(cid)
    lines = [f"# {conv.title}", ""]
    if conv.system:
        lines += [f"*System:* {conv.system}", ""]
    branches = _branches(store.tree(cid), [m.id for m in store.messages(cid)])
    level = "##" if len(branches) == 1 else "###"
    seen: dict[int, int] = {}  # message id -> the branch that showed it first
    for n, branch in enumerate(branches, 1):
        if len(branches) > 1:
            lines += [f"## Branch {n} of {len(branches)}" + (" (shown in the app)" if n == 1 else ""), ""]
        shared = next((i for i, m in enumerate(branch) if m.id not in seen), len(branch))
        if shared:
            lines += [f"*The first {shared} message(s) as in branch {seen[branch[shared - 1].id]}.*", ""]
        for m in branch[shared:]:
            seen[m.id] = n
            lines += [f"{level} {'You' if m.role == 'user' else 'Assistant'}", "", _closed(m.content), ""]
            if m.stopped:
                lines += ["*(stopped)*", ""]
    return "\n".join(lines)


def _closed(text: str) -> str:
    """``text`` with the code fences it left open closed, so a reply cut mid-code does not swallow
    every later section of the Markdown file."""
    fence = None
    for line in text.splitlines():
        mark = line.lstrip()[:3]
        if mark in ("```", "~~~"):
            if fence is None:
                fence = mark
            elif mark == fence:
                fence = None
    return text if fence is None else text.rstrip("\n") + "\n" + fence


def _branches(tree: list[Message], shown: list[int]) -> list[list[Message]]:
    """Every path from the first message to a message nothing follows; the one shown first."""
    by_id = {m.id: m for m in tree}
    parents = {m.parent for m in tree}
    paths = []
    for leaf in (m for m in tree if m.id not in parents):
        path, at = [], leaf
        while at is not None:
            path.append(at)
            at = by_id.get(at.parent)
        paths.append(path[::-1])
    shown_path = next((p for p in paths if [m.id for m in p] == shown), None)
    return ([shown_path] if shown_path else []) + [p for p in paths if p is not shown_path]


def _content(content: Any) -> str | None:
    """Text content: a string, or OpenAI's list of text parts (joined); valid Unicode only."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        return None
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # JSON lets a lone surrogate ("\ud800") through
        return None
    return content


def _messages(raw: Any, where: str) -> tuple[str | None, list[Message]]:
    """The conversation's messages; with ``id``/``parent`` (our export) a tree, checked: every
    parent is a message before it."""
    if not isinstance(raw, list) or not raw:
        raise ArchiveError(f"{where}: expected a non-empty list of messages")
    system, out, seen = None, [], set()
    tree = any(isinstance(m, dict) and m.get("role") != "system" and m.get("id") is not None for m in raw)
    for i, m in enumerate(raw):
        content = _content(m.get("content")) if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in ROLES or content is None:
            raise ArchiveError(f"{where}: message {i + 1} needs a role ({', '.join(ROLES)}) and text content "
                               "(a string or a list of text parts, valid Unicode)")
        m = m | {"content": content}
        if m["role"] == "system":
            system = m["content"]
            continue
        mid, parent = m.get("id"), m.get("parent")
        if mid is not None and (type(mid) is not int or mid in seen or (parent is not None and parent not in seen)):
            raise ArchiveError(f"{where}: message {i + 1} has a bad id or a parent that does not come before it")
        if (mid is None) == tree or (mid is None and parent is not None):
            raise ArchiveError(f"{where}: message {i + 1}: either every message has an id (a tree) or none does")
        seen.add(mid)
        out.append(Message(m["role"], m["content"], stopped=bool(m.get("stopped", False)), id=mid, parent=parent))
    return system, out


MAX_IMPORT = 256 << 20  # an export of years of chats is a few MB


def _read(path: Path) -> str:
    """The file's text: a regular file (never a FIFO or a device), of a sane size, UTF-8 (a BOM is
    allowed)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArchiveError(f"{path} does not exist") from None
    except OSError as e:
        raise ArchiveError(f"{path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{path} is not a regular file (a directory, a pipe or a device): name an export file")
    if st.st_size > MAX_IMPORT:
        raise ArchiveError(f"{path} is {st.st_size >> 20} MB; an import file is at most {MAX_IMPORT >> 20} MB")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ArchiveError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ArchiveError(f"{path} cannot be read ({e.strerror or e})") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ArchiveError(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise ArchiveError(f"{where}: nested too deeply to be a conversation") from None


def _settings(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """The settings the table accepts; the names of those it refused (they take the defaults)."""
    good, bad = {}, []
    for k, v in (raw.items() if isinstance(raw, dict) else ()):
        try:
            if k not in CHAT_KEYS:
                raise SettingsError(k)
            good[k] = TABLE[k].check(v)
        except SettingsError:
            bad.append(str(k))
    return good, bad


def _digest(title: str, system: str | None, msgs: list[Message]) -> str:
    """The id of a conversation that came without one (an OpenAI message list): its content."""
    data = json.dumps([title, system, [(m.role, m.content, m.id, m.parent) for m in msgs]], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()[:32]


def _parse(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every conversation of the file, checked, and notes on what was left out."""
    text = _read(path)
    notes: list[str] = []
    try:  # a whole-file JSON list: one conversation in the OpenAI message format
        whole = json.loads(text)
    except ValueError:
        whole = None
    except RecursionError:
        raise ArchiveError(f"{path}: nested too deeply to be a conversation") from None
    if isinstance(whole, list):
        system, msgs = _messages(whole, str(path))
        return [{"title": next((m.content for m in msgs if m.role == "user"), "imported")[:40],
                 "system": system, "settings": {}, "model": "", "messages": msgs,
                 "uid": _digest("", system, msgs)}], notes
    convs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        d = _json(line, f"{path}:{n}")
        if not isinstance(d, dict):
            raise ArchiveError(f"{path}:{n}: expected a conversation object")
        system, msgs = _messages(d.get("messages"), f"{path}:{n}")
        system = d["system"] if isinstance(d.get("system"), str) and _content(d["system"]) is not None else system
        title = _content(d.get("title"))
        settings, bad = _settings(d.get("settings"))
        if bad:
            notes.append(f"{path}:{n}: settings {', '.join(bad)} were not valid and take the defaults")
        times = {k: float(d[k]) for k in ("created", "updated")
                 if isinstance(d.get(k), (int, float)) and not isinstance(d[k], bool) and 0 < d[k] < 1e11}
        title = title if title and title.strip() else "imported"
        uid = d.get("uid") if isinstance(d.get("uid"), str) and d["uid"].strip() else _digest(title, system, msgs)
        convs.append({"title": title, "system": system,
                      "settings": settings, "model": d.get("model") if isinstance(d.get("model"), str) else "",
                      "messages": msgs, "head": d.get("head"), "uid": uid} | times)
    if not convs:
        raise ArchiveError(f"{path} holds no conversation")
    return convs, notes


def import_file(store: Store, path: Path) -> tuple[int, int, list[str]]:
    """Import every conversation of ``path``, all or nothing (one transaction); those the history
    already holds (by their id) are skipped. Returns (added, skipped, notes)."""
    convs, notes = _parse(Path(path))
    added = store.import_conversations(convs)
    return added, len(convs) - added, notes


def search(store: Store, text: str, limit: int = 200) -> list[Hit]:
    """Messages on any branch that match ``text`` (``Store.search``), newest first, each with the
    line that matches best (the first holding every word, else the first holding one)."""
    return [Hit(cid, title, role, matching_line(content, text), mid)
            for mid, cid, title, role, content in store.search(text, limit)]


def matching_line(content: str, text: str) -> str:
    words = [w.casefold() for w in text.split()]
    lines = content.splitlines() or [content]
    best = next((ln for ln in lines if all(w in ln.casefold() for w in words)), None)
    return (best or next((ln for ln in lines if any(w in ln.casefold() for w in words)), lines[0])).strip()
