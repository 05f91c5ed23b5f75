"""A conversation's engine state as data, validated: what the history stores and resumes.

``SessionState.from_dict(d, config)`` checks a saved state (a JSON object) against the model's
codec configuration before anything uses it: every field present and of its type, the codebook
made with this configuration, the codes exactly what that codebook came from (replayed), ``fed``
within the codes; message boundaries (``marks``) that do not fit are forgotten (None), not
refused. A failure is a ``ValueError`` that says what is wrong. ``to_dict`` is the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from z2z_chat.backends.codec import CodecConfig, CodecSession

VERSION = 1
Mark = tuple[int, int] | None  # (codes, fed_text characters) before a message; None: not known


@dataclass
class SessionState:
    system: str | None
    position_mode: str
    messages: list[dict[str, str]]
    codes: list[int]
    fed: int  # codes in the KV cache
    fed_text: str  # the text equivalent of the codes (template markers included)
    codec: CodecSession  # the codebook the codes made
    marks: list[Mark]

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "system": self.system, "position_mode": self.position_mode,
                "messages": [dict(m) for m in self.messages], "codes": list(self.codes), "fed": self.fed,
                "fed_text": self.fed_text, "codec": self.codec.to_dict(), "marks": [list(m) if m else None for m in self.marks]}

    @classmethod
    def from_dict(cls, d: Any, config: CodecConfig) -> SessionState:
        if not isinstance(d, dict):
            raise ValueError("the saved engine state is not a mapping")
        missing = [k for k in ("messages", "codes", "fed", "fed_text", "codec") if k not in d]
        if missing:
            raise ValueError(f"the saved engine state lacks {missing}")
        codec = CodecSession.from_dict(d["codec"])
        if codec.config != config:
            raise ValueError("the saved conversation was made with a different codec configuration (another model?)")
        msgs = d["messages"]
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError("the saved engine state has malformed messages")
        if not isinstance(d["fed_text"], str) or type(d["fed"]) is not int or not isinstance(d["codes"], list):
            raise ValueError("the saved engine state has malformed fields")
        replay = CodecSession(config)  # the codes must be exactly what this codebook came from
        for c in d["codes"]:
            replay.push(c)  # ValueError on ids that cannot exist
        if replay.to_dict() | {"fresh": 0} != codec.to_dict() | {"fresh": 0}:
            raise ValueError("the saved codes do not match the saved codebook")
        if not 0 <= d["fed"] <= len(d["codes"]):
            raise ValueError(f"the saved engine state has fed={d['fed']} outside [0, {len(d['codes'])}]")
        system = d.get("system")
        return cls(system if isinstance(system, str) else None, str(d.get("position_mode", "compressed")),
                   [{"role": m["role"], "content": m["content"]} for m in msgs], [int(c) for c in d["codes"]],
                   d["fed"], d["fed_text"], codec,
                   _marks(d.get("marks"), len(msgs), len(d["codes"]), len(d["fed_text"])))


def _marks(raw: Any, n_messages: int, n_codes: int, n_text: int) -> list[Mark]:
    """Saved message boundaries, each checked; unknown (None) where missing or impossible."""
    if not isinstance(raw, list) or len(raw) != n_messages:
        return [None] * n_messages
    out: list[Mark] = []
    for m in raw:
        ok = (isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
              and 0 <= m[0] <= n_codes and 0 <= m[1] <= n_text)
        out.append((m[0], m[1]) if ok else None)
    return out
