"""The id-level decode loop: codes in, codes out, nothing about text (framework-free).

A ladder of small pieces, as in gpt-fast and mlx-lm, that the chat engine (``engine.Session``)
and the benchmarks both drive:

- ``prefill(state, stream, cancel)``: feed every pending code, in chunks so a cancel request
  takes effect between chunks; returns the last position's logits (None if cancelled);
  ``prefill_chunks`` is the same, one chunk at a time, for callers that show progress.
- ``generate_codes(...)``: sample, push into the codec, yield a ``Step``, feed the code back;
  the last step carries the reason it stopped (``stop`` | ``length`` | ``cancelled`` |
  ``context``). ``max_tokens`` counts base tokens (what every other tool means by tokens): the
  loop stops at the code that reaches it.

With ``lookahead=D`` and a greedy sampler, ``generate_codes`` hands over to
``lookahead.generate_lookahead``: the same codes, fewer forwards. Both loops share what is in
``steps.py`` (the stream, and ``StepRules``: pick a code, accept it, decide whether to stop).

With a ``guard`` (``utf8_guard.Utf8Guard``), a code whose bytes would break UTF-8 (split a
character) is refused and the sampler picks again without it.

``state`` is a conversation's ``protocol.DecodeState``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.engine.events import GenerationSettings
from z2z_chat.backends.engine.grammar import Grammar
from z2z_chat.backends.engine.lookahead import generate_lookahead
from z2z_chat.backends.protocol import DecodeState
from z2z_chat.backends.engine.sampling import Sampler
from z2z_chat.backends.engine.steps import Step, StepRules, Stream, feed
from z2z_chat.backends.engine.utf8_guard import Utf8Guard

PREFILL_CHUNK = 256  # codes per prefill forward: cancel latency vs per-call overhead


def prefill_chunks(state: DecodeState, stream: Stream, cancel: threading.Event | None = None,
                   chunk: int = PREFILL_CHUNK) -> Iterator[tuple[int, int, np.ndarray]]:
    """Feed the pending codes a chunk at a time: yields (codes fed, codes to feed, the last fed
    code's logits) after each chunk; stops early when ``cancel`` is set between chunks."""
    codes, pos = stream.pending()
    if not codes:
        raise ValueError("nothing to prefill: the stream has no pending code")
    for i in range(0, len(codes), chunk):
        if i and cancel is not None and cancel.is_set():
            return
        logits = state.forward(codes[i:i + chunk], pos[i:i + chunk])
        stream.fed += len(codes[i:i + chunk])
        yield min(i + chunk, len(codes)), len(codes), logits


def prefill(state: DecodeState, stream: Stream, cancel: threading.Event | None = None,
            chunk: int = PREFILL_CHUNK) -> np.ndarray | None:
    """Feed the pending codes; logits of the last one, or None when cancelled between chunks."""
    done = total = 0
    logits = None
    for done, total, logits in prefill_chunks(state, stream, cancel, chunk):
        pass
    return logits if done == total else None


def generate_codes(state: DecodeState, codec: CodecSession, stream: Stream, logits: np.ndarray,
                   settings: GenerationSettings, *, stop_ids: set[int] | frozenset[int], context_length: int,
                   cancel: threading.Event | None = None, guard: Utf8Guard | None = None,
                   sampler: Sampler | None = None, grammar: Grammar | None = None) -> Iterator[Step]:
    """Decode from ``logits`` (the last fed position's) until a stop reason; see the docstring.
    ``sampler`` replaces the one ``settings.sampling`` makes (the benchmarks force codes with it);
    ``grammar`` constrains the codes (``grammar.py``)."""
    sampler = sampler or Sampler(settings.sampling, codec.config.base_vocab_size)
    # lookahead verifies argmax picks, over every entry at once; the n-gram block needs the whole
    # reply written before each pick, which a draft's verification does not have
    drafting = (settings.lookahead > 0 and sampler.greedy and not settings.sampling.no_repeat_ngram
                and grammar is None)
    rules = StepRules(codec, stream, sampler, settings.max_tokens, stop_ids, context_length, cancel,
                      settings.sampling.repetition_window, guard, settings.hyper_margin,
                      1 if drafting else settings.hyper_batch, settings.sampling.no_repeat_ngram, grammar)
    if drafting:
        yield from generate_lookahead(state, rules, logits, settings.lookahead)
        return
    while True:
        code = rules.pick_next(logits)
        step = rules.accept(code, codec.push(code))
        yield step
        if step.reason is not None:
            return  # the last code stays pending: it is fed with the next turn
        logits = feed(state, rules, code)
