"""The embedded default model: a zip2zip SmolLM2-135M-Instruct shipped inside this package
(``backends/default_model/``: LoRA adapter, hyper-encoders, tokenizer, model card), over the base
GGUF that ``assets.smollm2_gguf()`` fetches once into the user's cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from z2z_chat.backends.loading.assets import AssetError, smollm2_gguf

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"


def default_model(fetch: bool = True, progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """(checkpoint directory, base GGUF path) of the embedded default model."""
    if not (DEFAULT_MODEL_DIR / "zip2zip_config.json").is_file():
        raise AssetError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                         "reinstall z2z-chat or pass --model")
    return str(DEFAULT_MODEL_DIR), str(smollm2_gguf(fetch=fetch, progress=progress))
