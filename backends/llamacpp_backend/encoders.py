"""Hyper-encoders in numpy, numerically the torch ones (``torch_backend/encoders.py``), reading the
same parameter names from ``zip2zip_encoders.safetensors``, so the llama.cpp path needs neither
torch nor MLX.

``encoder(rows, table)``: ``rows`` (N, M) int base ids right-padded with ``pad_id``, ``table``
(rows, D) float32, the embedding (input side) or LM head (output side) matrix. Output (N, D).
Attention rows with no key (a ``transformer`` pad slot) come out as zeros, as torch's
``scaled_dot_product_attention`` returns them. GELU is the exact (erf) one.

Matrices of ``QUANT`` elements or more are kept as q8_0 (or float16) and multiplied on ggml's
kernels (``ggml_matmul``; ``prepare(kind="f32")`` keeps float32): at a released model's size the
encoders are 1.8 GB of float32 and a call is bound by reading them. Those outputs equal torch's
within that rounding; smaller matrices (the default model's) stay float32 and equal torch's.

Inside ``use_threads(n)`` a product by a large matrix (``SPLIT``) is split by columns over ``n``
threads (ggml's threads for a q8_0 one): the caller knows how many CPUs are idle while the encoder runs (the llama.cpp backend:
all of them before a step, the ones llama.cpp's threads leave free beside one).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import ggml_matmul

Weights = dict[str, Any]  # np.ndarray; once built, a ggml_matmul.QuantMatrix under name.weight.ggml
SPLIT = 1 << 22  # elements (16 MB of float32): a product by a larger matrix is split across threads
_local = threading.local()  # .threads: how many CPUs the calling thread's encoder calls may use
_pool: ThreadPoolExecutor | None = None


@contextmanager
def use_threads(n: int) -> Iterator[None]:
    """Encoder calls on this thread may split their large products over ``n`` threads (numpy's
    BLAS stays at one thread each: its own threads spin after a call, on llama.cpp's cores). The
    caller says how many CPUs are idle meanwhile: all of them before a llama.cpp step, the ones
    its threads leave free beside one."""
    before = getattr(_local, "threads", 1)
    _local.threads = max(1, n)
    try:
        yield
    finally:
        _local.threads = before


def _split(x: np.ndarray, wt: np.ndarray, n: int) -> np.ndarray:
    """``x @ wt`` as ``n`` products of column blocks, run at once (numpy releases the GIL in BLAS):
    each reads 1/n of the matrix, which is what bounds these products (few rows, a large matrix)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="z2z-encoder")
    out = np.empty((x.shape[0], wt.shape[1]), dtype=np.float32)
    cuts = np.linspace(0, wt.shape[1], n + 1).astype(int)

    def block(i: int) -> None:
        a, b = cuts[i], cuts[i + 1]
        out[:, a:b] = x @ wt[:, a:b]

    jobs = [_pool.submit(block, i) for i in range(1, n)]
    block(0)
    for j in jobs:
        j.result()
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """Numerical Recipes' erfc fit (|rel. error| < 1.2e-7): well inside float32 tolerances."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277)))))))))
    r = 1.0 - t * np.exp(poly)
    return np.copysign(r, x)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0).astype(x.dtype)))


def layer_norm(x: np.ndarray, w: Weights, prefix: str, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def linear(x: np.ndarray, w: Weights, name: str) -> np.ndarray:
    x2, threads = x.reshape(-1, x.shape[-1]), getattr(_local, "threads", 1)  # one 2-D product: numpy runs 3-D @ 2-D as a loop
    q = w.get(f"{name}.weight.ggml")
    if q is not None:
        out = q.matmul(x2, threads)
    else:
        wt = w[f"{name}.weight.T"]  # (in, out), transposed once at build time: 1.3-1.6x faster than a .T view here
        n = min(threads, wt.shape[1])
        out = _split(x2, wt, n) if n > 1 and wt.size >= SPLIT else x2 @ wt
    return out.reshape(*x.shape[:-1], out.shape[1])


def _has(w: Weights, name: str) -> bool:
    return f"{name}.weight.T" in w or f"{name}.weight.ggml" in w


def _qkv(x: np.ndarray, w: Weights, fused: str, part: str) -> list[np.ndarray]:
    """q, k and v: one matmul where ``prepare`` fused them, else three (``part`` formats q/k/v)."""
    if _has(w, fused):
        return np.split(linear(x, w, fused), 3, axis=-1)
    return [linear(x, w, part.format(n)) for n in "qkv"]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, h, M, d) each; mask broadcastable to (N, h, M, M), True = attend; empty rows -> 0."""
    scores = (q @ k.swapaxes(-1, -2)) / np.sqrt(q.shape[-1]).astype(q.dtype)
    scores = np.where(mask, scores, -np.inf)
    any_key = mask.any(-1, keepdims=True)
    scores = np.where(any_key, scores, 0.0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = np.where(any_key & mask, p, 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    return p @ v


def _heads(t: np.ndarray, h: int) -> np.ndarray:
    N, M, H = t.shape
    return t.reshape(N, M, h, H // h).transpose(0, 2, 1, 3)  # (N, h, M, d)


def _merge(t: np.ndarray) -> np.ndarray:
    N, h, M, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(N, M, h * d)


def transformer(w: Weights, cfg: dict[str, Any], pad_id: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    heads = cfg["num_heads"]

    def encode(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        x = table[rows]  # (N, M, D)
        if "pos_embed.weight" in w:
            x = x + w["pos_embed.weight"][: rows.shape[1]]
        valid = rows != pad_id
        mask = (valid[:, :, None] & valid[:, None, :])[:, None]  # (N, 1, M, M)
        for i in range(cfg["num_hidden_layers"]):
            p = f"layers.{i}"
            a = attend(*(_heads(t, heads) for t in _qkv(x, w, f"{p}.attention.qkv", f"{p}.attention.{{}}_proj")), mask)
            x = layer_norm(x + linear(_merge(a), w, f"{p}.attention.o_proj"), w, f"{p}.post_attention_layernorm")
            m = linear(gelu(linear(x, w, f"{p}.mlp.fc1")), w, f"{p}.mlp.fc2")
            x = layer_norm(x + m, w, f"{p}.post_mlp_layernorm")
        return x.mean(axis=1)  # (N, D), pads included, as the reference

    return encode


def res_latent_attn(w: Weights, cfg: dict[str, Any], pad_id: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    heads, causal, residual = cfg["num_heads"], cfg["causal"], cfg["residual"]

    def encode(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        N, M = rows.shape
        x = table[rows]  # (N, M, D)
        first = x[:, 0]
        if _has(w, "proj_in"):
            x = linear(x, w, "proj_in")
        x = x + w["pos_embed.weight"][:M]  # (N, M, H)
        valid = rows != pad_id
        mask = valid[:, None, None, :]  # (N, 1, 1, M): key-only
        if causal:
            mask = mask & np.tril(np.ones((M, M), dtype=bool))
        for i in range(cfg["num_hidden_layers"]):
            p = f"layers.{i}"
            h = layer_norm(x, w, f"{p}.norm1")
            a = attend(*(_heads(t, heads) for t in _qkv(h, w, f"{p}.wqkv", f"{p}.w{{}}")), mask)
            x = x + linear(_merge(a), w, f"{p}.wo")
            x = x + linear(gelu(linear(layer_norm(x, w, f"{p}.norm2"), w, f"{p}.w1")), w, f"{p}.w2")
        x = layer_norm(x, w, "norm")
        if causal:
            out = x[np.arange(N), np.maximum(valid.sum(-1), 1) - 1]
        else:
            out = (x * valid[..., None]).sum(1) / np.maximum(valid.sum(-1, keepdims=True), 1)
        if _has(w, "proj_out"):
            out = linear(out, w, "proj_out")
        return out + first if residual else out

    return encode


ENCODERS = {"transformer": transformer, "res_latent_attn": res_latent_attn}


def prepare(weights: Weights, cfg: dict[str, Any], kind: str = "q8_0") -> Weights:
    """The checkpoint's weights ((out, in) matrices, possibly read-only views of its file) as the
    encoders use them, each matrix kept once: one of ``QUANT`` elements or more as ``kind`` blocks
    (``name.weight.q8_0`` or ``.f16``, see ``ggml_matmul``) unless ``kind`` is f32, else as the (in, out) float32 copy
    ``linear`` multiplies by (numpy multiplies by it 1.3-1.6x faster than by a transposed view: 6-8
    rows, one BLAS thread, 0.27 vs 0.32 ms at 768x256, 19 vs 31 ms at 3072x12288); q, k and v fused
    where they are small."""
    w = dict(weights)
    for i in range(cfg["num_hidden_layers"]):  # one matmul for q, k and v where they are small (latency-bound)
        for fused, parts in ((f"layers.{i}.attention.qkv", [f"layers.{i}.attention.{n}_proj" for n in "qkv"]),
                             (f"layers.{i}.wqkv", [f"layers.{i}.w{n}" for n in "qkv"])):
            if all(f"{p}.weight" in w for p in parts) and w[f"{parts[0]}.weight"].size <= SMALL:
                w[f"{fused}.weight"] = np.concatenate([w.pop(f"{p}.weight") for p in parts])
    for k in [k for k, v in w.items() if v.ndim == 2 and k.endswith(".weight") and not k.startswith("pos_embed")]:
        m = w.pop(k)
        if kind in ggml_matmul.TYPES and m.size >= QUANT and ggml_matmul.fits(m, kind):
            w[f"{k}.{kind}"] = ggml_matmul.quantize(m, kind)
        else:
            w[f"{k}.T"] = np.ascontiguousarray(m.T, dtype=np.float32)
    return {k: v if ggml_kind(k) else np.asarray(v, dtype=np.float32) for k, v in w.items()}


def ggml_kind(key: str) -> str | None:
    """The ggml type of ``prepare``'s ``key`` (``name.weight.q8_0``: q8_0), None for float32."""
    kind = key.rsplit(".", 1)[-1]
    return kind if kind in ggml_matmul.TYPES else None


SMALL = 1 << 20  # elements: above this q, k and v stay apart (fusing would need a second copy at load)
QUANT = 1 << 22  # elements: a matrix this large is kept as q8_0 (Phi-3.5-mini's encoders: 1.8 GB -> 0.48 GB)
LAYOUT = 2  # of prepare's output; part of the key of cached prepared weights: change it with the layout


def build_encoder(encoder_type: str, weights: Weights, cfg: dict[str, Any], pad_id: int, prepared: bool = False,
                  kind: str = "q8_0") -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The encoder of the checkpoint's ``weights`` (or of ``prepare``'s output, with ``prepared``)."""
    w = {}
    for k, v in (weights if prepared else prepare(weights, cfg, kind)).items():
        if (t := ggml_kind(k)) is not None:  # name.weight.q8_0 -> name.weight.ggml, a QuantMatrix
            w[f"{k.rsplit('.', 1)[0]}.ggml"] = ggml_matmul.QuantMatrix(v, t)
        else:
            w[k] = v
    return ENCODERS[encoder_type](w, cfg, pad_id)
