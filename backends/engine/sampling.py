"""Sampling over the joint vocabulary (base ids ++ hyper slots), in numpy, shared by all backends.

``Sampler.sample(logits, n_allowed, repeats)`` first masks every hyper slot past ``n_allowed``
(codes that do not exist can never be emitted, whatever the backend returned), then applies the
repetition penalty by ``repeats`` (how many recent base tokens each code stands for: counted by
``steps.StepRules``, which knows the expansions), temperature, top-k and top-p, and draws with its
own seeded generator. Temperature 0 is greedy (argmax, lowest id on ties).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from z2z_chat.backends.engine.settings import TABLE
from z2z_chat.backends.errors import BackendError


@dataclass
class SamplingSettings:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_window: int = 64  # most recent base tokens the penalty looks at
    no_repeat_ngram: int = 0  # 0: off (``steps.StepRules`` refuses the codes)
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            TABLE[f.name].check(getattr(self, f.name))


class Sampler:
    def __init__(self, settings: SamplingSettings, base_vocab_size: int):
        self.s = settings
        self.V = base_vocab_size
        self.rng = np.random.default_rng(settings.seed)

    @property
    def greedy(self) -> bool:
        """Argmax picks (temperature 0): what lookahead can verify."""
        return self.s.temperature == 0

    def sample(self, logits: np.ndarray, n_allowed: int, repeats: np.ndarray | None = None) -> int:
        """One code from (V + C,) logits; hyper slots >= n_allowed are never chosen. ``repeats``
        (V + n_allowed,): how many recently written base tokens each code stands for; the
        repetition penalty applies once for each (a positive logit divided, a negative multiplied)."""
        x = np.array(logits, dtype=np.float32)  # a copy: the caller's logits stay untouched
        x[self.V + n_allowed:] = -np.inf
        x[np.isnan(x)] = -np.inf
        s = self.s
        if s.repetition_penalty != 1.0 and repeats is not None:
            hit = np.flatnonzero(repeats)
            v, f = x[hit], np.float32(s.repetition_penalty) ** repeats[hit]
            x[hit] = np.where(v > 0, v / f, v * f)
        if not np.isfinite(x).any():
            raise BackendError("every code is masked: the backend returned no finite logit "
                               "(NaN weights in the model or its hyper-encoders?)")
        if s.temperature == 0:
            return int(np.argmax(x))
        x = x / s.temperature
        if s.top_k and s.top_k < np.isfinite(x).sum():
            kth = np.partition(x, -s.top_k)[-s.top_k]
            x[x < kth] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        if s.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, s.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(len(p), p=p))
