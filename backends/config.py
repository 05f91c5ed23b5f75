"""``zip2zip_config.json``: read, validate, write (framework-free).

The file format is the one the ``zip2zip`` 0.2.0 package writes (``asdict`` of its config,
``indent=2, sort_keys=True``), so checkpoints move both ways:

    {"base_model_name_or_path": ..., "format_version": 1, "position_mode": "compressed",
     "encoder_type": "transformer" | "res_latent_attn",
     "encoder": {...fields of that type...},
     "compression": {"initial_vocab_size", "max_codebook_size", "max_subtokens", "disabled_ids"}}

Validation errors are ``ConfigError`` naming the file and the field. ``codec_config(pad_id)``
derives the ``CodecConfig`` (pad = tokenizer pad, else eos; pad is always disabled).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from z2z_chat.backends.codec import CodecConfig
from z2z_chat.backends.errors import CheckpointError

CONFIG_NAME = "zip2zip_config.json"
MLX_MARKER = "z2z_mlx.json"  # written into every MLX conversion (backends/mlx_backend/convert.py)
MLX_ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3")  # decoders the MLX backend runs
POSITION_MODES = ("compressed", "base_token_end")
MAX_CODEBOOK = 1 << 16

# Encoder fields per type, with defaults (None = required unless noted in ``_OPTIONAL``).
_COMMON = {"hidden_size": None, "tie_encoders": False, "position_encoding": None}
ENCODER_FIELDS: dict[str, dict[str, Any]] = {
    # v0.1 models: post-LN transformer in the model's hidden size, mean over all M slots
    "transformer": {**_COMMON, "num_hidden_layers": None, "intermediate_size": None, "num_heads": None},
    # zip2zip++ models: pre-LN latent transformer, masked-mean or last-token pooling, residual
    "res_latent_attn": {**_COMMON, "model_hidden_size": None, "num_hidden_layers": None,
                        "intermediate_size": None, "num_heads": None, "causal": False, "residual": True},
}
_OPTIONAL = {"position_encoding", "intermediate_size", "model_hidden_size"}


def positions(spans: Sequence[int], mode: str, start: int = 0) -> list[int]:
    """RoPE positions of codes with these spans (base tokens per code), from base position ``start``:
    consecutive in ``compressed`` mode; in ``base_token_end`` mode each code sits at the
    base-token index of its last subtoken (``start - 1 + cumsum(spans)``)."""
    if mode == "compressed":
        return list(range(start, start + len(spans)))
    out, p = [], start - 1
    for s in spans:
        p += s
        out.append(p)
    return out


class ConfigError(CheckpointError, ValueError):
    """A zip2zip config (or adapter config) is missing a field or has a bad value; the message names both."""


@dataclass
class CompressionSettings:
    initial_vocab_size: int
    max_codebook_size: int
    max_subtokens: int
    disabled_ids: list[int]


@dataclass
class Zip2ZipConfig:
    base_model_name_or_path: str
    encoder_type: str
    encoder: dict[str, Any]
    compression: CompressionSettings
    position_mode: str = "compressed"
    format_version: int = 1
    source: str = field(default="", compare=False, repr=False)  # where it was read from, for errors

    def __post_init__(self) -> None:
        self.validate()

    def _err(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.source or CONFIG_NAME}: {msg}")

    def validate(self) -> None:
        if self.encoder_type not in ENCODER_FIELDS:
            hint = (" (the reference's 'attention' encoder is broken upstream and not supported)"
                    if self.encoder_type == "attention" else "")
            raise self._err(f"encoder_type {self.encoder_type!r} is not one of "
                            f"{sorted(ENCODER_FIELDS)}{hint}")
        if self.position_mode not in POSITION_MODES:
            raise self._err(f"position_mode {self.position_mode!r} is not one of {POSITION_MODES}")
        known = ENCODER_FIELDS[self.encoder_type]
        unknown = sorted(set(self.encoder) - set(known))
        if unknown:
            raise self._err(f"encoder has unknown field(s) {unknown} for encoder_type {self.encoder_type!r}")
        self.encoder = {**known, **self.encoder}
        for k, v in self.encoder.items():
            if v is None and k not in _OPTIONAL:
                raise self._err(f"encoder.{k} is required")
            if k in ("tie_encoders", "causal", "residual") and not isinstance(v, bool):
                raise self._err(f"encoder.{k} must be true or false, got {v!r}")
            if k in ("hidden_size", "num_hidden_layers", "num_heads", "intermediate_size",
                     "model_hidden_size") and v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise self._err(f"encoder.{k} must be a positive integer, got {v!r}")
        if self.encoder["hidden_size"] % self.encoder["num_heads"]:
            raise self._err(f"encoder.hidden_size {self.encoder['hidden_size']} is not divisible "
                            f"by encoder.num_heads {self.encoder['num_heads']}")
        if self.encoder["position_encoding"] not in (None, "learnable"):
            raise self._err(f"encoder.position_encoding {self.encoder['position_encoding']!r} "
                            "must be null or 'learnable'")
        c = self.compression
        for k in ("initial_vocab_size", "max_codebook_size", "max_subtokens"):
            v = getattr(c, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "max_codebook_size" else 1):
                raise self._err(f"compression.{k} must be a {'non-negative' if k == 'max_codebook_size' else 'positive'} integer, got {v!r}")
        if c.max_codebook_size > MAX_CODEBOOK:
            raise self._err(f"compression.max_codebook_size {c.max_codebook_size} is larger than {MAX_CODEBOOK} "
                            "(the hyper caches hold C x hidden floats per session)")
        if c.max_subtokens > 16:
            raise self._err(f"compression.max_subtokens {c.max_subtokens} is larger than 16")
        if not c.disabled_ids:
            raise self._err("compression.disabled_ids is empty: it must list the tokenizer's special "
                            "tokens, e.g. list(tokenizer.get_added_vocab().values())")
        if len(set(c.disabled_ids)) != len(c.disabled_ids):
            raise self._err("compression.disabled_ids has duplicates")
        bad = [i for i in c.disabled_ids
               if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < c.initial_vocab_size]
        if bad:
            raise self._err(f"compression.disabled_ids {bad[:5]} are outside [0, initial_vocab_size)")

    @property
    def model_dim(self) -> int:
        """Width of the vectors the hyper-encoders produce (the decoder's hidden size)."""
        return self.encoder.get("model_hidden_size") or self.encoder["hidden_size"]

    def codec_config(self, pad_id: int) -> CodecConfig:
        c = self.compression
        return CodecConfig(c.initial_vocab_size, c.max_codebook_size, c.max_subtokens,
                           frozenset(c.disabled_ids), pad_id)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["compression"]["disabled_ids"] = sorted(d["compression"]["disabled_ids"])
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> Zip2ZipConfig:
        where = source or CONFIG_NAME
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}")
        for k in ("base_model_name_or_path", "encoder_type", "encoder", "compression"):
            if d.get(k) is None:
                raise ConfigError(f"{where}: field {k!r} is missing")
        comp = d["compression"]
        ckeys = {f.name for f in fields(CompressionSettings)}
        if not isinstance(comp, dict) or set(comp) - ckeys or ckeys - set(comp) - {"disabled_ids"}:
            raise ConfigError(f"{where}: compression must have exactly the fields {sorted(ckeys)}, "
                              f"got {sorted(comp) if isinstance(comp, dict) else comp!r}")
        for k, typ in (("base_model_name_or_path", str), ("encoder_type", str), ("encoder", dict),
                       ("position_mode", str)):
            if k in d and not isinstance(d[k], typ):
                raise ConfigError(f"{where}: {k} must be a {typ.__name__}, got {d[k]!r}")
        fv = d.get("format_version", 1)
        if fv != 1:
            raise ConfigError(f"{where}: format_version {fv!r} is not supported (this z2z-chat reads version 1); "
                              "upgrade z2z-chat or re-export the checkpoint")
        if not isinstance(comp.get("disabled_ids", []), list):
            raise ConfigError(f"{where}: compression.disabled_ids must be a list of token ids, "
                              f"got {comp['disabled_ids']!r}")
        return cls(
            base_model_name_or_path=d["base_model_name_or_path"],
            encoder_type=d["encoder_type"],
            encoder=dict(d["encoder"]),
            compression=CompressionSettings(**{"disabled_ids": None, **comp}),
            position_mode=d.get("position_mode", "compressed"),
            format_version=d.get("format_version", 1),
            source=source,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Zip2ZipConfig:
        """Read ``zip2zip_config.json`` from a file or a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: is this a zip2zip checkpoint directory?") from None
        except PermissionError:
            raise ConfigError(f"{path} cannot be read (permission denied)") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e}); is it the right file?") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))


ADAPTER_CONFIG = "adapter_config.json"
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's default when adapter_config.json has no lora_alpha


def lora_scale_of(ckpt: Path) -> tuple[int, float]:
    """(r, lora_alpha) of a checkpoint's ``adapter_config.json``, checked; every backend reads it
    here, so a damaged file gives the same one-line ``ConfigError`` everywhere and a missing
    ``lora_alpha`` means what it means to peft (8)."""
    path = Path(ckpt) / ADAPTER_CONFIG
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): re-export the adapter or restore the file") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    r, alpha = d.get("r"), d.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    tm = d.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise ConfigError(f"{path}: target_modules must be a list of module names, got {tm!r}")
    return r, float(alpha)
