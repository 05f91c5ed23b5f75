"""MLX: ``MLXModel`` (a ``Zip2ZipMLX``, shared) and ``MLXState`` (one conversation's mlx-lm KV cache
and hyper vectors), the decode protocol of ``backends/protocol.py``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from ..hyper import Entry, Mask
from ..sources import context_length_of
from .model import Zip2ZipMLX, load_converted, position_logits


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

    def close(self) -> None:
        self.cache = None
        self.model = None
