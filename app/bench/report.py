"""What ``z2z-bench compare`` reports from its runs: per engine load time, time to first token
(median), prefill and decode base tokens/s (sums over the prompts), codes per base token of the
replies, peak RSS of its process, correct replies (``expect`` substrings), ratios against the
reference engine; whether engines that must agree (with and without lookahead) wrote the same
replies; as a table or a bar chart."""

from __future__ import annotations

import statistics
from typing import Any


def correct(text: str, expect: list[str]) -> bool | None:
    return any(e.lower() in text.lower() for e in expect) if expect else None


def summary(name: str, runs: list[dict[str, Any]], load_s: float, rss: float) -> dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    errors = len(runs) - len(ok)
    tot = lambda k: sum(r[k] for r in ok)  # noqa: E731
    checked = [r["correct"] for r in ok if r["correct"] is not None]
    return {"engine": name, "load_s": load_s, "first_error": next((r["error"] for r in runs if not r.get("ok")), None), "ttft_s": statistics.median([r["ttft_s"] for r in ok]) if ok else None,
            "prefill_tok_s": tot("prompt_tokens") / tot("prefill_s") if ok and tot("prefill_s") else None,
            "decode_tok_s": tot("reply_tokens") / tot("decode_s") if ok and tot("decode_s") else None,
            "codes_per_token": tot("reply_codes") / tot("reply_tokens") if ok and tot("reply_tokens") else None,
            "peak_rss_mb": rss, "correct": f"{sum(checked)}/{len(checked)}", "errors": errors,
            "copy_decode_tok_s": _group_rate(ok, "copy")}


def _group_rate(runs: list[dict[str, Any]], group: str) -> float | None:
    g = [r for r in runs if r["group"] == group]
    t = sum(r["decode_s"] for r in g)
    return sum(r["reply_tokens"] for r in g) / t if g and t else None


def agreement(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Engines that must write the same greedy text: the same engine with and without lookahead."""
    out = []
    for n in results:
        if n.endswith("+lookahead") and n.removesuffix("+lookahead") in results:
            a, b = results[n.removesuffix("+lookahead")], results[n]
            same = sum(x.get("text") == y.get("text") for x, y in zip(a, b))
            out.append({"engines": [n.removesuffix("+lookahead"), n], "same_replies": same, "of": len(a)})
    return out


def format_report(rep: dict[str, Any]) -> str:
    cols = ["engine", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "copy_decode_tok_s", "decode_tok_s_vs_ref",
            "codes_per_token", "peak_rss_mb", "correct", "errors"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else (  # noqa: E731
        f"{v:.1f}" if isinstance(v, float) else str(v))
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rep["engines"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.append(f"reference: {rep['reference']}; {rep['prompts']} prompts x {rep['repeat']}, "
                 f"at most {rep['max_tokens']} tokens per reply, greedy")
    for a in rep["agreement"]:
        flag = "" if a["same_replies"] == a["of"] else "  <- DISAGREE"
        lines.append(f"agreement {a['engines'][0]} vs {a['engines'][1]}: {a['same_replies']}/{a['of']} replies identical{flag}")
    lines += [f"skipped {s['engine']}: {s['skipped']}" for s in rep["skipped"]]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in rep["engines"] if r["decode_tok_s"]]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh([r["engine"] for r in rows], [r["decode_tok_s"] for r in rows], color="#2f80ed", label="all prompts")
    ax.barh([r["engine"] for r in rows], [r["copy_decode_tok_s"] or 0 for r in rows], color="#e67e22", alpha=0.5,
            label="copy/edit prompts")
    ax.set_xlabel("decode, base tokens/s (greedy)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
