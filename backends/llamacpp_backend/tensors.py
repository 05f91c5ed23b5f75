"""Tensor files for the llama.cpp path, in numpy only (no torch, no MLX).

- ``SafetensorsFile(path)``: a memory-mapped safetensors file whose tensors are decoded to float32
  numpy one at a time (BF16 and F16 included, which ``safetensors.numpy`` cannot give as float32
  by itself), or viewed in place when stored as float32; ``read_safetensors(path)`` reads them
  all. Errors name the file.
- ``read_gguf_tables(path)``: the token-embedding matrix and, when the model has one, the LM head
  (``output.weight``), dequantized to float32 with ``gguf``; ``None`` head means tied embeddings.
- ``check_gguf(path, kind)``: parse a GGUF before llama.cpp sees it (llama.cpp aborts the process
  on some malformed files); returns its metadata as a dict.
- ``model_tables(path)``: ``check_gguf`` + ``read_gguf_tables`` for a model, cached in the user
  cache as ``.npy`` files keyed by the file's path, size and mtime: parsing a GGUF with a 49k-token
  vocabulary takes seconds in Python, opening the cached tables takes none. They are ``RowFile``s:
  rows read with ``pread`` when indexed, not memory maps: the hyper-encoders and the input rows
  touch a few rows a step, and a map's fault-around makes 64 KB resident for each, which after a
  long chat is the whole table (docs/BACKENDS.md).
- ``write_lora_gguf(path, peft_state, alpha, n_head, n_head_kv, arch)``: a PEFT LoRA adapter as a
  llama.cpp adapter GGUF. On ``llama`` llama.cpp stores q/k projection rows permuted for its
  interleaved RoPE, so ``lora_B`` of ``q_proj``/``k_proj`` gets the same row permutation
  (``permute_qk``); ``qwen2`` and ``phi3`` rotate halves as HF does and take the rows as they are.
- ``write_model_gguf(path, state, config, tokenizer, qtype)``: an HF decoder of one of ``ARCHS``
  (Llama, Mistral, Qwen2 with its attention biases, Phi-3 with fused ``qkv_proj``/``gate_up_proj``
  and its long-context RoPE factors) as a llama.cpp model GGUF (f32, f16, q8_0), with its BPE
  vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from z2z_chat.backends.errors import Z2ZError
from z2z_chat.backends.loading.sources import rope_settings


class TensorFileError(Z2ZError, ValueError):
    """A tensor file is missing, truncated or not what it should be; the message names it."""


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "U8": np.uint8}


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A safetensors file, memory-mapped: each tensor is decoded to float32 when it is read, so a
    converter holds one tensor at a time, not a 7 GB model (the header is checked at open)."""

    def __init__(self, path: str | Path):
        import mmap

        self.path = path = Path(path)
        try:
            with path.open("rb") as f:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            (n,) = struct.unpack("<Q", self._data[:8])
            header = json.loads(self._data[8:8 + n])
        except FileNotFoundError:
            raise TensorFileError(f"{path} does not exist") from None
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path} is not a readable safetensors file ({e})") from None
        self._index = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if info.get("dtype") not in _ST_DTYPES or 8 + n + end > len(self._data):
                raise TensorFileError(f"{path}: tensor {name} has dtype {info.get('dtype')} or lies outside the file")
            self._index[name] = (info["dtype"], tuple(info["shape"]), 8 + n + start, end - start)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.view(name).astype(np.float32)  # a copy: nothing keeps the map's pages

    def view(self, name: str) -> np.ndarray:
        """The tensor as float32 without a copy where the file stores float32 (read-only, backed by
        the file's pages, which the OS shares and can drop), else decoded."""
        kind, shape, at, size = self._index[name]
        dt = _ST_DTYPES[kind]
        a = np.frombuffer(self._data, dtype=dt, count=size // np.dtype(dt).itemsize, offset=at)
        if kind == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        if kind == "U8":  # raw bytes (the encoder cache's q8_0 blocks)
            return a.reshape(shape)
        return a.reshape(shape) if a.dtype == np.float32 else a.reshape(shape).astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a (small) safetensors file as float32."""
    return dict(SafetensorsFile(path))


def check_gguf(path: str | Path, kind: str = "model") -> dict[str, Any]:
    """Parse ``path`` fully (header, metadata, tensor table, data bounds); TensorFileError if not sound."""

    path = Path(path)
    meta, _ = _parse(path, kind)
    return meta


def _parse(path: Path, kind: str) -> tuple[dict[str, Any], Any]:
    import gguf

    if not path.is_file():
        raise TensorFileError(f"{kind} GGUF {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises bare ValueError/struct/IndexError on bad files
        raise TensorFileError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                              "was the download or conversion cut short?") from None
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - some array fields have no simple value; not needed here
            continue
    want = "adapter" if kind == "adapter" else None
    if want and meta.get("general.type") != want:
        raise TensorFileError(f"{path} is not a llama.cpp adapter (general.type={meta.get('general.type')!r})")
    if kind == "model" and meta.get("general.type") == "adapter":
        raise TensorFileError(f"{path} is a LoRA adapter, not a model")
    return meta, reader


_META_KEYS = ("general.architecture", "general.type")


def model_tables(path: str | Path) -> tuple[dict[str, Any], RowFile, RowFile | None]:
    """(metadata, embedding, LM head or None) of a model GGUF, through the cache (see the docstring)."""
    from z2z_chat.backends.loading.assets import cache_dir, file_key

    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"model GGUF {path} does not exist")
    d = cache_dir() / "llamacpp" / f"tables-{file_key(path)}"
    if (d / "meta.json").is_file():
        try:
            head = RowFile(d / "head.npy") if (d / "head.npy").is_file() else None
            return json.loads((d / "meta.json").read_text()), RowFile(d / "embed.npy"), head
        except (TensorFileError, OSError, ValueError):  # a damaged entry (a full disk, a crash): made again
            (d / "meta.json").unlink()
    meta, reader = _parse(path, "model")
    embed, head = read_gguf_tables(path, reader)
    arch = meta.get("general.architecture")
    keep = {k: v for k, v in meta.items() if k in _META_KEYS or (arch and k.startswith(f"{arch}.")
                                                                and isinstance(v, (int, float, str)))}
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "embed.npy", embed)
    if head is not None:
        np.save(d / "head.npy", head)
    (d / "meta.json").write_text(json.dumps(keep))  # written last: its presence marks a complete entry
    return model_tables(path)  # as files, not the arrays just read: they are the process's largest


class RowFile:
    """A (rows, D) float32 ``.npy`` table on disk, indexed like an array by row ids (any shape
    ``S``, giving (*S, D)); each row is one ``pread``, so only the rows read cost memory."""

    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            shape, fortran, dtype = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(f)
            self.offset = f.tell()
        self._row = shape[1] * 4 if len(shape) == 2 else 0
        if not self._row or fortran or dtype != np.float32 or os.path.getsize(path) != self.offset + shape[0] * self._row:
            raise TensorFileError(f"{path} is not a whole (rows, D) float32 table")
        self.path, self.shape = Path(path), shape
        self._fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        flat = ids.reshape(-1).tolist()
        if flat and (min(flat) < 0 or max(flat) >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]}) for {self.path}")
        buf = b"".join([os.pread(self._fd, self._row, self.offset + r * self._row) for r in flat])
        return np.frombuffer(buf, dtype=np.float32).reshape(*ids.shape, self.shape[1]).copy()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def read_gguf_tables(path: str | Path, reader: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(embedding (rows, D), LM head (rows, D) or None when tied), float32."""
    import gguf

    reader = reader or gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def table(name: str) -> np.ndarray:
        t = tensors[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a.reshape(int(t.shape[1]), int(t.shape[0])), dtype=np.float32)

    if "token_embd.weight" not in tensors:
        raise TensorFileError(f"{path} has no token_embd.weight tensor")
    return table("token_embd.weight"), table("output.weight") if "output.weight" in tensors else None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved RoPE order (its converter's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# a layer's HF modules -> llama.cpp tensors, every architecture of ARCHS (Phi-3's fused projections
# are llama.cpp's attn_qkv and its fused gate+up ffn_up)
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Phi3ForCausalLM": "phi3"}  # HF architecture -> llama.cpp's


def _permute(gg: str, arch: str, n_head: int, n_kv: int, w: np.ndarray) -> np.ndarray:
    """q/k rows in llama.cpp's order for ``arch``: interleaved on llama, HF's own elsewhere (NEOX RoPE)."""
    if arch != "llama" or gg not in ("attn_q", "attn_k"):
        return w
    return permute_qk(w, n_head if gg == "attn_q" else n_kv)
_LORA_KEY = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.default)?\.weight$")


def write_lora_gguf(path: str | Path, peft_state: dict[str, np.ndarray], alpha: float, n_head: int,
                    n_head_kv: int, arch: str = "llama") -> Path:
    import gguf

    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for k, v in peft_state.items():
        m = _LORA_KEY.search(k)
        if m is None:
            raise TensorFileError(f"adapter tensor {k} is not a LoRA A/B weight of a decoder layer "
                                  "(only attention and MLP projections can run on llama.cpp)")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = v
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))  # llama.cpp scales by alpha / r, as peft does
    for (i, hf), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or hf not in HF_TO_GGUF:
            raise TensorFileError(f"adapter layer {i} {hf}: expected one lora_A and one lora_B")
        gg = HF_TO_GGUF[hf]
        B = _permute(gg, arch, n_head, n_head_kv, ab["B"])
        w.add_tensor(f"blk.{i}.{gg}.weight.lora_a", np.ascontiguousarray(ab["A"], dtype=np.float32))  # (r, in)
        w.add_tensor(f"blk.{i}.{gg}.weight.lora_b", np.ascontiguousarray(B, dtype=np.float32))  # (out, r)
    _finish(w)
    return Path(path)


def _finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


QTYPES = ("f32", "f16", "q8_0")


def write_model_gguf(path: str | Path, state: Mapping[str, np.ndarray], config: dict[str, Any], tokenizer: Any,
                     qtype: str = "f32") -> Path:
    """``state``: HF names (``model.embed_tokens.weight``, ``model.layers.N...``, ``model.norm.weight``,
    ``lm_head.weight`` unless tied), float32, each read once; ``config``: the HF config as a dict."""
    import gguf

    if qtype not in QTYPES:
        raise TensorFileError(f"quantization {qtype!r} is not one of {QTYPES}")
    hf_arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if hf_arch not in ARCHS:
        raise TensorFileError(f"architecture {hf_arch} has no llama.cpp layout here (supported: {', '.join(ARCHS)}): "
                              "run it with --backend torch or mlx")
    arch = ARCHS[hf_arch]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    L, D = config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or D // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(str(config.get("_name_or_path") or "zip2zip-base"))
    w.add_context_length(int(config.get("max_position_embeddings") or 2048))
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    rope = rope_settings(config)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    extra = _rope_scaling(w, arch, config, rope.get("rope_scaling") or {}, head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(head_dim)
    V = state["model.embed_tokens.weight"].shape[0]
    w.add_vocab_size(V)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    _add_vocab(w, tokenizer, V)

    def add(name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 1 or qtype == "f32":
            w.add_tensor(name, a)
        elif qtype == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for name, a in extra.items():
        add(name, a)
    for i in range(L):
        for hf, gg in HF_TO_GGUF.items():
            for part in ("weight", "bias"):  # Qwen2's q/k/v carry biases
                a = state.get(f"model.layers.{i}.{hf}.{part}")
                if a is not None:
                    add(f"blk.{i}.{gg}.{part}", _permute(gg, arch, n_head, n_kv, a))
    add("output_norm.weight", state["model.norm.weight"])
    if not config.get("tie_word_embeddings", False) and "lm_head.weight" in state:
        add("output.weight", state["lm_head.weight"])
    _finish(w)
    return Path(path)


def _rope_scaling(w: Any, arch: str, config: dict[str, Any], scaling: dict[str, Any],
                  head_dim: int) -> dict[str, np.ndarray]:
    """RoPE scaling metadata; returns tensors it needs (Phi-3's long and short RoPE factors, whose
    attention factor is computed as llama.cpp's converter does)."""
    import math

    import gguf

    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        return {}
    if kind in ("longrope", "su") and arch == "phi3":
        orig = int(scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                   or config["max_position_embeddings"])
        scale = int(config["max_position_embeddings"]) / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        w.add_rope_scaling_orig_ctx_len(orig)
        long, short = (np.asarray(scaling[k], dtype=np.float32) for k in ("long_factor", "short_factor"))
        if long.shape != (head_dim // 2,) or short.shape != (head_dim // 2,):
            raise TensorFileError(f"longrope factors must have {head_dim // 2} values each")
        return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    raise TensorFileError(f"rope scaling {kind!r} is not written to GGUF here (linear; longrope on Phi-3): "
                          "run this model with --backend torch or mlx")


def _add_vocab(w: Any, tokenizer: Any, n_rows: int) -> None:
    """A byte-level BPE vocabulary (llama.cpp's "gpt2" model) from an HF fast tokenizer; we feed
    llama.cpp embeddings, never text, but it needs a vocabulary to load. Other tokenizers get the
    vocabulary-less "none" model."""
    import gguf

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if hasattr(tokenizer, "backend_tokenizer") else {}
    if model.get("type") != "BPE":
        w.add_tokenizer_model("none")
        return
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(n_rows)]
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.NORMAL if i in vocab else gguf.TokenType.UNUSED for i in range(n_rows)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)


def merge_lora_gguf(src: str | Path, dst: str | Path, peft_state: dict[str, np.ndarray], alpha: float,
                    qtype: str = "q8_0", progress: Any = lambda m: None) -> Path:
    """A copy of the model GGUF ``src`` with a PEFT LoRA merged into its weights: each adapted weight
    is dequantized, ``W + alpha/r * B @ A`` added (B row-permuted for q/k where llama.cpp stores them so),
    and stored as ``qtype`` (q8_0 or f16; a merge cannot go back to the base's 4-bit blocks without
    moving the weights the adapter was trained on). Other tensors and all metadata are copied."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    n_head = reader.fields[f"{arch}.attention.head_count"].contents()
    n_kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_kv = n_kv.contents() if n_kv is not None else n_head
    deltas: dict[str, np.ndarray] = {}
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for k, v in peft_state.items():
        m = _LORA_KEY.search(k)
        if m is None:
            raise TensorFileError(f"adapter tensor {k} is not a LoRA A/B weight of a decoder layer")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = v
    for (i, hf), ab in pairs.items():
        r = ab["A"].shape[0]
        d = (alpha / r) * (ab["B"] @ ab["A"])  # (out, in)
        gg = HF_TO_GGUF[hf]
        deltas[f"blk.{i}.{gg}.weight"] = _permute(gg, arch, n_head, n_kv, d)
    w = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    target = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16}[qtype]
    for n, t in enumerate(reader.tensors):
        if t.name in deltas:
            a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(deltas[t.name].shape) + deltas[t.name]
            if target == gguf.GGMLQuantizationType.F16:
                w.add_tensor(t.name, a.astype(np.float16))
            else:
                w.add_tensor(t.name, gguf.quants.quantize(a.astype(np.float32), target), raw_dtype=target)
            if n % 20 == 0:
                progress(f"merging the LoRA adapter: tensor {n + 1}/{len(reader.tensors)}")
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # bytes as they are
    if len(deltas) != len(pairs):
        raise TensorFileError("adapter layers do not match the model's tensors")
    _finish(w)
    return Path(dst)
