"""llama.cpp: ``LlamaCppModel`` (one context, tables and encoders, shared) and ``LlamaCppState``
(one conversation), the decode protocol of ``backends/protocol.py``.

Conversations share the model's one llama.cpp context: the state that runs has its KV cache in
the context; the others are parked as bytes (``llama_state_seq_get_data``, as long as their own
cache, not the window). Switching costs a copy of the two caches, and only when the conversation
changes; a context per conversation would allocate the whole window's KV for each, and one
context with several sequences would split the window between them.

Steps of base ids go to llama.cpp as token ids; a step with a hyper id goes as embeddings: base
ids look up the model's token-embedding matrix (read once from the GGUF and dequantized to
float32 as llama.cpp does), hyper ids the conversation's ``hyper_in``. llama.cpp
returns its own logits for the base vocabulary and the final hidden state ``h`` (after the final
norm); the hyper logits are ``hyper_out[:live] @ h`` in numpy, masked as on every backend
(``backends/hyper.py``). The hyper-encoders run as ggml graphs (``encoders.py``) on the
calling thread: before a step on llama.cpp's own thread count (the same OpenMP team), beside one
on the CPUs its threads leave free.

Input vectors are computed lazily: an entry's ``hyper_in`` is needed only once the entry is fed
as an input code, which most entries never are, while its output vector is needed at once (the
model may emit it next). That halves the encoder work of a decode step, the part of a step that
is not llama.cpp's. Output vectors are needed only after llama.cpp returns the step's hidden
state, so ``add_entries`` leaves them pending and ``forward`` computes them while llama.cpp
decodes where llama.cpp's threads leave a CPU free (``LlamaContext.decode(during=...)``), else
before; reading ``hyper_out`` computes them first. Each conversation keeps the last ``KNOWN``
rows' output vectors by row (``KnownOutputs``): a code's candidate is the same entry each time
the code is written (``x x`` after base token ``x``), and a new entry is often an earlier step's
candidate, so ``add_entries`` writes those at once and leaves only the others pending. (Per
conversation, not per model: a reply's cost should not depend on what other conversations wrote,
and benchmarks time one reply from cold.)

Positions must be contiguous (llama.cpp's rule), so only ``compressed`` checkpoints run here.

``PlainLlamaCppModel`` is the same model fed token ids (no zip2zip): what a user running plain
llama.cpp on the same GGUF gets, for side-by-side benchmarks.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from z2z_chat.backends.errors import BackendError
from z2z_chat.backends.hyper import Entry, HyperSlots, Mask, assemble, candidate_rows, saved_vectors
from z2z_chat.backends.llamacpp_backend.context import LlamaContext
from z2z_chat.backends.llamacpp_backend.encoders import use_threads

KNOWN = 1024  # output vectors kept by row (2.4 MB at the default model's width, 12.6 MB at 3072)

Encoder = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _start(positions: Sequence[int]) -> int:
    pos = list(positions)
    if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
        raise BackendError("llama.cpp runs only contiguous positions (compressed position mode)")
    return pos[0]


class _Shared:
    """The context and which conversation's KV cache it holds now."""

    def __init__(self, ctx: LlamaContext):
        self.ctx = ctx
        self.context_length = ctx.n_ctx
        self.active: _Sequence | None = None

    def activate(self, seq: _Sequence) -> LlamaContext:
        if self.active is not seq:
            if self.active is not None:
                self.active.park(self.ctx.save_seq(), self.ctx.n_past)
                self.active = None  # parked: a failing load below leaves no sequence active
            self.ctx.load_seq(seq.saved, seq.n_past)
            seq.saved = None
            self.active = seq
        return self.ctx

    def close(self) -> None:
        self.active = None
        self.ctx.close()


class _Sequence:
    """One conversation's place in the shared context: in it while active, else parked bytes."""

    def __init__(self, shared: _Shared):
        self.shared = shared
        self.context_length = shared.context_length
        self.saved: bytes | None = None
        self.n_past = 0

    @property
    def ctx(self) -> LlamaContext:
        return self.shared.activate(self)

    def park(self, saved: bytes, n_past: int) -> None:
        self.saved, self.n_past = saved, n_past

    def trim(self, n: int) -> None:
        self.ctx.trim(n)

    def _kv_out(self) -> tuple[bytes, int]:
        if self.shared.active is self:
            return self.shared.ctx.save_seq(), self.shared.ctx.n_past
        return self.saved or b"", self.n_past

    def _kv_in(self, data: bytes | memoryview, n_past: int) -> None:
        """Loaded now (by activating), so bytes llama.cpp refuses raise ``BackendError`` here."""
        self._clear_kv()
        self.park(data, n_past)
        try:
            self.ctx  # noqa: B018 - activating loads the bytes into the context
        except BackendError:
            self.saved, self.n_past = None, 0
            raise

    def kv_bytes(self) -> int:
        if self.shared.active is self:
            return self.shared.ctx.seq_bytes()
        return len(self.saved or b"")

    def _clear_kv(self) -> None:
        if self.shared.active is self:
            self.shared.ctx.clear()
        self.saved, self.n_past = None, 0

    def close(self) -> None:
        self._clear_kv()
        if self.shared.active is self:
            self.shared.active = None


class KnownOutputs:
    """The output vectors of the last ``KNOWN`` rows encoded, by row (an LRU)."""

    def __init__(self) -> None:
        self._v: OrderedDict[bytes, np.ndarray] = OrderedDict()  # row -> (D,), newest last

    def fill(self, out: np.ndarray, slots: Sequence[int], rows: np.ndarray) -> list[int]:
        """Write the known rows' vectors to ``out[slots]``; the indices of the other rows."""
        todo = []
        for i, r in enumerate(rows):
            key = r.tobytes()
            v = self._v.get(key)
            if v is None:
                todo.append(i)
            else:
                out[slots[i]] = v
                self._v.move_to_end(key)
        return todo

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        for r, v in zip(rows, vectors):
            self._v[r.tobytes()] = v.copy()  # not a view: it would keep the whole call's array
        while len(self._v) > KNOWN:
            self._v.popitem(last=False)


class LlamaCppModel(_Shared):
    """The loaded checkpoint: context, embedding and head tables, encoders; shared by every state."""

    def __init__(self, ctx: LlamaContext, embed: np.ndarray, head: np.ndarray | None, input_encoder: Encoder,
                 output_encoder: Encoder, V: int, C: int, M: int, pad_id: int):
        super().__init__(ctx)
        self.embed_table = embed  # (rows, D)
        self.head_table = embed if head is None else head  # (rows, D); tied embeddings share
        self.input_encoder, self.output_encoder = input_encoder, output_encoder
        self.V, self.C, self.M, self.pad_id = V, C, M, pad_id

    def new_state(self) -> LlamaCppState:
        return LlamaCppState(self)


class LlamaCppState(_Sequence):
    def __init__(self, model: LlamaCppModel):
        super().__init__(model)
        self.m = model
        self.V, self.C = model.V, model.C
        D = model.embed_table.shape[1]
        self.slots = HyperSlots(model.V, model.C, model.M, model.pad_id)
        self.hyper_in = np.zeros((model.C, D), dtype=np.float32)
        self._out = np.zeros((model.C, D), dtype=np.float32)  # (C, D) output vectors; read ``hyper_out``
        self.pending_in: dict[int, list[int]] = {}  # slot -> padded row whose input vector is not computed yet
        self.pending_out: tuple[list[int], np.ndarray] | None = None  # slots, (N, M) rows: output vectors to compute
        self.known_out = KnownOutputs()

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        plan = self.slots.plan(entries, candidate)
        if plan is None:
            return
        self._flush_out()  # a later plan may reuse the candidate's slot
        # one output-encoder call for the new entries and the candidate (a decode step has both),
        # less the rows whose vectors are known
        rows = np.asarray(plan.rows, dtype=np.int64)  # (N, M)
        todo = self.known_out.fill(self._out, plan.slots, rows)
        if todo:
            self.pending_out = ([plan.slots[i] for i in todo], rows[todo])
        for slot, row in zip(plan.slots[:plan.n_new], plan.rows):
            self.pending_in[slot] = row

    def _encode(self, encoder: Encoder, rows: np.ndarray, table, threads: int = 0) -> np.ndarray:
        """``encoder(rows, table)`` (N, D) on ``threads`` ggml threads (``encoders.use_threads``); 0:
        llama.cpp's own count, as when llama.cpp is not running (its OpenMP team, not a second one)."""
        with use_threads(threads or self.m.ctx.n_threads):
            return encoder(rows, table)

    def _flush_out(self, threads: int = 0) -> None:
        """Compute the pending output vectors (``_encode``'s ``threads``)."""
        if self.pending_out is not None:
            slots, rows = self.pending_out
            self._out[slots] = vectors = self._encode(self.m.output_encoder, rows, self.m.head_table, threads)
            self.known_out.add(rows, vectors)
            self.pending_out = None

    @property
    def hyper_out(self) -> np.ndarray:
        """(C, D) output vectors of the slots, the pending ones computed first."""
        self._flush_out()
        return self._out

    def _decode(self, codes: Sequence[int], positions: Sequence[int], every_row: bool = False):
        """llama.cpp's (logits, hidden) of the codes; the pending output vectors are computed
        meanwhile where llama.cpp leaves a CPU free, else first."""
        ctx = self.ctx
        self.slots.check_codes(codes)
        base_only = len(codes) > 0 and max(codes) < self.V  # most decode steps: llama.cpp looks up the same table rows
        rows = None if base_only else self._rows(codes)
        if not ctx.spare_cpu:
            self._flush_out()
        during = partial(self._flush_out, max(1, ctx.cpus - ctx.n_threads)) if self.pending_out is not None else None
        if base_only:
            return ctx.decode_ids(np.asarray(codes), _start(positions), every_row=every_row, during=during)
        return ctx.decode(rows, _start(positions), every_row=every_row, during=during)

    def export_kv(self) -> tuple[bytes, int]:
        """The KV cache and the hyper output vectors of the live slots with the entries they encode
        (re-encoding a full codebook costs more than reading it), as one blob."""
        (kv, n_past), live = self._kv_out(), self.slots.live
        head = struct.pack("<QQ", len(kv), live)
        return head + kv + self.slots.rows[:live].tobytes() + self.hyper_out[:live].tobytes(), n_past

    def import_kv(self, data: bytes, n_past: int, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        n_kv, live = struct.unpack_from("<QQ", data)
        M, D = self.slots.M, self._out.shape[1]
        if len(data) != 16 + n_kv + live * (M * 8 + D * 4):
            raise BackendError("a saved KV cache has the wrong size for this model")
        at = 16 + n_kv
        rows = np.frombuffer(data, dtype=np.int64, count=live * M, offset=at).reshape(live, M)
        vectors = np.frombuffer(data, dtype=np.float32, count=live * D, offset=at + rows.nbytes).reshape(live, D)
        try:
            self._kv_in(memoryview(data)[16:at], n_past)  # a view: the cache can be large, no copy
        except BackendError:
            self.reset()
            raise
        self.pending_out = None  # every live slot is set below
        plan = self.slots.plan(entries, candidate)
        if plan is None:
            return
        same = saved_vectors(plan, rows, live)  # input vectors are lazy: the output side is all that is saved
        slots = np.asarray(plan.slots)
        self._out[slots[same]] = vectors[slots[same]]
        rest = plan.only(~same)  # entries made after the export's last step (the pending code's)
        if rest.slots:
            self.pending_out = (rest.slots, np.asarray(rest.rows, dtype=np.int64))
            self._flush_out()
        for slot, row in zip(plan.slots[:plan.n_new], plan.rows):
            self.pending_in[slot] = row  # input vectors stay lazy, as after add_entries

    def _input_vectors(self, slots: list[int]) -> None:
        todo = sorted({s for s in slots if s in self.pending_in})
        if todo:
            rows = np.asarray([self.pending_in.pop(s) for s in todo], dtype=np.int64)  # (N, M)
            self.hyper_in[todo] = self._encode(self.m.input_encoder, rows, self.m.embed_table)  # before the decode

    def drop_entries(self, keep: int) -> None:
        self._flush_out()
        self.slots.drop(keep)
        self.pending_in = {s: r for s, r in self.pending_in.items() if s < keep}

    def _rows(self, codes: Sequence[int]) -> np.ndarray:
        """(T, D) input embeddings of (checked) codes."""
        c = np.asarray(codes, dtype=np.int64)
        is_hyper = c >= self.V
        rows = self.m.embed_table[np.minimum(c, self.V - 1)]  # (T, D)
        if is_hyper.any():
            slots = c[is_hyper] - self.V
            self._input_vectors(slots.tolist())
            rows[is_hyper] = self.hyper_in[slots]
        return rows

    def forward_all(self, codes: Sequence[int], positions: Sequence[int], masks: Sequence[Mask]) -> np.ndarray:
        """Logits (T, V + C) of every position, each masked as inference masks it there."""
        base, H = self._decode(codes, positions, every_row=True)  # (T, n_vocab), (T, D)
        n_max = max(n for n, _ in masks)
        ts, rows = candidate_rows(masks, self.slots.M, self.slots.pad_id)
        cand = np.zeros(0, dtype=np.float32)
        if ts:
            vectors = self._encode(self.m.output_encoder, np.asarray(rows, dtype=np.int64), self.m.head_table)
            cand = (H[ts] * vectors).sum(-1)  # (len(ts),)
        return assemble(base[:, : self.V], H @ self.hyper_out[:n_max].T, masks, ts, cand, self.V, self.C)

    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        base, h = self._decode(codes, positions)
        out = np.full(self.V + self.C, -np.inf, dtype=np.float32)  # (V + C,)
        out[: self.V] = base[: self.V]
        s = self.slots
        if s.live:
            out[self.V:self.V + s.live] = self.hyper_out[: s.live] @ h  # (live,)
            if s.candidate is not None and s.candidate > s.n_created:  # slots between are not created yet
                out[self.V + s.n_created:self.V + s.candidate] = -np.inf
        return out

    def reset(self) -> None:
        self._clear_kv()
        self.slots.reset()
        self.pending_in.clear()
        self.pending_out = None


class PlainLlamaCppModel(_Shared):
    """The base GGUF fed token ids, behind the same protocol (C = 0)."""

    def __init__(self, ctx: LlamaContext, V: int):
        super().__init__(ctx)
        self.V = V

    def new_state(self) -> PlainLlamaCppState:
        return PlainLlamaCppState(self)


class PlainLlamaCppState(_Sequence):
    def __init__(self, model: PlainLlamaCppModel):
        super().__init__(model)
        self.V = model.V

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        if entries:
            raise BackendError("the plain base model has no hypertokens")

    def drop_entries(self, keep: int) -> None:
        pass

    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        base, _ = self.ctx.decode_ids(np.asarray(codes), _start(positions))
        return base[: self.V]

    def forward_all(self, codes: Sequence[int], positions: Sequence[int], masks: Sequence[Mask]) -> np.ndarray:
        base, _ = self.ctx.decode_ids(np.asarray(codes), _start(positions), every_row=True)
        return base[:, : self.V]  # (T, V): no hypertokens, prompt-lookup decoding on our engine

    def reset(self) -> None:
        self._clear_kv()
