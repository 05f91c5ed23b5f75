"""``backends/engine/sampling.py``: the sampler over base ids ++ hyper slots (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from z2z_chat.backends.engine.sampling import Sampler, SamplingSettings


def test_sampler_never_emits_codes_that_do_not_exist():
    V, C = 10, 6
    logits = np.full(V + C, -5.0, dtype=np.float32)
    logits[V + 3:] = 1e9  # adversarial: huge logits on slots that do not exist
    logits[V + 4] = np.inf
    for settings in (SamplingSettings(), SamplingSettings(temperature=1.5, seed=1),
                     SamplingSettings(temperature=1.0, top_k=3, seed=2), SamplingSettings(temperature=1.0, top_p=0.5, seed=3)):
        s = Sampler(settings, V)
        picks = {s.sample(logits, n_allowed=3) for _ in range(200)}
        assert max(picks) < V + 3


def test_sampler_settings_behave():
    V = 8
    x = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 0], dtype=np.float32)
    assert Sampler(SamplingSettings(), V).sample(x, 2) == 7
    topk = {Sampler(SamplingSettings(temperature=1, top_k=2, seed=i), V).sample(x, 2) for i in range(50)}
    assert topk == {6, 7}
    topp = {Sampler(SamplingSettings(temperature=1, top_p=0.5, seed=i), V).sample(x, 2) for i in range(50)}
    assert topp <= {6, 7}
    a = [Sampler(SamplingSettings(temperature=1, seed=7), V).sample(x, 2) for _ in range(5)]
    b = [Sampler(SamplingSettings(temperature=1, seed=7), V).sample(x, 2) for _ in range(5)]
    assert a == b
    repeats = np.zeros(V + 2, dtype=np.int64)
    repeats[7] = 1
    assert Sampler(SamplingSettings(repetition_penalty=100.0), V).sample(x, 2, repeats) == 6
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0)
