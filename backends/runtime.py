"""Open a model on a backend: the one place that picks and lazily imports a framework.

``open_runtime(model, backend="auto", device="auto")`` returns a ``Runtime``: the loaded model
(shared), the tokenizer, the codec config, the zip2zip config and a description for status lines.
``Runtime.session()`` gives each conversation its own decode state of that model. ``auto``
picks MLX on Apple silicon when it is installed and the model is an MLX conversion, torch
otherwise. Errors are ``RuntimeOpenError`` with a message that says what to do.
"""

from __future__ import annotations

import importlib.util
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .codec import CodecConfig
from .config import MLX_MARKER, Zip2ZipConfig
from .engine import Session
from .protocol import Model
from .utf8_guard import Utf8Guard
from .errors import Z2ZError

BACKENDS = ("auto", "torch", "mlx", "llamacpp")


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

    @cached_property
    def guard(self) -> Utf8Guard:
        """Built once (0.2 s for a 49k vocabulary): every conversation of this runtime shares it."""
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
    if not _installed("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _position_mode(model: str) -> str | None:
    try:
        return Zip2ZipConfig.load(model).position_mode
    except Z2ZError:
        return None  # not a local checkpoint (a hub id): the chosen backend reports the details


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check_exists(model: str) -> None:
    """A path that does not exist is a typo unless it reads as a Hugging Face repo id (org/name)."""
    if not Path(model).expanduser().exists() and not _HUB_ID.fullmatch(model):
        raise RuntimeOpenError(f"{model}: no such checkpoint directory (nor a Hugging Face repo id, org/name); "
                               "check the path, or omit --model for the embedded default")


def _pick(backend: str, model: str, torch_options: bool = False) -> str:
    """``auto``: MLX for MLX conversions and on Apple silicon; CUDA, or a --device/--dtype asked for
    (torch options) -> torch; otherwise llama.cpp when it is installed and the checkpoint's
    positions are contiguous (``compressed``); else torch."""
    if backend not in BACKENDS:
        raise RuntimeOpenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
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

    from .assets import cache_dir

    if is_mlx_dir(model):
        made = json.loads((Path(model) / MLX_MARKER).read_text(encoding="utf-8")).get("dtype")
        if dtype not in ("auto", made):
            raise RuntimeOpenError(f"{model} was converted in {made}; for --dtype {dtype} convert it again: "
                                   f"python convert/to_mlx.py SRC DST --dtype {dtype}")
        return model
    dtype = "float16" if dtype == "auto" else dtype
    dst = cache_dir() / "mlx" / f"{conversion_key(model, base)}-{dtype}"
    if not is_mlx_dir(str(dst)):
        from .mlx_convert import ConvertError, convert

        try:
            convert(model, dst, force=True, base=base, dtype=dtype)
        except ConvertError as e:
            raise RuntimeOpenError(str(e)) from e
    return str(dst)


def open_runtime(model: str | None = None, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                 base: str | None = None, progress: Callable[[str], None] | None = None) -> Runtime:
    """Open ``model`` (a checkpoint directory, repo id or MLX conversion; None: the embedded default)."""
    from .sources import SourceError, check_chat_template

    rt = _open(model, backend, device, dtype, base, progress)
    try:
        check_chat_template(rt.tokenizer, rt.model_name)
    except SourceError as e:
        rt.close()
        raise RuntimeOpenError(str(e)) from None
    return rt


def _open(model: str | None, backend: str, device: str, dtype: str, base: str | None,
          progress: Callable[[str], None] | None) -> Runtime:
    if model is None:
        from .assets import AssetError
        from .defaults import default_model

        try:
            model, default_base = default_model(progress=progress)
        except AssetError as e:
            raise RuntimeOpenError(str(e)) from None
        base = base or default_base
    _check_exists(model)
    name = _pick(backend, model, torch_options=(device, dtype) != ("auto", "auto"))
    if name == "mlx":
        _need_mlx()
        return _open_mlx(mlx_conversion(model, base, dtype))
    if name == "llamacpp":
        try:
            return _open_llamacpp(gguf_conversion(model, base), base)
        except RuntimeOpenError:
            if backend != "auto":
                raise
            name = "torch"  # e.g. an architecture convert/to_gguf.py does not write: torch runs it
    if importlib.util.find_spec("torch") is None:
        what = "" if Path(model).exists() else f"{model} is not a local directory; as a Hugging Face repo id it needs "
        raise RuntimeOpenError(f'{what or "the torch backend needs "}torch and transformers: pip install "z2z-chat[torch]"')
    from .torch_backend import checkpoint
    from .torch_backend.backend import TorchModel, pick_device

    try:
        dev, dt = pick_device(device, dtype)
        loaded = checkpoint.load(model, base=base, device=dev, dtype=dt)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise RuntimeOpenError(str(e)) from None
    return Runtime(TorchModel(loaded.model), loaded.tokenizer, loaded.codec, loaded.config,
                   "torch", str(model), f"{dev.type} {str(dt).removeprefix('torch.')}", loaded.base)


def gguf_conversion(model: str, base: str | None) -> str:
    """A directory llama.cpp can run: the checkpoint itself when its base is a GGUF (or it was
    converted already), else a conversion made once into the user's cache."""
    from .assets import cache_dir
    from .sources import is_gguf

    p = Path(model)
    try:
        spec = base or Zip2ZipConfig.load(p).base_model_name_or_path
    except Z2ZError:
        return model  # not a local checkpoint: the backend reports what is wrong
    if (p / "model.gguf").is_file() or is_gguf(spec):
        return model
    dst = cache_dir() / "llamacpp" / f"ckpt-{conversion_key(model, base)}"
    if not (dst / "zip2zip_config.json").is_file():
        from .gguf_convert import ConvertError, convert

        try:
            convert(model, dst, "f16", base=base, force=True)
        except ConvertError as e:
            raise RuntimeOpenError(str(e)) from None
    return str(dst)


def _open_llamacpp(model: str, base: str | None, plain: bool = False) -> Runtime:
    if not _installed("llama_cpp") or not _installed("gguf"):
        raise RuntimeOpenError('the llama.cpp backend needs llama-cpp-python and gguf: pip install "z2z-chat[llamacpp]"')
    from .llamacpp_backend.checkpoint import open_checkpoint

    op = open_checkpoint(model, base=base, plain=plain)
    ctx = op.model.ctx
    codec = op.codec
    if plain:
        codec = CodecConfig(codec.base_vocab_size, 0, 1, codec.disabled_ids, codec.pad_id)
    return Runtime(op.model, op.tokenizer, codec, op.config, "llamacpp", str(model) + (" (plain)" if plain else ""),
                   f"cpu {ctx.n_threads} threads", op.base)


def _need_mlx() -> None:
    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
        raise RuntimeOpenError('the MLX backend needs mlx and mlx-lm: pip install "z2z-chat[mlx]" '
                               '(on Linux: pip install "mlx[cpu]" mlx-lm)')


def _open_mlx(model: str) -> Runtime:
    from .mlx_backend.backend import MLXModel

    try:
        loaded, tok = MLXModel.open(model)
    except (ValueError, OSError) as e:
        raise RuntimeOpenError(f"{e}. Convert a torch checkpoint with: python convert/to_mlx.py SRC DST") from None
    import mlx.core as mx

    m = loaded.z2z
    return Runtime(loaded, tok, m.config.codec_config(m.pad_id), m.config, "mlx", str(model),
                   f"{mx.default_device()} {str(m.dtype).removeprefix('mlx.core.')}")


def open_plain(rt: Runtime, base: str | None = None, device: str = "auto", dtype: str = "auto") -> Runtime:
    """The base model of ``rt`` without zip2zip on the same backend (torch or llama.cpp; MLX gets
    torch), for side-by-side comparisons."""
    from dataclasses import replace

    if rt.backend_name == "llamacpp":
        return _open_llamacpp(rt.model_name, rt.base, plain=True)

    from .codec import CodecConfig
    from .torch_backend import checkpoint
    from .torch_backend.backend import PlainTorchModel, pick_device

    dev, dt = pick_device(device, dtype)
    spec = base or rt.base or rt.config.base_model_name_or_path
    try:
        lm = checkpoint.load_base(spec, dt, dev)
    except checkpoint.CheckpointError as e:
        raise RuntimeOpenError(str(e)) from None
    c = rt.codec
    plain = CodecConfig(c.base_vocab_size, 0, 1, c.disabled_ids, c.pad_id)
    return Runtime(PlainTorchModel(lm, c.base_vocab_size), rt.tokenizer, plain,
                   replace(rt.config, position_mode="compressed"), "torch", f"{spec} (plain)", rt.device)
