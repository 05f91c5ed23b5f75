"""LZW codec for zip2zip hypertokens, bit-compatible with ``zip2zip-compression`` 0.3.4.

Contract (standard library only):

- ``encode(ids, config) -> (codes, Codebook)`` and ``decode(codes, config) -> (ids, Codebook)``
  give exactly what ``LZWCompressor(V, C, M, pad, disabled).encode(ids)[0]`` and ``.decode(codes)[0]``
  give, codebooks included, for every canonical stream and every *model-like* stream (each hyper
  code is an existing entry or the one new id the decoder can accept). The reference decoder's
  re-matching of non-canonical streams is reproduced quirk for quirk.
- Everything else (ids out of range, codes that do not exist, a new id with an empty or full
  buffer) raises ``ValueError`` naming the position and the value; the reference panics or
  silently stores garbage instead.
- ``CodecSession`` is the online form used in chat: one codebook per conversation, shared by the
  input side (``encode`` of a new turn) and the output side (``push`` of one generated code).

Hypertoken ids start at ``V = base_vocab_size`` and are handed out in creation order up to
``V + C - 1``; then the codebook stops growing. Entries are flat tuples of 2..M base ids.
Disabled ids (pad always among them) are never merged.

Internally entries live in an int-keyed trie: ``child[parent_code * V + token] -> code``. The
decoder can create entries whose prefix is not an entry (the reference's fault-tolerant path);
those wait in ``_orphans`` until their prefix appears, so a trie lookup always answers "is
``prefix + (token,)`` in the codebook" exactly as the reference's tuple hash map does.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CodecConfig", "Codebook", "CodecSession", "encode", "decode"]


@dataclass(frozen=True)
class CodecConfig:
    """The reference's ``CompressionConfig``: V, C, M, disabled ids and pad (always disabled)."""

    base_vocab_size: int
    max_codebook_size: int = 2048
    max_merge_size: int = 3
    disabled_ids: frozenset[int] = field(default_factory=frozenset)
    pad_id: int | None = None

    def __post_init__(self) -> None:
        V, C, M = self.base_vocab_size, self.max_codebook_size, self.max_merge_size
        if not isinstance(V, int) or V < 1:
            raise ValueError(f"base_vocab_size must be an int >= 1, got {V!r}")
        if not isinstance(C, int) or C < 0:
            raise ValueError(f"max_codebook_size must be an int >= 0, got {C!r}")
        if not isinstance(M, int) or M < 1:
            raise ValueError(f"max_merge_size must be an int >= 1, got {M!r}")
        disabled = frozenset(int(i) for i in self.disabled_ids)
        if self.pad_id is not None:
            if not 0 <= self.pad_id < V:
                raise ValueError(f"pad_id {self.pad_id} is outside the base vocabulary [0, {V})")
            disabled |= {self.pad_id}
        bad = sorted(i for i in disabled if not 0 <= i < V)
        if bad:
            raise ValueError(f"disabled_ids {bad[:5]} are outside the base vocabulary [0, {V})")
        object.__setattr__(self, "disabled_ids", disabled)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_vocab_size": self.base_vocab_size,
            "max_codebook_size": self.max_codebook_size,
            "max_merge_size": self.max_merge_size,
            "disabled_ids": sorted(self.disabled_ids),
            "pad_id": self.pad_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodecConfig:
        return cls(
            int(d["base_vocab_size"]),
            int(d["max_codebook_size"]),
            int(d["max_merge_size"]),
            frozenset(d.get("disabled_ids", ())),
            d.get("pad_id"),
        )


class Codebook(Mapping[int, tuple[int, ...]]):
    """Read-only view: hypertoken id -> tuple of base ids, ids ``V .. next_code - 1``."""

    __slots__ = ("_V", "_entries")

    def __init__(self, base_vocab_size: int, entries: Sequence[tuple[int, ...]]):
        self._V = base_vocab_size
        self._entries = entries  # entries[i] is the expansion of id V + i; shared, never mutated here

    @property
    def next_code(self) -> int:
        """The id the next entry would get."""
        return self._V + len(self._entries)

    def __getitem__(self, code: int) -> tuple[int, ...]:
        i = code - self._V
        if 0 <= i < len(self._entries):
            return self._entries[i]
        raise KeyError(code)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._V, self.next_code))

    def to_dict(self) -> dict[int, list[int]]:
        """The reference's ``Codebook.to_dict()`` shape: ``{id: [base ids]}`` in id order."""
        return {self._V + i: list(e) for i, e in enumerate(self._entries)}

    def __repr__(self) -> str:
        return f"Codebook({len(self)} entries, next_code={self.next_code})"


def _is_int(x: Any) -> bool:
    """Only integers are ids and codes: not bools, not floats that happen to be whole."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


_PLAIN_INT = {int}


def _check_ints(xs: Sequence[Any], what: str) -> None:
    if set(map(type, xs)) <= _PLAIN_INT:  # plain ints (not bools): one pass in C, the common case
        return
    for pos, x in enumerate(xs):  # numpy ints are integers too; anything else is named
        if not _is_int(x):
            raise ValueError(f"{what} {x!r} at position {pos} is not an integer")


def _check_ids(ids: Sequence[int], V: int) -> None:
    _check_ints(ids, "token id")
    if ids and (min(ids) < 0 or max(ids) >= V):
        pos, val = next((i, t) for i, t in enumerate(ids) if not 0 <= t < V)
        raise ValueError(f"token id {val} at position {pos} is outside the base vocabulary [0, {V})")


def encode(ids: Sequence[int], config: CodecConfig) -> tuple[list[int], Codebook]:
    """LZW-compress base ids with a fresh codebook. Raises ValueError on ids outside [0, V)."""
    ids = list(ids)
    V, M = config.base_vocab_size, config.max_merge_size
    _check_ids(ids, V)
    if M == 1:
        return ids, Codebook(V, [])
    limit = V + config.max_codebook_size
    disabled = config.disabled_ids
    # child[code * V + token] -> code of the extended buffer; stored as ~code when that entry is
    # M tokens long, because the encoder must emit it at once (forced emission at M).
    child: dict[int, int] = {}
    get = child.get
    parent: list[int] = []  # entry V + i == expansion(parent[i]) + (last[i],)
    last: list[int] = []
    add_parent, add_last = parent.append, last.append
    out: list[int] = []
    emit = out.append
    nid = V
    cur = -1  # code of the buffer, -1 when empty
    n = 0  # the buffer's length in base ids: counted as it grows, not looked up per entry
    for t in ids:
        if cur < 0:
            if t in disabled:
                emit(t)
            else:
                cur, n = t, 1
            continue
        key = cur * V + t
        nxt = get(key)
        if nxt is None:  # miss: a disabled token always misses, no entry contains one
            emit(cur)
            if t in disabled:
                emit(t)
                cur = -1
                continue
            if nid < limit:
                child[key] = nid if n + 1 < M else ~nid
                add_parent(cur)
                add_last(t)
                nid += 1
            cur, n = t, 1
        elif nxt < 0:
            emit(~nxt)
            cur = -1
        else:
            cur = nxt
            n += 1
    if cur >= 0:
        emit(cur)
    return out, Codebook(V, _LazyChain(V, parent, last))


class _LazyChain(Sequence[tuple[int, ...]]):
    """Entries stored as (parent code, last token), expanded to tuples on first use."""

    def __init__(self, V: int, parent: list[int], last: list[int]):
        self._V, self._parent, self._last = V, parent, last
        self._tuples: list[tuple[int, ...]] | None = None

    def _expand(self) -> list[tuple[int, ...]]:
        if self._tuples is None:
            V, entries = self._V, []
            for p, t in zip(self._parent, self._last):
                entries.append(((p,) if p < V else entries[p - V]) + (t,))
            self._tuples = entries
        return self._tuples

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, i):  # type: ignore[override]
        return self._expand()[i]


class _DecoderState:
    """The reference's ``CompressionState`` on the decoding side, plus the trie described above."""

    __slots__ = ("V", "M", "limit", "disabled", "entries", "child", "orphans", "index",
                 "buf", "node", "fresh", "journal")

    def __init__(self, config: CodecConfig):
        self.V = config.base_vocab_size
        self.M = config.max_merge_size
        self.limit = self.V + config.max_codebook_size
        self.disabled = config.disabled_ids
        self.entries: list[tuple[int, ...]] = []
        self.child: dict[int, int] = {}
        self.orphans: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.index: dict[tuple[int, ...], int] = {}
        self.buf: tuple[int, ...] = ()  # the previous code's ids, which the next code's first id extends
        self.node = -1  # code of buf when buf is a base id or an entry, else -1
        self.fresh = 0  # entries[fresh:] were created since the last take_new_entries()
        self.journal: list[tuple[int, int, list[tuple[int, int]]]] | None = None  # see CodecSession.mark

    def insert(self, entry: tuple[int, ...]) -> int:
        code = self.V + len(self.entries)
        self.entries.append(entry)
        self.index[entry] = code
        prefix, t = entry[:-1], entry[-1]
        p = prefix[0] if len(prefix) == 1 else self.index.get(prefix, -1)
        if p >= 0:
            self.child[p * self.V + t] = code
        else:
            self.orphans.setdefault(prefix, []).append((t, code))
        adopted = self.orphans.pop(entry, [])
        for t2, c2 in adopted:
            self.child[code * self.V + t2] = c2
        if self.journal is not None:
            self.journal.append((code, p, adopted))
        return code

    def undo(self, record: tuple[int, int, list[tuple[int, int]]]) -> None:
        """Remove the newest entry, exactly as ``insert`` added it."""
        code, p, adopted = record
        entry = self.entries.pop()
        del self.index[entry]
        for t2, _ in adopted:
            del self.child[code * self.V + t2]
        if adopted:
            self.orphans[entry] = adopted
        if p >= 0:
            del self.child[p * self.V + entry[-1]]
        else:
            kids = self.orphans[entry[:-1]]
            kids.remove((entry[-1], code))
            if not kids:
                del self.orphans[entry[:-1]]

    def code_of(self, seq: tuple[int, ...]) -> int:
        return seq[0] if len(seq) == 1 else self.index.get(seq, -1)

    def next_new_ok(self) -> bool:
        """Whether id ``next_code`` would be accepted now (the cScSc case)."""
        buf = self.buf
        if not 0 < len(buf) < self.M or self.V + len(self.entries) >= self.limit:
            return False
        return buf + (buf[0],) not in self.index

    def step(self, c: int, pos: int) -> tuple[int, ...]:
        """Decode one code; returns its base ids. Mirrors ``codec.rs::decode_fn`` per code."""
        V = self.V
        if c in self.disabled:
            self.buf, self.node = (), -1
            return (c,)
        if 0 <= c < V:
            d = (c,)
        elif V <= c < V + len(self.entries):
            d = self.entries[c - V]
        else:
            if c == V + len(self.entries) and self.next_new_ok():
                d = self.buf + (self.buf[0],)
                self.insert(d)
                self.buf, self.node = d, c
                return d
            raise ValueError(self._why_bad(c, pos))
        if V + len(self.entries) >= self.limit:  # full: the reference keeps no buffer
            self.buf, self.node = (), -1
            return d
        buf = self.buf
        if not buf or len(buf) == self.M:
            self.buf, self.node = d, c
            return d
        node, M, child = self.node, self.M, self.child
        for k, t in enumerate(d):
            nxt = child.get(node * V + t) if node >= 0 else self.index.get(buf + (t,))
            buf = buf + (t,)
            if nxt is None:
                self.insert(buf)
                self.buf = d[k:]
                self.node = c if k == 0 else self.code_of(self.buf)
                return d
            if len(buf) == M:
                rest = d[k + 1:]
                self.buf, self.node = rest, (self.code_of(rest) if rest else -1)
                return d
            node = nxt
        self.buf, self.node = buf, node
        return d

    def _why_bad(self, c: int, pos: int) -> str:
        n = self.V + len(self.entries)
        where = f"code {c} at position {pos}"
        if c < 0:
            return f"{where} is negative"
        if c > n or c >= self.limit:
            return f"{where} does not exist (the codebook holds ids {self.V}..{n - 1})"
        if not self.buf:
            return f"{where} is a new hypertoken id but there is no previous code to extend"
        if len(self.buf) == self.M:
            return f"{where} is a new hypertoken id but the previous code is already {self.M} tokens long"
        return f"{where} would duplicate an existing codebook entry {self.buf + (self.buf[0],)}"


def decode(codes: Sequence[int], config: CodecConfig) -> tuple[list[int], Codebook]:
    """Expand codes to base ids with a fresh codebook. Raises ValueError on codes that cannot exist."""
    codes = list(codes)
    _check_ints(codes, "code")
    st = _DecoderState(config)
    V, M, limit, disabled = st.V, st.M, st.limit, st.disabled
    entries, child, orphans = st.entries, st.child, st.orphans
    out: list[int] = []
    append, extend, new_entry = out.append, out.extend, entries.append
    # The buffer (the previous code's ids) is tracked by its code ``node`` and length ``blen``:
    # its tuple is only built when an entry is made of it. ``node`` is -1 only when the buffer is
    # empty or, after the slow path, not a code (``sbuf`` holds it then).
    node, blen, sbuf, nid, indexed, pos = -1, 0, (), V, 0, -1
    # Fast path: the canonical cases of ``_DecoderState.step`` inlined (an existing code; a new
    # entry made of the previous code plus this code's first token), written out once for base
    # ids and once for hypertokens: one branch per code is what makes it as fast as the Rust
    # codec. ``st.index`` is only needed by the other cases, so it is brought up to date lazily,
    # just before ``step`` runs.
    for c in codes:
        pos += 1
        if 0 <= c < V:
            if c not in disabled:
                if nid >= limit:  # full: the reference keeps no buffer
                    append(c)
                    node, blen = -1, 0
                    continue
                if not 0 < blen < M:
                    append(c)
                    node, blen = c, 1
                    continue
                key = node * V + c
                if node >= 0 and key not in child and not orphans:
                    new_entry(((node,) if node < V else entries[node - V]) + (c,))
                    child[key] = nid
                    nid += 1
                    append(c)
                    node, blen = c, 1
                    continue
        elif V <= c < nid:
            d = entries[c - V]
            if nid >= limit:
                extend(d)
                node, blen = -1, 0
                continue
            if not 0 < blen < M:
                extend(d)
                node, blen = c, len(d)
                continue
            key = node * V + d[0]
            if node >= 0 and key not in child and not orphans:
                new_entry(((node,) if node < V else entries[node - V]) + d[:1])
                child[key] = nid
                nid += 1
                extend(d)
                node, blen = c, len(d)
                continue
        for i in range(indexed, len(entries)):
            st.index[entries[i]] = V + i
        st.buf = () if not blen else sbuf if node < 0 else (node,) if node < V else entries[node - V]
        st.node = node
        extend(st.step(c, pos))
        node, sbuf, nid = st.node, st.buf, V + len(entries)
        blen = len(sbuf)
        indexed = len(entries)
    return out, Codebook(V, entries)


class CodecSession:
    """One conversation's codebook, shared by prompt encoding and generated codes.

    ``encode(ids)`` appends base ids (a new turn) and returns their codes; ``push(code)`` appends one
    generated code and returns its base ids. Either way the codebook evolves exactly as the
    reference's ``CodebookManager`` evolves when it is fed the same code stream.
    """

    def __init__(self, config: CodecConfig):
        self.config = config
        self._s = _DecoderState(config)
        self.num_codes = 0  # codes seen so far (prompt and generated)

    @property
    def codebook(self) -> Codebook:
        return Codebook(self._s.V, self._s.entries)

    def __len__(self) -> int:
        return len(self._s.entries)

    def push(self, code: int) -> tuple[int, ...]:
        """Take one generated code; returns its base ids. ValueError if the code cannot exist now."""
        if type(code) is not int and not _is_int(code):  # the ABC check only off the common path
            raise ValueError(f"code {code!r} at position {self.num_codes} is not an integer")
        code = int(code)
        d = self._s.step(code, self.num_codes)
        self.num_codes += 1
        return d

    def num_allowed_hyper(self) -> int:
        """Hyper ids ``V .. V + n - 1`` may be emitted next; all others must be masked."""
        return len(self._s.entries) + (1 if self._s.next_new_ok() else 0)

    def candidate(self) -> tuple[int, tuple[int, ...]] | None:
        """The new id the decoder would accept next (LZW's cScSc case) and the entry it would make."""
        s = self._s
        return (s.V + len(s.entries), s.buf + s.buf[:1]) if s.next_new_ok() else None

    def expand(self, code: int) -> tuple[int, ...]:
        """Base ids of an existing code (base, disabled or created hypertoken)."""
        return (code,) if code < self._s.V else self._s.entries[code - self._s.V]

    @property
    def fresh(self) -> int:
        """Entries ``[fresh:]`` were created since the last ``take_new_entries()``: the model has not
        been handed them yet."""
        return self._s.fresh

    @fresh.setter
    def fresh(self, n: int) -> None:
        self._s.fresh = min(max(int(n), 0), len(self._s.entries))

    def take_new_entries(self) -> list[tuple[int, tuple[int, ...]]]:
        """Entries created since the last call, as ``(id, base ids)``, in id order."""
        s = self._s
        new = [(s.V + i, s.entries[i]) for i in range(s.fresh, len(s.entries))]
        s.fresh = len(s.entries)
        return new

    def match(self, ids: Sequence[int], i: int = 0) -> tuple[int, int]:
        """The code the LZW encoder takes at ``ids[i]`` given this stream, and how many ids it covers
        (nothing is pushed). ``ids`` must be valid base ids."""
        s = self._s
        V, M, child = s.V, s.M, s.child
        code, length = ids[i], 1
        if code in s.disabled:
            return code, 1
        while length < M and i + length < len(ids):
            nxt = child.get(code * V + ids[i + length])
            if nxt is None:
                break
            code, length = nxt, length + 1
        if s.next_new_ok():
            cand = s.buf + s.buf[:1]
            if len(cand) > length and tuple(ids[i:i + len(cand)]) == cand:
                code, length = V + len(s.entries), len(cand)
        return code, length

    def encode(self, ids: Sequence[int]) -> list[int]:
        """Compress base ids as the continuation of this stream; each code goes through ``push``.

        At each position the longest match is walked in the trie of the codebook as the decoder
        holds it, and the valid new id (LZW's one-entry lag, the cScSc case) is taken when the
        text continues with its entry: that is exactly the LZW encoder's choice, so a fresh
        session gives ``encode(ids)``'s codes, and a turn that starts while a generated code is
        still a merge prefix stays in step with the decoder instead of diverging from it.
        """
        ids = list(ids)
        _check_ids(ids, self._s.V)
        codes: list[int] = []
        i = 0
        while i < len(ids):
            code, length = self.match(ids, i)
            self.push(code)
            codes.append(code)
            i += length
        return codes

    def mark(self) -> tuple[Any, ...]:
        """A point to ``rollback`` to (speculative decoding pushes drafted codes, then takes back
        the rejected ones). Cheap: entries created after the mark are journaled, not copied."""
        s = self._s
        if s.journal is None:
            s.journal = []
        return (len(s.journal), s.buf, s.node, self.num_codes)

    def rollback(self, mark: tuple[Any, ...]) -> None:
        """Return to ``mark``: every code pushed since is forgotten with the entries it created."""
        s = self._s
        n, buf, node, num_codes = mark
        while len(s.journal) > n:
            s.undo(s.journal.pop())
        s.buf, s.node, self.num_codes = buf, node, num_codes
        s.fresh = min(s.fresh, len(s.entries))

    def release(self) -> None:
        """Stop journaling (the marks handed out so far become invalid)."""
        self._s.journal = None

    def to_dict(self) -> dict[str, Any]:
        """Full state as plain JSON data."""
        s = self._s
        return {
            "config": self.config.to_dict(),
            "entries": [list(e) for e in s.entries],
            "buffer": list(s.buf),
            "fresh": s.fresh,
            "num_codes": self.num_codes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodecSession:
        """Restore a ``to_dict()`` snapshot; anything malformed is a ``ValueError`` saying what."""
        if not isinstance(d, Mapping):
            raise ValueError(f"codec snapshot must be a mapping, got {type(d).__name__}")
        missing = [k for k in ("config", "entries", "buffer", "fresh", "num_codes") if k not in d]
        if missing:
            raise ValueError(f"codec snapshot lacks {missing}")
        if not isinstance(d["config"], Mapping):
            raise ValueError("codec snapshot config must be a mapping")
        try:
            config = CodecConfig.from_dict(d["config"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"codec snapshot has a malformed config ({e!r})") from None
        session = cls(config)
        session._restore(d)
        return session

    def _restore(self, d: Mapping[str, Any]) -> None:
        s = _DecoderState(self.config)
        for e in _int_lists(d["entries"], "entries"):
            e = tuple(e)
            if not 2 <= len(e) <= s.M or any(not 0 <= t < s.V or t in s.disabled for t in e):
                raise ValueError(f"codec snapshot has an invalid entry {list(e)}")
            if e in s.index or s.V + len(s.entries) >= s.limit:
                raise ValueError(f"codec snapshot has a duplicate or excess entry {list(e)}")
            s.insert(e)
        (buf,) = _int_lists([d["buffer"]], "buffer")
        s.buf = tuple(buf)
        if len(s.buf) > s.M or any(not 0 <= t < s.V or t in s.disabled for t in s.buf):
            raise ValueError(f"codec snapshot buffer {list(s.buf)} is invalid (ids in [0, {s.V}), "
                             f"not disabled, at most M={s.M})")
        s.node = s.code_of(s.buf) if s.buf else -1
        for k, hi in (("fresh", len(s.entries)), ("num_codes", None)):
            v = d[k]
            if not _is_int(v) or v < 0 or (hi is not None and v > hi):
                raise ValueError(f"codec snapshot {k} must be an integer in [0, {hi if hi is not None else 'inf'}], got {v!r}")
        s.fresh = int(d["fresh"])
        self._s = s
        self.num_codes = int(d["num_codes"])


def _int_lists(xs: Any, what: str) -> list[list[int]]:
    if not isinstance(xs, list) or any(not isinstance(x, list) or not all(_is_int(t) for t in x) for x in xs):
        raise ValueError(f"codec snapshot {what} must be lists of integers")
    return [[int(t) for t in x] for x in xs]
