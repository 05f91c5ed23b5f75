"""``z2z-chat serve``: parse the options, load the model once, run the app under uvicorn.

Loopback by default; another ``--host`` without ``--api-key`` is allowed with a warning (anyone
who can reach the port can use the model). Ctrl+C / SIGTERM: the worker cancels the reply in
flight (its stream ends with a finish reason and ``[DONE]``) and the waiting ones (503), uvicorn
closes the connections and re-raises the signal, as it does for every app (exit status 130/143).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _port(value: str) -> int:
    n = _positive(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from z2z_chat.app.options import Parser, add_model_args, add_setting_args

    p = Parser(prog="z2z-chat serve", description="Serve a zip2zip model with the OpenAI chat API on this machine.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    add_model_args(p)
    p.add_argument("--model-id", help="the model name clients send and /v1/models lists (default: from --model)")
    p.add_argument("--api-key", default=os.environ.get("Z2Z_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (also from $Z2Z_API_KEY)")
    p.add_argument("--slots", type=_positive, default=4,
                   help="conversations whose KV cache and codebook are held at once (default 4)")
    p.add_argument("--cache-mb", type=_positive, default=1024, help="KV cache budget over those conversations")
    p.add_argument("--max-queue", type=_positive, default=16, help="requests waiting before 429 (default 16)")
    p.add_argument("--max-body-mb", type=_positive, default=16, help="largest request body, else 413 (default 16)")
    p.add_argument("--cache-dir", type=Path,
                   help="where conversations are parked on disk (default: the user cache's serve/ directory)")
    p.add_argument("--disk-cache-mb", type=_positive, default=4096,
                   help="disk budget of parked conversations, least recently used out first (default 4096)")
    p.add_argument("--no-disk-cache", action="store_true",
                   help="park conversations in memory only (their KV caches are read again when they return)")
    p.add_argument("--quiet", action="store_true", help="no access log on stderr")
    add_setting_args(p, ("max_tokens", "hyper_margin", "hyper_batch"))  # a request's own values win
    return p


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is said at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): is another server using it? "
                      "Pick another with --port") from None
    sock.listen(128)
    return sock


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from z2z_chat.app.server.http import build_app
    except ImportError as e:
        print(f'z2z-chat serve: needs starlette and uvicorn ({e}): pip install "z2z-chat[serve]"', file=sys.stderr)
        return 1
    from z2z_chat.backends.engine.kv_store import KVStore
    from z2z_chat.backends.errors import Z2ZError
    from z2z_chat.backends.loading.assets import cache_dir
    from z2z_chat.backends.runtime import open_runtime

    if not _loopback(args.host) and not args.api_key:
        print(f"z2z-chat serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        print(f"z2z-chat serve: error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="[z2z-chat] %(message)s", stream=sys.stderr)
    logging.getLogger("z2z-chat.access").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        rt = open_runtime(args.model, args.backend, args.device, args.dtype, base=args.base,
                          progress=lambda m: print(f"[z2z-chat] {m}", file=sys.stderr, flush=True))
    except Z2ZError as e:
        print(f"z2z-chat serve: error: {e}", file=sys.stderr)
        sock.close()
        return 1
    store = None if args.no_disk_cache else KVStore((args.cache_dir or cache_dir() / "serve"), rt.identity,
                                                    args.disk_cache_mb << 20)
    model_id = args.model_id or (Path(args.model).name if args.model else "z2z-default")
    app = build_app(rt, model_id, api_key=args.api_key, slots=args.slots, cache_mb=args.cache_mb,
                    max_queue=args.max_queue, store=store, max_body_mb=args.max_body_mb,
                    defaults={k: getattr(args, k) for k in ("max_tokens", "hyper_margin", "hyper_batch")})
    held = len(app.state.conversations.parked)
    print(f"[z2z-chat] serving {model_id} ({rt.describe()}) on http://{args.host}:{args.port}/v1"
          + (f"; {held} conversation(s) parked on disk" if held else ""), file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            app.state.worker.stop()  # replies in flight end now (their streams close properly)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
    try:
        Server(config).run(sockets=[sock])
    finally:
        rt.close()
    return 0
