"""Hyper-encoders on ggml's CPU kernels (``ggml_graph``), numerically the torch ones
(``torch_backend/encoders.py``), reading the same parameter names from
``zip2zip_encoders.safetensors``, so the llama.cpp path needs neither torch nor MLX.

``encoder(rows, table)``: ``rows`` (N, M) int base ids right-padded with ``pad_id``, ``table``
(rows, D) float32, the embedding (input side) or LM head (output side) matrix. Output (N, D).
Attention rows with no key (a ``transformer`` pad slot) come out as zeros, as torch's
``scaled_dot_product_attention`` returns them. GELU is the exact (erf) one.

An encoder call is one ggml graph (a few hundred rows at most: longer calls are cut) whose
products run on the entries' ids packed together, not on their pads (``_Packed``). Matrices of
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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from z2z_chat.backends.llamacpp_backend import ggml_graph
from z2z_chat.backends.llamacpp_backend.ggml_graph import Graph, Tensors

Weights = dict[str, np.ndarray]
_local = threading.local()  # .threads: how many CPUs the calling thread's encoder calls may use
CHUNK = 256  # entries per graph: bounds a call's memory (a released model's FFN rows: 200 KB an entry)
KEEP, KEPT = 4, 32  # calls of at most KEEP entries (decode steps) run kept graphs, the KEPT last used a thread


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


class _Packed:
    """A call's entries without their pads: the T valid slots of (N, M) ``rows`` packed into (H, T)
    tensors, so the products (the cost of a call) skip the pads; attention unpacks q, k and v to
    (H, M, N) for its per-entry softmax and packs its output back. Pad slots are never keys; a pad
    query (unpacked from packed row 0, a stand-in) gets any finite scores and is dropped on packing."""

    def __init__(self, g: Graph, rows: np.ndarray, pad_id: int, D: int, causal: bool = False):
        N, M = rows.shape
        valid = rows != pad_id  # (N, M)
        self.valid, self.N, self.M = valid, N, M
        # (T,) padded slot (n * M + m) of each packed row; a call of pads only keeps one as a stand-in
        self.at = np.flatnonzero(valid) if valid.any() else np.zeros(1, dtype=np.int64)
        packed = np.zeros(N * M, dtype=np.int64)
        packed[self.at] = np.arange(len(self.at))
        self.T = len(self.at)
        allowed = np.broadcast_to(valid[:, None, :], (N, M, M))  # (N, M_q, M_k): valid keys
        if causal:
            allowed = allowed & np.tril(np.ones((M, M), dtype=bool))
        allowed = allowed | ~allowed.any(-1, keepdims=True)  # a query with no key: any finite row
        self.mask = g.input(np.where(allowed, 0.0, -np.inf)[:, None])  # (M_k, M_q, 1, N)
        self.pack, self.unpack = g.index(self.at), g.index(packed)
        self.position = g.index(self.at % M)  # (T,) each packed row's place in its entry
        at = self.at
        self.x = g.feed(lambda x0: x0.reshape(N * M, D)[at], (self.T, D))  # (D, T): the run's table rows, packed

    def pool(self, weights: np.ndarray) -> np.ndarray:
        """(N, M) weights of each entry's slots -> (N, T) weights of the packed rows."""
        out = np.zeros((self.N, self.T), dtype=np.float32)
        out[self.at // self.M, np.arange(self.T)] = (weights * self.valid).reshape(-1)[self.at]
        return out


def _attention(g: Graph, w: Tensors, x: int, names: list[str], heads: int, H: int, p: _Packed) -> int:
    """Multi-head self-attention of packed x (H, T) within each entry (``p``); ``names``: the q, k, v
    and output matrices. (H, T)."""
    d, M, N = H // heads, p.M, p.N

    def unpack(t: int) -> int:  # (H, T) -> (d, h, M, N)
        return g.reshape(g.take(t, p.unpack), d, heads, M, N)

    q, k = (g.permute(unpack(g.mm(w[n], x)), 0, 2, 1, 3) for n in names[:2])  # (d, M, h, N)
    v = g.cont(g.permute(unpack(g.mm(w[names[2]], x)), 1, 2, 0, 3))  # (M, d, h, N)
    a = g.softmax(g.mm(k, q), p.mask, 1.0 / math.sqrt(d))  # (M_k, M_q, h, N)
    o = g.mm(v, a)  # (d, M_q, h, N)
    o = g.reshape(g.cont(g.permute(o, 0, 2, 1, 3)), H, M * N)  # heads side by side, as torch's
    return g.mm(w[names[3]], g.take(o, p.pack))


def _pool(g: Graph, x: int, weights: np.ndarray, H: int, N: int) -> int:
    """Packed x (H, T) -> (H, N): each entry's rows weighted by ``weights`` (N, T)."""
    xt = g.cont(g.permute(x, 1, 0, 2, 3))  # (T, H)
    return g.mm(xt, g.input(weights))  # (T, H) x (T, N) -> (H, N)


def transformer(w: Tensors, cfg: dict[str, Any], pad_id: int, H: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(encode, pad_rows). Pads count in the mean (as the reference), but a pad slot attends to
    nothing, so its output depends only on its place in the entry: ``pad_rows`` computes the M of
    them once (a call adds the right ones in), and a call's products run on valid slots only."""
    heads, layers = cfg["num_heads"], cfg["num_hidden_layers"]

    def layer_rest(g: Graph, x: int, p: str, a: int | None) -> int:
        """Post-LN residual blocks after attention output ``a`` (None: a pad slot's, zero)."""
        x = g.layer_norm(x if a is None else g.add(x, a), w[f"{p}.post_attention_layernorm.weight"],
                         w[f"{p}.post_attention_layernorm.bias"])
        m = g.mm(w[f"{p}.mlp.fc2.weight"], g.gelu(g.mm(w[f"{p}.mlp.fc1.weight"], x)))
        return g.layer_norm(g.add(x, m), w[f"{p}.post_mlp_layernorm.weight"], w[f"{p}.post_mlp_layernorm.bias"])

    def positioned(g: Graph, x: int, position: int) -> int:
        return g.add(x, g.take(w["pos_embed.weight"], position)) if "pos_embed.weight" in w else x

    def pad_rows(g: Graph, pad: np.ndarray, M: int) -> tuple[int, tuple[int, ...]]:
        """The final rows (M, H) of a pad slot at each place 0..M-1; ``pad`` (H,) its table row."""
        x = positioned(g, g.input(np.broadcast_to(pad, (M, len(pad)))), g.index(np.arange(M)))
        for i in range(layers):
            x = layer_rest(g, x, f"layers.{i}", None)
        return x, (M, H)

    def encode(g: Graph, rows: np.ndarray, pads: np.ndarray | None) -> tuple[int, tuple[int, ...]]:
        """``pads`` (M, H): ``pad_rows``'s (None: ``rows`` has no pad)."""
        N, M = rows.shape
        p = _Packed(g, rows, pad_id, H)
        x = positioned(g, p.x, p.position)  # (H, T)
        for i in range(layers):
            names = [f"layers.{i}.attention.{n}_proj.weight" for n in ("q", "k", "v", "o")]
            x = layer_rest(g, x, f"layers.{i}", _attention(g, w, x, names, heads, H, p))
        out = _pool(g, x, p.pool(np.full((N, M), 1.0 / M, dtype=np.float32)), H, N)
        if pads is not None:  # the pads' share of each mean: (N, M) x (M, H)
            out = g.add(out, g.input((~p.valid).astype(np.float32) @ pads / M))
        return out, (N, H)

    return encode, pad_rows


def res_latent_attn(w: Tensors, cfg: dict[str, Any], pad_id: int,
                    H: int) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """(encode, pad_rows or None). Pad slots are no key and no part of the pooled output, so a
    call's products run on valid slots only; but a causal encoder pools an entry of pads only by its
    first slot, which attends to nothing: ``pad_rows`` gives it (as the transformer's)."""
    heads, causal, residual, layers = cfg["num_heads"], cfg["causal"], cfg["residual"], cfg["num_hidden_layers"]
    D = cfg.get("model_hidden_size") or H  # the table's width

    def start(g: Graph, x: int, position: int) -> int:
        """x (D, T) -> (H, T), placed."""
        if "proj_in.weight" in w:
            x = g.mm(w["proj_in.weight"], x)  # (H, T)
        return g.add(x, g.take(w["pos_embed.weight"], position))

    def layers_of(g: Graph, x: int, p: _Packed | None) -> int:
        """The layers and the final norm; ``p`` None: pad slots, whose attention output is zero."""
        for i in range(layers):
            q = f"layers.{i}"
            if p is not None:
                h = g.layer_norm(x, w[f"{q}.norm1.weight"], w[f"{q}.norm1.bias"])
                x = g.add(x, _attention(g, w, h, [f"{q}.w{n}.weight" for n in "qkvo"], heads, H, p))
            f = g.layer_norm(x, w[f"{q}.norm2.weight"], w[f"{q}.norm2.bias"])
            x = g.add(x, g.mm(w[f"{q}.w2.weight"], g.gelu(g.mm(w[f"{q}.w1.weight"], f))))
        return g.layer_norm(x, w["norm.weight"], w["norm.bias"])

    def pad_rows(g: Graph, pad: np.ndarray, M: int) -> tuple[int, tuple[int, ...]]:
        """The final rows (M, H) of a pad slot at each place 0..M-1; ``pad`` (D,) its table row."""
        x = g.input(np.broadcast_to(pad, (M, len(pad))))
        return layers_of(g, start(g, x, g.index(np.arange(M))), None), (M, H)

    def encode(g: Graph, rows: np.ndarray, pads: np.ndarray | None) -> tuple[int, tuple[int, ...]]:
        N, M = rows.shape
        p = _Packed(g, rows, pad_id, D, causal)
        x = layers_of(g, start(g, p.x, p.position), p)  # (H, T)
        n_valid = p.valid.sum(-1)  # (N,)
        if causal:  # the last valid row
            pick = np.zeros((N, M), dtype=np.float32)
            pick[np.arange(N), np.maximum(n_valid, 1) - 1] = 1.0
        else:  # the mean of the valid rows
            pick = (p.valid / np.maximum(n_valid, 1)[:, None]).astype(np.float32)
        out = _pool(g, x, p.pool(pick), H, N)  # (H, N)
        if causal and pads is not None and (n_valid == 0).any():  # entries of pads only: their first slot
            out = g.add(out, g.input((n_valid == 0)[:, None] * pads[0]))
        if "proj_out.weight" in w:
            out = g.mm(w["proj_out.weight"], out)  # (D, N)
        if residual:
            out = g.add(out, g.feed(lambda x0: x0[:, 0], (N, D)))  # each entry's first table row
        return out, (N, D if "proj_out.weight" in w or residual else H)

    return encode, pad_rows if causal else None


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
    graph, pad_graph = ENCODERS[encoder_type](w, cfg, pad_id, H)
    M_max = w.ne[w["pos_embed.weight"]][1] if "pos_embed.weight" in w else None
    nodes = 64 * (cfg["num_hidden_layers"] + 2)
    # id(table), M -> (table, pad_graph's (M, H)): a call with pads looks its table's up (the table
    # is kept with them, so its id is not reused: kept graphs' keys rely on that too); the pad row
    # is read once per table, not at each call
    pad_rows: dict[tuple[int, int], tuple[Any, np.ndarray]] = {}

    def pads(table: Any, M: int, threads: int, check: bool = False) -> np.ndarray | None:
        """pad_graph's rows (M, H) for ``table``'s pad row, computed once per table and M."""
        if pad_graph is None:
            return None
        key = (id(table), M)
        if key not in pad_rows:
            row = np.asarray(table[[pad_id]], dtype=np.float32)[0]  # (D,)
            with Graph(check=check, known=w.ne, nodes=nodes) as g:
                pad_rows[key] = (table, g.run(*pad_graph(g, row, M), threads=threads))
        return pad_rows[key][1]

    # ggml aborts on shapes that do not fit: checked first (ValueError), on a stand-in call
    M = min(2, M_max or 2)
    rows = np.full((2, M), 1 if pad_id != 1 else 0, dtype=np.int64)
    rows[1, 1:] = pad_id
    stand_in_pads = pads(np.broadcast_to(np.zeros(D, dtype=np.float32), (pad_id + 1, D)), M, 1, check=True)  # no copy
    with Graph(check=True, known=w.ne, nodes=nodes) as g:
        out, shape = graph(g, rows, stand_in_pads)
        g.need(g.ne[out][:2] == shape[::-1], f"the encoder gives {g.ne[out]}, expected {shape[::-1]}")
        nodes = 2 * len(g.ne) + 16  # room for the graph's nodes and leaves (ggml aborts past it)
    pad_rows.clear()
    out_width = shape[1]
    kept = threading.local()  # .graphs: {(shape, valid slots, pads' table): (Graph, out, shape)}, newest last

    def graph_of(rows: np.ndarray, table: Any, pad_out: np.ndarray | None) -> tuple[Graph, int, tuple[int, ...]]:
        """A kept graph for calls of ``rows``' shape and pad slots (a decode step's: their building
        in Python cost more than their computing), on this thread."""
        graphs = kept.__dict__.setdefault("graphs", OrderedDict())
        key = (rows.shape, (rows != pad_id).tobytes(), 0 if pad_out is None else id(table))
        if key in graphs:
            graphs.move_to_end(key)
        else:
            if len(graphs) >= KEPT:
                graphs.popitem(last=False)
            g = Graph(nodes=nodes, keep=True)
            graphs[key] = (g, *graph(g, rows, pad_out))
        return graphs[key]

    def encode(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if table.shape[-1] != D or (M_max is not None and rows.shape[1] > M_max):
            raise ValueError(f"encoder rows {rows.shape} of a table of width {table.shape[-1]}: "
                             f"expected width {D} and at most {M_max} ids a row")
        if len(rows) == 0:
            return np.zeros((0, out_width), dtype=np.float32)
        threads = getattr(_local, "threads", 1)
        pad_out = pads(table, rows.shape[1], threads) if (rows == pad_id).any() else None
        parts = []
        for at in range(0, len(rows), CHUNK):
            r = rows[at:at + CHUNK]
            x0 = table[r]  # (N, M, D) the rows' table rows
            if len(rows) <= KEEP:  # a decode step's call (a long call's last chunk would evict them)
                g, out, shape = graph_of(r, table, pad_out)
                parts.append(g.run(out, shape, x0, threads))
            else:
                with Graph(nodes=nodes) as g:
                    out, shape = graph(g, r, pad_out)
                    parts.append(g.run(out, shape, x0, threads))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    encode.weights = w  # keeps the tensors (and the arrays they lie in) with the encoder
    return encode
