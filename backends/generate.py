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

PREFILL_CHUNK = 256  # codes per prefill forward: cancel latency vs per-call overhead


@dataclass
class Stream:
    """Every code of a conversation in order, with positions; ``codes[:fed]`` are in the KV cache."""

    mode: str = "compressed"
    codes: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    n_base: int = 0  # base tokens the codes stand for
    fed: int = 0

    def next_position(self, span: int) -> int:
        """Position the next code would take if it stood for ``span`` base tokens."""
        start = len(self.codes) if self.mode == "compressed" else self.n_base
        return positions([span], self.mode, start)[0]

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


def generate_codes(backend: Any, codec: CodecSession, stream: Stream, logits: np.ndarray, sampler: Sampler, *,
                   max_tokens: int, stop_ids: set[int] | frozenset[int], context_length: int,
                   cancel: threading.Event | None = None, window: int = 64) -> Iterator[Step]:
    """Decode from ``logits`` (the last fed position's) until a stop reason; see the docstring."""
    M = codec.config.max_merge_size
    n_base = 0
    while True:
        code = sampler.sample(logits, codec.num_allowed_hyper(), stream.codes[-window:])
        ids = codec.push(code)
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
        yield Step(code, ids, reason)
        if reason is not None:
            return  # the last code stays pending: it is fed with the next turn
        sync_entries(backend, codec)
        logits = backend.forward([code], [stream.positions[-1]])
        stream.fed = len(stream.codes)
