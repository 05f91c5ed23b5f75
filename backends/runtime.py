"""Open a model on a backend: the one place that picks and lazily imports a framework.

``open_runtime(model, backend="auto", device="auto")`` returns a ``Runtime``: the loaded model
(shared), the tokenizer, the codec config, the zip2zip config and a description for status lines.
``Runtime.session()`` gives each conversation its own decode state of that model.

``BACKENDS`` is the table: per backend, the module whose ``open_model`` loads a checkpoint
(``protocol.Loaded``), what it needs installed, and the conversion it runs on (MLX and llama.cpp
run a conversion made once into the user cache; torch runs the checkpoint). ``auto`` picks MLX
for MLX conversions and on Apple silicon; torch where CUDA is or a device/dtype is asked for;
llama.cpp where it is installed and the checkpoint's positions are contiguous; else torch.
Errors of ours (``Z2ZError``) pass through; a missing package or a failed conversion is a
``RuntimeOpenError`` that says what to do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from z2z_chat.backends.codec import CodecConfig
from z2z_chat.backends.config import MLX_MARKER, Zip2ZipConfig
from z2z_chat.backends.engine.session import Session
from z2z_chat.backends.errors import Z2ZError
from z2z_chat.backends.protocol import Loaded, Model
from z2z_chat.backends.engine.utf8_guard import Utf8Guard


class RuntimeOpenError(Z2ZError, RuntimeError):
    """A model or backend could not be opened."""


@dataclass
class Runtime:
    model: Model
    tokenizer: Any
    codec: CodecConfig
    config: Zip2ZipConfig
    backend_name: str
    model_name: str
    device: str
    base: str = ""  # the base model it runs on, as loaded

    @classmethod
    def of(cls, loaded: Loaded, backend: str, model_name: str) -> Runtime:
        return cls(loaded.model, loaded.tokenizer, loaded.codec, loaded.config, backend, model_name, loaded.device,
                   loaded.base)

    @cached_property
    def guard(self) -> Utf8Guard:
        """Built once (it decodes the whole vocabulary): every conversation of this runtime shares it."""
        return Utf8Guard(self.tokenizer, self.codec.base_vocab_size)

    def session(self, system: str | None = None) -> Session:
        """A new conversation with its own state (KV cache, hyper slots) of the shared model."""
        return Session(self.model.new_state(), self.tokenizer, self.codec,
                       position_mode=self.config.position_mode, system=system, guard=self.guard)

    def close(self) -> None:
        self.model.close()

    @cached_property
    def identity(self) -> str:
        """Names what a saved KV cache is valid for: the backend, the model's files, the window."""
        return f"{self.backend_name}|{conversion_key(self.model_name, self.base)}|{self.model.context_length}"

    def describe(self) -> str:
        name = Path(self.model_name).name if Path(self.model_name).exists() else self.model_name
        return f"{self.backend_name} | {name} | {self.device}"




def is_mlx_dir(model: str) -> bool:
    return (Path(model) / MLX_MARKER).is_file()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_cuda() -> bool:
    """A CUDA GPU torch could use, decided without importing torch (which costs seconds and a few
    hundred MB to a llama.cpp session): an NVIDIA driver on this machine and a torch build that is
    not CPU-only. Torch itself reports the device when it is picked."""
    if not _installed("torch"):
        return False
    try:
        if "+cpu" in importlib.metadata.version("torch"):
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    if sys.platform == "win32":
        return Path(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvcuda.dll").exists()
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _position_mode(model: str) -> str | None:
    try:
        return Zip2ZipConfig.load(model).position_mode
    except Z2ZError:
        return None  # not a local checkpoint (a hub id): the chosen backend reports the details


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check_exists(model: str) -> None:
    """A path that does not exist is a typo unless it reads as a Hugging Face repo id (org/name)
    whose org is not a local directory (``out/mdl`` next to a directory ``out`` is a mistyped path)."""
    path = Path(model).expanduser()
    if path.exists():
        return
    if not _HUB_ID.fullmatch(model) or path.parent.is_dir():
        raise RuntimeOpenError(f"{model}: no such checkpoint directory (nor a Hugging Face repo id, org/name); "
                               "check the path, or choose the embedded default model")


def _pick(backend: str, model: str, torch_options: bool = False) -> str:
    """``auto``: MLX for MLX conversions and on Apple silicon; CUDA, or a --device/--dtype asked for
    (torch options) -> torch; otherwise llama.cpp when it is installed and the checkpoint's
    positions are contiguous (``compressed``); else torch."""
    if backend != "auto" and backend not in BACKENDS:
        raise RuntimeOpenError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    if is_mlx_dir(model) or (apple and _installed("mlx_lm")):
        return "mlx"
    if not torch_options and _installed("llama_cpp") and _position_mode(model) == "compressed" and not _has_cuda():
        return "llamacpp"
    return "torch"


def conversion_key(model: str, base: str | None) -> str:
    """Names a cached conversion of ``model``: its path, the base, and each of its files' name, size
    and modification time, so a checkpoint retrained in place (or a new default model shipped at
    the same path) gets a new conversion instead of the stale one."""
    import hashlib

    p = Path(model)
    h = hashlib.sha256(f"{p.resolve() if p.exists() else model}|{base}".encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def mlx_conversion(model: str, base: str | None, dtype: str = "auto") -> str:
    """An MLX conversion of a torch checkpoint (float16 unless ``dtype`` says otherwise), made once
    into the user's cache. An MLX directory is used as it is: a ``dtype`` it was not converted in is
    an error, not silently ignored."""
    import json

    from z2z_chat.backends.loading.assets import cache_dir

    if is_mlx_dir(model):
        made = json.loads((Path(model) / MLX_MARKER).read_text(encoding="utf-8")).get("dtype")
        if dtype not in ("auto", made):
            raise RuntimeOpenError(f"{model} was converted in {made}; for --dtype {dtype} convert it again: "
                                   f"python convert/to_mlx.py SRC DST --dtype {dtype}")
        return model
    dtype = "float16" if dtype == "auto" else dtype
    dst = cache_dir() / "mlx" / f"{conversion_key(model, base)}-{dtype}"
    if not is_mlx_dir(str(dst)):
        from z2z_chat.backends.mlx_backend.convert import ConvertError, convert

        try:
            convert(model, dst, force=True, base=base, dtype=dtype)
        except ConvertError as e:
            raise RuntimeOpenError(str(e)) from e
    return str(dst)


@dataclass(frozen=True)
class Backend:
    module: str  # under backends/, with open_model(path, base, device, dtype) -> protocol.Loaded
    needs: tuple[str, ...]  # import names that must be installed
    install: str  # what to do when one is missing


BACKENDS = {
    "torch": Backend("torch_backend.backend", ("torch", "transformers"),
                     'the torch backend needs torch and transformers: pip install "z2z-chat[torch]"'),
    "mlx": Backend("mlx_backend.backend", ("mlx", "mlx_lm"), 'the MLX backend needs mlx and mlx-lm: pip install '
                   '"z2z-chat[mlx]" (on Linux: pip install "mlx[cpu]" mlx-lm)'),
    "llamacpp": Backend("llamacpp_backend.checkpoint", ("llama_cpp", "gguf"),
                        'the llama.cpp backend needs llama-cpp-python and gguf: pip install "z2z-chat[llamacpp]"'),
}


def _module(name: str, model: str = "") -> Any:
    b = BACKENDS[name]
    if not all(_installed(m) for m in b.needs):
        hub = f"{model} is not a local directory; as a Hugging Face repo id " if model and not Path(model).exists() else ""
        raise RuntimeOpenError(hub + b.install)
    return importlib.import_module(f".{b.module}", __package__)


def _load(name: str, path: str, base: str | None, device: str = "auto", dtype: str = "auto",
          progress: Callable[[str], None] | None = None) -> Runtime:
    try:
        loaded = _module(name, path).open_model(path, base, device, dtype, progress=progress)
    except (ValueError, OSError) as e:  # not ours: a library refused the files
        raise RuntimeOpenError(f"{path}: {e}") from e
    return Runtime.of(loaded, name, path)


def open_runtime(model: str | None = None, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                 base: str | None = None, progress: Callable[[str], None] | None = None) -> Runtime:
    """Open ``model`` (a checkpoint directory, repo id or MLX conversion; None: the embedded default)."""
    from z2z_chat.backends.loading.sources import check_chat_template

    if model is None:
        from z2z_chat.backends.loading.defaults import default_model

        model, default_base = default_model(progress=progress)
        base = base or default_base
    _check_exists(model)
    rt = _open(model, backend, device, dtype, base, progress or (lambda line: None))
    try:
        check_chat_template(rt.tokenizer, rt.model_name)
    except Z2ZError:
        rt.close()
        raise
    return rt


def _open(model: str, backend: str, device: str, dtype: str, base: str | None,
          progress: Callable[[str], None]) -> Runtime:
    name = _pick(backend, model, torch_options=(device, dtype) != ("auto", "auto"))
    if name == "mlx":
        _module("mlx")  # the conversion needs it too
        return _load("mlx", mlx_conversion(model, base, dtype), base, device, dtype, progress)
    if name == "llamacpp":
        try:
            _module("llamacpp")
            return _load("llamacpp", gguf_conversion(model, base), base, device, dtype, progress)
        except RuntimeOpenError as e:
            if backend != "auto":
                raise
            progress(f"llama.cpp cannot run {model} ({e}); running it on torch instead")
    return _load("torch", model, base, device, dtype, progress)


def gguf_conversion(model: str, base: str | None) -> str:
    """A directory llama.cpp can run: the checkpoint itself when its base is a GGUF (or it was
    converted already), else a conversion made once into the user's cache."""
    from z2z_chat.backends.loading.assets import cache_dir
    from z2z_chat.backends.loading.sources import is_gguf

    p = Path(model)
    try:
        spec = base or Zip2ZipConfig.load(p).base_model_name_or_path
    except Z2ZError:
        return model  # not a local checkpoint: the backend reports what is wrong
    if (p / "model.gguf").is_file() or is_gguf(spec):
        return model
    dst = cache_dir() / "llamacpp" / f"ckpt-{conversion_key(model, base)}"
    if not (dst / "zip2zip_config.json").is_file():
        from z2z_chat.backends.llamacpp_backend.convert import ConvertError, convert

        try:
            convert(model, dst, "f16", base=base, force=True)
        except ConvertError as e:
            raise RuntimeOpenError(str(e)) from e
    return str(dst)


def open_plain(rt: Runtime, base: str | None = None, device: str = "auto", dtype: str = "auto") -> Runtime:
    """The base model of ``rt`` without zip2zip on the same backend (torch or llama.cpp; MLX gets
    torch), for side-by-side comparisons; ``base`` another file of it (another quantization)."""
    if rt.backend_name == "llamacpp":
        name, label = "llamacpp", rt.model_name
        loaded = _module(name).open_checkpoint(rt.model_name, base or rt.base, plain=True)
    else:
        label = base or rt.base or rt.config.base_model_name_or_path
        name, loaded = "torch", _module("torch").open_base(label, rt.tokenizer, rt.codec, rt.config, device, dtype)
    return Runtime.of(loaded, name, f"{label} (plain)")
