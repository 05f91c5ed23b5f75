"""``z2z-bench long``: reading long documents, then a question, then a follow-up, on llama.cpp.

Per domain (Python sources, English prose, French man pages) and length (base tokens of the
document), one conversation: the document with a question, then a follow-up question. Three
engines on the same base GGUF, same threads, one after the other: zip2zip on our engine, the
plain base on our engine (token ids, no adapter), and llama-cpp-python's ``Llama.generate`` (which
reuses the KV cache of a shared prompt prefix on the follow-up). Reported: prefill seconds, time to
first token, KV cache bytes after the reply, decode tokens/s at that depth, and the follow-up's
time to first token. Then going back to the conversation later (the app's reopen): a new session
restored from the saved state sends one more question, once with the KV cache saved on disk
(``KVStore``: written, read back, imported) and once without (the conversation is read again);
the time from the start of the reopen to the first token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from z2z_chat.app.bench.peer import peer_ggufs
from z2z_chat.backends.runtime import Runtime

QUESTION = "What is the text above about? Answer in one sentence."
FOLLOW_UP = "Name one detail from it."
REOPEN = "Anything else?"


def _document(tokenizer: Any, domain: str, tokens: int) -> str:
    from z2z_chat.app.bench.codec import documents

    docs, _ = documents(tokenizer, domain, 1, tokens)
    if not docs:
        raise RuntimeError(f"no {domain} text of {tokens} tokens on this machine")
    return tokenizer.decode(docs[0])


def _ours(rt: Runtime, doc: str, reply_tokens: int) -> dict[str, Any]:
    from z2z_chat.backends.engine.events import Done, GenerationSettings

    s = rt.session()
    row: dict[str, Any] = {}
    for key, text in (("first", f"{doc}\n\n{QUESTION}"), ("follow", FOLLOW_UP)):
        done = [e for e in s.send(text, GenerationSettings(max_tokens=reply_tokens)) if isinstance(e, Done)][-1]
        st = done.stats
        row[key] = {"prefill_s": st.prefill_s, "ttft_s": st.ttft_s, "positions": st.context_codes,
                    "tokens": st.context_tokens, "decode_tok_s": st.decode_tok_s, "kv_bytes": s.state.kv_bytes()}
    row["reopen"] = _reopen(rt, s.to_dict(), s.saved_kv())
    s.state.close()
    return row


def _reopen(rt: Runtime, saved: dict[str, Any], snap: Any) -> dict[str, float]:
    """Seconds from reopening a saved conversation to the first token of one more reply, with the
    KV cache from disk and without it."""
    import tempfile
    from pathlib import Path

    from z2z_chat.backends.engine.events import GenerationSettings, Token
    from z2z_chat.backends.engine.kv_store import KVStore

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = KVStore(Path(tmp), rt.identity)
        if snap is not None:
            store.save("chat", snap)
        for key in ("with_kv", "without_kv"):
            t0 = time.perf_counter()
            s = rt.session()
            s.restore(saved, store.load("chat") if key == "with_kv" else None)
            for ev in s.send(REOPEN, GenerationSettings(max_tokens=4)):
                if isinstance(ev, Token):
                    out[key] = time.perf_counter() - t0
                    break
            s.state.close()
    return out


def _llama_cpp_python(gguf: str, tokenizer: Any, doc: str, reply_tokens: int, threads: int) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=8192, n_threads=threads, n_threads_batch=threads, verbose=False)
    msgs: list[dict[str, str]] = []
    row: dict[str, Any] = {}
    for key, text in (("first", f"{doc}\n\n{QUESTION}"), ("follow", FOLLOW_UP)):
        msgs.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        t0 = time.perf_counter()
        out, t_first = [], 0.0
        for tok in llm.generate(ids, temp=0.0):  # reset: it reuses the longest shared prefix
            if not out:
                t_first = time.perf_counter()
            if tok == llm.token_eos() or len(out) >= reply_tokens:
                break
            out.append(tok)
        t_end = time.perf_counter()
        msgs.append({"role": "assistant", "content": tokenizer.decode(out, skip_special_tokens=True)})
        row[key] = {"prefill_s": t_first - t0, "ttft_s": t_first - t0, "positions": len(ids), "tokens": len(ids),
                    "decode_tok_s": len(out) / (t_end - t_first) if t_end > t_first else 0.0,
                    "kv_bytes": llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)}
    llm.close()
    return row


def run(rt: Runtime, plain: Runtime, *, domains: list[str], lengths: list[int], reply_tokens: int, threads: int,
        progress: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for domain in domains:
        for n in lengths:
            doc = _document(rt.tokenizer, domain, n)
            progress(f"{domain}, {n} tokens: z2z")
            z = _ours(rt, doc, reply_tokens)
            progress(f"{domain}, {n} tokens: plain base on our engine")
            p = _ours(plain, doc, reply_tokens)
            peers = {}
            for label, gguf in peer_ggufs(rt.base, progress):  # the shipped type and the merged model's
                progress(f"{domain}, {n} tokens: {label}")
                peers[label] = _llama_cpp_python(str(gguf), rt.tokenizer, doc, reply_tokens, threads)
            # the ratios are quoted against the faster peer (docs/BENCHMARKS.md)
            best = min(peers, key=lambda k: peers[k]["first"]["ttft_s"])
            rows.append({"domain": domain, "doc_tokens": n, "z2z": z, "plain": p, "peers": peers,
                         "llama_cpp_python": peers[best], "fastest_peer": best})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"(lcp: the faster llama-cpp-python peer, per row; peers: the time to first token of each)\n"
            f"{'domain':8} {'tokens':>6} {'pos':>6} | {'ttft z2z':>8} {'plain':>6} {'lcp':>6} {'lcp/z2z':>7} | "
            f"{'KV MB z2z':>9} {'lcp':>6} {'saved':>6} | {'dec z2z':>7} {'lcp':>6} | {'follow-up ttft z2z':>18} {'lcp':>6} | "
            f"{'reopen ttft kv':>14} {'no kv':>6}")
    out = [head]
    for r in rows:
        z, p, c = r["z2z"]["first"], r["plain"]["first"], r["llama_cpp_python"]["first"]
        zf, cf = r["z2z"]["follow"], r["llama_cpp_python"]["follow"]
        out.append(f"{r['domain']:8} {z['tokens']:6} {z['positions']:6} | {z['ttft_s']:8.2f} {p['ttft_s']:6.2f} "
                   f"{c['ttft_s']:6.2f} {c['ttft_s'] / z['ttft_s']:7.2f} | {z['kv_bytes'] / 2**20:9.1f} "
                   f"{c['kv_bytes'] / 2**20:6.1f} {1 - z['kv_bytes'] / c['kv_bytes']:6.0%} | "
                   f"{z['decode_tok_s']:7.1f} {c['decode_tok_s']:6.1f} | {zf['ttft_s']:18.2f} {cf['ttft_s']:6.2f} | "
                   f"{r['z2z']['reopen'].get('with_kv', 0):14.2f} {r['z2z']['reopen'].get('without_kv', 0):6.2f} | "
                   + ", ".join(f"{k} {v['first']['ttft_s']:.2f}" for k, v in r["peers"].items()))
    return "\n".join(out)
