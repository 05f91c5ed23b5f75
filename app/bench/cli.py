"""``z2z-bench``: benchmark commands. Each prints a table (or ``--json``) of measurements taken side
by side in one run, so ratios compare like with like on the same machine and load."""

from __future__ import annotations

import argparse
import json
import sys

from z2z_chat.app.options import add_model_args
from z2z_chat.backends.engine.settings import TABLE
from z2z_chat.backends.errors import SettingsError, Z2ZError


def _progress(msg: str) -> None:
    print(f"[z2z-bench] {msg}", file=sys.stderr, flush=True)


def _tokenizer(spec: str | None):
    from z2z_chat.backends.loading.assets import smollm2_gguf
    from z2z_chat.backends.loading.sources import load_tokenizer

    return load_tokenizer(spec or smollm2_gguf())


def cmd_codec(args: argparse.Namespace) -> int:
    from z2z_chat.app.bench import codec as bench_codec

    rows = bench_codec.run(_tokenizer(args.tokenizer), M=args.M, C=args.C, n_docs=args.docs,
                           doc_tokens=args.doc_tokens, repeat=args.repeat, progress=_progress)
    print(json.dumps(rows, indent=2) if args.json else bench_codec.format_table(rows))
    return 0


def _runtime(args: argparse.Namespace):
    from z2z_chat.backends.runtime import open_runtime

    _progress(f"loading {args.model} on {args.backend}")
    return open_runtime(args.model, args.backend, args.device, args.dtype, base=args.base)


def _emit(args: argparse.Namespace, title: str, rows: list[dict]) -> None:
    from z2z_chat.app.bench.model import format_rows

    print(json.dumps(rows, indent=2) if args.json else f"{title}\n{format_rows(rows)}")


def cmd_prefill(args: argparse.Namespace) -> int:
    from z2z_chat.app.bench import model as bench_model

    rt = _runtime(args)
    lengths = [int(x) for x in args.lengths.split(",")]
    _emit(args, f"prefill, {rt.describe()} (ratio: zip2zip / plain base-token throughput)",
          bench_model.prefill(rt, lengths, args.repeat, _progress))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from z2z_chat.app.bench import model as bench_model

    rt = _runtime(args)
    _emit(args, f"decode, {rt.describe()} (step_overhead: zip2zip step time / plain step time - 1)",
          bench_model.decode(rt, args.prompt_tokens, args.steps, _progress, args.hyper_batch, max(1, args.rounds)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from z2z_chat.app.bench import model as bench_model

    rt = _runtime(args)
    ref = None
    if args.reference:
        _progress("loading the zip2zip reference package on the same checkpoint")
        ref = bench_model.reference_ttft(rt, rt.model_name, args.reference)
    rows = bench_model.chat(rt, args.turns, args.reply_tokens, ref, _progress)
    _emit(args, f"chat, {rt.describe()} (time to first token per turn)", rows)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from z2z_chat.backends.runtime import RuntimeOpenError, open_plain
    from z2z_chat.app.bench import quality as bench_quality

    texts = {}
    for item in args.text:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            raise ValueError(f"--text {item}: expected DOMAIN=FILE with an existing file")
        texts[name] = Path(path).read_text(encoding="utf-8", errors="replace")
    rt = _runtime(args)
    if rt.backend_name != "torch":
        raise RuntimeOpenError(f"ppl scores whole sequences with the torch model; it does not run on "
                               f"{rt.backend_name}: use --backend torch")
    plain = open_plain(rt, args.base, args.device, args.dtype)
    rows = bench_quality.byte_perplexity(rt, plain.model.lm, texts, args.window, args.max_windows, _progress)
    _emit(args, f"byte-level perplexity, {rt.describe()} (ratio: zip2zip / base)", rows)
    return 0


def cmd_structured(args: argparse.Namespace) -> int:
    from z2z_chat.app.bench import structured
    from z2z_chat.app.bench.compare import load_prompts

    rt = _runtime(args)
    prompts = [p["turns"][-1] for p in load_prompts(args.prompts)][: args.limit or None]
    _emit(args, f"structured output per step, {rt.describe()} (greedy; each prompt both ways, alternated)",
          structured.run(rt, prompts, args.max_tokens, _progress))
    return 0


def _policy(text: str) -> dict:
    """``k=v,k=v`` as settings-table values ("" : the defaults)."""
    out = {}
    for k, _, v in (kv.strip().partition("=") for kv in text.split(",") if kv.strip()):
        if k not in TABLE:
            raise SettingsError(f"unknown setting {k!r} in --policies; the settings are {', '.join(TABLE)}")
        out[k] = TABLE[k].parse(v)
    return out


def cmd_answers(args: argparse.Namespace) -> int:
    from pathlib import Path

    from z2z_chat.backends.runtime import open_plain
    from z2z_chat.app.bench import quality as bench_quality

    rt = _runtime(args)
    plain = open_plain(rt, args.base, args.device, args.dtype)
    from z2z_chat.app.bench.compare import load_prompts

    prompts = load_prompts(args.prompts)[: args.limit or None]
    policies = [{"hyper_margin": TABLE["hyper_margin"].parse(m)} for m in (args.margins or "").split(",") if m]
    policies += [{"hyper_batch": TABLE["hyper_batch"].parse(b)} for b in (args.hyper_batches or "").split(",") if b]
    policies += [_policy(p) for p in args.policies.split(";")] if args.policies else []
    if policies:
        _emit(args, f"decoding policies, {rt.describe()}; speed_vs_base: decode tok/s ratio",
              bench_quality.policy_curve(rt, plain, prompts, args.max_tokens, policies, _progress))
        return 0
    rows = bench_quality.answers(rt, plain, prompts, args.max_tokens, _progress)
    if args.markdown:
        Path(args.markdown).write_text(bench_quality.format_answers(rows))
        _progress(f"answers side by side: {args.markdown}")
    if args.json:
        print(json.dumps({"answers": rows, "summary": bench_quality.summarize_answers(rows)}, indent=2))
    else:
        _emit(args, f"answers, {rt.describe()} vs its base model", bench_quality.summarize_answers(rows))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from z2z_chat.app.bench import compare, report

    prompts = compare.load_prompts(args.prompts, args.groups.split(",") if args.groups else None)[: args.limit or None]
    if not prompts:
        raise ValueError("no prompts selected")
    rep = compare.run(args.model, args.base, prompts, args.max_tokens, args.repeat, args.mlx, _progress,
                      args.engines.split(",") if args.engines else None)
    if args.plot:
        report.plot(rep, args.plot)
        _progress(f"chart: {args.plot}")
    print(json.dumps(rep, indent=2, default=str) if args.json else report.format_report(rep))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from z2z_chat.backends.loading.assets import smollm2_gguf
    from z2z_chat.backends.llamacpp_backend.context import default_threads
    from z2z_chat.app.bench import serve as bench_serve

    gguf = args.gguf or smollm2_gguf()
    try:
        report = bench_serve.run(model=args.model, gguf=gguf, tokenizer=_tokenizer(args.model or gguf),
                                 threads=args.threads or default_threads(), turns=args.turns,
                                 max_tokens=args.max_tokens, conversations=args.conversations,
                                 load_requests=args.requests, progress=_progress)
    except RuntimeError as e:
        raise Z2ZError(str(e)) from e
    print(json.dumps(report, indent=2) if args.json else bench_serve.format_report(report))
    return 0


def cmd_long(args: argparse.Namespace) -> int:
    from z2z_chat.backends.llamacpp_backend.context import default_threads
    from z2z_chat.backends.runtime import open_plain
    from z2z_chat.app.bench import long as bench_long

    if args.backend != "llamacpp":
        raise Z2ZError("z2z-bench long compares with llama-cpp-python: run it with --backend llamacpp")
    rt = _runtime(args)
    try:
        rows = bench_long.run(rt, open_plain(rt), domains=args.domains.split(","),
                              lengths=[int(x) for x in args.lengths.split(",")], reply_tokens=args.reply_tokens,
                              threads=default_threads(), progress=_progress)
    except RuntimeError as e:
        raise Z2ZError(str(e)) from e
    print(json.dumps(rows, indent=2) if args.json else
          f"long documents, {rt.describe()}\n{bench_long.format_table(rows)}")
    return 0


def cmd_overflow(args: argparse.Namespace) -> int:
    """A long chat in a small window on llama.cpp: how often a turn re-reads the conversation."""
    import statistics

    from z2z_chat.backends.loading.defaults import default_model
    from z2z_chat.backends.engine.events import GenerationSettings, Notice
    from z2z_chat.backends.llamacpp_backend.checkpoint import open_checkpoint
    from z2z_chat.backends.runtime import Runtime

    model, base = (args.model, args.base) if args.model else default_model(progress=_progress)
    op = open_checkpoint(model, base=base or args.base, n_ctx=args.context)
    rt = Runtime(op.model, op.tokenizer, op.codec, op.config, "llamacpp", model, "cpu")
    s = rt.session()
    topics = ["cats", "the sea", "Python lists", "bread", "the moon", "trains", "music", "rain", "chess", "tea"]
    ttft, restarts, fed = [], 0, []
    for i in range(args.turns):
        events = list(s.send(f"Tell me one fact about {topics[i % 10]} (question {i}).",
                             GenerationSettings(max_tokens=args.max_tokens)))
        restarts += any(isinstance(e, Notice) for e in events)
        ttft.append(events[-1].stats.ttft_s)
        fed.append(events[-1].stats.prompt_tokens)
    rows = [{"turns": args.turns, "context": args.context, "restarts": restarts,
             "median_ttft_ms": statistics.median(ttft) * 1e3, "p90_ttft_ms": sorted(ttft)[int(0.9 * len(ttft))] * 1e3,
             "median_tokens_encoded": statistics.median(fed)}]
    _emit(args, f"{args.turns} turns in a {args.context}-position window, llama.cpp", rows)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from z2z_chat.backends.runtime import open_runtime
    from z2z_chat.app.bench import model as bench_model
    from z2z_chat.app.bench import scale

    import os

    out = Path(args.out or f"out/scale-{args.geometry}")
    os.environ["Z2Z_CONTEXT"] = str(args.context)  # both engines, in this process and the measuring ones
    gguf_dir = scale.make_checkpoint(out, args.geometry, _progress, args.quantize)
    title = f"{args.geometry} ({scale.GEOMETRIES[args.geometry].params / 1e9:.2f}B, random weights, {args.quantize})"
    wanted, sections = args.sections.split(","), {}
    if "load" in wanted:
        try:
            sections["load"] = scale.load(gguf_dir, _progress)
        except RuntimeError as e:  # a measuring process failed: its error output is in the message
            raise Z2ZError(str(e)) from e
    if "prefill" in wanted or "decode" in wanted:
        rt = open_runtime(str(gguf_dir), "llamacpp")
        if "prefill" in wanted:
            lengths = [int(x) for x in args.lengths.split(",")]
            sections["prefill"] = bench_model.prefill(rt, lengths, 1, _progress)
        if "decode" in wanted:
            sections["decode"] = bench_model.decode(rt, args.prompt_tokens, args.steps, _progress, args.hyper_batch,
                                                    max(1, args.rounds))
    if args.json:
        print(json.dumps(sections, indent=2))
    else:
        from z2z_chat.app.bench.model import format_rows

        for name, rows in sections.items():
            print(f"{name}, {title}\n{format_rows(rows)}\n")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


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
    pf = sub.add_parser("prefill", help="prefill throughput, zip2zip vs plain (Table 5 lengths)")
    _model_args(pf)
    pf.add_argument("--lengths", default="256,512,1024,2048")
    pf.add_argument("--repeat", type=int, default=3)
    pf.set_defaults(func=cmd_prefill)
    dc = sub.add_parser("decode", help="decode throughput and per-step overhead, own and forced")
    _model_args(dc)
    dc.add_argument("--prompt-tokens", type=int, default=256)
    dc.add_argument("--steps", type=int, default=256)
    dc.add_argument("--hyper-batch", type=int, default=1, help="the decoding policy (z2z-chat --hyper-batch)")
    dc.add_argument("--rounds", type=int, default=1, help="alternate plain and zip2zip runs this many times; "
                    "each row gives the median runs")
    dc.set_defaults(func=cmd_decode)
    ch = sub.add_parser("chat", help="time to first token over a scripted multi-turn chat")
    _model_args(ch)
    ch.add_argument("--turns", type=int, default=10)
    ch.add_argument("--reply-tokens", type=int, default=48)
    ch.add_argument("--reference", metavar="BASE_HF_DIR",
                    help="also time the zip2zip package's generate (needs the base as an HF directory)")
    ch.set_defaults(func=cmd_chat)
    pp = sub.add_parser("ppl", help="byte-level perplexity of the zip2zip model and its base, per domain")
    _model_args(pp)
    pp.add_argument("--text", action="append", required=True, metavar="DOMAIN=FILE", help="held-out text")
    pp.add_argument("--window", type=int, default=512, help="base tokens per scored window")
    pp.add_argument("--max-windows", type=int, default=20)
    pp.set_defaults(func=cmd_ppl)
    an = sub.add_parser("answers", help="answers of the zip2zip model and its base to a fixed prompt set")
    _model_args(an)
    an.add_argument("--max-tokens", type=int, default=160)
    an.add_argument("--limit", type=int, default=0, help="first N prompts only")
    an.add_argument("--prompts", help="JSONL prompt set (default: the default model's evaluation set)")
    an.add_argument("--markdown", help="write the answers side by side to this file")
    an.add_argument("--margins", metavar="M,M,...",
                    help="the decoding policy's curve instead: e.g. off,0,1,2 (a hypertoken must beat its first "
                         "subtoken's logit by M); the base answers once")
    an.add_argument("--hyper-batches", metavar="K,K,...",
                    help="the same for z2z-chat --hyper-batch: e.g. 1,4,8 (with --margins: both curves, one base)")
    an.add_argument("--policies", metavar="K=V,...;K=V,...",
                    help="decoding policies as settings, ';' between policies, an empty one for the defaults: e.g. "
                         "';repetition_penalty=1.1,repetition_window=64;no_repeat_ngram=4'")
    an.set_defaults(func=cmd_answers)
    so = sub.add_parser("structured", help="structured output (a JSON schema) vs unconstrained: time per step")
    _model_args(so)
    so.add_argument("--max-tokens", type=int, default=160)
    so.add_argument("--limit", type=int, default=12, help="first N prompts of the set (default 12)")
    so.add_argument("--prompts", help="JSONL prompt set (default: the default model's evaluation set)")
    so.set_defaults(func=cmd_structured)
    sc = sub.add_parser("scale", help="a random-weight model of a released geometry on llama.cpp: load, memory, "
                        "prefill, decode vs plain llama.cpp")
    sc.add_argument("--geometry", default="phi3.5-mini", choices=["phi3.5-mini", "tiny"])
    sc.add_argument("--out", help="where the model is made and kept (default out/scale-GEOMETRY)")
    sc.add_argument("--quantize", default="q8_0", choices=["f16", "q8_0"])
    sc.add_argument("--lengths", default="256,1024", help="prefill prompt lengths")
    sc.add_argument("--prompt-tokens", type=int, default=256)
    sc.add_argument("--steps", type=int, default=32)
    sc.add_argument("--context", type=int, default=4096, help="window of both engines (default 4096)")
    sc.add_argument("--sections", default="load,prefill,decode", help="what to measure (default: all three)")
    sc.add_argument("--hyper-batch", type=int, default=1, help="the decoding policy (z2z-chat --hyper-batch)")
    sc.add_argument("--rounds", type=int, default=1, help="alternate plain and zip2zip runs this many times; "
                    "each row gives the median runs")
    sc.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sc.set_defaults(func=cmd_scale)
    lg = sub.add_parser("long", help="long documents: prefill, time to first token, KV size, follow-up (llama.cpp)")
    _model_args(lg)
    lg.set_defaults(backend="llamacpp")
    lg.add_argument("--lengths", default="1000,2000,4000,7000", help="document lengths in base tokens")
    lg.add_argument("--domains", default="code,english,french")
    lg.add_argument("--reply-tokens", type=int, default=48)
    lg.set_defaults(func=cmd_long)

    ov = sub.add_parser("overflow", help="a long chat past a small context window: restarts and time to first token")
    ov.add_argument("--model", help="llama.cpp-ready checkpoint (default: the embedded model)")
    ov.add_argument("--base", help="override the checkpoint's base model")
    ov.add_argument("--context", type=int, default=512)
    ov.add_argument("--turns", type=int, default=100)
    ov.add_argument("--max-tokens", type=int, default=48)
    ov.add_argument("--json", action="store_true")
    ov.set_defaults(func=cmd_overflow)

    sv = sub.add_parser("serve", help="z2z-chat serve beside llama-cpp-python's server, over HTTP")
    sv.add_argument("--model", help="zip2zip checkpoint for z2z-chat serve (default: the embedded model)")
    sv.add_argument("--gguf", help="base GGUF for llama-cpp-python's server (default: the embedded model's base)")
    sv.add_argument("--threads", type=int, default=0, help="threads for both servers (default: all cores)")
    sv.add_argument("--turns", type=int, default=10)
    sv.add_argument("--max-tokens", type=int, default=96)
    sv.add_argument("--conversations", type=int, default=4)
    sv.add_argument("--requests", type=int, default=200, help="requests of the load run")
    sv.add_argument("--json", action="store_true")
    sv.set_defaults(func=cmd_serve)

    cp = sub.add_parser("compare", help="z2z-chat beside llama.cpp, transformers, prompt lookup and the reference")
    cp.add_argument("--model", help="zip2zip checkpoint directory (default: the embedded model)")
    cp.add_argument("--base", help="override the checkpoint's base model")
    cp.add_argument("--prompts", help="JSONL prompt set (default: the default model's evaluation set)")
    cp.add_argument("--groups", help="only these groups, comma-separated (qa,code,copy,followup,multilingual)")
    cp.add_argument("--limit", type=int, default=0, help="first N prompts only")
    cp.add_argument("--max-tokens", type=int, default=128, help="base tokens per reply (default 128)")
    cp.add_argument("--repeat", type=int, default=1, help="passes over the prompt set (default 1)")
    cp.add_argument("--engines", help="only these engines, comma-separated names as in the table")
    cp.add_argument("--mlx", action="store_true", help="include MLX engines (slow on a CPU)")
    cp.add_argument("--plot", help="write a bar chart (SVG or PNG; needs matplotlib)")
    cp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cp.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Z2ZError as e:
        print(f"z2z-bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
