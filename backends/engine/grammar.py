"""Structured output over an adaptive vocabulary: a JSON schema constrains decoding, hypertokens
included (llguidance does the grammar; this module adapts it to codes).

``Grammar.json(tokenizer, schema, stop_ids)`` compiles ``schema`` (None: any JSON object) for the
base vocabulary. At each step ``StepRules`` asks:

- ``allowed()``: a (V,) mask of the base tokens the grammar accepts next (llguidance's token mask;
  the stop tokens only once the JSON is complete). A hypertoken is a candidate only when its first
  subtoken is allowed: a vectorised first cut;
- ``fits(ids)``: whether the grammar accepts every base token of a code's expansion in order
  (consumed, then rolled back); a sampled hypertoken that does not fit is refused and the sampler
  picks again without it, as for the UTF-8 guard;
- ``consume(ids)``: the accepted code's base tokens advance the grammar.

So the model keeps writing hypertokens wherever the text they stand for is valid (inside strings,
repeated keys), and the output parses and follows the schema whenever the reply ends by itself
(once the JSON is complete only the stop tokens are allowed). ``GrammarError`` is a schema the
engine cannot compile (the server answers 400).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from z2z_chat.backends.errors import Z2ZError


class GrammarError(Z2ZError, ValueError):
    """A schema or grammar that cannot be used."""


_TOKENIZERS: dict[int, Any] = {}  # id(backend tokenizer) -> LLTokenizer (~1 s to build: once per model)


def _lltokenizer(tok: Any, stop_ids: frozenset[int]) -> Any:
    try:
        import llguidance
    except ModuleNotFoundError as e:
        raise GrammarError('structured output needs llguidance: pip install "z2z-chat[serve]"') from e
    key = id(tok.backend_tokenizer)
    if key not in _TOKENIZERS:
        backend = tok.backend_tokenizer
        _TOKENIZERS[key] = llguidance.LLTokenizer(backend.to_str(), n_vocab=len(tok),
                                                  eos_token=sorted(stop_ids) or None)
    return _TOKENIZERS[key]


class Grammar:
    def __init__(self, matcher: Any, V: int):
        self.m, self.V = matcher, V
        self._words = (V + 31) // 32

    @classmethod
    def json(cls, tok: Any, schema: dict[str, Any] | None, stop_ids: frozenset[int] | set[int]) -> Grammar:
        """A matcher for JSON text: following ``schema``, or any JSON object when it is None."""
        import llguidance

        lltok = _lltokenizer(tok, frozenset(stop_ids))
        spec = schema if schema is not None else {"type": "object"}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(spec), defaults={"whitespace_flexible": False})
            matcher = llguidance.LLMatcher(lltok, grammar)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be used: {matcher.get_error()}")
        return cls(matcher, len(tok))

    def allowed(self) -> np.ndarray:
        """(V,) bool: the base tokens the grammar accepts next."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint32)
        mask = np.unpackbits(bits.view(np.uint8), bitorder="little").astype(bool)
        return mask[:self.V]

    def fits(self, ids: tuple[int, ...] | list[int]) -> bool:
        """Every base token of ``ids`` is accepted in order (the grammar is left as it was)."""
        n = self.m.try_consume_tokens(list(ids))
        if n:
            self.m.rollback(n)
        return n == len(ids)

    def consume(self, ids: tuple[int, ...] | list[int]) -> None:
        if not self.m.consume_tokens(list(ids)):
            raise GrammarError(f"the grammar refused tokens it allowed: {self.m.get_error()}")
