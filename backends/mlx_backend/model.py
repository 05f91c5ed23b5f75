"""The zip2zip model in MLX over an mlx-lm decoder (Llama, Qwen2, Mistral, Phi-3/3.5).

mlx-lm's attention puts every token at RoPE position ``cache.offset``; zip2zip++
(``base_token_end``) needs each code at the base-token index of its last subtoken. So the decoder
blocks are driven here with their own weights: the attention is recomputed with explicit
positions (RoPE applied per run of consecutive positions, since ``mx.fast.rope`` takes one
offset per call), the MLP and norms are the blocks' own. ``compressed`` positions are one run.

Hyper vectors: the encoders read the embedding rows (``embed_tokens`` returns dequantized rows
for a quantized decoder) and the LM head rows (``mx.dequantize`` of the gathered rows when the
head is quantized); the logits are base (V) ++ hyper (C), slots that do not exist at -inf.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from z2z_chat.backends.config import MLX_ARCHITECTURES, Zip2ZipConfig
from z2z_chat.backends.hyper import Entry, HyperSlots, Mask, EncodePlan, assemble, candidate_rows
from z2z_chat.backends.loading.sources import pad_id_of, rope_settings
from z2z_chat.backends.mlx_backend.encoders import build_encoder


@dataclass
class MLXHyperVectors:
    """One session's hypertoken vectors; ``slots`` says which are live (``backends/hyper.py``)."""

    hyper_in: mx.array  # (C, D)
    hyper_out: mx.array  # (C, D)
    slots: HyperSlots


def rope_runs(rope: nn.Module, x: mx.array, positions: Sequence[int]) -> mx.array:
    """RoPE on (B, H, T, d) at explicit positions: one call per run of consecutive positions."""
    out, start = [], 0
    for t in range(1, len(positions) + 1):
        if t == len(positions) or positions[t] != positions[t - 1] + 1:
            out.append(rope(x[:, :, start:t], offset=int(positions[start])))
            start = t
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=2)


def attention(attn: nn.Module, x: mx.array, positions: Sequence[int], cache: Any, mask: Any) -> mx.array:
    B, L, _ = x.shape
    if hasattr(attn, "qkv_proj"):  # Phi-3: fused projections
        qkv = attn.qkv_proj(x)
        qn = attn.n_heads * attn.head_dim
        q, k, v = mx.split(qkv, [qn, qn + attn.n_kv_heads * attn.head_dim], axis=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = rope_runs(attn.rope, q, positions), rope_runs(attn.rope, k, positions)
    k, v = cache.update_and_fetch(k, v)
    out = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Zip2ZipMLX:
    def __init__(self, config: Zip2ZipConfig, lm: nn.Module, pad_id: int, encoders: dict[str, mx.array],
                 model_type: str):
        if model_type not in MLX_ARCHITECTURES:
            raise ValueError(f"architecture {model_type!r} is not supported by the MLX backend "
                             f"(supported: {', '.join(MLX_ARCHITECTURES)})")
        c = config.compression
        self.config, self.lm, self.pad_id = config, lm, pad_id
        self.V, self.C, self.M = c.initial_vocab_size, c.max_codebook_size, c.max_subtokens
        enc = config.encoder
        self.input_encoder = build_encoder(config.encoder_type, enc, self.M)
        self.output_encoder = None if enc["tie_encoders"] else build_encoder(config.encoder_type, enc, self.M)
        for prefix, module in (("input_encoder", self.input_encoder), ("output_encoder", self.output_encoder)):
            if module is not None:
                sub = [(k[len(prefix) + 1:], v) for k, v in encoders.items() if k.startswith(prefix + ".")]
                module.load_weights(sub, strict=True)
        self.dtype = self.lm.model.embed_tokens(mx.array([0])).dtype

    def new_cache(self) -> MLXHyperVectors:
        D = self.config.model_dim
        return MLXHyperVectors(mx.zeros((self.C, D), dtype=self.dtype), mx.zeros((self.C, D), dtype=self.dtype),
                          HyperSlots(self.V, self.C, self.M, self.pad_id))

    # --- vectors ----------------------------------------------------------------------------

    def embed_rows(self, ids: mx.array) -> mx.array:
        return self.lm.model.embed_tokens(ids)

    def head_rows(self, ids: mx.array) -> mx.array:
        head = getattr(self.lm, "lm_head", None)
        if head is None:  # tied embeddings
            return self.embed_rows(ids)
        if isinstance(head, nn.QuantizedLinear):
            return mx.dequantize(head.weight[ids], head.scales[ids], head.biases[ids],
                                 group_size=head.group_size, bits=head.bits)
        return head.weight[ids]

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None, hyper: MLXHyperVectors) -> None:
        plan = hyper.slots.plan(entries, candidate)
        if plan is not None:
            self.write_vectors(plan, hyper)

    def write_vectors(self, plan: EncodePlan, hyper: MLXHyperVectors) -> None:
        """Encode the plan's rows into ``hyper``: both vectors for its entries, the output one for its candidate."""
        if not plan.slots:
            return
        rows = mx.array(plan.rows)  # (N, M)
        valid = rows != self.pad_id
        idx = mx.array(plan.slots)
        # one output-encoder call for the new entries and the candidate (a decode step has both)
        out_enc = self.output_encoder or self.input_encoder
        hyper.hyper_out[idx] = out_enc(self.head_rows(rows), valid).astype(self.dtype)
        n = plan.n_new
        if n:
            hyper.hyper_in[idx[:n]] = self.input_encoder(self.embed_rows(rows[:n]), valid[:n]).astype(self.dtype)

    # --- forward ----------------------------------------------------------------------------

    def embed(self, codes: Sequence[int], hyper: MLXHyperVectors) -> mx.array:
        hyper.slots.check_codes(codes)
        ids = mx.array(list(codes))
        is_hyper = ids >= self.V
        base = self.embed_rows(mx.minimum(ids, self.V - 1))
        vec = hyper.hyper_in[mx.maximum(ids - self.V, 0)]
        return mx.where(is_hyper[:, None], vec, base)[None]  # (1, T, D)

    def hidden(self, codes: Sequence[int], positions: Sequence[int], cache: list[Any],
               hyper: MLXHyperVectors) -> mx.array:
        h = self.embed(codes, hyper)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.lm.model.layers, cache):
            h = h + attention(layer.self_attn, layer.input_layernorm(h), positions, c, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.model.norm(h)  # (1, T, D)

    def logits(self, h: mx.array, hyper: MLXHyperVectors) -> mx.array:
        """(D,) -> (V + C,) with slots that cannot be emitted at -inf."""
        head = getattr(self.lm, "lm_head", None)
        base = (self.lm.model.embed_tokens.as_linear(h) if head is None else head(h))[..., : self.V]
        ok = mx.array(hyper.slots.allowed())
        scores = mx.where(ok, h @ hyper.hyper_out.T, -mx.inf)  # (C,)
        return mx.concatenate([base.astype(mx.float32), scores.astype(mx.float32)], axis=-1)


def position_logits(model: Zip2ZipMLX, h: mx.array, masks: Sequence[Mask], hyper: MLXHyperVectors) -> np.ndarray:
    """(T, D) -> (T, V + C) numpy logits, row t masked as inference masks it after code t."""
    head = getattr(model.lm, "lm_head", None)
    base = (model.lm.model.embed_tokens.as_linear(h) if head is None else head(h))[..., : model.V]
    n_max = max(n for n, _ in masks)
    scores = h @ hyper.hyper_out[:n_max].T  # (T, n_max)
    ts, rows = candidate_rows(masks, model.M, model.pad_id)
    cand = mx.zeros((0,))
    if ts:
        r = mx.array(rows)
        out_enc = model.output_encoder or model.input_encoder
        vc = out_enc(model.head_rows(r), r != model.pad_id).astype(h.dtype)  # (K, D)
        cand = (h[mx.array(ts)] * vc).sum(-1)
    mx.eval(base, scores, cand)
    f = lambda x: np.array(x.astype(mx.float32))  # noqa: E731
    return assemble(f(base), f(scores), masks, ts, f(cand), model.V, model.C)


def load_converted(path: str | Path) -> tuple[Zip2ZipMLX, Any, dict[str, Any]]:
    """A directory written by ``convert/to_mlx.py`` -> (model, tokenizer, mlx-lm config)."""
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    from z2z_chat.backends.config import ConfigError

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "zip2zip_encoders.safetensors").is_file():
        raise ValueError(f"{path} is not an MLX zip2zip directory (run python convert/to_mlx.py first)")
    try:
        config = Zip2ZipConfig.load(path)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    # conversions written before the rope fix carry the rope base only in ``rope_parameters``
    lm, lm_config = load_model(path, model_config=rope_settings(hf_config))
    tok = AutoTokenizer.from_pretrained(path)
    pad = pad_id_of(tok)
    encoders = mx.load(str(path / "zip2zip_encoders.safetensors"))
    return Zip2ZipMLX(config, lm, pad, encoders, lm_config["model_type"]), tok, lm_config
