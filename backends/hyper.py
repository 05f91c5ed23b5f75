"""Hypertoken slot bookkeeping shared by every backend (framework-free).

Each backend session keeps two (C, D) arrays in its own framework: ``hyper_in`` (input
embeddings of created entries) and ``hyper_out`` (their output vectors). ``HyperSlots`` says
where new vectors go and which slots are live; the frameworks only do the numerics.

- Slot ``s`` holds hypertoken id ``V + s``. Slots ``0 .. n_created - 1`` are real entries.
- ``candidate``: one further slot whose output vector is live (LZW's cScSc case: the id the
  decoder would accept next), so the model can predict it before it exists.
- ``plan(entries, candidate)`` validates ids and returns the slots to write and the entries'
  base ids right-padded with ``pad_id`` to M, as the reference feeds them to the encoders:
  the first ``n_new`` rows get both vectors, a trailing candidate row only its output vector.
- ``drop(keep)`` forgets slots ``>= keep`` (a rewind, a rejected draft): they are masked again.
- ``allowed()``: (C,) bool of the slots that may be scored; everything else is -inf.
- ``rows``: (C, M) the entry each slot's vectors encode, so a saved state's vectors are taken
  back only for the entries they were computed from (``saved_vectors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from z2z_chat.backends.errors import BackendError

Entry = tuple[int, tuple[int, ...]]


@dataclass
class EncodePlan:
    slots: list[int]  # (N,)
    rows: list[list[int]]  # (N, M) base ids, pad-filled
    n_new: int  # rows[:n_new] are created entries; a further row is the candidate

    def only(self, keep: np.ndarray) -> EncodePlan:
        """The rows where ``keep`` (N,) is true, in order (created entries stay first)."""
        idx = np.flatnonzero(keep)
        return EncodePlan([self.slots[i] for i in idx], [self.rows[i] for i in idx], int((idx < self.n_new).sum()))


class HyperSlots:
    def __init__(self, V: int, C: int, M: int, pad_id: int):
        self.V, self.C, self.M, self.pad_id = V, C, M, pad_id
        self.n_created = 0
        self.candidate: int | None = None
        self.rows = np.full((C, M), -1, dtype=np.int64)  # (C, M)

    def plan(self, entries: Sequence[Entry], candidate: Entry | None = None) -> EncodePlan | None:
        """Validate and record new entries (and the candidate); None when there is nothing to do."""
        self.candidate = None
        items = [*entries, candidate] if candidate is not None else list(entries)
        if not items:
            return None
        slots = [i - self.V for i, _ in items]
        if min(slots) < 0 or max(slots) >= self.C:
            raise BackendError(f"hypertoken ids {[i for i, _ in items]} are outside "
                               f"[{self.V}, {self.V + self.C})")
        for _, e in items:
            if not 1 <= len(e) <= self.M or min(e) < 0 or max(e) >= self.V:
                raise BackendError(f"codebook entry {list(e)} is not 1..{self.M} base ids in [0, {self.V})")
        rows = [list(e) + [self.pad_id] * (self.M - len(e)) for _, e in items]
        self.rows[slots] = rows
        n = len(entries)
        if n:
            self.n_created = max(self.n_created, max(slots[:n]) + 1)
        if candidate is not None:
            self.candidate = slots[-1]
        return EncodePlan(slots, rows, n)

    @property
    def live(self) -> int:
        """Slots ``[0, live)`` need scoring (some may still be masked: see ``allowed``)."""
        return self.n_created if self.candidate is None else max(self.n_created, self.candidate + 1)

    def allowed(self) -> np.ndarray:
        ok = np.arange(self.C) < self.n_created  # (C,)
        if self.candidate is not None:
            ok[self.candidate] = True
        return ok

    def check_codes(self, codes: Sequence[int]) -> None:
        hi = self.V + self.n_created
        for c in codes:
            if not 0 <= c < hi:
                raise BackendError(f"code {c} does not exist (valid: 0..{hi - 1}); add its entry first")

    def drop(self, keep: int) -> None:
        self.n_created = min(self.n_created, max(keep, 0))
        self.candidate = None

    def reset(self) -> None:
        self.n_created, self.candidate = 0, None


def saved_vectors(plan: EncodePlan, saved_rows: np.ndarray, saved_created: int) -> np.ndarray:
    """(N,) bool: the plan's rows whose vectors a saved state holds, i.e. the same entry in the same
    slot (``saved_rows`` (L, M) is the saved ``HyperSlots.rows[:live]``); a created entry needs
    both vectors, so its slot must have been created there too, not only a candidate."""
    slots = np.asarray(plan.slots, dtype=np.int64)  # (N,)
    want = np.asarray(plan.rows, dtype=np.int64)  # (N, M)
    limit = np.where(np.arange(len(slots)) < plan.n_new, saved_created, len(saved_rows))
    ok = slots < limit
    ok[ok] = (saved_rows[slots[ok]] == want[ok]).all(axis=1)
    return ok


# --- verification of drafted codes: logits for every position of a forward ---------------------

Mask = tuple[int, "Entry | None"]  # after code t: entries that exist, and the cScSc candidate


def candidate_rows(masks: Sequence[Mask], M: int, pad_id: int) -> tuple[list[int], list[list[int]]]:
    """Rows (positions) that have a candidate, and its base ids padded to M, for one encoder call."""
    ts, rows = [], []
    for t, (_, cand) in enumerate(masks):
        if cand is not None:
            ts.append(t)
            rows.append(list(cand[1]) + [pad_id] * (M - len(cand[1])))
    return ts, rows


def assemble(base: np.ndarray, scores: np.ndarray, masks: Sequence[Mask], cand_t: list[int],
             cand_scores: np.ndarray, V: int, C: int) -> np.ndarray:
    """(T, V + C) logits from base logits (T, V), scores of the created slots (T, n_max) and each
    candidate's score: row t allows the ``masks[t][0]`` entries that exist after code t and its own
    candidate, as inference would mask it there; everything else is -inf."""
    T = base.shape[0]
    out = np.full((T, V + C), -np.inf, dtype=np.float32)
    out[:, :V] = base
    for t, (n, _) in enumerate(masks):
        out[t, V:V + n] = scores[t, :n]
    for t, s in zip(cand_t, cand_scores):
        out[t, masks[t][1][0]] = s
    return out
