"""Open a model on a backend: the one place that picks and lazily imports a framework.

``open_runtime(model, backend="auto", device="auto")`` returns a ``Runtime``: the backend, the
tokenizer, the codec config, the zip2zip config and a description for status lines. ``auto``
picks MLX on Apple silicon when it is installed and the model is an MLX conversion, torch
otherwise. Errors are ``RuntimeOpenError`` with a message that says what to do.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from typing import Any

from .codec import CodecConfig
from .config import Zip2ZipConfig
from .engine import Backend, Session

BACKENDS = ("auto", "torch", "mlx")


class RuntimeOpenError(RuntimeError):
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

    def session(self, system: str | None = None) -> Session:
        return Session(self.backend, self.tokenizer, self.codec,
                       position_mode=self.config.position_mode, system=system)

    def describe(self) -> str:
        return f"{self.backend_name} | {self.model_name} | {self.device}"


def _pick(backend: str) -> str:
    if backend not in BACKENDS:
        raise RuntimeOpenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        backend = "mlx" if apple and importlib.util.find_spec("mlx") else "torch"
    return backend


def open_runtime(model: str, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                 base: str | None = None) -> Runtime:
    name = _pick(backend)
    if name == "mlx":
        raise RuntimeOpenError("the MLX backend is not available in this version; use --backend torch")
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
                   "torch", str(model), f"{dev.type} {str(dt).removeprefix('torch.')}")
