"""Hyper-encoders: a hypertoken's base ids -> one vector, with the reference's numerics.

Input: ``entries`` (N, M) long, each row an entry's base ids right-padded with ``pad_id``;
``table`` (rows, D), the decoder's input embedding matrix (input side) or LM head matrix (output
side). Output: (N, D). State-dict keys equal those of the ``zip2zip`` 0.2.0 package, so encoder
files load both ways.

- ``transformer`` (v0.1 models): post-LN layers in the model's width; attention between non-pad
  slots only; pooled by a plain mean over all M slots, pads included (a pad slot's vector is
  its embedding pushed through the layers without attention: released checkpoints depend on it).
- ``res_latent_attn`` (zip2zip++): optional projection to a latent width, pre-LN layers with a
  key-only pad mask (plus causal), final LayerNorm, masked mean or last-valid-slot pooling,
  projection back, plus the first subtoken's raw embedding when ``residual``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, M, H = x.shape  # mask: (N, M, M) bool, True = attend

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, M, self.heads, -1).transpose(1, 2)  # (N, heads, M, H/heads)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                             split(self.v_proj(x)), attn_mask=mask.unsqueeze(1))
        return self.o_proj(out.transpose(1, 2).reshape(N, M, H))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate, bias=False)
        self.fc2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PostLNLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.mlp = MLP(hidden, intermediate)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.post_mlp_layernorm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(x + self.attention(x, mask)).to(x.dtype)
        return self.post_mlp_layernorm(x + self.mlp(x)).to(x.dtype)


class TransformerEncoder(nn.Module):
    """``encoder_type: "transformer"``."""

    def __init__(self, cfg: dict[str, Any], max_subtokens: int, pad_id: int):
        super().__init__()
        H = cfg["hidden_size"]
        self.pad_id = pad_id
        self.pos_embed = nn.Embedding(max_subtokens, H) if cfg["position_encoding"] == "learnable" else None
        inter = cfg["intermediate_size"] or 4 * H
        self.layers = nn.ModuleList(PostLNLayer(H, inter, cfg["num_heads"])
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, entries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        x = table[entries]  # (N, M, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(entries.shape[1], device=x.device))
        valid = entries != self.pad_id  # (N, M)
        mask = valid.unsqueeze(-1) & valid.unsqueeze(-2)  # (N, M, M): pad queries see nothing -> 0
        for layer in self.layers:
            x = layer(x, mask)
        return x.mean(dim=1)  # (N, D), pads included, as the reference


class ResLatentAttnLayer(nn.Module):
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, M, D = x.shape  # mask: (N, 1, 1 or M, M) bool

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, M, self.heads, -1).transpose(1, 2)

        h = self.norm1(x)
        with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            a = F.scaled_dot_product_attention(split(self.wq(h)), split(self.wk(h)), split(self.wv(h)),
                                               attn_mask=mask)
        x = x + self.wo(a.transpose(1, 2).reshape(N, M, D))
        return x + self.w2(F.gelu(self.w1(self.norm2(x))))


class ResLatentAttnEncoder(nn.Module):
    """``encoder_type: "res_latent_attn"``."""

    def __init__(self, cfg: dict[str, Any], max_subtokens: int, pad_id: int):
        super().__init__()
        H = cfg["hidden_size"]
        D = cfg["model_hidden_size"] or H
        self.pad_id, self.causal, self.residual = pad_id, cfg["causal"], cfg["residual"]
        self.proj_in = nn.Linear(D, H, bias=False) if D != H else None
        self.proj_out = nn.Linear(H, D, bias=False) if D != H else None
        if self.residual and self.proj_out is not None:
            nn.init.zeros_(self.proj_out.weight)  # starts as the identity on the first subtoken
        self.pos_embed = nn.Embedding(max_subtokens, H)
        inter = cfg["intermediate_size"] or 4 * H
        self.layers = nn.ModuleList(ResLatentAttnLayer(H, inter, cfg["num_heads"])
                                    for _ in range(cfg["num_hidden_layers"]))
        self.norm = nn.LayerNorm(H)

    def forward(self, entries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        N, M = entries.shape
        x = F.embedding(entries, table)  # (N, M, D)
        first = x[:, 0]  # (N, D), before any projection
        if self.proj_in is not None:
            x = self.proj_in(x)
        x = x + self.pos_embed(torch.arange(M, device=x.device))  # (N, M, H)
        valid = entries != self.pad_id  # (N, M)
        mask = valid[:, None, None, :]  # (N, 1, 1, M): key-only
        if self.causal:
            mask = mask & torch.ones(M, M, dtype=torch.bool, device=x.device).tril()
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        if self.causal:
            last = (valid.sum(-1).clamp(min=1) - 1).long()
            out = x[torch.arange(N, device=x.device), last]
        else:
            out = (x * valid.unsqueeze(-1)).sum(1) / valid.sum(-1, keepdim=True).clamp(min=1)
        if self.proj_out is not None:
            out = self.proj_out(out)
        return out + first if self.residual else out


ENCODERS = {"transformer": TransformerEncoder, "res_latent_attn": ResLatentAttnEncoder}


def build_encoder(encoder_type: str, cfg: dict[str, Any], max_subtokens: int, pad_id: int) -> nn.Module:
    return ENCODERS[encoder_type](cfg, max_subtokens, pad_id)
