"""Hyper-encoders in MLX, numerically the torch ones (``torch_backend/encoders.py``) and with the
same parameter names, so ``zip2zip_encoders.safetensors`` loads as is.

Input: ``x`` (N, M, D), the embedding (or LM head) rows of each entry's base ids, pads included,
and ``valid`` (N, M) bool. Output: (N, D). Attention is written out (not ``mx.fast``) because a
``transformer`` pad slot attends to nothing and must come out as zeros, as torch's
``scaled_dot_product_attention`` returns for fully masked rows.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
    """(N, H, M, d) each; mask broadcastable to (N, H, M, M), True = attend; empty rows -> 0."""
    scores = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)
    scores = mx.where(mask, scores, -mx.inf)
    any_key = mx.any(mask, axis=-1, keepdims=True)
    probs = mx.softmax(mx.where(any_key, scores, 0.0), axis=-1, precise=True)
    return mx.where(any_key, probs, 0.0) @ v


def split_heads(t: mx.array, heads: int) -> mx.array:
    N, M, H = t.shape
    return t.reshape(N, M, heads, H // heads).transpose(0, 2, 1, 3)


def merge_heads(t: mx.array) -> mx.array:
    N, h, M, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(N, M, h * d)


class MLXSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(merge_heads(attend(q, k, v, mask[:, None])))


class MLXMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate, bias=False)
        self.fc2 = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))  # exact (erf) GELU, as torch's default


class MLXPostLNLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.attention = MLXSelfAttention(hidden, heads)
        self.mlp = MLXMLP(hidden, intermediate)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.post_mlp_layernorm = nn.LayerNorm(hidden)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.post_attention_layernorm(x + self.attention(x, mask))
        return self.post_mlp_layernorm(x + self.mlp(x))


class MLXTransformerEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], max_subtokens: int):
        super().__init__()
        H = cfg["hidden_size"]
        self.learnable = cfg["position_encoding"] == "learnable"
        if self.learnable:
            self.pos_embed = nn.Embedding(max_subtokens, H)
        inter = cfg["intermediate_size"] or 4 * H
        self.layers = [MLXPostLNLayer(H, inter, cfg["num_heads"]) for _ in range(cfg["num_hidden_layers"])]

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        if self.learnable:
            x = x + self.pos_embed.weight[: x.shape[1]]
        mask = valid[:, :, None] & valid[:, None, :]  # (N, M, M)
        for layer in self.layers:
            x = layer(x, mask)
        return x.mean(axis=1)  # pads included, as the reference


class MLXResLatentAttnLayer(nn.Module):
    def __init__(self, dim: int, intermediate: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.norm1(x)
        q, k, v = (split_heads(p(h), self.heads) for p in (self.wq, self.wk, self.wv))
        x = x + self.wo(merge_heads(attend(q, k, v, mask)))
        return x + self.w2(nn.gelu(self.w1(self.norm2(x))))


class MLXResLatentAttnEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], max_subtokens: int):
        super().__init__()
        H = cfg["hidden_size"]
        D = cfg["model_hidden_size"] or H
        self.causal, self.residual = cfg["causal"], cfg["residual"]
        self.project = D != H
        if self.project:
            self.proj_in = nn.Linear(D, H, bias=False)
            self.proj_out = nn.Linear(H, D, bias=False)
        self.pos_embed = nn.Embedding(max_subtokens, H)
        inter = cfg["intermediate_size"] or 4 * H
        self.layers = [MLXResLatentAttnLayer(H, inter, cfg["num_heads"]) for _ in range(cfg["num_hidden_layers"])]
        self.norm = nn.LayerNorm(H)

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        N, M, _ = x.shape
        first = x[:, 0]
        if self.project:
            x = self.proj_in(x)
        x = x + self.pos_embed.weight[:M]
        mask = valid[:, None, None, :]  # (N, 1, 1, M): key-only
        if self.causal:
            mask = mask & mx.tril(mx.ones((M, M), dtype=mx.bool_))
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        if self.causal:
            last = mx.maximum(valid.sum(-1), 1) - 1
            out = mx.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        else:
            v = valid[..., None].astype(x.dtype)
            out = (x * v).sum(1) / mx.maximum(v.sum(1), 1)
        if self.project:
            out = self.proj_out(out)
        return out + first if self.residual else out


def build_encoder(encoder_type: str, cfg: dict[str, Any], max_subtokens: int) -> nn.Module:
    return {"transformer": MLXTransformerEncoder, "res_latent_attn": MLXResLatentAttnEncoder}[encoder_type](cfg, max_subtokens)
