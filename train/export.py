"""``python -m z2z_chat.train.export SRC DST [--base ID] [--dtype bfloat16]``: a trained checkpoint, made small
for shipping: adapter and encoders cast to ``--dtype``, tokenizer files kept, the base model
recorded as ``--base`` (a hub id or path; the place it was trained from is machine-specific)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from z2z_chat.backends.errors import Z2ZError
from z2z_chat.backends.loading.assets import as_siblings


class ExportError(Z2ZError):
    """The source is not a checkpoint that can be exported."""


KEEP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
        "adapter_config.json")


def export(src: Path, dst: Path, base: str | None, dtype: torch.dtype) -> list[Path]:
    if not (src / "zip2zip_config.json").is_file():
        raise ExportError(f"{src} is not a zip2zip checkpoint (no zip2zip_config.json)")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("zip2zip_encoders.safetensors", "adapter_model.safetensors"):
        if (src / name).is_file():
            state = {k: v.to(dtype) for k, v in load_file(src / name).items()}
            save_file(state, dst / name)
            as_siblings(dst / name)
            written.append(dst / name)
    for name in KEEP:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            written.append(dst / name)
    cfg = json.loads((src / "zip2zip_config.json").read_text())
    if base:
        cfg["base_model_name_or_path"] = base
    if (dst / "adapter_config.json").is_file() and base:
        ac = json.loads((dst / "adapter_config.json").read_text())
        ac["base_model_name_or_path"] = base
        (dst / "adapter_config.json").write_text(json.dumps(ac, indent=2, sort_keys=True))
    (dst / "zip2zip_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    written.append(dst / "zip2zip_config.json")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m z2z_chat.train.export", description=__doc__)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--base", help="base model to record (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args(argv)
    try:
        files = export(a.src, a.dst, a.base, getattr(torch, a.dtype))
    except Z2ZError as e:
        print(f"train.export: error: {e}", file=sys.stderr)
        return 1
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f}  {f.stat().st_size / 1e6:.2f} MB")
    print(f"total {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
