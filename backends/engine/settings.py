"""The generation settings, written once: name, type, default, bounds and help of each.

Everything that takes a setting reads this table: the engine's ``GenerationSettings`` and
``SamplingSettings`` check their fields with ``Setting.check``; the command lines make their flags
from it (``app/options.py``), the app's F8 form its fields and hints, the saved defaults their
keys, and the server its request checks. A bound changed here changes all of them.

A value that breaks a bound is a ``SettingsError`` naming the setting and its range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from z2z_chat.backends.errors import SettingsError

Value = int | float | None


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # int or float
    default: Value
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # the lower bound itself is refused
    can_be_off: bool = False  # None ("off") is a value
    help: str = ""
    hint: str = ""  # a few words for the F8 form
    per_chat: bool = True  # kept by each conversation, edited with F8, saved as a default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """``in [1, 1048576]``, ``in (0, 1]``, ``>= 0``: numbers as typed, never in exponent form."""
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(float(x))

        if self.hi is None:
            text = f"{'>' if self.lo_open else '>='} {num(self.lo)}" if self.lo is not None else "(any finite value)"
        else:
            low = "(-inf" if self.lo is None else f"{'(' if self.lo_open else '['}{num(self.lo)}"
            text = f"in {low}, {num(self.hi)}]"
        return text + (" or off" if self.can_be_off else "")

    def check(self, v: Any) -> Value:
        """``v`` when it is a value of this setting, else ``SettingsError`` naming it."""
        if v is None and self.can_be_off:
            return None
        integer = self.kind is int
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if (isinstance(v, bool) or not ok or not math.isfinite(v)
                or (self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo))
                or (self.hi is not None and v > self.hi)):
            kind = "an integer" if integer else "a number"
            raise SettingsError(f"{self.name} must be {kind} {self.range_text()}, got {v!r}")
        return v

    def parse(self, text: str) -> Value:
        """A typed value (the command line, the F8 form): ``off`` where the setting can be off."""
        text = text.strip()
        if self.can_be_off and text.lower() in ("off", "none", ""):
            return None
        try:
            v = int(text) if self.kind is int else float(text)
        except ValueError:
            kind = "an integer" if self.kind is int else "a number"
            raise SettingsError(f"{self.name} must be {kind} {self.range_text()}, got {text!r}") from None
        return self.check(v)


SETTINGS: tuple[Setting, ...] = (
    Setting("max_tokens", int, 512, 1, 1 << 20,
            help="most base tokens per reply; the reply stops at the code that reaches it "
                 "(a hypertoken counts as the tokens it stands for)", hint="base tokens per reply"),
    Setting("temperature", float, 0.0, 0, 2, help="0 = greedy", hint="0 = greedy"),  # OpenAI's range
    Setting("top_p", float, 1.0, 0, 1, lo_open=True, help="nucleus sampling (1 = off)", hint="1 = off"),
    Setting("top_k", int, 0, 0, 1 << 20, help="sample among the k likeliest (0 = off)", hint="0 = off"),
    Setting("repetition_penalty", float, 1.0, 0, None, lo_open=True,
            help="penalize base tokens written in the last repetition_window base tokens, once for each "
                 "such token a code stands for, as llama.cpp and Ollama do (1 = off; their default 1.1)",
            hint="1 = off"),
    Setting("repetition_window", int, 64, 1, 4096,
            help="base tokens the repetition penalty looks back over", hint="base tokens looked back"),
    Setting("no_repeat_ngram", int, 0, 0, 64,
            help="refuse a code that would repeat a run of this many base tokens already in the reply "
                 "(0 = off)", hint="0 = off"),
    Setting("lookahead", int, 0, 0, 8,
            help="verify up to N codes drafted from the conversation's own text per forward (greedy only; "
                 "same output, fewer forwards when the reply copies earlier text; 0 = off)",
            hint="0 = off, greedy only"),
    Setting("seed", int, None, 0, 2**63 - 1, can_be_off=True,
            help="seed of the sampler (off: a new one each reply)", hint="off = random"),
    Setting("hyper_margin", float, None, None, None, can_be_off=True, per_chat=False,
            help="decoding policy: write a hypertoken only when its logit beats its own first subtoken's "
                 "by M (off: the model's own pick)"),
    Setting("hyper_batch", int, 1, 1, 64, per_chat=False,
            help="decoding policy: hand new hypertokens to the model K at a time while it writes (one "
                 "output-encoder call per K entries instead of per step; 1: as trained)"),
)
TABLE: dict[str, Setting] = {s.name: s for s in SETTINGS}
CHAT_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.per_chat)


def defaults() -> dict[str, Value]:
    return {s.name: s.default for s in SETTINGS}


def check_all(values: dict[str, Any]) -> dict[str, Value]:
    """``values`` checked against the table (unknown names are a ``SettingsError`` too)."""
    unknown = sorted(set(values) - set(TABLE))
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(TABLE)}")
    return {k: TABLE[k].check(v) for k, v in values.items()}
