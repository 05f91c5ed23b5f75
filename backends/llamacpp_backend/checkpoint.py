"""Open a zip2zip checkpoint on llama.cpp.

Accepted layouts (a directory with ``zip2zip_config.json`` and the hyper-encoders):
- written by ``convert/to_gguf.py``: ``model.gguf`` (the base, or the base with the LoRA merged)
  and optionally ``lora.gguf`` (a llama.cpp LoRA adapter);
- a torch checkpoint whose base is a GGUF file (the embedded default model: its base is the Q4_1
  GGUF it was trained on) with a PEFT adapter: the adapter is merged once into a q8_0 copy of the
  base in the user cache (seconds): it decodes as fast as the base, where an adapter applied at
  run time costs every step (README, "llama.cpp"), and q8_0 keeps the merged weights within a
  rounding of what was trained.

The hyper-encoders' weights are checked and laid out once (``encoders.prepare``: float32, large
matrices as q8_0 unless ``Z2Z_ENCODER_WEIGHTS`` says f16 or f32) and kept in the user cache,
where ggml reads them (memory-mapped).

Everything is checked before llama.cpp sees it (it aborts the process on some bad files): the
position mode (``base_token_end`` needs non-contiguous positions, which stock llama.cpp refuses),
the GGUF files parse, vocabulary and hidden sizes agree with the config and the encoders.
Failures are ``CheckpointError`` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from z2z_chat.backends.loading.assets import cache_dir, file_key
from z2z_chat.backends.loading.checkpoint import Checkpoint
from z2z_chat.backends.codec import CodecConfig
from z2z_chat.backends.config import CONFIG_NAME, Zip2ZipConfig, lora_scale_of
from z2z_chat.backends.errors import CheckpointError
from z2z_chat.backends.protocol import Loaded
from z2z_chat.backends.loading.sources import checkpoint_tokenizer, is_gguf
from z2z_chat.backends.llamacpp_backend.backend import LlamaCppModel, PlainLlamaCppModel
from z2z_chat.backends.llamacpp_backend import encoders
from z2z_chat.backends.llamacpp_backend.context import LlamaContext
from z2z_chat.backends.llamacpp_backend.encoders import build_encoder, prepare
from z2z_chat.backends.llamacpp_backend.tensors import (
    SafetensorsFile,
    TensorFileError,
    check_gguf,
    merge_lora_gguf,
    model_tables,
    read_safetensors,
)

MODEL_FILE, LORA_FILE = "model.gguf", "lora.gguf"


def _base_gguf(ck: Checkpoint) -> Path:
    if (ck.dir / MODEL_FILE).is_file():
        return ck.dir / MODEL_FILE
    if is_gguf(ck.base):
        return Path(ck.base)
    raise CheckpointError(f"{ck.dir} has no {MODEL_FILE} and its base ({ck.base}) is not a GGUF file: convert it "
                          f"once with `python convert/to_gguf.py {ck.dir} OUT_DIR`, or run it with --backend torch")


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _seal(path: Path, seal: Path) -> None:
    """Record the file as it was made: its size, modification time and digest."""
    st = path.stat()
    seal.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": _digest(path)}))


def _sealed(path: Path, seal: Path) -> bool:
    """The cached file is the one that was made: the same size and time, or else the same digest
    (a copy); a file rewritten in place, even to the same size, is not."""
    try:
        record = json.loads(seal.read_text())
        st = path.stat()
        if record["size"] != st.st_size:
            return False
        return record["mtime_ns"] == st.st_mtime_ns or record["digest"] == _digest(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _merged_or_adapter(ck: Checkpoint, base: Path, progress) -> tuple[Path, Path | None]:
    """(model GGUF, adapter GGUF or None): a ``lora.gguf`` is applied at load; a PEFT adapter is merged
    once into a cached q8_0 copy of the base (see the module docstring)."""
    ckpt = ck.dir
    if (ckpt / LORA_FILE).is_file():
        return base, ckpt / LORA_FILE
    peft = ckpt / "adapter_model.safetensors"
    if not ck.has_adapter:
        return base, None
    if not peft.is_file():
        raise CheckpointError(f"{ckpt} has adapter_config.json but no adapter_model.safetensors")
    _, alpha = lora_scale_of(ckpt)
    st = base.stat()
    key = hashlib.sha256(peft.read_bytes() + f"|{alpha}|{base.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    entry = cache_dir() / "llamacpp" / f"merged-{key.hexdigest()[:16]}"
    out, seal = entry / MODEL_FILE, entry / "seal"  # written once the file is known sound
    if out.is_file() and not _sealed(out, seal):
        progress(f"the cached merge {out} was changed since it was made; making it again")
        out.unlink()
    if not out.is_file():
        entry.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        progress(f"merging the LoRA adapter of {ckpt.name} into {base.name} (once)")
        merge_lora_gguf(base, tmp, read_safetensors(peft), float(alpha), "q8_0", progress)
        check_gguf(tmp)
        tmp.replace(out)
        _seal(out, seal)
    return out, None


def _encoders(file: Path, config: Zip2ZipConfig, pad: int, kind: str):
    """(input encoder, output encoder), their weights laid out by ``encoders.prepare`` and kept in
    the user cache (keyed by the file's path, size and mtime, the encoder config and ``kind``),
    read back as views of the cached file, which ggml reads where it lies. The checks (finite
    weights, shapes that fit the config: one call on a stand-in row) run when the cache entry is
    made: a released 4B checkpoint's float32 encoders are 1.8 GB, and the check call alone reads
    all of it, which every open would pay if it ran at each."""
    prefixes = ("input_encoder",) + (() if config.encoder["tie_encoders"] else ("output_encoder",))
    cfg = config.encoder
    key = file_key(file, prefixes, encoders.LAYOUT, kind, encoders.QUANT, config.encoder_type, config.model_dim,
                   json.dumps(cfg, sort_keys=True))
    cached = cache_dir() / "llamacpp" / f"encoders-{key}.safetensors"
    weights = None
    if cached.is_file():
        try:
            f = SafetensorsFile(cached)
            weights = {p: {k[len(p) + 1:]: f.view(k) for k in f if k.startswith(p + ".")} for p in prefixes}
        except TensorFileError:  # a damaged entry (a full disk, a crash): made again
            cached.unlink()
    if weights is None:
        weights = {p: _checked(file, p, config, pad, kind) for p in prefixes}
        from safetensors.numpy import save_file

        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file({f"{p}.{k}": v for p, w in weights.items() for k, v in w.items()}, tmp)
        tmp.replace(cached)
    enc = {p: build_encoder(config.encoder_type, w, cfg, pad, prepared=True) for p, w in weights.items()}
    return enc["input_encoder"], enc.get("output_encoder", enc["input_encoder"])


def _encoder_weights() -> str:
    """``Z2Z_ENCODER_WEIGHTS``: the type of the encoders' large matrices (``encoders.prepare``):
    ``q8_0`` (the default), ``f16``, or ``f32`` (torch's outputs exactly, 3.8x q8_0's memory)."""
    value = os.environ.get("Z2Z_ENCODER_WEIGHTS", "q8_0")
    if value not in ("q8_0", "f16", "f32"):
        raise CheckpointError(f"Z2Z_ENCODER_WEIGHTS={value!r}: use q8_0 (the default), f16 or f32")
    return value


def _checked(file: Path, prefix: str, config: Zip2ZipConfig, pad: int, kind: str) -> dict[str, np.ndarray]:
    """``prefix``'s weights, prepared, once they are finite and run on a stand-in row."""
    st = SafetensorsFile(file)
    sub = {k[len(prefix) + 1:]: st.view(k) for k in st if k.startswith(prefix + ".")}
    if not sub:
        raise CheckpointError(f"{file} has no {prefix}.* weights")
    bad = [k for k, v in sub.items() if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{file}: {prefix}.{bad[0]} holds NaN or infinite values")
    row, table = np.zeros((1, config.compression.max_subtokens), dtype=np.int64), np.ones((1, config.model_dim), np.float32)
    try:
        w = prepare(sub, config.encoder, kind)
        out = build_encoder(config.encoder_type, w, config.encoder, pad, prepared=True)(row, table)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{file}: {prefix} does not match {CONFIG_NAME} ({type(e).__name__}: {e})") from None
    if out.shape != (1, config.model_dim) or not np.isfinite(out).all():
        raise CheckpointError(f"{file}: {prefix} gives vectors of shape {out.shape[1:]}, "
                              f"expected ({config.model_dim},) and finite")
    return w


def open_model(path: str | Path, base: str | None = None, device: str = "auto", dtype: str = "auto",
               progress=None) -> Loaded:
    """The backend's entry point (``protocol.Loaded``); llama.cpp runs on the CPU in the GGUF's own types."""
    if device not in ("auto", "cpu") or dtype != "auto":
        raise CheckpointError("the llama.cpp backend runs on the CPU in the GGUF's own types: drop --device/--dtype, "
                              "or use --backend torch")
    return open_checkpoint(path, base, progress=progress or (lambda m: None))  # the merge says what it does


def open_checkpoint(path: str | Path, base: str | None = None, n_ctx: int = 0, n_threads: int | None = None,
                    plain: bool = False, progress=lambda m: None, exact: bool = False) -> Loaded:
    """Open ``path`` on llama.cpp (``plain``: its base GGUF alone, fed token ids, no hypertokens)."""
    ck = Checkpoint.open(path, base, progress)
    ckpt, config = ck.dir, ck.config
    if config.position_mode != "compressed" and not plain:
        raise CheckpointError(
            f"{ckpt} uses position_mode {config.position_mode!r}: each code sits at the position of its last "
            "base token, and stock llama.cpp only accepts contiguous positions. Run it with --backend torch "
            "(or mlx on Apple silicon).")
    V, kind = config.compression.initial_vocab_size, _encoder_weights()
    tok, pad = checkpoint_tokenizer(ck, lean=True)  # no transformers import: seconds and memory saved
    gguf_path = _base_gguf(ck)
    try:
        meta, embed, head = model_tables(gguf_path)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None
    if embed.shape[0] < V or embed.shape[1] != config.model_dim:
        raise CheckpointError(f"{gguf_path}: its embedding matrix is {embed.shape[0]} x {embed.shape[1]}, but the "
                              f"zip2zip config needs at least {V} rows of width {config.model_dim}: wrong base model?")
    model_path, adapter = gguf_path, None
    if not plain:
        try:
            model_path, adapter = _merged_or_adapter(ck, gguf_path, progress)
            if adapter is not None:
                check_gguf(adapter, "adapter")
        except TensorFileError as e:
            raise CheckpointError(str(e)) from None
    ctx = LlamaContext(model_path, adapter, n_ctx=n_ctx, n_threads=n_threads, exact=exact)
    codec, device = config.codec_config(pad), f"cpu {ctx.n_threads} threads"
    if plain:
        codec = CodecConfig(codec.base_vocab_size, 0, 1, codec.disabled_ids, codec.pad_id)
        return Loaded(PlainLlamaCppModel(ctx, V), tok, config, codec, str(gguf_path), device)
    try:
        enc_in, enc_out = _encoders(ck.encoders, config, pad, kind)
    except (CheckpointError, TensorFileError, KeyError) as e:
        ctx.close()
        raise CheckpointError(f"{ckpt}: the hyper-encoders do not match the config ({e})") from None
    c = config.compression
    model = LlamaCppModel(ctx, embed, head, enc_in, enc_out, V, c.max_codebook_size, c.max_subtokens, pad)
    return Loaded(model, tok, config, codec, str(gguf_path), device)
