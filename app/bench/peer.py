"""The peer at its best: the base model as llama-cpp-python users run it, at the shipped type and at
the merged zip2zip model's type.

The llama.cpp backend merges the LoRA adapter into a q8_0 copy of the base, and on a CPU q8_0 alone
reads prompts faster than the shipped q4_1 file; a ratio against the q4_1 peer would credit zip2zip
with part of the quantization's gain. ``peer_ggufs(base)`` gives both files (the q8_0 one
requantized once with llama.cpp's own quantizer, kept in the cache); every benchmark that compares
with llama-cpp-python runs both, and the docs quote the ratio against the faster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MERGED_TYPE = "q8_0"  # what backends/llamacpp_backend/checkpoint.py merges into


def requantized(gguf: str | Path, progress: Callable[[str], None] = lambda m: None) -> Path:
    """``gguf`` as q8_0 (llama.cpp's ``llama_model_quantize``, requantizing), cached by the file's key."""
    import llama_cpp

    from z2z_chat.backends.llamacpp_backend.context import _quiet_and_init
    from z2z_chat.backends.loading.assets import cache_dir, file_key

    src = Path(gguf)
    out = cache_dir() / "bench" / f"{src.stem}-{file_key(src)}-{MERGED_TYPE}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"requantizing {src.name} to {MERGED_TYPE} for the peer (once)")
    _quiet_and_init()  # llama.cpp lists every tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not requantize {src} to {MERGED_TYPE}")
    tmp.replace(out)
    return out


def peer_ggufs(base: str | Path, progress: Callable[[str], None] = lambda m: None) -> list[tuple[str, Path]]:
    """(label, file) of the peer's runs: the shipped base, and the base at the merged model's type."""
    shipped = Path(base)
    kind = shipped.stem.rsplit(".", 1)[-1].lower() if "." in shipped.stem else "shipped"
    runs = [(f"llama-cpp-python {kind}", shipped)]
    if kind != MERGED_TYPE:
        runs.append((f"llama-cpp-python {MERGED_TYPE}", requantized(shipped, progress)))
    return runs
