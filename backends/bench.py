"""``z2z-bench``: benchmark commands. Each prints a table (or ``--json``) of measurements taken side
by side in one run, so ratios compare like with like on the same machine and load."""

from __future__ import annotations

import argparse
import json
import sys


def _progress(msg: str) -> None:
    print(f"[z2z-bench] {msg}", file=sys.stderr, flush=True)


def _tokenizer(spec: str | None):
    from .assets import smollm2_gguf
    from .sources import load_tokenizer

    return load_tokenizer(spec or smollm2_gguf())


def cmd_codec(args: argparse.Namespace) -> int:
    from . import bench_codec

    rows = bench_codec.run(_tokenizer(args.tokenizer), M=args.M, C=args.C, n_docs=args.docs,
                           doc_tokens=args.doc_tokens, repeat=args.repeat, progress=_progress)
    print(json.dumps(rows, indent=2) if args.json else bench_codec.format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="z2z-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("codec", help="compression and codec throughput, ours vs zip2zip-compression")
    c.add_argument("--tokenizer", help="HF tokenizer dir, repo id or .gguf (default: SmolLM2-135M GGUF)")
    c.add_argument("--M", type=int, default=3, help="max merge size (default 3)")
    c.add_argument("--C", type=int, default=2048, help="max codebook size (default 2048)")
    c.add_argument("--docs", type=int, default=40, help="documents per domain (default 40)")
    c.add_argument("--doc-tokens", type=int, default=2048, help="tokens per document (default 2048)")
    c.add_argument("--repeat", type=int, default=5, help="timing repeats, best kept (default 5)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=cmd_codec)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
