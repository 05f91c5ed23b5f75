"""A zip2zip checkpoint to a directory the llama.cpp backend runs (``convert/to_gguf.py``).

Output directory:
- ``model.gguf``: the base decoder. A GGUF base is reused as it is (hard-linked or copied: it
  is what the adapter was trained on); HF weights (a local directory or a cached hub id) are
  written with ``gguf`` in f32, f16 or q8_0: Llama (SmolLM2), Mistral, Qwen2 and Phi-3 decoders
  (``tensors.ARCHS``; the architectures the MLX backend runs).
- the LoRA adapter, ``lora="merge"`` (default): merged into the weights (exactly, in float32,
  before an HF base is written; into a q8_0 copy of a quantized GGUF base): it decodes as fast
  as the base, where a run-time adapter costs every step (README, "llama.cpp").
  ``lora="adapter"``: ``lora.gguf``, a llama.cpp adapter applied at load (smaller on disk).
- ``zip2zip_config.json`` (base ``model.gguf``), the hyper-encoders (float32 safetensors) and the
  tokenizer files.

No torch needed. Progress lines go to ``progress``; failures are ``ConvertError`` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from z2z_chat.backends.loading.checkpoint import Checkpoint, snapshot
from z2z_chat.backends.config import CONFIG_NAME, lora_scale_of
from z2z_chat.backends.errors import ConvertError
from z2z_chat.backends.loading.sources import is_gguf, load_tokenizer, pad_id_of

def _hf_state(base: Path) -> tuple[Mapping[str, np.ndarray], dict]:
    """The base's weights, read one tensor at a time (a 4B model is 15 GB of float32), and config."""
    from collections import ChainMap

    from z2z_chat.backends.llamacpp_backend.tensors import ARCHS, SafetensorsFile

    cfg_file = base / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{base} has no config.json: is it a Hugging Face model directory?")
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise ConvertError(f"{base}: architecture {arch} is not supported by convert/to_gguf.py "
                           f"(supported: {', '.join(ARCHS)}); run it with --backend torch or mlx")
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{base} has no .safetensors weights")
    return ChainMap(*(SafetensorsFile(f) for f in files)), config


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


LORA_MODES = ("merge", "adapter")


class _Merged(Mapping[str, np.ndarray]):
    """HF weights with a PEFT LoRA adapter merged as each is read: W + alpha / r * B @ A (float32)."""

    def __init__(self, state: Mapping[str, np.ndarray], peft: dict[str, np.ndarray], alpha: float):
        import re

        key = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.default)?\.weight$")
        self.state, self.alpha, self.pairs = state, alpha, {}
        for k, v in peft.items():
            m = key.search(k)
            if m is None:
                raise ConvertError(f"adapter tensor {k} is not a LoRA A/B weight of a decoder layer")
            self.pairs.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = v
        missing = [k for k in self.pairs if k not in state]
        if missing:
            raise ConvertError(f"the adapter adapts {missing[0]}, which the base model does not have: wrong base?")

    def __getitem__(self, name: str) -> np.ndarray:
        w = self.state[name]
        ab = self.pairs.get(name)
        return w if ab is None else w + (self.alpha / ab["A"].shape[0]) * (ab["B"] @ ab["A"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def convert(src: str, dst: str | Path, quantize: str = "f32", base: str | None = None, force: bool = False,
            progress: Callable[[str], None] = lambda m: None, lora: str = "merge") -> list[Path]:
    from z2z_chat.backends.llamacpp_backend.tensors import (
        check_gguf,
        ARCHS,
        merge_lora_gguf,
        read_safetensors,
        write_lora_gguf,
        write_model_gguf,
    )

    if lora not in LORA_MODES:
        raise ConvertError(f"lora must be one of {LORA_MODES}, got {lora!r}")

    ck = Checkpoint.open(src, base, progress)
    ckpt, config, spec = ck.dir, ck.config, ck.base
    dst = Path(dst)
    if config.position_mode != "compressed":
        raise ConvertError(f"{ckpt} uses position_mode {config.position_mode!r}, which stock llama.cpp cannot "
                           "run (it needs contiguous positions); use --backend torch or mlx")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise ConvertError(f"{dst} exists and is not empty; pass --force to replace it")
    dst.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(ck.tokenizer_source)
    out = dst / "model.gguf"
    peft = alpha = None
    if ck.has_adapter:
        _, alpha = lora_scale_of(ckpt)
        peft = read_safetensors(ckpt / "adapter_model.safetensors")
    if is_gguf(spec):
        meta = check_gguf(spec)
        arch = meta.get("general.architecture")
        n_head, n_kv = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv")
        if peft is not None and lora == "merge":
            qtype = quantize if quantize in ("q8_0", "f16") else "q8_0"
            progress(f"base: {spec} with the LoRA adapter merged -> {out} ({qtype})")
            merge_lora_gguf(spec, out, peft, alpha, qtype, progress)
            peft = None
        else:
            if quantize != "f32":
                progress(f"{spec} is already a GGUF: reused as it is (--quantize applies to HF weights)")
            progress(f"base: {spec} -> {out}")
            _place(Path(spec), out)
    else:
        base_dir = Path(spec) if Path(spec).is_dir() else snapshot(spec)
        progress(f"reading {base_dir}")
        state, hf_config = _hf_state(base_dir)
        n_head = hf_config["num_attention_heads"]
        n_kv = hf_config.get("num_key_value_heads") or n_head
        arch = ARCHS[hf_config["architectures"][0]]
        if peft is not None and lora == "merge":
            progress("merging the LoRA adapter (float32, as each weight is written)")
            state = _Merged(state, peft, alpha)
            peft = None
        progress(f"writing {out} ({quantize})")
        write_model_gguf(out, state, hf_config, tok, quantize)
    written = [out]
    if peft is not None:
        progress(f"writing {dst / 'lora.gguf'} (LoRA adapter, alpha {alpha})")
        written.append(write_lora_gguf(dst / "lora.gguf", peft, alpha, int(n_head), int(n_kv or n_head), arch))
    from safetensors.numpy import save_file

    save_file(read_safetensors(ck.encoders), dst / "zip2zip_encoders.safetensors")
    written.append(dst / "zip2zip_encoders.safetensors")
    # the tokenizer as loaded here, not its files copied: its class comes from the base's config.json
    # (not copied), and a tokenizer without a pad token gets that class's default; the pad id the
    # encoders pad entries with must stay the one torch uses (Qwen2's class gave 0, the bare files eos)
    written += [Path(f) for f in tok.save_pretrained(dst) if Path(f).is_file()]
    if pad_id_of(load_tokenizer(dst)) != pad_id_of(tok):
        raise ConvertError(f"{dst}: the converted tokenizer's pad id differs from {ck.tokenizer_source}'s")
    d = config.to_dict() | {"base_model_name_or_path": "model.gguf"}
    (dst / CONFIG_NAME).write_text(json.dumps(d, indent=2, sort_keys=True), encoding="utf-8")
    written.append(dst / CONFIG_NAME)
    return written
