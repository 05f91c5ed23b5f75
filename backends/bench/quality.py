"""``z2z-bench ppl`` and ``z2z-bench answers``: a zip2zip model against its base model (torch).

- ``ppl``: byte-level perplexity (the paper's metric: exp(total NLL / UTF-8 bytes)) of held-out
  text per domain. The text is cut into windows of ``--window`` base tokens; the base model
  scores the base ids, the zip2zip model the window's LZW codes (fresh codebook per window, each
  position masked as inference masks it); both condition on the first token, and the bytes are
  those of the rest of the window. Also the compression (codes / base tokens).
- ``answers``: both models answer a fixed prompt set greedily on the same backend; prints the
  answers side by side with the input compression (prompt codes / tokens), the output
  compression (emitted codes / base tokens of the reply) and decode speed in base tokens/s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PROMPTS = [
    ("code", "Write a Python function that checks whether a string is a palindrome."),
    ("code", "Write a Python function that returns the n-th Fibonacci number."),
    ("code", "Write a Python class for a stack with push, pop and peek."),
    ("code", "Write a Python script that counts the words in a file."),
    ("code", "Write a Python function that merges two sorted lists."),
    ("code", "Write a Python function that computes the factorial of a number, recursively."),
    ("code", "Write a function in Python that removes duplicates from a list, keeping the order."),
    ("code", "Write Python code that reads a JSON file and prints its keys."),
    ("qa", "What is the capital of France?"),
    ("qa", "What is the largest ocean on Earth?"),
    ("qa", "How many legs does a spider have?"),
    ("qa", "What gas do plants absorb from the air?"),
    ("qa", "Who painted the Mona Lisa?"),
    ("qa", "What is 7 times 8?"),
    ("qa", "What is the freezing point of water in Celsius?"),
    ("explain", "Explain what a variable is in programming."),
    ("explain", "Explain why the sky is blue in two sentences."),
    ("explain", "Explain the difference between a list and a dictionary in Python."),
    ("task", "List three benefits of regular exercise."),
    ("task", "Write a short email inviting a colleague to lunch."),
    ("task", "Give me a recipe for a simple omelette."),
    ("task", "Translate 'good morning, how are you?' into French."),
    ("task", "Summarize the story of Little Red Riding Hood in three sentences."),
    ("task", "Write a haiku about the sea."),
]


def byte_perplexity(rt: Any, base_lm: Any, texts: dict[str, str], window: int, max_windows: int,
                    progress: Callable[[str], None]) -> list[dict]:
    import torch

    from ..codec import CodecSession

    tok, model = rt.tokenizer, rt.backend.model
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


def answers(rt: Any, plain: Any, prompts: Sequence[tuple[str, str]], max_tokens: int,
            progress: Callable[[str], None]) -> list[dict]:
    from ..engine import Done, GenerationSettings, Token

    out = []
    for i, (kind, prompt) in enumerate(prompts):
        row: dict[str, Any] = {"kind": kind, "prompt": prompt}
        for name, r in (("zip", rt), ("base", plain)):
            progress(f"answers {i + 1}/{len(prompts)}: {name}")
            text, stats = [], None
            for ev in r.session().send(prompt, GenerationSettings(max_tokens=max_tokens)):
                if isinstance(ev, Token):
                    text.append(ev.text)
                elif isinstance(ev, Done):
                    stats = ev.stats
            row[f"{name}_answer"] = "".join(text).strip()
            row[f"{name}_reply_tokens"] = stats.reply_tokens
            row[f"{name}_reply_codes"] = stats.reply_codes
            row[f"{name}_prompt_tokens"] = stats.prompt_tokens
            row[f"{name}_prompt_codes"] = stats.prompt_codes
            row[f"{name}_decode_tok_s"] = stats.decode_tok_s
        out.append(row)
    return out


def summarize_answers(rows: list[dict]) -> list[dict]:
    def ratio(rs: list[dict], a: str, b: str) -> float:
        return sum(r[a] for r in rs) / max(1, sum(r[b] for r in rs))

    out = []
    for kind in ["all"] + sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if kind == "all" or r["kind"] == kind]
        out.append({"prompts": kind, "n": len(rs),
                    "input_codes_per_token": ratio(rs, "zip_prompt_codes", "zip_prompt_tokens"),
                    "output_codes_per_token": ratio(rs, "zip_reply_codes", "zip_reply_tokens"),
                    "zip_decode_tok_s": float(np.mean([r["zip_decode_tok_s"] for r in rs])),
                    "base_decode_tok_s": float(np.mean([r["base_decode_tok_s"] for r in rs]))})
    return out


def format_answers(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines += [f"### [{r['kind']}] {r['prompt']}",
                  f"- base ({r['base_reply_tokens']} tok): {r['base_answer'][:400]}",
                  f"- zip2zip ({r['zip_reply_tokens']} tok in {r['zip_reply_codes']} codes): {r['zip_answer'][:400]}", ""]
    return "\n".join(lines)
