"""``z2z-bench ppl`` and ``z2z-bench answers``: a zip2zip model against its base model (torch).

- ``ppl``: byte-level perplexity (the paper's metric: exp(total NLL / UTF-8 bytes)) of held-out
  text per domain. The text is cut into windows of ``--window`` base tokens; the base model
  scores the base ids, the zip2zip model the window's LZW codes (fresh codebook per window, each
  position masked as inference masks it); both condition on the first token, and the bytes are
  those of the rest of the window. Also the compression (codes / base tokens).
- ``answers``: both models answer a prompt set (default: the default model's published evaluation
  set, ``default_model/eval/prompts.jsonl``) greedily on the same backend; prints, per group, the
  input and output compression (codes / base tokens), right answers where ``expect`` allows a
  check, U+FFFD counts and decode speed; ``--markdown`` writes the replies side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


def byte_perplexity(rt: Any, base_lm: Any, texts: dict[str, str], window: int, max_windows: int,
                    progress: Callable[[str], None]) -> list[dict]:
    import torch

    from z2z_chat.backends.codec import CodecSession

    tok, model = rt.tokenizer, rt.model.z2z
    rows = []
    for domain, text in texts.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = [t for t in ids if t not in rt.codec.disabled_ids]
        wins = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:max_windows]
        nll_base = nll_zip = 0.0
        n_bytes = n_tok = n_codes = 0
        for k, w in enumerate(wins):
            progress(f"ppl {domain}: window {k + 1}/{len(wins)}")
            n_bytes += len(tok.decode(w[1:]).encode("utf-8"))
            n_tok += len(w)
            with torch.no_grad():
                x = torch.tensor([w], device=model.device)
                lp = torch.log_softmax(base_lm(input_ids=x).logits[0, :-1, : rt.codec.base_vocab_size].float(), -1)
                nll_base -= lp.gather(1, x[0, 1:, None]).sum().item()
                s = CodecSession(rt.codec)
                codes = s.encode(w)
                n_codes += len(codes)
                logits = model.sequence_logits(codes, CodecSession(rt.codec))[:-1].float()
                lpz = torch.log_softmax(logits, -1)
                nll_zip -= lpz.gather(1, torch.tensor(codes[1:], device=model.device)[:, None]).sum().item()
        if not wins:
            progress(f"ppl {domain}: fewer than {window} tokens, skipped")
            continue
        pb, pz = math.exp(nll_base / n_bytes), math.exp(nll_zip / n_bytes)
        rows.append({"domain": domain, "windows": len(wins), "bytes": n_bytes, "base_byte_ppl": pb,
                     "zip_byte_ppl": pz, "ppl_ratio": pz / pb, "compression": n_codes / n_tok})
    return rows


def final_reply(session: Any, turns: Sequence[str], settings: Any) -> tuple[str, Any, str]:
    """Send the turns of one conversation; the last reply's text, its ``TurnStats`` and why it stopped."""
    from z2z_chat.backends.engine.events import Done, Token

    for t in turns[:-1]:
        list(session.send(t, settings))
    text, stats, reason = [], None, ""
    for ev in session.send(turns[-1], settings):
        if isinstance(ev, Token):
            text.append(ev.text)
        elif isinstance(ev, Done):
            stats, reason = ev.stats, ev.reason
    return "".join(text), stats, reason


def loops(answer: str, reason: str) -> bool:
    """A reply that ran to the token limit repeating itself: fewer than half of its word 4-grams
    are distinct (a reply asked to repeat something stops on its own before the limit)."""
    words = answer.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return reason == "length" and len(grams) >= 8 and len(set(grams)) < len(grams) / 2


def answers(rt: Any, plain: Any, prompts: Sequence[dict[str, Any]], max_tokens: int,
            progress: Callable[[str], None], policy: dict[str, Any] | None = None,
            base_rows: list[dict] | None = None) -> list[dict]:
    """Both models answer each prompt (a conversation: earlier turns answered first) greedily on
    the same backend; per prompt: the final replies, their compression, speed, correctness against
    ``expect`` and replacement characters (U+FFFD: bytes cut across a character). ``policy``:
    settings-table values the zip2zip model decodes with (the base answers with the defaults);
    ``base_rows``: the base's answers of an earlier call, reused (they do not depend on the policy)."""
    from z2z_chat.backends.engine.events import GenerationSettings

    out = []
    for i, p in enumerate(prompts):
        turns, expect = p["turns"], p.get("expect", [])
        row: dict[str, Any] = {"kind": p.get("group", ""), "prompt": " / ".join(turns)}
        if base_rows is not None:
            row |= {k: v for k, v in base_rows[i].items() if k.startswith("base_")}
        for name, r, values in (("zip", rt, policy or {}), ("base", plain, {})):
            if name == "base" and base_rows is not None:
                continue
            progress(f"answers {i + 1}/{len(prompts)}: {name}")
            settings = GenerationSettings.from_values({"max_tokens": max_tokens} | values)
            text, stats, reason = final_reply(r.session(), turns, settings)
            answer = text.strip()
            row[f"{name}_loops"] = loops(answer, reason)
            row[f"{name}_decode_s"] = stats.decode_s
            row[f"{name}_answer"] = answer
            row[f"{name}_correct"] = any(e.lower() in answer.lower() for e in expect) if expect else None
            row[f"{name}_fffd"] = answer.count("\ufffd")
            row[f"{name}_reply_tokens"] = stats.reply_tokens
            row[f"{name}_reply_codes"] = stats.reply_codes
            row[f"{name}_prompt_tokens"] = stats.prompt_tokens
            row[f"{name}_prompt_codes"] = stats.prompt_codes
            row[f"{name}_decode_tok_s"] = stats.decode_tok_s
        out.append(row)
    return out


def policy_curve(rt: Any, plain: Any, prompts: Sequence[dict[str, Any]], max_tokens: int,
                 policies: Sequence[dict[str, Any]], progress: Callable[[str], None]) -> list[dict]:
    """The decoding policies' trade-off: for each policy (settings-table values: ``hyper_margin``,
    ``hyper_batch``, ``repetition_penalty``, ``no_repeat_ngram``, ...), right answers, output codes
    per token, loops to the limit and decode speed per group, the base answering once for all."""
    out, base_rows = [], None
    for policy in policies:
        label = ", ".join(f"{k}={v}" for k, v in policy.items()) or "defaults"
        progress(f"policy {label}")
        rows = answers(rt, plain, prompts, max_tokens, progress, policy, base_rows)
        base_rows = rows
        for s in summarize_answers(rows):
            out.append({"policy": label, "prompts": s["prompts"],
                        "zip_correct": s["zip_correct"], "base_correct": s["base_correct"],
                        "output_codes_per_token": s["output_codes_per_token"],
                        "zip_loops": s["zip_loops"], "zip_fffd": s["zip_fffd"],
                        "speed_vs_base": s["zip_decode_tok_s"] / s["base_decode_tok_s"] if s["base_decode_tok_s"] else 0.0})
            progress(f"curve {out[-1]}")  # each policy as it is done: a long run stopped early keeps them
    return out


def summarize_answers(rows: list[dict]) -> list[dict]:
    def ratio(rs: list[dict], a: str, b: str) -> float:
        den = sum(r[b] for r in rs)
        return sum(r[a] for r in rs) / den if den else 0.0

    def right(rs: list[dict], name: str) -> str:
        checked = [r[f"{name}_correct"] for r in rs if r[f"{name}_correct"] is not None]
        return f"{sum(checked)}/{len(checked)}" if checked else "-"

    out = []
    for kind in ["all"] + sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if kind == "all" or r["kind"] == kind]
        out.append({"prompts": kind, "n": len(rs),
                    "input_codes_per_token": ratio(rs, "zip_prompt_codes", "zip_prompt_tokens"),
                    "output_codes_per_token": ratio(rs, "zip_reply_codes", "zip_reply_tokens"),
                    "zip_correct": right(rs, "zip"), "base_correct": right(rs, "base"),
                    "zip_fffd": sum(r["zip_fffd"] for r in rs), "base_fffd": sum(r["base_fffd"] for r in rs),
                    "zip_loops": sum(r["zip_loops"] for r in rs), "base_loops": sum(r["base_loops"] for r in rs),
                    # all reply tokens over all decode time: a long reply weighs what it costs
                    "zip_decode_tok_s": ratio(rs, "zip_reply_tokens", "zip_decode_s"),
                    "base_decode_tok_s": ratio(rs, "base_reply_tokens", "base_decode_s")})
    return out


def _marks(row: dict, name: str) -> str:
    c = row[f"{name}_correct"]
    return ("" if c is None else " (right)" if c else " (wrong)") + (" (loops)" if row[f"{name}_loops"] else "")


def format_answers(rows: list[dict]) -> str:
    lines = ["# Answers side by side", ""]
    for r in rows:
        lines += [f"### [{r['kind']}] {r['prompt'][:300]}",
                  f"- base ({r['base_reply_tokens']} tok){_marks(r, 'base')}: {r['base_answer'][:400]}",
                  f"- zip2zip ({r['zip_reply_tokens']} tok in {r['zip_reply_codes']} codes){_marks(r, 'zip')}: "
                  f"{r['zip_answer'][:400]}", ""]
    return "\n".join(lines)
