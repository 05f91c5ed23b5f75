"""Open a model on a backend: the one place that picks and lazily imports a framework.

``open_runtime(model, backend="auto", device="auto")`` returns a ``Runtime``: the backend, the
tokenizer, the codec config, the zip2zip config and a description for status lines. ``auto``
picks MLX on Apple silicon when it is installed and the model is an MLX conversion, torch
otherwise. Errors are ``RuntimeOpenError`` with a message that says what to do.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codec import CodecConfig
from .config import Zip2ZipConfig
from .engine import Backend, Session
from .errors import Z2ZError

BACKENDS = ("auto", "torch", "mlx")


class RuntimeOpenError(Z2ZError, RuntimeError):
    """A model or backend could not be opened."""


@dataclass
class Runtime:
    backend: Backend
    tokenizer: Any
    codec: CodecConfig
    config: Zip2ZipConfig
    backend_name: str
    model_name: str
    device: str
    base: str = ""  # the base model it runs on, as loaded

    def session(self, system: str | None = None) -> Session:
        return Session(self.backend, self.tokenizer, self.codec,
                       position_mode=self.config.position_mode, system=system)

    def describe(self) -> str:
        name = Path(self.model_name).name if Path(self.model_name).exists() else self.model_name
        return f"{self.backend_name} | {name} | {self.device}"


MLX_MARKER = "z2z_mlx.json"  # written into every MLX conversion (backends/mlx_convert.py)


def is_mlx_dir(model: str) -> bool:
    return (Path(model) / MLX_MARKER).is_file()


def _pick(backend: str, model: str) -> str:
    if backend not in BACKENDS:
        raise RuntimeOpenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        backend = "mlx" if is_mlx_dir(model) or (apple and importlib.util.find_spec("mlx_lm")) else "torch"
    return backend


def mlx_conversion(model: str, base: str | None) -> str:
    """An MLX conversion of a torch checkpoint, made once into the user's cache."""
    import hashlib

    from .assets import cache_dir

    if is_mlx_dir(model):
        return model
    key = hashlib.sha256(f"{Path(model).resolve() if Path(model).exists() else model}|{base}".encode()).hexdigest()[:16]
    dst = cache_dir() / "mlx" / key
    if not is_mlx_dir(str(dst)):
        from .mlx_convert import ConvertError, convert

        try:
            convert(model, dst, force=True, base=base)
        except ConvertError as e:
            raise RuntimeOpenError(str(e)) from None
    return str(dst)


def open_runtime(model: str | None = None, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                 base: str | None = None, progress: Callable[[str], None] | None = None) -> Runtime:
    """Open ``model`` (a checkpoint directory, repo id or MLX conversion; None: the embedded default)."""
    if model is None:
        from .assets import AssetError
        from .defaults import default_model

        try:
            model, default_base = default_model(progress=progress)
        except AssetError as e:
            raise RuntimeOpenError(str(e)) from None
        base = base or default_base
    name = _pick(backend, model)
    if name == "mlx":
        _need_mlx()
        return _open_mlx(mlx_conversion(model, base))
    if importlib.util.find_spec("torch") is None:
        raise RuntimeOpenError('the torch backend needs torch and transformers: pip install "z2z-chat[torch]"')
    from .torch_backend import checkpoint
    from .torch_backend.backend import TorchBackend, pick_device

    try:
        dev, dt = pick_device(device, dtype)
        loaded = checkpoint.load(model, base=base, device=dev, dtype=dt)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise RuntimeOpenError(str(e)) from None
    return Runtime(TorchBackend(loaded.model), loaded.tokenizer, loaded.codec, loaded.config,
                   "torch", str(model), f"{dev.type} {str(dt).removeprefix('torch.')}", loaded.base)


def _need_mlx() -> None:
    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
        raise RuntimeOpenError('the MLX backend needs mlx and mlx-lm: pip install "z2z-chat[mlx]" '
                               '(on Linux: pip install "mlx[cpu]" mlx-lm)')


def _open_mlx(model: str) -> Runtime:
    from .mlx_backend.backend import MLXBackend

    try:
        backend, tok = MLXBackend.open(model)
    except (ValueError, OSError) as e:
        raise RuntimeOpenError(f"{e}. Convert a torch checkpoint with: python convert/to_mlx.py SRC DST") from None
    import mlx.core as mx

    m = backend.model
    return Runtime(backend, tok, m.config.codec_config(m.pad_id), m.config, "mlx", str(model),
                   f"{mx.default_device()} {str(m.dtype).removeprefix('mlx.core.')}")


def open_plain(rt: Runtime, base: str | None = None, device: str = "auto", dtype: str = "auto") -> Runtime:
    """The base model of ``rt`` without zip2zip (torch), for side-by-side comparisons."""
    from dataclasses import replace

    from .codec import CodecConfig
    from .torch_backend import checkpoint
    from .torch_backend.backend import PlainBackend, pick_device

    dev, dt = pick_device(device, dtype)
    spec = base or rt.base or rt.config.base_model_name_or_path
    try:
        lm = checkpoint.load_base(spec, dt, dev)
    except checkpoint.CheckpointError as e:
        raise RuntimeOpenError(str(e)) from None
    c = rt.codec
    plain = CodecConfig(c.base_vocab_size, 0, 1, c.disabled_ids, c.pad_id)
    return Runtime(PlainBackend(lm, c.base_vocab_size), rt.tokenizer, plain,
                   replace(rt.config, position_mode="compressed"), "torch", f"{spec} (plain)", rt.device)
