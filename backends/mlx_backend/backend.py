"""``MLXBackend``: the engine's backend protocol over ``Zip2ZipMLX`` and mlx-lm KV caches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from ..hyper import Entry, Mask
from ..sources import context_length_of
from .model import Zip2ZipMLX, load_converted, position_logits


class MLXBackend:
    def __init__(self, model: Zip2ZipMLX, context_length: int):
        self.model = model
        self.context_length = context_length
        self.cache = make_prompt_cache(model.lm)
        self.hyper = model.new_cache()  # this session's hypertoken vectors

    @classmethod
    def open(cls, path: str | Path):
        model, tok, lm_config = load_converted(path)
        return cls(model, context_length_of(lm_config)), tok

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

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model.lm)
        self.hyper.slots.reset()

    def close(self) -> None:
        self.cache = None
        self.model = None
