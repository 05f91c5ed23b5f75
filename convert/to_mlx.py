"""``python convert/to_mlx.py SRC DST [--quantize 4|8] [--q-group-size N] [--dtype D] [--force]``
(also ``python -m z2z_chat.convert.to_mlx``): a torch zip2zip checkpoint to a directory the MLX backend
runs.

SRC is a zip2zip checkpoint (directory or hub id; its base from an HF directory, hub id or
GGUF). The LoRA adapter is merged into the decoder, which ``mlx_lm.convert`` writes in mlx-lm's
format (config, safetensors, tokenizer files), quantized if asked. Beside it go
``zip2zip_config.json`` (base ``"."``: the decoder is in the directory) and the hyper-encoder
weights, in ``--dtype`` (the encoders are never quantized: their numerics carry the hypertokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from z2z_chat.backends.errors import Z2ZError, needs_extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert/to_mlx.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="zip2zip checkpoint (directory or hub id)")
    p.add_argument("dst", type=Path, help="output directory")
    p.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the decoder to 4 or 8 bits")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--base", help="override the checkpoint's base model")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    a = p.parse_args(argv)
    try:
        try:
            from z2z_chat.backends.mlx_backend.convert import convert

            files = convert(a.src, a.dst, quantize=a.quantize, q_group_size=a.q_group_size, dtype=a.dtype,
                            force=a.force, base=a.base)
        except ModuleNotFoundError as e:
            raise needs_extra(e, "convert/to_mlx.py", "torch,mlx") from None
    except Z2ZError as e:
        print(f"to_mlx: error: {e}", file=sys.stderr)
        return 1
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        print(f"{f}  {size / 1e6:.2f} MB")
    print(f"wrote {len(files)} files, {total / 1e6:.1f} MB, to {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
