"""Where models and tokenizers come from: local directories, Hugging Face repo ids, GGUF files.

Contract: every ``load_*`` either returns what was asked for or raises ``SourceError`` whose
message names the path or repo and says what to do; nothing falls back to random weights.
A GGUF base is given as the path of the ``.gguf`` file; transformers dequantizes it on load
(``gguf_file=``). Tokenizers converted from a GGUF are cached as ``tokenizer.json`` so the
conversion (several seconds) happens once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from z2z_chat.backends.loading.assets import cache_dir, file_key
from z2z_chat.backends.errors import CheckpointError

if TYPE_CHECKING:
    from z2z_chat.backends.loading.checkpoint import Checkpoint


class SourceError(CheckpointError):
    """A model, checkpoint or tokenizer could not be found or read."""


def is_gguf(spec: str | os.PathLike) -> bool:
    return str(spec).lower().endswith(".gguf")


def load_tokenizer(spec: str | os.PathLike, lean: bool = False) -> Any:
    """A transformers tokenizer from an HF directory, a repo id or a ``.gguf`` file; with ``lean``, a
    ``tokenizer.ChatTokenizer`` where the files allow it (no transformers import: the llama.cpp path)."""
    spec = str(spec)
    try:
        if is_gguf(spec):
            path = Path(spec)
            if not path.is_file():
                raise SourceError(f"GGUF file {spec} does not exist")
            cached = cache_dir() / "tokenizers" / file_key(path)
            if (cached / "tokenizer.json").exists():
                return _from_files(cached, lean)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            tok.save_pretrained(cached)
            return tok
        d = Path(spec)
        if d.is_dir() and not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise SourceError(f"{d} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json): "
                              "copy them from the base model into it")
        return _from_files(spec, lean)
    except SourceError:
        raise
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load a tokenizer from {spec}: {e}") from e


def _from_files(spec: str | os.PathLike, lean: bool) -> Any:
    from z2z_chat.backends.loading import tokenizer

    tok = tokenizer.load(spec) if lean and Path(spec).is_dir() else None
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    return tok


def pad_id_of(tokenizer: Any) -> int | None:
    """The id zip2zip pads entries with: the tokenizer's pad token, else its eos (the reference's rule)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def context_length_of(config: Any, default: int = 2048) -> int:
    """The context window of a decoder config (a transformers config object or an mlx-lm dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return int(get("max_position_embeddings", None) or default)


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rope base and scaling of an HF ``config.json`` in both layouts: transformers 5 writes only
    ``rope_parameters: {"rope_type", "rope_theta", ...}``; mlx-lm and older readers read top-level
    ``rope_theta`` and ``rope_scaling`` and silently fall back to a base of 10,000 without them."""
    params = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta", params.get("rope_theta"))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling["type"] = scaling["rope_type"]  # the key older readers (mlx-lm's phi3) look for
    out: dict[str, Any] = {}
    if theta is not None:
        out["rope_theta"] = float(theta)
    if scaling is not None:
        out["rope_scaling"] = scaling
    return out


def check_chat_template(tokenizer: Any, where: str) -> None:
    """Render a one-message conversation now, so a broken or missing chat template is an error at
    load time that names its source, not a traceback at the first message."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja2 and transformers raise several types here
        raise SourceError(f"the chat template of {where} does not render ({type(e).__name__}: {e}); fix "
                          "chat_template.jinja or the chat_template of tokenizer_config.json") from None


def checkpoint_tokenizer(ck: Checkpoint, lean: bool = False) -> tuple[Any, int]:
    """The tokenizer of a checkpoint (its own files, else its base's) and its pad id, checked against
    the config's ``initial_vocab_size``; ``SourceError`` names what does not fit. ``lean``: see
    ``load_tokenizer``."""
    src, vocab_size = ck.tokenizer_source, ck.config.compression.initial_vocab_size
    tok = load_tokenizer(src, lean)
    if len(tok) != vocab_size:
        raise SourceError(f"the tokenizer has {len(tok)} tokens but {ck.dir / 'zip2zip_config.json'} says "
                          f"initial_vocab_size={vocab_size}: wrong base model? (tokenizer from {src})")
    pad = pad_id_of(tok)
    if pad is None:
        raise SourceError(f"the tokenizer of {src} has neither a pad nor an eos token")
    return tok, pad
