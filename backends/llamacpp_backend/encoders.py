"""Hyper-encoders on ggml's CPU kernels (``ggml_graph``), numerically the torch ones
(``torch_backend/encoders.py``), reading the same parameter names from
``zip2zip_encoders.safetensors``, so the llama.cpp path needs neither torch nor MLX.

``encoder(rows, table)``: ``rows`` (N, M) int base ids right-padded with ``pad_id``, ``table``
(rows, D) float32, the embedding (input side) or LM head (output side) matrix. Output (N, D).
Attention rows with no key (a ``transformer`` pad slot) come out as zeros, as torch's
``scaled_dot_product_attention`` returns them. GELU is the exact (erf) one.

An encoder call is one ggml graph (a few hundred rows at most: longer calls are cut). Matrices of
``QUANT`` elements or more are kept as q8_0 (``prepare``'s ``kind``; f16, or float32 with
``f32``): a released 4B model's encoders are 1.8 GB as float32 and a call was bound by reading
them. Outputs equal torch's within float32 rounding, or within that type's rounding; smaller
matrices (all of the default model's) stay float32.

Inside ``use_threads(n)`` a call runs on ``n`` ggml threads: the caller knows how many CPUs are
idle meanwhile (the llama.cpp backend: llama.cpp's own thread count before a step, the CPUs its
threads leave free beside one).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import ggml_graph
from .ggml_graph import Graph, Tensors

Weights = dict[str, np.ndarray]
_local = threading.local()  # .threads: how many CPUs the calling thread's encoder calls may use
CHUNK = 256  # entries per graph: bounds a call's memory (a released model's FFN rows: 200 KB an entry)


@contextmanager
def use_threads(n: int) -> Iterator[None]:
    """Encoder calls on this thread run on ``n`` ggml threads; the caller says how many CPUs are
    idle meanwhile: llama.cpp's thread count before its step, the CPUs it leaves free beside one."""
    before = getattr(_local, "threads", 1)
    _local.threads = max(1, n)
    try:
        yield
    finally:
        _local.threads = before


def _attention(g: Graph, w: Tensors, x: int, names: list[str], heads: int, M: int, N: int, H: int, mask: int,
               keep: int | None = None) -> int:
    """Multi-head self-attention of x (H, M, N) with ``mask`` (M, M, 1, N) added to the scores;
    ``keep`` (1, M, 1, N) zeroes query rows. ``names``: the q, k, v and output matrices. (H, M, N)."""
    d = H // heads

    def split(t: int) -> int:
        return g.permute(g.reshape(t, d, heads, M, N), 0, 2, 1, 3)  # (d, M, h, N)

    q, k = split(g.mm(w[names[0]], x)), split(g.mm(w[names[1]], x))
    v = g.cont(g.permute(g.reshape(g.mm(w[names[2]], x), d, heads, M, N), 1, 2, 0, 3))  # (M, d, h, N)
    p = g.softmax(g.mm(k, q), mask, 1.0 / math.sqrt(d))  # (M_k, M_q, h, N)
    o = g.mm(v, p)  # (d, M_q, h, N)
    if keep is not None:
        o = g.mul(o, keep)
    o = g.reshape(g.cont(g.permute(o, 0, 2, 1, 3)), H, M, N)  # heads side by side, as torch's
    return g.mm(w[names[3]], o)


def _pool(g: Graph, x: int, weights: np.ndarray, H: int, N: int) -> int:
    """x (H, M, N) -> (H, N): each entry's rows weighted by ``weights`` (N, M) (a mean, or one row)."""
    xt = g.cont(g.permute(x, 1, 0, 2, 3))  # (M, H, N)
    return g.reshape(g.mm(xt, g.input(weights[:, None, :])), H, N)  # (M, H, N) x (M, 1, N) -> (H, 1, N)


def transformer(w: Tensors, cfg: dict[str, Any], pad_id: int, H: int) -> Callable[..., np.ndarray]:
    heads, layers = cfg["num_heads"], cfg["num_hidden_layers"]

    def encode(g: Graph, rows: np.ndarray, x0: np.ndarray) -> tuple[int, tuple[int, ...]]:
        N, M = rows.shape
        x = g.input(x0)  # (H, M, N)
        if "pos_embed.weight" in w:
            x = g.add(x, g.rows(w["pos_embed.weight"], H, M))
        valid = rows != pad_id
        pair = valid[:, :, None] & valid[:, None, :]  # (N, M_q, M_k)
        pair |= ~valid[:, :, None]  # a pad query (no key): any finite row; its output is zeroed
        mask = g.input(np.where(pair, 0.0, -np.inf)[:, None])  # (M_k, M_q, 1, N)
        keep = g.input(valid[:, None, :, None].astype(np.float32))  # (1, M_q, 1, N)
        for i in range(layers):
            p = f"layers.{i}"
            names = [f"{p}.attention.{n}_proj.weight" for n in ("q", "k", "v", "o")]
            a = _attention(g, w, x, names, heads, M, N, H, mask, keep)
            x = g.layer_norm(g.add(x, a), w[f"{p}.post_attention_layernorm.weight"],
                             w[f"{p}.post_attention_layernorm.bias"])
            m = g.mm(w[f"{p}.mlp.fc2.weight"], g.gelu(g.mm(w[f"{p}.mlp.fc1.weight"], x)))
            x = g.layer_norm(g.add(x, m), w[f"{p}.post_mlp_layernorm.weight"], w[f"{p}.post_mlp_layernorm.bias"])
        return _pool(g, x, np.full((N, M), 1.0 / M, dtype=np.float32), H, N), (N, H)  # pads included, as the reference

    return encode


def res_latent_attn(w: Tensors, cfg: dict[str, Any], pad_id: int, H: int) -> Callable[..., np.ndarray]:
    heads, causal, residual, layers = cfg["num_heads"], cfg["causal"], cfg["residual"], cfg["num_hidden_layers"]

    def encode(g: Graph, rows: np.ndarray, x0: np.ndarray) -> tuple[int, tuple[int, ...]]:
        N, M = rows.shape
        x = g.input(x0)  # (D, M, N)
        if "proj_in.weight" in w:
            x = g.mm(w["proj_in.weight"], x)  # (H, M, N)
        x = g.add(x, g.rows(w["pos_embed.weight"], H, M))
        valid = rows != pad_id
        allowed = np.broadcast_to(valid[:, None, :], (N, M, M))  # (N, M_q, M_k): key-only
        if causal:
            allowed = allowed & np.tril(np.ones((M, M), dtype=bool))
        some = allowed.any(-1)  # (N, M_q): a query with no key (a row of pads) gets zeros, as torch's
        mask = g.input(np.where(allowed | ~some[..., None], 0.0, -np.inf)[:, None])  # (M_k, M_q, 1, N)
        keep = g.input(some[:, None, :, None].astype(np.float32))  # (1, M_q, 1, N)
        for i in range(layers):
            p = f"layers.{i}"
            h = g.layer_norm(x, w[f"{p}.norm1.weight"], w[f"{p}.norm1.bias"])
            x = g.add(x, _attention(g, w, h, [f"{p}.w{n}.weight" for n in "qkvo"], heads, M, N, H, mask, keep))
            f = g.layer_norm(x, w[f"{p}.norm2.weight"], w[f"{p}.norm2.bias"])
            x = g.add(x, g.mm(w[f"{p}.w2.weight"], g.gelu(g.mm(w[f"{p}.w1.weight"], f))))
        x = g.layer_norm(x, w["norm.weight"], w["norm.bias"])
        n_valid = np.maximum(valid.sum(-1), 1)  # (N,)
        if causal:  # the last valid row
            pick = np.zeros((N, M), dtype=np.float32)
            pick[np.arange(N), n_valid - 1] = 1.0
        else:  # the mean of the valid rows
            pick = (valid / n_valid[:, None]).astype(np.float32)
        out = _pool(g, x, pick, H, N)  # (H, N)
        D = x0.shape[-1]
        if "proj_out.weight" in w:
            out = g.mm(w["proj_out.weight"], out)  # (D, N)
        if residual:
            out = g.add(out, g.input(x0[:, 0]))
        return out, (N, D if "proj_out.weight" in w or residual else H)

    return encode


ENCODERS = {"transformer": transformer, "res_latent_attn": res_latent_attn}


def prepare(weights: Weights, cfg: dict[str, Any], kind: str = "q8_0") -> Weights:
    """The checkpoint's weights ((out, in) matrices, possibly read-only views of its file) as the
    encoders keep them: a matrix of ``QUANT`` elements or more as ``kind`` blocks
    (``name.weight.q8_0`` or ``.f16``, ``ggml_graph.quantize``) unless ``kind`` is f32, the rest
    float32 as they are (ggml multiplies by (out, in) rows directly)."""
    w = {}
    for k, v in weights.items():
        if (kind in ggml_graph.TYPES and v.ndim == 2 and k.endswith(".weight") and not k.startswith("pos_embed")
                and v.size >= QUANT and ggml_graph.fits(v, kind)):
            w[f"{k}.{kind}"] = ggml_graph.quantize(v, kind)
        else:
            w[k] = np.asarray(v, dtype=np.float32)
    return w


QUANT = 1 << 22  # elements: a matrix this large is kept as q8_0 (Phi-3.5-mini's encoders: 1.8 GB -> 0.48 GB)
LAYOUT = 3  # of prepare's output; part of the key of cached prepared weights: change it with the layout


def ggml_kind(key: str) -> str | None:
    """The ggml type of ``prepare``'s ``key`` (``name.weight.q8_0``: q8_0), None for float32."""
    kind = key.rsplit(".", 1)[-1]
    return kind if kind in ggml_graph.TYPES else None


def build_encoder(encoder_type: str, weights: Weights, cfg: dict[str, Any], pad_id: int, prepared: bool = False,
                  kind: str = "q8_0") -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The encoder of the checkpoint's ``weights`` (or of ``prepare``'s output, with ``prepared``)."""
    arrays = {}
    for k, v in (weights if prepared else prepare(weights, cfg, kind)).items():
        t = ggml_kind(k)
        arrays[k.rsplit(".", 1)[0] if t else k] = (v, t or "f32")  # name.weight.q8_0 -> name.weight
    w = Tensors(arrays)
    H = cfg["hidden_size"]
    D = cfg.get("model_hidden_size") or H
    graph = ENCODERS[encoder_type](w, cfg, pad_id, H)
    M_max = w.ne[w["pos_embed.weight"]][1] if "pos_embed.weight" in w else None
    # ggml aborts on shapes that do not fit: checked first (ValueError), on a stand-in call
    with Graph(1, check=True, known=w.ne, nodes=64 * (cfg["num_hidden_layers"] + 2)) as g:
        M = min(2, M_max or 2)
        rows = np.ones((2, M), dtype=np.int64)
        rows[1, 1:] = pad_id
        out, shape = graph(g, rows, np.zeros((2, M, D), dtype=np.float32))
        g.need(g.ne[out][:2] == shape[::-1], f"the encoder gives {g.ne[out]}, expected {shape[::-1]}")
        nodes = 2 * len(g.ne) + 16  # room for the graph's nodes and leaves (ggml aborts past it)
    out_width = shape[1]

    def encode(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if table.shape[-1] != D or (M_max is not None and rows.shape[1] > M_max):
            raise ValueError(f"encoder rows {rows.shape} of a table of width {table.shape[-1]}: "
                             f"expected width {D} and at most {M_max} ids a row")
        if len(rows) == 0:
            return np.zeros((0, out_width), dtype=np.float32)
        parts = []
        for at in range(0, len(rows), CHUNK):
            r = rows[at:at + CHUNK]
            with Graph(getattr(_local, "threads", 1), nodes=nodes) as g:
                out, shape = graph(g, r, table[r])  # table rows (N, M, D)
                parts.append(g.run(out, shape))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    encode.weights = w  # keeps the tensors (and the arrays they lie in) with the encoder
    return encode
