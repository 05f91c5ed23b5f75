"""``z2z-bench codec``: compression and codec speed on real token streams, ours vs the reference.

Per domain (Python sources, English prose, French man pages; all present on a Debian machine) the
text is tokenized with a real BPE tokenizer and cut into documents of ``--doc-tokens`` tokens.
Printed per domain: UTF-8 bytes per token without and with zip2zip (the paper's Table 2 metric),
the compression rate (codes / base tokens), and encode / decode throughput of ``backends.codec``
and of ``zip2zip_compression`` (when installed) measured side by side in this run, as a ratio.
"""

from __future__ import annotations

import glob
import gzip
import re
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from z2z_chat.backends.codec import CodecConfig, CodecSession, decode, encode
from z2z_chat.backends.loading.sources import pad_id_of


def _python_sources() -> Iterator[str]:
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield p.read_text(encoding="utf-8", errors="replace")


def _english() -> Iterator[str]:
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        if p.is_file() and not p.is_symlink():
            yield p.read_text(encoding="utf-8", errors="replace")


_ROFF = re.compile(r"\\f[BIRP]|\\[-&e(]|\\\*?\(..|\\s[-+]?\d")


def _french() -> Iterator[str]:
    for p in sorted(glob.glob("/usr/share/man/fr/man*/*.gz")):
        text = gzip.decompress(Path(p).read_bytes()).decode("utf-8", errors="replace")
        lines = [_ROFF.sub("", ln) for ln in text.splitlines() if not ln.startswith((".", "'"))]
        yield "\n".join(lines)


DOMAINS: dict[str, Callable[[], Iterator[str]]] = {
    "code": _python_sources, "english": _english, "french": _french,
}


def documents(tokenizer: Any, domain: str, n_docs: int, doc_tokens: int) -> tuple[list[list[int]], int]:
    """Up to ``n_docs`` token documents of exactly ``doc_tokens`` tokens, and their UTF-8 bytes."""
    docs, nbytes, ids = [], 0, []
    for text in DOMAINS[domain]():
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for start in range(0, len(enc["input_ids"]) - doc_tokens + 1, doc_tokens):
            ids = enc["input_ids"][start:start + doc_tokens]
            a, b = enc["offset_mapping"][start][0], enc["offset_mapping"][start + doc_tokens - 1][1]
            docs.append(ids)
            nbytes += len(text[a:b].encode("utf-8"))
            if len(docs) == n_docs:
                return docs, nbytes
    return docs, nbytes


def _best_of(fs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best seconds of each function, run in turn within every repeat: a machine that slows down
    part way through a run slows both codecs, not only the one timed then."""
    best = dict.fromkeys(fs, float("inf"))
    for _ in range(repeat):
        for k, f in fs.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def run(tokenizer: Any, *, M: int, C: int, n_docs: int, doc_tokens: int, repeat: int,
        progress: Callable[[str], None]) -> list[dict[str, Any]]:
    try:
        import zip2zip_compression as zc
    except ImportError:
        zc = None
        progress("zip2zip_compression is not installed: reporting our codec only "
                 "(pip install --no-deps zip2zip-compression==0.3.4 for the side-by-side ratio)")
    V = len(tokenizer)
    disabled = frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.get_added_vocab().values())
    pad = pad_id_of(tokenizer)
    config = CodecConfig(V, C, M, disabled, pad)
    rows = []
    for domain in DOMAINS:
        progress(f"{domain}: tokenizing")
        docs, nbytes = documents(tokenizer, domain, n_docs, doc_tokens)
        if not docs:
            progress(f"{domain}: no text found on this machine, skipped")
            continue
        n_tok = sum(map(len, docs))
        coded = [encode(d, config)[0] for d in docs]
        n_codes = sum(map(len, coded))
        row: dict[str, Any] = {
            "domain": domain, "docs": len(docs), "base_tokens": n_tok, "codes": n_codes,
            "bytes_per_token": nbytes / n_tok, "bytes_per_code": nbytes / n_codes,
            "compression": n_codes / n_tok,
        }
        progress(f"{domain}: timing encode/decode over {len(docs)} x {doc_tokens} tokens")
        fs = {"enc": lambda: [encode(d, config) for d in docs], "dec": lambda: [decode(c, config) for c in coded]}
        if zc is not None:
            ref = zc.LZWCompressor(V, C, M, pad, sorted(disabled))
            assert [ref.encode(d)[0] for d in docs] == coded, "reference codec disagrees"
            fs |= {"ref_enc": lambda: [ref.encode(d) for d in docs], "ref_dec": lambda: [ref.decode(c) for c in coded]}
        t = _best_of(fs, repeat)
        row["encode_mtok_s"], row["decode_mtok_s"] = n_tok / t["enc"] / 1e6, n_tok / t["dec"] / 1e6
        if zc is not None:
            row["ref_encode_mtok_s"], row["ref_decode_mtok_s"] = n_tok / t["ref_enc"] / 1e6, n_tok / t["ref_dec"] / 1e6
            row["encode_ratio"], row["decode_ratio"] = t["ref_enc"] / t["enc"], t["ref_dec"] / t["dec"]

        def push_all() -> None:
            for codes in coded:
                s = CodecSession(config)
                for c in codes:
                    s.push(c)
        row["push_us"] = _best_of({"push": push_all}, repeat)["push"] / n_codes * 1e6
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'domain':8} {'bytes/tok':>9} {'bytes/code':>10} {'codes/tok':>9} "
            f"{'enc Mtok/s':>10} {'ref':>6} {'ratio':>6} {'dec Mtok/s':>10} {'ref':>6} {'ratio':>6} {'push us':>7}")
    lines = [head]
    for r in rows:
        ref = lambda k: f"{r[k]:6.2f}" if k in r else f"{'-':>6}"  # noqa: E731
        lines.append(
            f"{r['domain']:8} {r['bytes_per_token']:9.2f} {r['bytes_per_code']:10.2f} {r['compression']:9.3f} "
            f"{r['encode_mtok_s']:10.2f} {ref('ref_encode_mtok_s')} {ref('encode_ratio')} "
            f"{r['decode_mtok_s']:10.2f} {ref('ref_decode_mtok_s')} {ref('decode_ratio')} {r['push_us']:7.2f}")
    return "\n".join(lines)
