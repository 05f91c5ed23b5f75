"""What the engine and the decode loops ask of a framework: a shared ``Model`` and its states.

A ``Model`` is loaded once (weights, hyper-encoders) and shared by every conversation; each
conversation gets its own ``DecodeState`` from ``model.new_state()``: its KV cache, its hyper
slots and vectors, its position count. Two states of one model never see each other's cache.

``DecodeState`` is the decode protocol every framework implements once::

    add_entries(entries, candidate)   # new (id, base ids); candidate: the valid new id, if any
    forward(codes, positions) -> np.ndarray   # logits of the last position, (V + C,)
    forward_all(codes, positions, masks) -> np.ndarray   # (T, V + C), row t masked as after code t
    drop_entries(keep)   # forget hyper entries with ids >= V + keep (a rewind, a rejected draft)
    trim(n)   # drop the last n positions from the KV cache
    kv_bytes() -> int   # memory its KV cache holds now (the server's budget, the context meter)
    reset(); close(); context_length: int

A state that can hand its KV cache out as bytes and take it back (every zip2zip state: llama.cpp's
sequence bytes, torch's and MLX's tensors in ``kv_tensors.py``) also implements ``SavesKV``: the
app keeps a conversation's cache on disk, so reopening it skips the prefill. ``import_kv`` stands
for ``add_entries`` on a fresh state: it registers the codebook's entries with the vectors the
export saved of them instead of encoding them again. ``export_kv`` raises ``BackendError`` for a
cache it does not save (a sliding window), and the conversation is then read again.

Each backend package has one entry point, ``open_model(path, base, device, dtype) -> Loaded``: the shared model with its tokenizer, configs, the base it runs on and the device in
words. ``runtime.py`` picks the package and imports it lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from z2z_chat.backends.codec import CodecConfig
from z2z_chat.backends.config import Zip2ZipConfig
from z2z_chat.backends.hyper import Entry, Mask


class DecodeState(Protocol):
    context_length: int

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None: ...
    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray: ...
    def forward_all(self, codes: Sequence[int], positions: Sequence[int], masks: Sequence[Mask]) -> np.ndarray: ...
    def trim(self, n: int) -> None: ...
    def drop_entries(self, keep: int) -> None: ...
    def kv_bytes(self) -> int: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class SavesKV(Protocol):
    def export_kv(self) -> tuple[bytes, int]: ...  # (bytes, positions)
    def import_kv(self, data: bytes, n_past: int, entries: Sequence[Entry],
                  candidate: Entry | None = None) -> None: ...  # BackendError when refused (state then empty)


class Model(Protocol):
    context_length: int

    def new_state(self) -> DecodeState: ...
    def close(self) -> None: ...


@dataclass
class Loaded:
    """What every backend's ``open_model`` returns."""

    model: Model
    tokenizer: Any
    config: Zip2ZipConfig
    codec: CodecConfig
    base: str  # the base model it runs on, as loaded (a resolved path, GGUF file or repo id)
    device: str  # for status lines: "cpu float32", "cpu 2 threads", "gpu float16"
