"""Training data: documents -> base ids -> LZW-compressed sequences of ``seq_len + 1`` codes.

Sources, all read through the ``datasets`` library and streamed: local text files (a file, a
directory or a glob; one document per file), JSONL and Parquet (a text field, or a ``messages``
column of chat records rendered with the tokenizer's chat template), and Hugging Face datasets
(``hf:name[:config]``; read only until they have given their share of ``total_codes``; an
unreachable hub is an error in seconds).

Each source's documents are tokenized, each followed by end-of-sequence (a disabled id, so no
hypertoken spans two documents), concatenated, and cut into sequences of exactly
``seq_len + 1`` codes, each compressed with a fresh codebook (the count is in codes, not base
tokens; the last piece of a source is right-padded). Sources are mixed by weight; a held-out
split is set aside. Work runs in parallel processes with a progress bar, and the result is
cached on disk keyed by everything that determines it. The result is a pure function of the
config, the files and the seed: every process (and node) gets the same sequences, and the trainer
deals them out by step and rank, so sharding across ranks and resume positions are exact.
"""

from __future__ import annotations

import glob as globlib
import sysconfig
import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from z2z_chat.backends.codec import CodecConfig, encode
from z2z_chat.backends.errors import Z2ZError

from z2z_chat.train.config import DataConfig, Source

CHAT_ROLES = {"system", "user", "assistant"}


class DataError(Z2ZError, ValueError):
    """A data source cannot be read; the message names it."""


@dataclass
class Prepared:
    train: np.ndarray  # (N, seq_len + 1) int32 codes, right-padded with pad
    train_len: np.ndarray  # (N,) real codes per sequence (pad may equal eos: lengths, not ids, mark padding)
    val: np.ndarray
    val_len: np.ndarray
    base_tokens: int  # base tokens behind all sequences
    codes: int  # real (non-pad) codes behind those base tokens
    skipped: int  # records skipped (empty documents, chat records with unknown roles)


def _files(path: str) -> list[Path]:
    """The files of a source path: a file, a directory, or a glob; ``{stdlib}`` stands for the running
    Python's standard library (a recipe that trains on it works on every OS)."""
    p = Path(path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    found = sorted(Path(f) for f in globlib.glob(str(p), recursive=True))
    if not found:
        raise DataError(f"data source {path}: no such file or nothing matches")
    return found


def _format(src: Source, f: Path) -> str:
    if src.format != "auto":
        return src.format
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(f.suffix, "text")


def iter_documents(src: Source) -> Iterator[str | list[dict[str, str]]]:
    """Raw documents of a source, streamed: a string, or a list of chat messages."""
    n = 0
    for doc in _stream(src):
        yield doc
        n += 1
        if src.max_docs and n >= src.max_docs:
            return


def _document(rec: dict[str, Any], field: str) -> Any:
    """The text field, or a chat column (``messages``, or ``field`` holding a list of messages)."""
    return rec["messages"] if isinstance(rec.get("messages"), list) else rec.get(field)


def _stream(src: Source) -> Iterator[Any]:
    """Documents through the ``datasets`` library, streamed (nothing is loaded whole): local text
    files (one document per file), JSONL and Parquet, or a Hugging Face dataset id."""
    try:
        import datasets
    except ImportError:
        raise DataError('reading training data needs the datasets package: pip install "z2z-chat[train]"') from None
    datasets.disable_progress_bars()
    if src.format == "hf" or src.path.startswith("hf:"):
        yield from _stream_hub(src, datasets)
        return
    by_format: dict[str, list[str]] = {}
    for f in _files(src.path):
        by_format.setdefault(_format(src, f), []).append(str(f))
    for fmt, files in by_format.items():
        if fmt == "jsonl":
            for f in files:  # one file at a time, so a bad line can be named
                ds = datasets.load_dataset("json", data_files=f, split="train", streaming=True)
                try:
                    yield from (_document(r, src.field) for r in ds)
                except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
                    raise DataError(f"{f}: not JSON lines ({e.__cause__ or e})") from None
            continue
        if fmt == "text":
            ds = datasets.load_dataset("text", data_files=files, split="train", streaming=True,
                                       sample_by="document", encoding_errors="replace")
            yield from (r["text"] for r in ds)
            continue
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        if src.field not in (ds.column_names or []) and "messages" not in (ds.column_names or []):
            raise DataError(f"{src.path}: no column {src.field!r} (columns: {ds.column_names})")
        yield from (_document(r, src.field) for r in ds)


def _stream_hub(src: Source, datasets: Any) -> Iterator[Any]:
    from z2z_chat.backends.loading.checkpoint import hub_reachable

    name, _, conf = src.path.removeprefix("hf:").partition(":")
    if not hub_reachable():  # fail in seconds, not after a minute of retries
        raise DataError(f"cannot reach the Hugging Face hub for the dataset {name}; where the machine is "
                        "offline, download it elsewhere (e.g. to Parquet) and list the local files instead")
    try:
        yield from (_document(r, src.field) for r in
                    datasets.load_dataset(name, conf or None, split=src.split, streaming=True))
    except (ConnectionError, OSError, ValueError) as e:
        raise DataError(f"cannot read the Hugging Face dataset {name} ({e})") from None


def tokenize_document(tok: Any, doc: Any, eos: int) -> list[int] | None:
    """Base ids of one document followed by eos; None for records to skip."""
    if isinstance(doc, str):
        if not doc.strip():
            return None
        return tok(doc, add_special_tokens=False)["input_ids"] + [eos]
    if isinstance(doc, list) and doc and all(isinstance(m, dict) for m in doc):
        if any(m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str) for m in doc):
            return None
        ids = tok.apply_chat_template(doc, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return ids if ids and ids[-1] == eos else ids + [eos]
    return None


def chunk_codes(ids: list[int], codec: CodecConfig, length: int) -> list[list[int]]:
    """Cut a base-id stream into code sequences of ``length`` codes (the last one may be
    shorter), each compressed with a fresh codebook."""
    out, pos, M = [], 0, codec.max_merge_size
    while pos < len(ids):
        window = ids[pos:pos + length * M]  # M tokens per code at most: >= length codes unless it ends
        codes, cb = encode(window, codec)
        codes = codes[:length]
        pos += sum(1 if c < codec.base_vocab_size else len(cb[c]) for c in codes)
        out.append(codes)
    return out


def _work(args: tuple[str, list[Any], dict, int]) -> tuple[list[list[int]], int, int]:
    tok_dir, docs, codec_d, length = args
    tok = _worker_tokenizer(tok_dir)
    codec = CodecConfig.from_dict(codec_d)
    stream, skipped = [], 0
    for doc in docs:
        ids = tokenize_document(tok, doc, tok.eos_token_id)
        if ids is None:
            skipped += 1
        else:
            stream += ids
    seqs = [q for q in chunk_codes(stream, codec, length) if len(q) >= 2]  # one code predicts nothing
    return seqs, len(stream), skipped


_TOK: dict[str, Any] = {}


def _worker_tokenizer(tok_dir: str) -> Any:
    if tok_dir not in _TOK:
        from transformers import AutoTokenizer

        _TOK[tok_dir] = AutoTokenizer.from_pretrained(tok_dir)
    return _TOK[tok_dir]


def _fingerprint(cfg: DataConfig, codec: CodecConfig, tok_dir: str, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([asdict(cfg) | {"cache_dir": "", "num_workers": 0}, codec.to_dict(), seed],
                        sort_keys=True).encode())
    tok_file = Path(tok_dir) / "tokenizer.json"
    h.update(tok_file.read_bytes() if tok_file.exists() else tok_dir.encode())
    for s in cfg.sources:
        if not s.path.startswith("hf:"):
            for f in _files(s.path):
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def prepare(cfg: DataConfig, codec: CodecConfig, tok_dir: str, cache_dir: Path, seed: int,
            log=print) -> Prepared:
    """Tokenize, compress, mix and split the sources (cached)."""
    from tqdm.auto import tqdm

    key = _fingerprint(cfg, codec, tok_dir, seed)
    cache = cache_dir / f"data-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        log(f"data: cached {cache.name}: {len(z['train'])} train / {len(z['val'])} held-out sequences")
        return Prepared(z["train"], z["train_len"], z["val"], z["val_len"], int(z["base_tokens"]),
                        int(z["codes"]), int(z["skipped"]))
    length = cfg.seq_len + 1
    workers = cfg.num_workers or os.cpu_count() or 1
    weights = [s.weight for s in cfg.sources]
    per_source, base_tokens, skipped = [], 0, 0
    with ProcessPoolExecutor(workers) as pool:
        for src, w in zip(cfg.sources, weights):
            # a hub dataset is read only until it has given its share of total_codes (it can be far
            # larger than a run needs); 10% more leaves room for the held-out split
            hub = src.format == "hf" or src.path.startswith("hf:")
            budget = int(1.1 * cfg.total_codes * w / sum(weights)) if cfg.total_codes and hub else 0
            seqs: list[list[int]] = []
            got = 0
            bar = tqdm(desc=f"compress {Path(src.path).name}", unit="doc")
            docs = iter_documents(src)
            while not budget or got < budget:
                chunks = [c for c in (list(itertools.islice(docs, 64)) for _ in range(4 * workers)) if c]
                if not chunks:
                    break
                for (s, n, k), c in zip(pool.map(_work, [(tok_dir, c, codec.to_dict(), length) for c in chunks]), chunks):
                    seqs += s
                    got += sum(map(len, s))
                    base_tokens += n
                    skipped += k
                    bar.update(len(c))
            bar.close()
            if not seqs:
                raise DataError(f"data source {src.path}: no documents, or every one was empty or skipped")
            per_source.append(seqs)
    codes = sum(len(q) for seqs in per_source for q in seqs)
    rng = random.Random(seed)
    total = sum(map(len, per_source))
    want_total = (cfg.total_codes // length) if cfg.total_codes else total
    mixed = []
    for seqs, w in zip(per_source, weights):
        n = max(1, round(want_total * w / sum(weights)))
        rng.shuffle(seqs)
        reps = -(-n // len(seqs))
        if reps > 1:
            log(f"data: a source with {len(seqs)} sequences is repeated {reps}x to reach its weight")
        mixed += (seqs * reps)[:n]
    rng.shuffle(mixed)
    lens = np.asarray([len(q) for q in mixed], dtype=np.int32)
    arr = np.full((len(mixed), length), codec.pad_id, dtype=np.int32)
    for i, q in enumerate(mixed):
        arr[i, :len(q)] = q
    n_val = int(round(len(arr) * cfg.val_fraction))
    if cfg.val_fraction and n_val == 0 and len(arr) > 1:
        n_val = 1
    out = Prepared(arr[n_val:], lens[n_val:], arr[:n_val], lens[:n_val], base_tokens, codes, skipped)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{k: np.asarray(v) for k, v in asdict(out).items()})
    log(f"data: {len(out.train)} train / {len(out.val)} held-out sequences of up to {length} codes; "
        f"{base_tokens} base tokens -> {codes} codes ({codes / max(base_tokens, 1):.3f}); "
        f"{skipped} records skipped")
    return out
