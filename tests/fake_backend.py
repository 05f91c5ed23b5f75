"""A framework-free model behind the decode protocol (numpy only), for the generate/engine
invariants: planning, rewind, rollback, lookahead equality, overflow, many states of one model.

Its "network" is a bigram table: the logits after a code depend on the last two codes in the
state's KV cache, so greedy replies fall into loops that lookahead drafts can copy. The KV cache
is the list of (code, position) fed; positions are checked as llama.cpp checks them.
"""

from __future__ import annotations

import numpy as np

from z2z_chat.backends.errors import BackendError
from z2z_chat.backends.hyper import HyperSlots


class FakeModel:
    def __init__(self, V: int, C: int, M: int, pad_id: int, context_length: int = 512, mode: str = "compressed"):
        self.V, self.C, self.M, self.pad_id = V, C, M, pad_id
        self.context_length, self.mode = context_length, mode

    def new_state(self) -> FakeState:
        return FakeState(self)

    def close(self) -> None:
        pass


class FakeState:
    def __init__(self, model: FakeModel):
        self.m = model
        self.context_length = model.context_length
        self.kv: list[tuple[int, int]] = []  # (code, position) of every fed code
        self.slots = HyperSlots(model.V, model.C, model.M, model.pad_id)

    def _logits(self, n_live: int, candidate: int | None) -> np.ndarray:
        key = tuple(c for c, _ in self.kv[-2:])
        x = np.random.default_rng(hash(key) & 0xFFFFFFFF).standard_normal(self.m.V + self.m.C).astype(np.float32)
        allowed = np.arange(self.m.C) < n_live  # (C,) hyper slots that exist
        if candidate is not None:
            allowed[candidate] = True
        x[self.m.V:][~allowed] = -np.inf
        return x  # (V + C,)

    def _feed(self, codes, positions) -> None:
        self.slots.check_codes(codes)
        prev = self.kv[-1][1] if self.kv else -1
        for c, p in zip(codes, positions):
            ok = p == prev + 1 if self.m.mode == "compressed" else p > prev
            if not ok:
                raise BackendError(f"position {p} does not follow {prev}")
            if p >= self.context_length:
                raise BackendError("the context window is full")
            self.kv.append((c, p))
            prev = p

    def add_entries(self, entries, candidate=None) -> None:
        self.slots.plan(entries, candidate)

    def forward(self, codes, positions) -> np.ndarray:
        self._feed(codes, positions)
        return self._logits(self.slots.n_created, self.slots.candidate)

    def forward_all(self, codes, positions, masks) -> np.ndarray:
        rows = []
        for c, p, (n, cand) in zip(codes, positions, masks):
            self._feed([c], [p])
            rows.append(self._logits(n, None if cand is None else cand[0] - self.m.V))
        return np.stack(rows)  # (T, V + C)

    def trim(self, n: int) -> None:
        if n > 0:
            del self.kv[-n:]

    def drop_entries(self, keep: int) -> None:
        self.slots.drop(keep)

    def kv_bytes(self) -> int:
        return 16 * len(self.kv)

    def reset(self) -> None:
        self.kv.clear()
        self.slots.reset()

    def close(self) -> None:
        self.kv = []
