"""``z2z-convert gguf|mlx SRC DST [...]`` (also ``python -m z2z_chat.convert``): the installed form
of ``python convert/to_gguf.py`` and ``python convert/to_mlx.py``; the arguments after the target
are theirs (``z2z-convert gguf --help``)."""

from __future__ import annotations

import sys

from z2z_chat.convert import to_gguf, to_mlx

TARGETS = {"gguf": to_gguf.main, "mlx": to_mlx.main}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in TARGETS:
        print(f"usage: z2z-convert {{{','.join(TARGETS)}}} SRC DST [options]\n"
              "  gguf: a torch zip2zip checkpoint to a directory the llama.cpp backend runs\n"
              "  mlx:  a torch zip2zip checkpoint to a directory the MLX backend runs", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    return TARGETS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
