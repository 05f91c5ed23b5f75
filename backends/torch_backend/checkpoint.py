"""zip2zip checkpoints (the ``zip2zip`` 0.2.0 format) to and from ``Zip2ZipLM``.

``load`` opens a ``backends.checkpoint.Checkpoint`` (directory, base, tokenizer, encoders, adapter:
the rules live there) and builds the torch model from it; ``save`` writes one. Every failure is a
``CheckpointError`` naming the file and the problem; nothing is ever replaced by random weights.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from z2z_chat.backends.loading.assets import as_siblings

from z2z_chat.backends.loading.checkpoint import ENCODER_FILES, Checkpoint
from z2z_chat.backends.codec import CodecConfig
from z2z_chat.backends.config import ADAPTER_CONFIG, CONFIG_NAME, Zip2ZipConfig, lora_scale_of
from z2z_chat.backends.errors import CheckpointError
from z2z_chat.backends.loading.sources import checkpoint_tokenizer, is_gguf
from z2z_chat.backends.torch_backend.model import Zip2ZipLM


@dataclass
class TorchCheckpoint:
    model: Zip2ZipLM
    tokenizer: Any
    config: Zip2ZipConfig
    codec: CodecConfig
    base: str  # the base model actually loaded (resolved path, GGUF file or repo id)


def load_base(spec: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A transformers causal LM from an HF directory, a repo id or a ``.gguf`` file (as
    ``Checkpoint.open`` resolved it)."""
    from transformers import AutoModelForCausalLM

    try:
        if is_gguf(spec):
            p = Path(spec)
            with _quiet_dequantization():
                lm = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot load the base model {spec}: {e}") from e
    return lm.to(device).eval()


def _quiet_dequantization():
    """transformers draws a bar per GGUF tensor; in a pipe that is dozens of lines before any
    error. On a terminal it stays (it is progress); elsewhere it is switched off."""
    import contextlib
    import functools
    from unittest import mock

    if sys.stderr is not None and sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils

    return mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", functools.partial(tqdm, disable=True))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_encoders(model: Zip2ZipLM, file: Path) -> None:
    state = _read_safetensors(file)
    for k, v in state.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{file}: {k} is {v.dtype}, expected floating-point weights")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{file}: {k} holds NaN or infinite values (a diverged training run?)")
    parts = {"input_encoder": model.input_encoder, "output_encoder": model.output_encoder}
    for prefix, module in parts.items():
        if module is None:
            continue
        sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not sub:
            raise CheckpointError(f"{file} has no {prefix}.* weights")
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{file}: {prefix} does not match the config "
                                  f"({CONFIG_NAME}): {e}") from None
    stray = [k for k in state if not k.startswith(tuple(p + "." for p, m in parts.items() if m is not None))]
    if stray:
        raise CheckpointError(f"{file} has weights the config does not use: {stray[:4]}")


def _load_adapter(lm: torch.nn.Module, ckpt: Path, merge: bool) -> torch.nn.Module:
    from peft import PeftModel

    weights = ckpt / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{ckpt} has {ADAPTER_CONFIG} but no adapter_model.safetensors")
    state = _read_safetensors(weights)
    lora_scale_of(ckpt)  # a damaged adapter_config.json: the same message on every backend
    try:
        peft = PeftModel.from_pretrained(lm, ckpt, is_trainable=not merge)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: cannot apply the LoRA adapter: {e}") from None
    names = {n for n, _ in peft.named_parameters() if "lora_" in n}
    want = {k.replace(".weight", ".default.weight") for k in state}
    if not want <= names:
        raise CheckpointError(f"{weights}: adapter weights for modules the base model lacks: "
                              f"{sorted(want - names)[:3]}")
    return peft.merge_and_unload() if merge else peft


def load(spec: str | os.PathLike, *, base: str | os.PathLike | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         merge_lora: bool = True) -> TorchCheckpoint:
    """Load a zip2zip checkpoint with its base model and tokenizer."""
    ck = Checkpoint.open(spec, base)
    tokenizer, pad = checkpoint_tokenizer(ck)
    lm = load_base(ck.base, dtype, torch.device(device))
    if ck.has_adapter:
        lm = _load_adapter(lm, ck.dir, merge_lora)
    try:
        model = Zip2ZipLM(ck.config, lm, pad)
    except ValueError as e:
        raise CheckpointError(f"{ck.dir}: {e}") from e
    load_encoders(model, ck.encoders)
    return TorchCheckpoint(model.eval(), tokenizer, ck.config, ck.config.codec_config(pad), ck.base)


def save(model: Zip2ZipLM, directory: str | os.PathLike, tokenizer: Any = None,
         full: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config, encoders, and the LoRA adapter if the decoder carries one (unmerged).

    ``full``: whole tensors by ``model.named_parameters()`` name, used in place of the model's own
    parameters (a sharded training run gathers them first: its parameters hold one shard each)."""
    full = full or {}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out)
    state = {}
    for part in ("input_encoder", "output_encoder"):
        module = getattr(model, part)
        if module is not None:
            state |= {f"{part}.{k}": full.get(f"{part}.{k}", v) for k, v in module.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out / ENCODER_FILES[0])
    if hasattr(model.lm, "peft_config"):
        lm_full = {k.removeprefix("lm."): v for k, v in full.items() if k.startswith("lm.")}
        with warnings.catch_warnings():  # peft warns at every save about the base it cannot reach offline
            warnings.simplefilter("ignore", UserWarning)
            model.lm.save_pretrained(out, state_dict=lm_full or None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    as_siblings(out / ENCODER_FILES[0], out / "adapter_model.safetensors")
    return out
