"""What a turn yields and what it is given: the events (``Token``, ``Notice``, ``Progress``,
``Done`` with its ``TurnStats``) and ``GenerationSettings`` (validated at construction: a bad value
is a ``SettingsError``). Plain data, no engine logic."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from z2z_chat.backends.engine.sampling import SamplingSettings
from z2z_chat.backends.engine.settings import TABLE, check_all, defaults


@dataclass
class Token:
    text: str
    code: int | None  # None: text held back until the end of the reply, no code of its own
    span: int


@dataclass
class Notice:
    text: str


@dataclass
class Progress:
    """Prefill of a long input: positions fed of those to feed, seconds since it began."""

    done: int
    total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.done * (self.total - self.done) if self.done else 0.0


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # base tokens prefilled this turn
    prompt_codes: int = 0
    reply_tokens: int = 0
    reply_codes: int = 0
    codebook_size: int = 0
    codebook_capacity: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    drafted_codes: int = 0  # reply codes that came from accepted lookahead drafts
    context_tokens: int = 0  # base tokens of the whole conversation the reply continues (clients' "prompt")
    context_codes: int = 0
    cached_tokens: int = 0  # of those, already in the KV cache when the turn began
    cached_codes: int = 0

    @property
    def codes_per_forward(self) -> float:
        """Reply codes per decode forward: 1.0 without lookahead, more when drafts are accepted."""
        forwards = self.reply_codes - self.drafted_codes
        return self.reply_codes / forwards if forwards > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.reply_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def decode_codes_s(self) -> float:
        return self.reply_codes / self.decode_s if self.decode_s else 0.0

    @property
    def meaningful_speed(self) -> bool:
        """Throughput of a reply of a few codes, or of a few milliseconds, is noise."""
        return self.reply_codes >= 8 and self.decode_s >= 0.05

    def summary(self) -> str:
        speed = (f"decode {self.decode_tok_s:.1f} tok/s ({self.decode_codes_s:.1f} codes/s)"
                 if self.meaningful_speed else "decode -")
        look = f" ({self.codes_per_forward:.2f} codes/forward)" if self.drafted_codes else ""
        return (f"prompt {self.prompt_tokens} tok -> {self.prompt_codes} codes | "
                f"reply {self.reply_tokens} tok -> {self.reply_codes} codes{look} | "
                f"codebook {self.codebook_size}/{self.codebook_capacity} | "
                f"ttft {self.ttft_s * 1000:.0f} ms | prefill {self.prefill_tok_s:.1f} tok/s | {speed}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TurnStats:
        """Read back ``to_dict()`` (derived and unknown keys ignored, bad values zeroed)."""
        out = cls()
        for f in fields(cls):
            v = d.get(f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                setattr(out, f.name, type(getattr(out, f.name))(v))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                               "decode_codes_s": self.decode_codes_s, "codes_per_forward": self.codes_per_forward}


@dataclass
class Done:
    reason: str
    stats: TurnStats


Event = Token | Notice | Progress | Done


@dataclass
class GenerationSettings:
    max_tokens: int = TABLE["max_tokens"].default  # base tokens per reply: generation stops at the code that reaches it
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    lookahead: int = 0  # most drafted codes verified per forward (greedy only; 0: off)
    drop_old_turns: bool = True  # False: a conversation past the window is a ContextFullError (the server)
    hyper_margin: float | None = None  # a hypertoken must beat its first subtoken's logit by this (None: off)
    hyper_batch: int = 1  # new hypertokens reach the model this many at a time while it writes (1: as trained)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "lookahead", "hyper_margin", "hyper_batch"):
            TABLE[name].check(getattr(self, name))

    @classmethod
    def from_values(cls, values: dict[str, Any], **engine: Any) -> GenerationSettings:
        """From the settings table's names (``settings.SETTINGS``; missing ones take its defaults);
        ``engine`` sets the fields that are not user settings (``drop_old_turns``)."""
        v = defaults() | check_all(values)
        sampling = SamplingSettings(temperature=float(v["temperature"]), top_k=v["top_k"], top_p=float(v["top_p"]),
                                    repetition_penalty=float(v["repetition_penalty"]),
                                    repetition_window=v["repetition_window"],
                                    no_repeat_ngram=v["no_repeat_ngram"], seed=v["seed"])
        return cls(v["max_tokens"], sampling, v["lookahead"], hyper_margin=v["hyper_margin"],
                   hyper_batch=v["hyper_batch"], **engine)
