"""MLX: ``MLXModel`` (a ``Zip2ZipMLX``, shared) and ``MLXState`` (one conversation's mlx-lm KV cache
and hyper vectors), the decode protocol of ``backends/protocol.py``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import safetensors
import safetensors.numpy
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache

from z2z_chat.backends import kv_tensors
from z2z_chat.backends.errors import BackendError, CheckpointError
from z2z_chat.backends.protocol import Loaded
from z2z_chat.backends.hyper import Entry, Mask, saved_vectors
from z2z_chat.backends.loading.sources import context_length_of
from z2z_chat.backends.mlx_backend.model import Zip2ZipMLX, load_converted, position_logits


def open_model(path: str, base: str | None = None, device: str = "auto", dtype: str = "auto",
               progress=None) -> Loaded:
    """The backend's entry point (``protocol.Loaded``) for a directory ``convert/to_mlx.py`` wrote
    (in its own dtype: ``runtime.mlx_conversion`` checks ``dtype``; MLX picks its device)."""
    try:
        model, tok = MLXModel.open(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{e}. Convert a torch checkpoint with: python convert/to_mlx.py SRC DST") from e
    z = model.z2z
    return Loaded(model, tok, z.config, z.config.codec_config(z.pad_id), base or z.config.base_model_name_or_path,
                  f"{mx.default_device()} {str(z.dtype).removeprefix('mlx.core.')}")


class MLXModel:
    """A loaded MLX conversion; every ``new_state()`` shares its weights."""

    def __init__(self, model: Zip2ZipMLX, context_length: int):
        self.z2z, self.context_length = model, context_length

    @classmethod
    def open(cls, path: str | Path) -> tuple[MLXModel, Any]:
        model, tok, lm_config = load_converted(path)
        return cls(model, context_length_of(lm_config)), tok

    def new_state(self) -> MLXState:
        return MLXState(self.z2z, self.context_length)

    def close(self) -> None:
        pass


class MLXState:
    def __init__(self, model: Zip2ZipMLX, context_length: int):
        self.model = model
        self.context_length = context_length
        self.cache = make_prompt_cache(model.lm)
        self.hyper = model.new_cache()  # this conversation's hypertoken vectors

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        self.model.add_entries(entries, candidate, self.hyper)

    def drop_entries(self, keep: int) -> None:
        self.hyper.slots.drop(keep)

    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        h = self.model.hidden(codes, positions, self.cache, self.hyper)
        out = self.model.logits(h[0, -1], self.hyper)
        mx.eval(out)
        return np.array(out, copy=False)  # (V + C,) float32

    def forward_all(self, codes: Sequence[int], positions: Sequence[int], masks: Sequence[Mask]) -> np.ndarray:
        """Logits (T, V + C) of every position, each masked as inference masks it there."""
        h = self.model.hidden(codes, positions, self.cache, self.hyper)
        return position_logits(self.model, h[0], masks, self.hyper)

    def trim(self, n: int) -> None:
        if n > 0:
            trim_prompt_cache(self.cache, n)

    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache) if self.cache is not None else 0

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model.lm)
        self.hyper.slots.reset()

    def export_kv(self) -> tuple[bytes, int]:
        """The KV cache and the live hyper vectors as safetensors bytes (``backends/kv_tensors.py``);
        bfloat16 is written as float32 (numpy has no bfloat16), which casts back exactly."""
        if any(type(c) is not KVCache for c in self.cache):
            raise BackendError("a rotating or quantized KV cache is not saved")
        h, slots = self.hyper, self.hyper.slots
        t = {name: x[..., :c.offset, :] for (k, v), c in zip(kv_tensors.kv_names(len(self.cache)), self.cache)
             for name, x in ((k, c.keys), (v, c.values)) if c.keys is not None}
        t |= {"hyper_in": h.hyper_in[:slots.n_created], "hyper_out": h.hyper_out[:slots.live]}
        arrays = {k: np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x) for k, x in t.items()}
        arrays |= {"rows": slots.rows[:slots.live].copy(), "created": np.array([slots.n_created], dtype=np.int64)}
        return safetensors.numpy.save(arrays), self.cache[0].offset

    def import_kv(self, data: bytes, n_past: int, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        try:
            t = safetensors.numpy.load(bytes(data))
        except safetensors.SafetensorError as e:
            raise BackendError(f"a saved KV cache is not readable: {e}") from e
        m = self.model
        rows, created = kv_tensors.check(t, len(self.cache), n_past, m.config.model_dim, m.M)
        self.reset()
        for c, (k, v) in zip(self.cache, kv_tensors.kv_names(len(self.cache))):
            c.update_and_fetch(mx.array(t[k]).astype(m.dtype), mx.array(t[v]).astype(m.dtype))
        plan = self.hyper.slots.plan(entries, candidate)
        if plan is None:
            return
        ok = saved_vectors(plan, rows, created)
        slots = np.asarray(plan.slots, dtype=np.int64)
        out, inp = slots[ok], slots[ok & (np.arange(len(slots)) < plan.n_new)]  # a candidate has only its output vector
        if len(out):
            self.hyper.hyper_out[mx.array(out)] = mx.array(t["hyper_out"][out]).astype(m.dtype)
        if len(inp):
            self.hyper.hyper_in[mx.array(inp)] = mx.array(t["hyper_in"][inp]).astype(m.dtype)
        m.write_vectors(plan.only(~ok), self.hyper)  # entries made after the export

    def close(self) -> None:
        self.cache = None
        self.model = None
