"""A zip2zip checkpoint located and read once, with no framework: every backend and converter
starts from ``Checkpoint.open(spec, base)`` and turns it into its own loaded model.

A checkpoint is a directory (or a Hugging Face repo id, found in the local cache or fetched)
holding ``zip2zip_config.json``, the hyper-encoders (``zip2zip_encoders.safetensors``, alias
``encoders.safetensors``) and, when the decoder was fine-tuned, a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``). Its base, one rule everywhere:

- ``base`` given (``--base``): that path (relative to the current directory) or repo id;
- else the config's ``base_model_name_or_path``: ``"."`` is the checkpoint directory itself; a
  relative path that exists inside the checkpoint is taken from there (checkpoints can be moved);
  the embedded default model's base is the GGUF ``assets.smollm2_gguf()`` keeps in the cache;
  anything else is an absolute path or a repo id as written.

A base given as a repo id that is not in the Hugging Face cache while the hub cannot be reached
fails here, in seconds, naming ``--base`` (a download would retry for most of a minute).
Failures are ``CheckpointError`` naming the file; a ``Z2ZError`` from below passes unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from z2z_chat.backends.config import ADAPTER_CONFIG, CONFIG_NAME, Zip2ZipConfig
from z2z_chat.backends.errors import CheckpointError

ENCODER_FILES = ("zip2zip_encoders.safetensors", "encoders.safetensors")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Checkpoint:
    dir: Path
    config: Zip2ZipConfig
    base: str  # resolved: a local path (directory or .gguf file) or a repo id
    tokenizer_source: str  # the checkpoint's own tokenizer files, else the base's
    encoders: Path
    has_adapter: bool  # a PEFT adapter to apply to the base (never when the base is the checkpoint)

    @classmethod
    def open(cls, spec: str | os.PathLike, base: str | os.PathLike | None = None,
             progress: Callable[[str], None] | None = None) -> Checkpoint:
        ckpt = resolve(spec)
        config = Zip2ZipConfig.load(ckpt)
        encoders = encoder_file(ckpt)
        base_spec = base_of(ckpt, config, base, progress)
        own_tokenizer = (ckpt / "tokenizer_config.json").is_file()
        return cls(ckpt, config, base_spec, str(ckpt) if own_tokenizer else base_spec, encoders,
                   (ckpt / ADAPTER_CONFIG).is_file() and base_spec != str(ckpt))


def encoder_file(ckpt: Path) -> Path:
    """The hyper-encoder weights of a checkpoint directory."""
    found = next((ckpt / n for n in ENCODER_FILES if (ckpt / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{ckpt} has no hyper-encoder weights ({' or '.join(ENCODER_FILES)})")
    return found


def base_of(ckpt: Path, config: Zip2ZipConfig, override: str | os.PathLike | None,
            progress: Callable[[str], None] | None = None) -> str:
    """The base model of a checkpoint, by the rule in this module's docstring."""
    if override is not None:
        return locate_base(override)
    spec = config.base_model_name_or_path
    if spec == ".":
        return str(ckpt)
    if not Path(spec).is_absolute() and (ckpt / spec).exists():
        return str((ckpt / spec).resolve())
    from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR

    if ckpt.resolve() == DEFAULT_MODEL_DIR:
        from z2z_chat.backends.loading.assets import AssetError, smollm2_gguf

        try:
            return str(smollm2_gguf(progress=progress))
        except AssetError as e:
            raise CheckpointError(str(e)) from None
    return spec if Path(spec).exists() else _hub_base(spec)


def locate_base(spec: str | os.PathLike) -> str:
    """A base given by the user: an existing path (made absolute), else a repo id the cache holds or
    the hub can serve (``CheckpointError`` in seconds otherwise)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise CheckpointError(f"base model {spec} is a file but not a GGUF file: give a .gguf file, a Hugging "
                              "Face model directory or a repo id")
    return str(path.resolve()) if path.exists() else _hub_base(str(spec))


def _hub_base(spec: str) -> str:
    """A base that is not a local path: a repo id the cache holds or the hub can serve."""
    if spec.lower().endswith(".gguf"):
        raise CheckpointError(f"base model GGUF {spec} does not exist")
    if not REPO_ID.match(spec):
        raise CheckpointError(f"base model {spec} is neither a local path nor a Hugging Face repo id")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str) or hub_reachable():
        return spec
    raise CheckpointError(f"the base model {spec} is not in the Hugging Face cache and the hub cannot be reached "
                          "(offline, or HF_HUB_OFFLINE=1): pass --base with a local copy (a directory or a "
                          ".gguf file), or run `hf download " + spec + "` where you are online")


def resolve(spec: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``spec`` (a directory, or a hub repo id fetched/cached)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: it is not a zip2zip checkpoint")
        return path
    if path.exists() or not REPO_ID.match(str(spec)):
        raise CheckpointError(f"{spec} is neither a checkpoint directory nor a Hugging Face repo id")
    return snapshot(str(spec))


def snapshot(repo_id: str) -> Path:
    """The local copy of a Hugging Face repo: from the cache, else fetched when the hub answers."""
    spec = repo_id
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
        raise CheckpointError(f"cannot fetch {spec} from the Hugging Face hub: {e}") from e


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: a failing download retries for most of a minute, this
    says no in seconds."""
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
