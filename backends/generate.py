"""The id-level decode loop: codes in, codes out, nothing about text (framework-free).

A ladder of small pieces, as in gpt-fast and mlx-lm, that the chat engine (``engine.Session``)
and the benchmarks both drive:

- ``Stream``: the code stream of one conversation: codes, their RoPE positions (only through
  ``config.positions``), how many base tokens they stand for, and how many are in the KV cache.
- ``sync_entries(backend, codec)``: hand the codebook entries created since the last call, and
  the current cScSc candidate, to the backend.
- ``prefill(backend, stream, cancel)``: feed every pending code, in chunks so a cancel request
  takes effect between chunks; returns the last position's logits (None if cancelled).
- ``generate_codes(...)``: sample, push into the codec, yield a ``Step``, feed the code back;
  the last step carries the reason it stopped (``stop`` | ``length`` | ``cancelled`` |
  ``context``). ``max_tokens`` counts base tokens (what every other tool means by tokens): the
  loop stops at the code that reaches it.

With ``lookahead=D`` (greedy sampling only) each step also drafts up to D codes from the text that
followed the latest earlier occurrence of the last 8 base tokens (``Drafter``), pushes them into
the codec (marked, so they can be taken back), verifies them in one ``backend.forward_all`` and keeps
the longest prefix the model itself would have produced, plus the model's own next code at the
first mismatch. The KV cache, the codec and the backend's hyper slots of rejected codes are
rolled back. The output is the same codes as without lookahead; only the number of forwards
changes. D adapts: it grows while drafts are accepted and shrinks when they are not.

With a ``guard`` (``utf8_guard.Utf8Guard``), a code whose bytes would break UTF-8 (split a
character) is refused and the sampler picks again without it.

A backend is anything with the engine's ``Backend`` protocol (see ``engine.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codec import CodecSession
from .config import positions
from .sampling import Sampler
from .utf8_guard import Utf8Guard

PREFILL_CHUNK = 256  # codes per prefill forward: cancel latency vs per-call overhead


@dataclass
class Stream:
    """Every code of a conversation in order, with positions; ``codes[:fed]`` are in the KV cache."""

    mode: str = "compressed"
    codes: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    n_base: int = 0  # base tokens the codes stand for
    fed: int = 0

    def next_positions(self, spans: Sequence[int]) -> list[int]:
        """Positions the next codes would take if they stood for ``spans`` base tokens."""
        return positions(spans, self.mode, len(self.codes) if self.mode == "compressed" else self.n_base)

    def next_position(self, span: int) -> int:
        return self.next_positions([span])[0]

    def append(self, code: int, span: int) -> None:
        self.positions.append(self.next_position(span))
        self.codes.append(code)
        self.n_base += span

    def extend(self, codes: Sequence[int], codec: CodecSession) -> None:
        for c in codes:
            self.append(c, len(codec.expand(c)))

    def pending(self) -> tuple[list[int], list[int]]:
        return self.codes[self.fed:], self.positions[self.fed:]


@dataclass
class Step:
    code: int
    ids: tuple[int, ...]  # the base ids it stands for
    reason: str | None = None  # set on the last step only
    drafted: bool = False  # came from an accepted draft (no forward of its own)


class Drafter:
    """Drafts from the conversation's own text: finds the latest earlier occurrence of the last
    ``MIN_MATCH`` base tokens and proposes the base tokens that followed it. The caller turns them
    into codes with the codec's own LZW choice (``CodecSession.match``), which is how the model
    writes copied text: drafting at the code level misses, because copied text is cut into
    other codes than the first time it appeared (the codebook has grown since)."""

    MIN_MATCH = 8

    def __init__(self) -> None:
        self.ids: list[int] = []  # base ids of the stream, in order
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> index just after its latest occurrence
        self.seen = 0  # codes of the stream already expanded into ``ids``
        self.indexed = 0

    def _index(self, codes: Sequence[int], codec: CodecSession) -> None:
        for c in codes[self.seen:]:
            self.ids.extend(codec.expand(c))
        self.seen = len(codes)
        n, ids = self.MIN_MATCH, self.ids
        for i in range(max(self.indexed, n), len(ids)):  # n-grams followed by at least one id
            self.last[tuple(ids[i - n:i])] = i
        self.indexed = max(self.indexed, len(ids))

    def propose(self, codes: Sequence[int], codec: CodecSession, nxt_ids: Sequence[int], k: int) -> list[int]:
        """Up to k base ids expected after the stream ``codes`` and then ``nxt_ids``."""
        self._index(codes, codec)
        tail = (self.ids[-self.MIN_MATCH:] + list(nxt_ids))[-self.MIN_MATCH:]
        j = self.last.get(tuple(tail)) if len(tail) == self.MIN_MATCH else None
        return self.ids[j:j + k] if j is not None else []


def sync_entries(backend: Any, codec: CodecSession) -> None:
    backend.add_entries(codec.take_new_entries(), codec.candidate())


def prefill(backend: Any, stream: Stream, cancel: threading.Event | None = None,
            chunk: int = PREFILL_CHUNK) -> np.ndarray | None:
    """Feed the pending codes; logits of the last one, or None when cancelled between chunks."""
    codes, pos = stream.pending()
    if not codes:
        raise ValueError("nothing to prefill: the stream has no pending code")
    logits = None
    for i in range(0, len(codes), chunk):
        if i and cancel is not None and cancel.is_set():
            return None
        logits = backend.forward(codes[i:i + chunk], pos[i:i + chunk])
        stream.fed += len(codes[i:i + chunk])
    return logits


MAX_DRAFT = 8


def generate_codes(backend: Any, codec: CodecSession, stream: Stream, logits: np.ndarray, sampler: Sampler, *,
                   max_tokens: int, stop_ids: set[int] | frozenset[int], context_length: int,
                   cancel: threading.Event | None = None, window: int = 64, lookahead: int = 0,
                   guard: Utf8Guard | None = None) -> Iterator[Step]:
    """Decode from ``logits`` (the last fed position's) until a stop reason; see the docstring."""
    M = codec.config.max_merge_size
    n_base = 0
    greedy = getattr(getattr(sampler, "s", None), "temperature", None) == 0  # lookahead verifies argmax picks

    def pick(logits: np.ndarray, n: int, cand: tuple[int, tuple[int, ...]] | None, recent: list[int]) -> int:
        """The sampler's code among the ``n`` entries (+ the candidate), ``recent`` the codes written
        last; with a guard, codes that would split a character are refused and the sampler picks
        again without them."""
        allowed, history = n + (cand is not None), recent[-window:]  # the repetition penalty's window
        code = sampler.sample(logits, allowed, history)
        if guard is None:
            return code
        pending = guard.pending([i for c in recent[-4:] for i in codec.expand(c)])  # <= 4 bytes matter
        x = logits
        while not guard.fits(pending, cand[1] if cand and code == cand[0] else codec.expand(code)):
            x = np.array(logits, dtype=np.float32) if x is logits else x
            x[code] = -np.inf
            code = sampler.sample(x, allowed, history)
        return code

    def accept(code: int, ids: tuple[int, ...], drafted: bool = False) -> Step:
        nonlocal n_base
        stream.append(code, len(ids))
        n_base += len(ids)
        if code in stop_ids:
            reason = "stop"
        elif n_base >= max_tokens:
            reason = "length"
        elif cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif stream.next_position(M) >= context_length:
            reason = "context"
        else:
            reason = None
        return Step(code, ids, reason, drafted)

    if lookahead <= 0 or not greedy:
        while True:
            code = pick(logits, len(codec), codec.candidate(), stream.codes[-window - 4:])
            step = accept(code, codec.push(code))
            yield step
            if step.reason is not None:
                return  # the last code stays pending: it is fed with the next turn
            sync_entries(backend, codec)
            logits = backend.forward([code], [stream.positions[-1]])
            stream.fed = len(stream.codes)

    drafter, D, skip, wait = Drafter(), min(lookahead, 2), 0, 0  # D starts small and grows with acceptance
    code = pick(logits, len(codec), codec.candidate(), stream.codes[-window - 4:])
    try:
        while True:
            mark = codec.mark()
            ids0 = codec.push(code)
            seq, spans, masks = [code], [len(ids0)], [(len(codec), codec.candidate())]
            draft = drafter.propose(stream.codes, codec, ids0, D * M) if wait == 0 else []
            wait = max(wait - 1, 0)
            i = 0
            while i < len(draft) and len(seq) <= D:  # the draft's text, cut into codes as LZW does
                d, n = codec.match(draft, i)
                spans.append(len(codec.push(d)))
                seq.append(d)
                masks.append((len(codec), codec.candidate()))
                i += n
            if len(seq) == 1:  # nothing to verify: a plain step
                step = accept(code, ids0)
                yield step
                if step.reason is not None:
                    return
                sync_entries(backend, codec)
                logits = backend.forward([code], [stream.positions[-1]])
                stream.fed = len(stream.codes)
                code = pick(logits, len(codec), codec.candidate(), stream.codes[-window - 4:])
                continue
            sync_entries(backend, codec)
            rows = backend.forward_all(seq, stream.next_positions(spans), masks)  # (len(seq), V + C)
            recent = stream.codes[-window - 4:]
            kept, nxt = [code], None
            for i in range(1, len(seq) + 1):
                n, cand = masks[i - 1]
                m = pick(rows[i - 1], n, cand, recent + kept)
                if i == len(seq) or m != seq[i]:
                    nxt = m  # the model's own code after the accepted prefix
                    break
                kept.append(seq[i])
            # take back the draft, then replay what is kept: the same pushes create the same entries,
            # which the backend already holds (taken, not sent again); its later slots are dropped
            codec.rollback(mark)
            steps, reason = [], None
            for j, c in enumerate(kept):
                steps.append(accept(c, codec.push(c), drafted=j > 0))
                reason = steps[-1].reason
                if reason is not None:
                    break
            codec.take_new_entries()
            backend.drop_entries(len(codec))
            # the KV cache holds seq; keep what was accepted (minus a last code that stays pending)
            backend.trim(len(seq) - len(steps) + (reason is not None))
            stream.fed = len(stream.codes) - (reason is not None)
            yield from steps
            if reason is not None:
                return
            accepted = len(kept) - 1
            if accepted == len(seq) - 1:
                D = min(D + 2, lookahead, MAX_DRAFT)
            elif accepted == 0:  # a wrong draft costs a wider forward: back off for a while
                skip = min(2 * skip + 1, 16)
                wait, D = skip, max(D // 2, 1)
            else:
                D, skip = max(accepted + 1, 1), 0
            code = nxt
    finally:
        codec.release()
