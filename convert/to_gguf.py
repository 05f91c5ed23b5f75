"""``python convert/to_gguf.py CHECKPOINT OUT_DIR [--quantize f32|f16|q8_0] [--base B] [--force]``
(also ``python -m z2z_chat.convert.to_gguf``): a torch zip2zip checkpoint (ours or the ``zip2zip`` 0.2.0
format; a directory or a cached hub id) to a directory that ``z2z-chat --backend llamacpp
--model OUT_DIR`` opens: ``model.gguf`` (the base; a GGUF base is reused, HF weights are
converted; the LoRA adapter merged in, or with ``--lora adapter`` kept as ``lora.gguf``), the
hyper-encoders and the zip2zip config. See ``backends/llamacpp_backend/convert.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from z2z_chat.backends.errors import Z2ZError, needs_extra
from z2z_chat.backends.llamacpp_backend.tensors import QTYPES  # numpy only


def main(argv: list[str] | None = None) -> int:
    # transformers reads the tokenizer only; without torch it says at import that models will not
    # be available, which is true and not this command's business
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    p = argparse.ArgumentParser(prog="convert/to_gguf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="zip2zip checkpoint (directory or hub id)")
    p.add_argument("dst", type=Path, help="output directory")
    p.add_argument("--quantize", default="f32", choices=QTYPES, help="type of the converted base (HF weights)")
    p.add_argument("--base", help="override the checkpoint's base model (HF directory or .gguf)")
    p.add_argument("--lora", default="merge", choices=["merge", "adapter"],
                   help="merge the LoRA adapter into the weights (default, fastest) or keep it as lora.gguf")
    p.add_argument("--force", action="store_true", help="replace files in DST")
    a = p.parse_args(argv)
    try:
        try:
            from z2z_chat.backends.llamacpp_backend.convert import convert

            files = convert(a.src, a.dst, a.quantize, base=a.base, force=a.force, lora=a.lora,
                            progress=lambda m: print(f"to_gguf: {m}", file=sys.stderr))
        except ModuleNotFoundError as e:
            raise needs_extra(e, "convert/to_gguf.py", "llamacpp") from None
    except Z2ZError as e:
        print(f"to_gguf: error: {e}", file=sys.stderr)
        return 1
    total = 0
    for f in files:
        total += f.stat().st_size
        print(f"{f}  {f.stat().st_size / 1e6:.2f} MB")
    print(f"wrote {len(files)} files, {total / 1e6:.1f} MB, to {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
