"""zip2zip checkpoints (the ``zip2zip`` 0.2.0 format) to and from ``Zip2ZipLM``.

A checkpoint is a directory or a Hugging Face repo id holding ``zip2zip_config.json``,
``zip2zip_encoders.safetensors`` (alias ``encoders.safetensors``) and either a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) or nothing (the base as it is). Its
base model is ``base_model_name_or_path``: ``"."`` (the checkpoint holds the decoder), a path
(absolute, or relative to the checkpoint so checkpoints can be moved), a ``.gguf`` file, or a
repo id. Every failure is a ``CheckpointError`` naming the file and the problem; nothing is
ever replaced by random weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..codec import CodecConfig
from ..config import CONFIG_NAME, ConfigError, Zip2ZipConfig, lora_scale_of
from ..errors import Z2ZError
from ..sources import SourceError, checkpoint_tokenizer, is_gguf
from .model import Zip2ZipLM

ENCODER_FILES = ("zip2zip_encoders.safetensors", "encoders.safetensors")
ADAPTER_CONFIG = "adapter_config.json"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class CheckpointError(Z2ZError, RuntimeError):
    """A checkpoint or its base model could not be loaded; the message names the file."""


@dataclass
class Loaded:
    model: Zip2ZipLM
    tokenizer: Any
    config: Zip2ZipConfig
    codec: CodecConfig
    base: str  # the base model actually loaded (resolved path, GGUF file or repo id)


def resolve(spec: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``spec`` (a directory, or a hub repo id fetched/cached)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: it is not a zip2zip checkpoint")
        return path
    if path.exists() or not _REPO_ID.match(str(spec)):
        raise CheckpointError(f"{spec} is neither a checkpoint directory nor a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(spec), local_files_only=True))  # cached: no network at all
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise CheckpointError(
            f"{spec} is not in the Hugging Face cache and the hub cannot be reached (offline, or "
            f"HF_HUB_OFFLINE=1). Run `hf download {spec}` where you are online, or pass a local "
            "directory.")
    try:
        return Path(snapshot_download(str(spec)))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{spec} could not be fetched from the Hugging Face hub") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"cannot fetch {spec} from the Hugging Face hub: {e}") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: a failing download retries for most of a minute, this
    says no in seconds."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _base_spec(config: Zip2ZipConfig, ckpt: Path, override: str | os.PathLike | None) -> str:
    spec = str(override) if override is not None else config.base_model_name_or_path
    if spec == ".":
        return str(ckpt)
    if override is None and not Path(spec).is_absolute() and (ckpt / spec).exists():
        return str((ckpt / spec).resolve())  # stored relative to the checkpoint
    return spec


def load_base(spec: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A transformers causal LM from an HF directory, a repo id or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM

    try:
        if is_gguf(spec):
            p = Path(spec)
            if not p.is_file():
                raise CheckpointError(f"base model GGUF {spec} does not exist")
            lm = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
        else:
            if not Path(spec).exists() and not _REPO_ID.match(spec):
                raise CheckpointError(f"base model {spec} is neither a local path nor a Hugging Face repo id")
            lm = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except CheckpointError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot load the base model {spec}: {e}") from e
    return lm.to(device).eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_encoders(model: Zip2ZipLM, ckpt: Path) -> None:
    file = next((ckpt / n for n in ENCODER_FILES if (ckpt / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{ckpt} has no hyper-encoder weights ({' or '.join(ENCODER_FILES)})")
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
    try:
        lora_scale_of(ckpt)  # a damaged adapter_config.json: the same message on every backend
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
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
         merge_lora: bool = True) -> Loaded:
    """Load a zip2zip checkpoint with its base model and tokenizer."""
    ckpt = resolve(spec)
    try:
        config = Zip2ZipConfig.load(ckpt)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    base_spec = _base_spec(config, ckpt, base)
    try:
        tokenizer, pad = checkpoint_tokenizer(ckpt, config.compression.initial_vocab_size, base_spec)
    except SourceError as e:
        raise CheckpointError(str(e)) from None
    device = torch.device(device)
    lm = load_base(base_spec, dtype, device)
    if (ckpt / ADAPTER_CONFIG).is_file() and base_spec != str(ckpt):
        lm = _load_adapter(lm, ckpt, merge_lora)
    try:
        model = Zip2ZipLM(config, lm, pad)
    except ValueError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    load_encoders(model, ckpt)
    return Loaded(model.eval(), tokenizer, config, config.codec_config(pad), base_spec)


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
        model.lm.save_pretrained(out, state_dict=lm_full or None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
