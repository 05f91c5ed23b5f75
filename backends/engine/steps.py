"""What both decode loops (``generate.generate_codes`` and ``lookahead.generate_lookahead``) share,
framework-free:

- ``Stream``: the code stream of one conversation: codes, their RoPE positions (only through
  ``config.positions``), how many base tokens they stand for, and how many are in the KV cache.
- ``Step``: one accepted code, with the reason the turn stops there, if it does.
- ``sync_entries(state, codec)``: hand the codebook entries created since the last call, and
  the current cScSc candidate, to the decode state.
- ``StepRules``: pick a code (the sampler, the UTF-8 guard, the hyper-margin policy), accept it,
  decide whether the turn stops; ``feed`` runs an accepted code through the model.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.config import positions
from z2z_chat.backends.protocol import DecodeState
from z2z_chat.backends.engine.sampling import Sampler
from z2z_chat.backends.engine.utf8_guard import Utf8Guard


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


def sync_entries(state: DecodeState, codec: CodecSession) -> None:
    state.add_entries(codec.take_new_entries(), codec.candidate())


@dataclass
class StepRules:
    """What both decode loops share: pick the sampler's code, accept a code into the stream and
    say whether the turn stops there."""

    codec: CodecSession
    stream: Stream
    sampler: Sampler
    max_tokens: int
    stop_ids: set[int] | frozenset[int]
    context_length: int
    cancel: threading.Event | None = None
    window: int = 64  # the repetition penalty's window
    guard: Utf8Guard | None = None
    hyper_margin: float | None = None  # a hypertoken must beat its first subtoken's logit by this
    hyper_batch: int = 1  # see ``feed``
    n_base: int = 0  # base tokens accepted this turn
    _firsts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,) first ids

    def recent(self) -> list[int]:
        return self.stream.codes[-self.window - 4:]

    def pick(self, logits: np.ndarray, n: int, cand: tuple[int, tuple[int, ...]] | None, recent: list[int]) -> int:
        """The sampler's code among the ``n`` entries (+ the candidate), ``recent`` the codes written
        last; with a guard, codes that would split a character are refused and the sampler picks
        again without them."""
        allowed, history = n + (cand is not None), recent[-self.window:]
        if self.hyper_margin is not None and allowed:
            logits = self._margin(logits, n, cand)
        code = self.sampler.sample(logits, allowed, history)
        if self.guard is None:
            return code
        codec, guard = self.codec, self.guard
        pending = guard.pending([i for c in recent[-4:] for i in codec.expand(c)])  # <= 4 bytes matter
        x = logits
        while not guard.fits(pending, cand[1] if cand and code == cand[0] else codec.expand(code)):
            x = np.array(logits, dtype=np.float32) if x is logits else x
            x[code] = -np.inf
            code = self.sampler.sample(x, allowed, history)
        return code

    def _margin(self, logits: np.ndarray, n: int, cand: tuple[int, tuple[int, ...]] | None) -> np.ndarray:
        """The decoding policy: a hypertoken whose logit does not beat its own first subtoken's by
        ``hyper_margin`` is masked, so the base token is written instead (and the rest of the
        entry is decided step by step). Entries only grow within a turn: their first ids are
        appended, not recomputed."""
        V = self.sampler.V
        if len(self._firsts) < n:
            new = [self.codec.expand(V + j)[0] for j in range(len(self._firsts), n)]
            self._firsts = np.concatenate([self._firsts, np.asarray(new, dtype=np.int64)])
        x = np.array(logits, dtype=np.float32)  # (V + C,)
        hyper = x[V:V + n]
        hyper[hyper < x[self._firsts[:n]] + self.hyper_margin] = -np.inf
        if cand is not None and x[V + n] < x[cand[1][0]] + self.hyper_margin:
            x[V + n] = -np.inf
        return x

    def _pending(self) -> bytes:
        return self.guard.pending([i for c in self.stream.codes[-4:] for i in self.codec.expand(c)])

    def _mid_character(self) -> bool:
        """The text ends inside a character that base tokens can finish: a reply cut there would
        end in U+FFFD, so the limit waits for the code that finishes it (``pick_next``)."""
        if self.guard is None or self.n_base >= self.max_tokens + 3:
            return False
        pending = self._pending()
        return bool(pending) and bool(self.guard.finishers(pending).any())

    def pick_next(self, logits: np.ndarray) -> int:
        if self.n_base >= self.max_tokens and self.guard is not None:
            # past the limit only to finish a character: the sampler picks among the base ids that do
            ok = self.guard.finishers(self._pending())
            x = np.full(logits.shape, -np.inf, dtype=np.float32)
            x[:len(ok)][ok] = logits[:len(ok)][ok]
            return self.sampler.sample(x, 0, self.recent()[-self.window:])
        if self.hyper_batch > 1:  # only what the model was handed (see ``feed``)
            return self.pick(logits, self.codec.fresh, None, self.recent())
        return self.pick(logits, len(self.codec), self.codec.candidate(), self.recent())

    def accept(self, code: int, ids: tuple[int, ...], drafted: bool = False) -> Step:
        self.stream.append(code, len(ids))
        self.n_base += len(ids)
        if code in self.stop_ids:
            reason = "stop"
        elif self.n_base >= self.max_tokens and not self._mid_character():
            reason = "length"
        elif self.cancel is not None and self.cancel.is_set():
            reason = "cancelled"
        elif self.stream.next_position(self.codec.config.max_merge_size) >= self.context_length:
            reason = "context"
        else:
            reason = None
        return Step(code, ids, reason, drafted)


def feed(state: DecodeState, rules: StepRules, code: int) -> np.ndarray:
    """Hand the new entries to the state and feed the code just accepted; its logits.

    With ``hyper_batch`` k > 1 the entries are handed over k at a time, and the cScSc candidate
    never: one output-encoder call for k entries costs far less than k calls (docs/BENCHMARKS.md
    has the measurements). An entry cannot be written until it is handed over; it can always be
    read (the next prefill hands everything over first)."""
    codec = rules.codec
    if rules.hyper_batch == 1:
        sync_entries(state, codec)
    elif len(codec) - codec.fresh >= rules.hyper_batch or code >= codec.config.base_vocab_size + codec.fresh:
        state.add_entries(codec.take_new_entries())  # a batch, or the code fed needs its entry (forced codes)
    logits = state.forward([code], [rules.stream.positions[-1]])
    rules.stream.fed = len(rules.stream.codes)
    return logits
