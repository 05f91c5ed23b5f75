"""Training configuration: a TOML or YAML file plus ``--section.key value`` overrides.

``load_config(path, overrides)`` returns a validated ``TrainConfig``; an unknown key, a wrong
type or a bad value is a ``TrainConfigError`` naming the key. Defaults follow the paper
(cosine 3e-4 -> 1e-5, sequence 1024 codes, 32,768 tokens per batch, 10k steps, lambda 0.1,
M=3, a 2-layer transformer hyper-encoder).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from z2z_chat.backends.errors import Z2ZError

# LoRA target presets by transformers model_type. Phi-3 fuses q/k/v and gate/up.
LORA_PRESETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


class TrainConfigError(Z2ZError, ValueError):
    """A training config key is unknown or has a bad value."""


@dataclass
class Source:
    path: str = ""  # file, glob, directory; or "hf:name[:config]" for a Hugging Face dataset
    format: str = "auto"  # auto | text | jsonl | parquet | hf
    weight: float = 1.0
    field: str = "text"  # text field (jsonl/parquet/hf); chat records use "messages"
    split: str = "train"  # for hf datasets
    max_docs: int = 0  # 0: all


@dataclass
class DataConfig:
    sources: list[Source] = field(default_factory=list)
    seq_len: int = 1024  # codes per training sequence
    total_codes: int = 0  # sequences drawn from the mixture until this many codes (0: everything once)
    val_fraction: float = 0.02
    num_workers: int = 0  # preprocessing processes (0: one per core)
    cache_dir: str = ""  # "" : <output>/data-cache


@dataclass
class EncoderSettings:
    type: str = "transformer"
    hidden_size: int = 0  # 0: the base model's hidden size
    num_hidden_layers: int = 2
    num_heads: int = 0  # 0: the base model's attention heads
    intermediate_size: int = 0  # 0: 4 x hidden
    position_encoding: str = "learnable"
    tie_encoders: bool = False
    model_hidden_size: int = 0  # res_latent_attn: 0 = the base model's hidden size
    causal: bool = False
    residual: bool = True


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # []: the preset for the architecture


@dataclass
class OptimSettings:
    max_lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = -1  # -1: min(1000, 10% of steps)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    steps: int = 10_000
    tokens_per_batch: int = 32_768  # codes per optimizer step, all processes together
    micro_batch_size: int = 4  # sequences per process per forward


@dataclass
class TrainConfig:
    base_model: str = ""  # HF directory, repo id or .gguf
    init_from: str = ""  # a zip2zip checkpoint whose LoRA and encoder weights start this run
    output: str = "out/run"
    max_codebook_size: int = 2048
    max_subtokens: int = 3
    position_mode: str = "compressed"
    causal_codebook: bool = True  # softmax sees only entries that exist at each position
    recon_lambda: float = 0.1
    kl_lambda: float = 0.0  # KL to the base model's next-token distribution (needs a LoRA adapter)
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    stop_at: int = 0  # end this run after this step, saving (time-limited jobs); rerun to resume
    time_budget_s: float = 0.0  # end this run, saving, after the step that passes this many seconds (0: off)
    log_every: int = 10
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2)
    dtype: str = "float32"  # base weights: float32 | bfloat16
    push_to_hub: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)

    def validate(self) -> None:
        def bad(key: str, why: str) -> TrainConfigError:
            return TrainConfigError(f"{key}: {why}")
        if not self.base_model:
            raise bad("base_model", "is required (an HF directory, repo id or .gguf file)")
        if self.position_mode not in ("compressed", "base_token_end"):
            raise bad("position_mode", f"must be compressed or base_token_end, got {self.position_mode!r}")
        if self.max_subtokens < 1 or self.max_codebook_size < 0:
            raise bad("max_subtokens/max_codebook_size", "must be >= 1 / >= 0")
        if self.recon_lambda < 0:
            raise bad("recon_lambda", "must be >= 0")
        if self.kl_lambda < 0:
            raise bad("kl_lambda", "must be >= 0")
        if self.kl_lambda > 0 and not self.lora.enabled:
            raise bad("kl_lambda", "needs lora.enabled = true (the base is the model with its adapter off)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise bad("mixed_precision", "must be no, bf16 or fp16")
        if self.dtype not in ("float32", "bfloat16"):
            raise bad("dtype", "must be float32 or bfloat16")
        if self.encoder.type not in ("transformer", "res_latent_attn"):
            raise bad("encoder.type", f"must be transformer or res_latent_attn, got {self.encoder.type!r}")
        o = self.optim
        if o.steps < 1 or o.micro_batch_size < 1 or o.tokens_per_batch < 1:
            raise bad("optim", "steps, micro_batch_size and tokens_per_batch must be >= 1")
        if not 0 < o.min_lr <= o.max_lr:
            raise bad("optim.min_lr", "must be in (0, max_lr]")
        d = self.data
        if not d.sources:
            raise bad("data.sources", "needs at least one source")
        if d.seq_len < 8:
            raise bad("data.seq_len", "must be >= 8")
        if not 0 <= d.val_fraction < 1:
            raise bad("data.val_fraction", "must be in [0, 1)")
        for i, s in enumerate(d.sources):
            if not s.path:
                raise bad(f"data.sources[{i}].path", "is required")
            if s.format not in ("auto", "text", "jsonl", "parquet", "hf"):
                raise bad(f"data.sources[{i}].format", f"unknown format {s.format!r}")
            if s.weight <= 0:
                raise bad(f"data.sources[{i}].weight", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if is_dataclass(typ):
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a table")
        return _build(typ, value, key + ".")
    origin = getattr(typ, "__origin__", None)
    if origin is list:
        (item,) = typ.__args__
        if not isinstance(value, list):
            raise TrainConfigError(f"{key}: expected a list")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise TrainConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"{key}: expected a number, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise TrainConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if typ is str:
        return str(value)
    raise TrainConfigError(f"{key}: unsupported type")


def _build(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise TrainConfigError(f"unknown key(s): {', '.join(prefix + k for k in unknown)}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in d.items()})


def _set_dotted(d: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise TrainConfigError(f"--{key}: {p} is not a table")
    try:  # numbers, booleans and lists parse as TOML values; anything else stays a string
        d[parts[-1]] = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        d[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a .toml / .yaml / .json file and apply ``key=value`` or ``--key value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TrainConfigError(f"config file {p} does not exist")
        text = p.read_text()
        if p.suffix == ".json":
            try:
                raw = json.loads(text)
            except ValueError as e:
                raise TrainConfigError(f"{p}: {e}") from None
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise TrainConfigError(f"{p}: {e}") from None
        if "base_model" in raw and not Path(str(raw["base_model"])).is_absolute():
            cand = p.parent / str(raw["base_model"])
            if cand.exists():
                raw["base_model"] = str(cand)
    items = list(overrides or [])
    while items:
        item = items.pop(0).removeprefix("--")
        if "=" in item:
            key, value = item.split("=", 1)
        elif items:
            key, value = item, items.pop(0)
        else:
            raise TrainConfigError(f"override --{item} has no value")
        _set_dotted(raw, key.replace("-", "_"), value)
    cfg = _build(TrainConfig, raw)
    cfg.validate()
    return cfg
