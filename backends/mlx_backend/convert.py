"""Torch zip2zip checkpoint -> MLX directory (the work behind ``convert/to_mlx.py``).

``convert(src, dst, ...)`` merges the LoRA adapter, writes the decoder through ``mlx_lm.convert``
(quantized if asked), then the hyper-encoders in ``dtype`` (never quantized),
``zip2zip_config.json`` (base ``"."``) and ``z2z_mlx.json`` (provenance; marks the directory as an
MLX conversion). torch, transformers and mlx-lm are imported only when it runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from z2z_chat.backends.config import MLX_ARCHITECTURES, MLX_MARKER
from z2z_chat.backends.errors import ConvertError
from z2z_chat.backends.loading.sources import rope_settings


def log(msg: str) -> None:
    print(f"[to_mlx] {msg}", file=sys.stderr, flush=True)  # progress of a long job goes to stderr


def write_hf_decoder(lm, tokenizer, out: Path) -> None:
    """The merged decoder as a plain HF directory (a GGUF-loaded model refuses save_pretrained)."""
    from safetensors.torch import save_file

    cfg = lm.config.to_dict()
    for k in ("quantization_config", "_name_or_path"):
        cfg.pop(k, None)
    cfg["torch_dtype"] = "float32"
    cfg |= rope_settings(cfg)  # mlx-lm reads only the top-level rope keys
    state = {k: v.detach().float().contiguous().cpu() for k, v in lm.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(out)


def convert(src: str, dst: Path, *, quantize: int | None = None, q_group_size: int = 64,
            dtype: str = "float16", force: bool = False, base: str | None = None) -> list[Path]:
    if dst.exists():
        if not force:
            raise ConvertError(f"{dst} already exists; pass --force to replace it")
        shutil.rmtree(dst)
    import torch
    from mlx_lm import convert as mlx_convert
    from safetensors.torch import save_file

    from z2z_chat.backends.torch_backend import checkpoint

    log(f"loading {src} (torch, float32)")
    loaded = checkpoint.load(src, base=base, dtype=torch.float32, merge_lora=True)
    lm = loaded.model.lm
    arch = lm.config.model_type
    if arch not in MLX_ARCHITECTURES:
        raise ConvertError(f"architecture {arch!r} is not supported by the MLX backend ({', '.join(MLX_ARCHITECTURES)})")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing the merged {arch} decoder")
        write_hf_decoder(lm, loaded.tokenizer, Path(tmp) / "hf")
        log("converting the decoder with mlx_lm" + (f" ({quantize}-bit, group {q_group_size})" if quantize else ""))
        with contextlib.redirect_stdout(sys.stderr):  # mlx_lm prints its progress; stdout stays clean
            mlx_convert(str(Path(tmp) / "hf"), str(dst), quantize=bool(quantize),
                        q_group_size=q_group_size if quantize else None, q_bits=quantize, dtype=dtype)
    log("writing the hyper-encoders and zip2zip_config.json")
    tdtype = getattr(torch, dtype)
    m = loaded.model
    state = {f"input_encoder.{k}": v for k, v in m.input_encoder.state_dict().items()}
    if m.output_encoder is not None:
        state |= {f"output_encoder.{k}": v for k, v in m.output_encoder.state_dict().items()}
    save_file({k: v.detach().to(tdtype).contiguous() for k, v in state.items()}, dst / "zip2zip_encoders.safetensors")
    cfg = loaded.config.to_dict() | {"base_model_name_or_path": "."}
    (dst / "zip2zip_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (dst / MLX_MARKER).write_text(json.dumps({"source": str(src), "base": loaded.config.base_model_name_or_path,
                                                  "dtype": dtype, "quantize": quantize,
                                                  "q_group_size": q_group_size if quantize else None}, indent=2))
    return sorted(p for p in dst.iterdir() if p.is_file())
