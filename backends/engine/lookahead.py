"""Lookahead decoding: draft codes from the conversation's own text, verify them in one forward.

``generate_lookahead(state, rules, logits, lookahead)`` yields the same ``Step``s as the plain loop
in ``generate.py`` with a greedy sampler; only the number of forwards changes. Each step drafts up
to D codes from the text that followed the latest earlier occurrence of the last 8 base tokens
(``Drafter``), pushes them into the codec (marked, so they can be taken back), verifies them in one
``state.forward_all`` and keeps the longest prefix the model itself would have produced, plus the
model's own next code at the first mismatch. The KV cache, the codec and the state's hyper slots
of rejected codes are rolled back. D adapts: it grows while drafts are accepted and shrinks when
they are not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.protocol import DecodeState
from z2z_chat.backends.engine.steps import Step, StepRules, feed, sync_entries

MAX_DRAFT = 8


class Drafter:
    """Drafts from the conversation's own text: finds the latest earlier occurrence of the last
    ``MIN_MATCH`` base tokens and proposes the base tokens that followed it. The caller turns them
    into codes with the codec's own LZW choice (``CodecSession.match``), which is how the model
    writes copied text: drafting at the code level misses, because copied text is cut into
    other codes than the first time it appeared (the codebook has grown since)."""

    MIN_MATCH = 8

    def __init__(self) -> None:
        self.ids: list[int] = []  # base ids of the stream, in order
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> index just after its latest occurrence
        self.seen = 0  # codes of the stream already expanded into ``ids``
        self.indexed = 0

    def _index(self, codes: Sequence[int], codec: CodecSession) -> None:
        for c in codes[self.seen:]:
            self.ids.extend(codec.expand(c))
        self.seen = len(codes)
        n, ids = self.MIN_MATCH, self.ids
        for i in range(max(self.indexed, n), len(ids)):  # n-grams followed by at least one id
            self.last[tuple(ids[i - n:i])] = i
        self.indexed = max(self.indexed, len(ids))

    def propose(self, codes: Sequence[int], codec: CodecSession, nxt_ids: Sequence[int], k: int) -> list[int]:
        """Up to k base ids expected after the stream ``codes`` and then ``nxt_ids``."""
        self._index(codes, codec)
        tail = (self.ids[-self.MIN_MATCH:] + list(nxt_ids))[-self.MIN_MATCH:]
        j = self.last.get(tuple(tail)) if len(tail) == self.MIN_MATCH else None
        return self.ids[j:j + k] if j is not None else []


def generate_lookahead(state: DecodeState, rules: StepRules, logits: np.ndarray, lookahead: int) -> Iterator[Step]:
    """The greedy decode loop with drafts of up to ``lookahead`` codes (see the module docstring)."""
    codec, stream, M = rules.codec, rules.stream, rules.codec.config.max_merge_size
    drafter, D, skip, wait = Drafter(), min(lookahead, 2), 0, 0  # D starts small and grows with acceptance
    code = rules.pick_next(logits)
    try:
        while True:
            mark = codec.mark()
            ids0 = codec.push(code)
            seq, spans, masks = [code], [len(ids0)], [(len(codec), codec.candidate())]
            # past the token limit (finishing a character) every step is a plain one
            draft = drafter.propose(stream.codes, codec, ids0, D * M) if wait == 0 and \
                rules.n_base + len(ids0) < rules.max_tokens else []
            wait = max(wait - 1, 0)
            i = 0
            while i < len(draft) and len(seq) <= D:  # the draft's text, cut into codes as LZW does
                d, n = codec.match(draft, i)
                spans.append(len(codec.push(d)))
                seq.append(d)
                masks.append((len(codec), codec.candidate()))
                i += n
            if len(seq) == 1:  # nothing to verify: a plain step
                step = rules.accept(code, ids0)
                yield step
                if step.reason is not None:
                    return
                code = rules.pick_next(feed(state, rules, code))
                continue
            sync_entries(state, codec)
            rows = state.forward_all(seq, stream.next_positions(spans), masks)  # (len(seq), V + C)
            recent = rules.recent()
            kept, nxt = [code], None
            for i in range(1, len(seq) + 1):
                n, cand = masks[i - 1]
                m = rules.pick(rows[i - 1], n, cand, recent + kept)
                if i == len(seq) or m != seq[i]:
                    nxt = m  # the model's own code after the accepted prefix
                    break
                kept.append(seq[i])
            # take back the draft, then replay what is kept: the same pushes create the same entries,
            # which the state already holds (taken, not sent again); its later slots are dropped
            codec.rollback(mark)
            steps, reason = [], None
            for j, c in enumerate(kept):
                steps.append(rules.accept(c, codec.push(c), drafted=j > 0))
                reason = steps[-1].reason
                if reason is not None:
                    break
            codec.take_new_entries()
            state.drop_entries(len(codec))
            # the KV cache holds seq; keep what was accepted (minus a last code that stays pending)
            state.trim(len(seq) - len(steps) + (reason is not None))
            stream.fed = len(stream.codes) - (reason is not None)
            yield from steps
            if reason is not None:
                return
            if rules.n_base >= rules.max_tokens:  # the next code only finishes a character
                nxt = rules.pick_next(rows[len(kept) - 1])
            accepted = len(kept) - 1
            if accepted == len(seq) - 1:
                D = min(D + 2, lookahead, MAX_DRAFT)
            elif accepted == 0:  # a wrong draft costs a wider forward: back off for a while
                skip = min(2 * skip + 1, 16)
                wait, D = skip, max(D // 2, 1)
            else:
                D, skip = max(accepted + 1, 1), 0
            code = nxt
    finally:
        codec.release()
