"""A torch or MLX conversation's decode state as bytes, so a chat reopens without being read again.

The blob is safetensors (no pickle: a cache file is never code), with these tensors:

- ``k{i}``, ``v{i}``: layer i's KV cache, (1, H_kv, T, d), T = the positions it holds;
- ``hyper_in`` (N_created, D) and ``hyper_out`` (L, D): the vectors of the live hyper slots
  (re-encoding a full codebook costs more than reading them);
- ``rows`` (L, M) int64: the entry each slot's vectors encode, so they are taken back only for
  the same entries (``hyper.saved_vectors``); ``created`` (1,) int64: N_created.

llama.cpp saves its own sequence bytes instead (``llamacpp_backend/backend.py``). ``check``
validates what was read against the model before anything is touched; a failure is a
``BackendError`` and the engine then reads the conversation again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from z2z_chat.backends.errors import BackendError


def kv_names(n_layers: int) -> list[tuple[str, str]]:
    return [(f"k{i}", f"v{i}") for i in range(n_layers)]


def check(t: Mapping[str, Any], n_layers: int, n_past: int, D: int, M: int) -> tuple[np.ndarray, int]:
    """Shapes of a loaded blob against the model and ``n_past``; returns (rows (L, M), created)."""
    missing = [n for pair in kv_names(n_layers) for n in pair if n not in t]
    missing += [n for n in ("hyper_in", "hyper_out", "rows", "created") if n not in t]
    if missing or len(t) != 2 * n_layers + 4:
        raise BackendError(f"a saved KV cache does not fit this model ({n_layers} layers expected)")
    shape = tuple(t["k0"].shape)
    for k, v in kv_names(n_layers):
        if tuple(t[k].shape) != shape or len(shape) != 4 or shape[0] != 1 or shape[2] != n_past \
                or tuple(t[v].shape)[:3] != shape[:3]:
            raise BackendError(f"a saved KV cache holds {tuple(t[k].shape)} at layer {k[1:]}, "
                               f"not (1, heads, {n_past}, dim)")
    rows, created = np.asarray(t["rows"], dtype=np.int64), int(np.asarray(t["created"]).reshape(-1)[0])
    L = rows.shape[0] if rows.ndim == 2 else -1
    if rows.ndim != 2 or rows.shape[1] != M or not 0 <= created <= L \
            or tuple(t["hyper_out"].shape) != (L, D) or tuple(t["hyper_in"].shape) != (created, D):
        raise BackendError("a saved KV cache has hyper vectors of the wrong shape for this model")
    return rows, created
