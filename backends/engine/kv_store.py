"""Conversations' KV caches on disk, so that going back to a long chat does not read it again.

``KVStore(root, identity)`` keeps one file per conversation under ``root``: a JSON header line
(format, the runtime's ``identity`` — backend, model files, window —, the positions held, the
digest of the codes they hold, the data's length and CRC-32, and the caller's ``meta``: the
server keeps the conversation's messages and engine state there) followed by the bytes the
backend exported. ``load`` checks every field before the bytes reach the backend. The directory
keeps to a size budget: the files used least recently are removed first.

A cache is an optimisation: every failure of it (a damaged, truncated, foreign or vanished file,
a directory or a device where a file should be, a full disk, another process removing a file
being read) is logged and means "read the conversation again", never an exception. Files are
written through a temporary file of their own (several processes may share the directory) and
renamed into place; a temporary file a crash left behind is removed by the next save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("z2z-chat.kv")


@dataclass(frozen=True)
class SavedKV:
    """A conversation's KV cache as a backend exported it: ``fed`` positions holding the codes
    whose ``codes_digest`` is ``digest``."""

    data: bytes
    fed: int
    digest: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # the caller's, kept beside the bytes


def codes_digest(codes: Sequence[int]) -> str:
    return hashlib.sha256(array("q", codes).tobytes()).hexdigest()


FORMAT = 3
MAX_HEADER = 64 << 20  # a header holds a conversation's codes and messages, never more
DEFAULT_BUDGET_MB = 2048


def budget_bytes() -> int:
    try:
        mb = int(os.environ.get("Z2Z_KV_CACHE_MB", DEFAULT_BUDGET_MB))
    except ValueError:
        mb = DEFAULT_BUDGET_MB
    return max(mb, 0) * 2**20


class KVStore:
    def __init__(self, root: Path, identity: str, budget: int | None = None):
        self.root, self.identity = root, identity
        self.budget = budget_bytes() if budget is None else budget

    def path(self, conversation: str) -> Path:
        return self.root / f"{hashlib.sha256(conversation.encode()).hexdigest()[:24]}.kv"

    def save(self, conversation: str, snap: SavedKV) -> str | None:
        """Write atomically, then trim the directory to the budget. None when saved, else why not
        (logged too): nothing depends on the file."""
        header = json.dumps({"format": FORMAT, "identity": self.identity, "key": conversation, "fed": snap.fed,
                             "digest": snap.digest, "size": len(snap.data), "meta": snap.meta,
                             # damage, not tampering: CRC-32 is far cheaper than a hash
                             "crc32": zlib.crc32(snap.data)}, ensure_ascii=True).encode() + b"\n"
        if len(header) + len(snap.data) > self.budget or len(header) > MAX_HEADER:
            return f"larger than the cache's budget ({self.budget >> 20} MB)"
        out, tmp = self.path(conversation), None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=out.stem + ".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(snap.data)
            os.replace(tmp, out)
            tmp = None
            self._trim(keep=out)
            return None
        except OSError as e:
            log.warning("the KV cache of a conversation was not saved in %s (%s); it will be read again", self.root, e)
            return e.strerror or str(e)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def load(self, conversation: str) -> SavedKV | None:
        """The saved cache, checked; None (with a log line when a file was refused) otherwise."""
        path = self.path(conversation)
        try:
            got = self._read(path, header_only=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("a saved KV cache was refused (%s): %s; the conversation is read again", path.name, e)
            self.drop(conversation)
            return None
        header, data = got
        if header.get("key", conversation) != conversation:
            return None  # a hash collision of two conversations' names: not this one's
        # used: the budget removes the least recently used first (another process may have removed
        # or replaced the file meanwhile: the bytes read are whole all the same)
        with contextlib.suppress(OSError):
            os.utime(path)
        return SavedKV(data, header["fed"], header["digest"], header.get("meta") or {})

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(conversation, meta) of every readable file of this identity, least recently used first."""
        try:
            files = sorted(self.root.glob("*.kv"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for p in files:
            try:
                header, _ = self._read(p, header_only=True)
            except (OSError, ValueError):
                continue
            if isinstance(header.get("key"), str):
                yield header["key"], header.get("meta") or {}

    def _read(self, path: Path, header_only: bool) -> tuple[dict[str, Any], bytes]:
        """Header and data, every field checked; ValueError says what is wrong."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # a directory, a device, a FIFO: never read it
                raise ValueError("not a regular file")
            if st.st_size > self.budget + MAX_HEADER:
                raise ValueError(f"{st.st_size} bytes, more than the cache's budget")
            line = f.readline(MAX_HEADER + 1)
            if not line.endswith(b"\n"):
                raise ValueError("no header line")
            header = json.loads(line)
            if not (isinstance(header, dict) and header.get("format") == FORMAT
                    and header.get("identity") == self.identity):
                raise ValueError("written by another model or version")
            if header_only:
                return header, b""
            data = f.read(st.st_size)
        ok = (header.get("size") == len(data) and header.get("crc32") == zlib.crc32(data)
              and isinstance(header.get("fed"), int) and isinstance(header.get("digest"), str)
              and isinstance(header.get("meta", {}), dict))
        if not ok:
            raise ValueError("damaged or truncated")
        return header, data

    def drop(self, conversation: str) -> None:
        try:
            self.path(conversation).unlink(missing_ok=True)
        except OSError as e:  # a directory at the path: leave it, it is refused at every load
            log.warning("could not remove %s (%s)", self.path(conversation), e)

    def _trim(self, keep: Path) -> None:
        now = time.time()
        for p in self.root.glob("*.tmp"):  # a save that crashed; a live one is younger than a minute
            try:
                if now - p.stat().st_mtime > 60:
                    p.unlink()
            except OSError:
                continue
        sized = []
        for p in self.root.glob("*.kv"):
            try:
                st = p.stat()
            except OSError:
                continue
            if p != keep and stat.S_ISREG(st.st_mode):
                sized.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in sized) + keep.stat().st_size
        for _, size, p in sorted(sized):
            if total <= self.budget:
                break
            total -= size
            p.unlink(missing_ok=True)
