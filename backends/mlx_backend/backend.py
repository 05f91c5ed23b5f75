"""``MLXBackend``: the engine's backend protocol over ``Zip2ZipMLX`` and mlx-lm KV caches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from .model import Zip2ZipMLX, load_converted


class MLXBackend:
    def __init__(self, model: Zip2ZipMLX, context_length: int):
        self.model = model
        self.context_length = context_length
        self.cache = make_prompt_cache(model.lm)

    @classmethod
    def open(cls, path: str | Path):
        model, tok, lm_config = load_converted(path)
        return cls(model, int(lm_config.get("max_position_embeddings", 2048))), tok

    def add_entries(self, entries: Sequence[tuple[int, tuple[int, ...]]],
                    candidate: tuple[int, tuple[int, ...]] | None = None) -> None:
        self.model.add_entries(entries, candidate)

    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        h = self.model.hidden(codes, positions, self.cache)
        out = self.model.logits(h[0, -1])
        mx.eval(out)
        return np.array(out, copy=False)  # (V + C,) float32

    def trim(self, n: int) -> None:
        if n > 0:
            trim_prompt_cache(self.cache, n)

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model.lm)
        self.model.reset_entries()

    def close(self) -> None:
        self.cache = None
        self.model = None
