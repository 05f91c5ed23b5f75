"""``z2z-bench structured``: the per-step cost of structured output against unconstrained decoding.

Each prompt is answered twice by the same session kind, greedy, alternating which goes first:
unconstrained, and under a JSON schema (``backends/engine/grammar.py``). The replies differ, so
the figure compared is the time per decode step (decode seconds / codes written) and per base
token; the table also says how many of the constrained replies ended by themselves and parsed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 400},
    "items": {"type": "array", "maxItems": 6, "items": {"type": "string", "maxLength": 80}}},
    "required": ["answer", "items"], "additionalProperties": False}


def _turn(rt: Any, prompt: str, max_tokens: int, schema: dict | None) -> dict[str, Any]:
    from z2z_chat.backends.engine.events import Done, GenerationSettings, Token
    from z2z_chat.backends.engine.grammar import Grammar

    session = rt.session()
    grammar = Grammar.json(rt.tokenizer, schema, session.stop_ids) if schema is not None else None
    text, done = "", None
    for ev in session.send(prompt, GenerationSettings(max_tokens=max_tokens), grammar=grammar):
        text += ev.text if isinstance(ev, Token) else ""
        done = ev if isinstance(ev, Done) else done
    st = done.stats
    try:
        parsed = schema is None or isinstance(json.loads(text), dict)
    except ValueError:
        parsed = False
    return {"ms_per_step": 1000 * st.decode_s / max(st.reply_codes, 1),
            "ms_per_token": 1000 * st.decode_s / max(st.reply_tokens, 1),
            "codes_per_token": st.reply_codes / max(st.reply_tokens, 1), "stopped": done.reason == "stop",
            "parsed": parsed}


def run(rt: Any, prompts: list[str], max_tokens: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: dict[str, list[dict]] = {"unconstrained": [], "json schema": []}
    for i, p in enumerate(prompts):
        order = [("unconstrained", None), ("json schema", SCHEMA)]
        for name, schema in order if i % 2 == 0 else order[::-1]:
            progress(f"structured {i + 1}/{len(prompts)}: {name}")
            rows[name].append(_turn(rt, p, max_tokens, schema))
    plain = statistics.median(r["ms_per_step"] for r in rows["unconstrained"])
    out = []
    for name, rs in rows.items():
        step = statistics.median(r["ms_per_step"] for r in rs)
        out.append({"decoding": name, "prompts": len(rs), "ms_per_step_median": round(step, 2),
                    "ms_per_token_median": round(statistics.median(r["ms_per_token"] for r in rs), 2),
                    "step_vs_unconstrained": round(step / plain, 3),
                    "codes_per_token": round(statistics.mean(r["codes_per_token"] for r in rs), 3),
                    "ended_and_parsed": f"{sum(r['stopped'] and r['parsed'] for r in rs)}/{len(rs)}"})
    return out
