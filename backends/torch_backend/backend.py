"""``TorchBackend``: the engine's backend protocol over a ``Zip2ZipLM`` and a transformers KV cache.

Per decode step the work is one decoder step, the encoders on the step's new entry (and the
candidate's output side), and one (C_live, D) matrix-vector product for the hyper logits.
``pick_device("auto")`` prefers CUDA (bf16), then MPS (fp16), then the CPU (fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from .model import Zip2ZipLM


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here")
    if dtype == "auto":
        dt = {"cuda": torch.bfloat16, "mps": torch.float16}.get(dev.type, torch.float32)
    else:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return dev, dt


class TorchBackend:
    def __init__(self, model: Zip2ZipLM):
        self.model = model.eval()
        self.device = model.device
        self.hyper = model.new_cache()  # this session's hypertoken vectors
        cfg = model.lm.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.cache = DynamicCache(config=cfg)

    @torch.inference_mode()
    def add_entries(self, entries: Sequence[tuple[int, tuple[int, ...]]],
                    candidate: tuple[int, tuple[int, ...]] | None = None) -> None:
        self.model.add_entries(entries, candidate, self.hyper)

    @torch.inference_mode()
    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(codes)], device=self.device)
        pos = torch.tensor([list(positions)], device=self.device)
        h = self.model.hidden(ids, pos, self.cache, self.hyper)  # (1, T, D)
        return self.model.logits(h[0, -1], self.hyper).float().cpu().numpy()  # (V + C,)

    def trim(self, n: int) -> None:
        if n > 0:
            self.cache.crop(-n)

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.lm.config)
        self.model.reset_entries(self.hyper)

    def close(self) -> None:
        self.cache = None
        self.model = None


class PlainBackend:
    """The base model without zip2zip, behind the same protocol (no hypertokens, C = 0): the
    baseline that benchmarks and quality comparisons run on the same engine and device."""

    def __init__(self, lm, vocab_size: int):
        self.lm = lm.eval()
        self.V = vocab_size
        self.device = next(lm.parameters()).device
        self.context_length = int(getattr(lm.config, "max_position_embeddings", 2048))
        self.cache = DynamicCache(config=lm.config)

    def add_entries(self, entries, candidate=None) -> None:
        if entries:
            raise ValueError("the plain base model has no hypertokens")

    @torch.inference_mode()
    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(codes)], device=self.device)
        pos = torch.tensor([list(positions)], device=self.device)
        out = self.lm(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1, : self.V].float().cpu().numpy()

    def trim(self, n: int) -> None:
        if n > 0:
            self.cache.crop(-n)

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.lm.config)

    def close(self) -> None:
        self.cache = None
