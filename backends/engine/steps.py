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
from typing import TYPE_CHECKING

import numpy as np

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.config import positions
from z2z_chat.backends.protocol import DecodeState
from z2z_chat.backends.engine.sampling import Sampler
from z2z_chat.backends.engine.utf8_guard import Utf8Guard

if TYPE_CHECKING:
    from z2z_chat.backends.engine.grammar import Grammar


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
    window: int = 64  # the repetition penalty's window, in base tokens
    guard: Utf8Guard | None = None
    hyper_margin: float | None = None  # a hypertoken must beat its first subtoken's logit by this
    hyper_batch: int = 1  # see ``feed``
    no_repeat_ngram: int = 0  # refuse a code that repeats a run of this many base tokens of the reply
    grammar: Grammar | None = None  # structured output: codes whose whole expansion it accepts
    n_base: int = 0  # base tokens accepted this turn
    _firsts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,) first ids
    _rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.int64))  # (n, M) ids, pad V
    _reply: list[int] = field(default_factory=list)  # this turn's base ids (the n-gram block's)
    _grams: set[tuple[int, ...]] = field(default_factory=set)

    def recent(self) -> list[int]:
        return self.stream.codes[-self.window - 4:]

    def pick(self, logits: np.ndarray, n: int, cand: tuple[int, tuple[int, ...]] | None, recent: list[int]) -> int:
        """The sampler's code among the ``n`` entries (+ the candidate), ``recent`` the codes written
        last; a code that would split a character (with a guard) or repeat a run of the reply (the
        n-gram block) is refused and the sampler picks again without it."""
        allowed = n + (cand is not None)
        if self.hyper_margin is not None and allowed:
            logits = self._margin(logits, n, cand)
        if self.grammar is not None:
            logits = self._grammar_mask(logits, n, cand)
        repeats = self._repeats(n, cand, recent) if self.sampler.s.repetition_penalty != 1.0 else None
        code = self.sampler.sample(logits, allowed, repeats)
        if self.guard is None and not self.no_repeat_ngram and self.grammar is None:
            return code
        codec, guard, grammar = self.codec, self.guard, self.grammar
        pending = guard.pending([i for c in recent[-4:] for i in codec.expand(c)]) if guard else b""
        x = logits
        while True:
            ids = cand[1] if cand and code == cand[0] else codec.expand(code)
            if ((guard is None or guard.fits(pending, ids)) and not self._repeats_run(ids)
                    and (grammar is None or len(ids) == 1 or grammar.fits(ids))):
                return code
            x = np.array(logits, dtype=np.float32) if x is logits else x
            x[code] = -np.inf
            code = self.sampler.sample(x, allowed, repeats)

    def _grammar_mask(self, logits: np.ndarray, n: int, cand: tuple[int, tuple[int, ...]] | None) -> np.ndarray:
        """Base tokens the grammar refuses, and hypertokens whose first subtoken it refuses, masked
        (the rest of a hypertoken's expansion is checked when it is picked: ``Grammar.fits``)."""
        V = self.sampler.V
        ok = self.grammar.allowed()  # (V,)
        x = np.array(logits, dtype=np.float32)  # (V + C,)
        x[:V][~ok] = -np.inf
        if n:
            x[V:V + n][~ok[self._expansions(n)[:, 0]]] = -np.inf
        if cand is not None and not ok[cand[1][0]]:
            x[V + n] = -np.inf
        return x

    def _expansions(self, n: int) -> np.ndarray:
        """(n, M) base ids of the first ``n`` entries, padded with V; entries only grow within a
        turn, so rows are appended, not recomputed."""
        V, M = self.sampler.V, self.codec.config.max_merge_size
        if self._rows.shape[1] != M:
            self._rows = np.zeros((0, M), dtype=np.int64)
        if len(self._rows) < n:
            new = np.full((n - len(self._rows), M), V, dtype=np.int64)
            for r, j in enumerate(range(len(self._rows), n)):
                ids = self.codec.expand(V + j)
                new[r, :len(ids)] = ids
            self._rows = np.concatenate([self._rows, new])
        return self._rows[:n]

    def _repeats(self, n: int, cand: tuple[int, tuple[int, ...]] | None, recent: list[int]) -> np.ndarray:
        """(V + allowed,) how many of the last ``window`` base tokens each code stands for: a base
        token once, a hypertoken once for each of its tokens among them (whatever a code expands to,
        the penalty is the base model's)."""
        V = self.sampler.V
        ids = [i for c in recent[-self.window:] for i in self.codec.expand(c)][-self.window:]
        seen = np.zeros(V + 1, dtype=np.int64)  # the last slot: the pad, never seen
        seen[ids] = 1
        counts = [seen[:V], seen[self._expansions(n)].sum(axis=1)]
        if cand is not None:
            counts.append(np.array([seen[list(cand[1])].sum()], dtype=np.int64))
        return np.concatenate(counts)

    def _repeats_run(self, ids: tuple[int, ...]) -> bool:
        """Writing ``ids`` would repeat a run of ``no_repeat_ngram`` base tokens of this reply."""
        k = self.no_repeat_ngram
        if not k:
            return False
        tail = self._reply[-(k - 1):] if k > 1 else []
        seq = tail + list(ids)
        return any(tuple(seq[i:i + k]) in self._grams for i in range(len(seq) - k + 1))

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
            return self.sampler.sample(x, 0)
        if self.hyper_batch > 1:  # only what the model was handed (see ``feed``)
            return self.pick(logits, self.codec.fresh, None, self.recent())
        return self.pick(logits, len(self.codec), self.codec.candidate(), self.recent())

    def accept(self, code: int, ids: tuple[int, ...], drafted: bool = False) -> Step:
        self.stream.append(code, len(ids))
        self.n_base += len(ids)
        if self.grammar is not None and code not in self.stop_ids:
            self.grammar.consume(ids)
        if self.no_repeat_ngram:
            k, start = self.no_repeat_ngram, max(len(self._reply) - self.no_repeat_ngram + 1, 0)
            self._reply += ids
            self._grams.update(tuple(self._reply[i:i + k]) for i in range(start, len(self._reply) - k + 1))
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
