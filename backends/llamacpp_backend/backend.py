"""``LlamaCppBackend``: the engine's backend protocol over llama.cpp (``context.LlamaContext``).

Every input row is an embedding: base ids look up the model's token-embedding matrix (read once
from the GGUF and dequantized to float32), hyper ids the session's ``hyper_in``. llama.cpp
returns its own logits for the base vocabulary and the final hidden state ``h`` (after the final
norm); the hyper logits are ``hyper_out[:live] @ h`` in numpy, masked as on every backend
(``backends/hyper.py``). The hyper-encoders run in numpy (``encoders.py``).

Positions must be contiguous (llama.cpp's rule), so only ``compressed`` checkpoints run here.

``PlainLlamaCppBackend`` is the same model fed token ids (no zip2zip): what a user running plain
llama.cpp on the same GGUF gets, for side-by-side benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import BackendError
from ..hyper import Entry, HyperSlots
from .context import LlamaContext

Encoder = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _start(positions: Sequence[int]) -> int:
    pos = list(positions)
    if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
        raise BackendError("llama.cpp runs only contiguous positions (compressed position mode)")
    return pos[0]


class LlamaCppBackend:
    def __init__(self, ctx: LlamaContext, embed: np.ndarray, head: np.ndarray | None, input_encoder: Encoder,
                 output_encoder: Encoder, V: int, C: int, M: int, pad_id: int):
        self.ctx = ctx
        self.embed_table = embed  # (rows, D)
        self.head_table = embed if head is None else head  # (rows, D); tied embeddings share
        self.input_encoder, self.output_encoder = input_encoder, output_encoder
        self.V, self.C = V, C
        D = embed.shape[1]
        self.slots = HyperSlots(V, C, M, pad_id)
        self.hyper_in = np.zeros((C, D), dtype=np.float32)
        self.hyper_out = np.zeros((C, D), dtype=np.float32)
        self.context_length = ctx.n_ctx

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        plan = self.slots.plan(entries, candidate)
        if plan is None:
            return
        rows = np.asarray(plan.rows, dtype=np.int64)  # (N, M)
        # one output-encoder call for the new entries and the candidate (a decode step has both)
        self.hyper_out[plan.slots] = self.output_encoder(rows, self.head_table)
        n = plan.n_new
        if n:
            self.hyper_in[plan.slots[:n]] = self.input_encoder(rows[:n], self.embed_table)

    def drop_entries(self, keep: int) -> None:
        self.slots.drop(keep)

    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        self.slots.check_codes(codes)
        c = np.asarray(codes, dtype=np.int64)
        is_hyper = c >= self.V
        rows = self.embed_table[np.minimum(c, self.V - 1)]  # (T, D)
        if is_hyper.any():
            rows[is_hyper] = self.hyper_in[c[is_hyper] - self.V]
        base, h = self.ctx.decode(rows, _start(positions))
        out = np.full(self.V + self.C, -np.inf, dtype=np.float32)  # (V + C,)
        out[: self.V] = base[: self.V]
        live = self.slots.live
        if live:
            out[self.V:self.V + live] = np.where(self.slots.allowed()[:live], self.hyper_out[:live] @ h, -np.inf)
        return out

    def trim(self, n: int) -> None:
        self.ctx.trim(n)

    def reset(self) -> None:
        self.ctx.clear()
        self.slots.reset()

    def close(self) -> None:
        self.ctx.close()


class PlainLlamaCppBackend:
    """The base GGUF fed token ids, behind the same protocol (C = 0)."""

    def __init__(self, ctx: LlamaContext, V: int):
        self.ctx, self.V = ctx, V
        self.context_length = ctx.n_ctx

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        if entries:
            raise BackendError("the plain base model has no hypertokens")

    def drop_entries(self, keep: int) -> None:
        pass

    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        base, _ = self.ctx.decode_ids(np.asarray(codes), _start(positions))
        return base[: self.V]

    def trim(self, n: int) -> None:
        self.ctx.trim(n)

    def reset(self) -> None:
        self.ctx.clear()

    def close(self) -> None:
        self.ctx.close()
