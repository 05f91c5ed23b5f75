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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from z2z_chat.backends.errors import Z2ZError

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


def export_jsonl(store: Store, path: Path) -> int:
    """Write every conversation; returns how many."""
    convs = store.conversations()
    with open(path, "w", encoding="utf-8") as f:
        for c in reversed(convs):  # oldest first, so an import keeps the order
            tree = store.tree(c.id)
            local = {m.id: i for i, m in enumerate(tree, 1)}  # ids within the conversation
            shown = store.messages(c.id)
            msgs = [{"id": local[m.id], "parent": local.get(m.parent), "role": m.role, "content": m.content,
                     "stopped": m.stopped} for m in tree]
            f.write(json.dumps({"title": c.title, "model": c.model, "system": c.system, "settings": c.settings,
                                "head": local[shown[-1].id] if shown else None, "messages": msgs},
                               ensure_ascii=False) + "\n")
    return len(convs)


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
            lines += [f"{level} {'You' if m.role == 'user' else 'Assistant'}", "", m.content, ""]
            if m.stopped:
                lines += ["*(stopped)*", ""]
    return "\n".join(lines)


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


def _messages(raw: Any, where: str) -> tuple[str | None, list[Message]]:
    """The conversation's messages; with ``id``/``parent`` (our export) a tree, checked: every
    parent is a message before it."""
    if not isinstance(raw, list) or not raw:
        raise ArchiveError(f"{where}: expected a non-empty list of messages")
    system, out, seen = None, [], set()
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ArchiveError(f"{where}: message {i + 1} needs a role ({', '.join(ROLES)}) and text content")
        if m["role"] == "system":
            system = m["content"]
            continue
        mid, parent = m.get("id"), m.get("parent")
        if mid is not None and (type(mid) is not int or mid in seen or (parent is not None and parent not in seen)):
            raise ArchiveError(f"{where}: message {i + 1} has a bad id or a parent that does not come before it")
        seen.add(mid)
        out.append(Message(m["role"], m["content"], stopped=bool(m.get("stopped", False)), id=mid, parent=parent))
    return system, out


def _parse(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{path} cannot be read as UTF-8 text ({e})") from None
    try:  # a whole-file JSON list: one conversation in the OpenAI message format
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, list):
        system, msgs = _messages(whole, str(path))
        return [{"title": next((m.content for m in msgs if m.role == "user"), "imported")[:40],
                 "system": system, "settings": {}, "model": "", "messages": msgs}]
    convs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ArchiveError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ArchiveError(f"{path}:{n}: expected a conversation object")
        system, msgs = _messages(d.get("messages"), f"{path}:{n}")
        title = d.get("title") if isinstance(d.get("title"), str) and d["title"].strip() else "imported"
        settings = d.get("settings") if isinstance(d.get("settings"), dict) else {}
        convs.append({"title": title, "system": d.get("system") if isinstance(d.get("system"), str) else system,
                      "settings": settings, "model": d.get("model") if isinstance(d.get("model"), str) else "",
                      "messages": msgs, "head": d.get("head")})
    if not convs:
        raise ArchiveError(f"{path} holds no conversation")
    return convs


def import_file(store: Store, path: Path) -> int:
    """Import every conversation of ``path`` (all or nothing); returns how many."""
    convs = _parse(Path(path))
    for c in convs:
        cid = store.create(c["title"], c["model"], c["system"], c["settings"])
        new: dict[int | None, int | None] = {None: None}
        for m in c["messages"]:
            kept = Message(m.role, m.content, stopped=m.stopped)
            if m.id is None:  # a plain list: each message follows the one before
                store.add_message(cid, kept)
            else:
                new[m.id] = store.add_message(cid, kept, parent=new[m.parent])
        head = c.get("head")
        if isinstance(head, int) and head in new:
            store.set_head(cid, new[head], descend=False)
    return len(convs)


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
