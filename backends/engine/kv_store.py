"""Conversations' KV caches on disk, so that going back to a long chat does not read it again.

``KVStore(root, identity)`` keeps one file per conversation under ``root`` (the user cache's
``kv/`` directory): a JSON header line (format, the runtime's ``identity`` — backend, model files,
window —, the positions held, the digest of the codes they hold, the data's length and CRC-32)
followed by the bytes the backend exported. ``load`` checks every field before the bytes reach
the backend; a file that fails a check is deleted and ``None`` returned: it is a cache, the
conversation is read again instead. The directory keeps to a size budget (``Z2Z_KV_CACHE_MB``,
default 2048): the files used least recently are removed first. Nothing here is needed for
correctness; every failure falls back to a prefill.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SavedKV:
    """A conversation's KV cache as a backend exported it: ``fed`` positions holding the codes
    whose ``codes_digest`` is ``digest``."""

    data: bytes
    fed: int
    digest: str


def codes_digest(codes: Sequence[int]) -> str:
    return hashlib.sha256(array("q", codes).tobytes()).hexdigest()


FORMAT = 2
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

    def save(self, conversation: str, snap: SavedKV) -> None:
        """Write atomically, then trim the directory to the budget. OSError (a full disk) is the
        caller's to report or ignore: nothing depends on the file."""
        if len(snap.data) > self.budget:
            return
        header = {"format": FORMAT, "identity": self.identity, "fed": snap.fed, "digest": snap.digest,
                  "size": len(snap.data), "crc32": zlib.crc32(snap.data)}  # damage, not tampering: CRC-32 is 5x cheaper
        self.root.mkdir(parents=True, exist_ok=True)
        out = self.path(conversation)
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(snap.data)
        tmp.replace(out)
        self._trim(keep=out)

    def load(self, conversation: str) -> SavedKV | None:
        path = self.path(conversation)
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
                data = f.read()
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.drop(conversation)
            return None
        ok = (isinstance(header, dict) and header.get("format") == FORMAT and header.get("identity") == self.identity
              and header.get("size") == len(data) and header.get("crc32") == zlib.crc32(data)
              and isinstance(header.get("fed"), int) and isinstance(header.get("digest"), str))
        if not ok:  # another model, a damaged or truncated file: read the conversation instead
            self.drop(conversation)
            return None
        os.utime(path)  # used: the budget removes the least recently used first
        return SavedKV(data, header["fed"], header["digest"])

    def drop(self, conversation: str) -> None:
        self.path(conversation).unlink(missing_ok=True)

    def _trim(self, keep: Path) -> None:
        files = sorted((p for p in self.root.glob("*.kv") if p != keep), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files) + keep.stat().st_size
        for p in files:
            if total <= self.budget:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
