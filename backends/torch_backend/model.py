"""The zip2zip model in torch: a transformers causal LM plus two hyper-encoders and their caches.

Vocabulary: ids ``0..V-1`` are base tokens, ``V..V+C-1`` hypertoken slots. ``V`` is the
tokenizer's size; an LM head with more rows than V (Phi-3.5: 32064 vs 32011) has its extra rows
dropped: they are not tokens and must never be sampled (the reference shifts them behind the
hyper slots where a model can pick them).

- ``add_entries([(id, base ids), ...], candidate, hyper)`` runs both encoders once on the new
  entries and stores the results in a ``TorchHyperVectors`` (``hyper_in`` / ``hyper_out``, (C, D)); each
  backend session owns one (the model keeps a default for whole-sequence scoring). ``candidate``
  is the one id the decoder could still accept as new (LZW's cScSc case): only its output
  vector is computed, so the model can predict it.
- ``embed(codes)`` looks base ids up in the embedding matrix and hyper ids in ``hyper_in``.
- ``hidden(codes, positions, cache)`` runs the decoder body at explicit positions (both position
  modes are just different positions) and returns its final hidden states.
- ``logits(hidden)`` = base logits (V) ++ hyper logits (C); slots that are neither created nor
  the candidate are -inf, so a nonexistent code can never be emitted.
- ``sequence_logits(codes)`` scores whole compressed sequences with a fresh codebook, masking at
  each position what did not exist yet there (as inference sees it): for tests and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from z2z_chat.backends.codec import CodecSession
from z2z_chat.backends.config import Zip2ZipConfig, positions
from z2z_chat.backends.hyper import Entry, HyperSlots, Mask, EncodePlan, assemble, candidate_rows
from z2z_chat.backends.torch_backend.encoders import build_encoder


@dataclass
class TorchHyperVectors:
    """One session's hypertoken vectors; ``slots`` says which are live (``backends/hyper.py``)."""

    hyper_in: torch.Tensor  # (C, D)
    hyper_out: torch.Tensor  # (C, D)
    slots: HyperSlots


def entry_tensor(entries: Sequence[tuple[int, ...]], M: int, pad_id: int, device) -> torch.Tensor:
    """(N, M) long: each entry's base ids right-padded with pad, as the reference feeds them."""
    rows = [list(e) + [pad_id] * (M - len(e)) for e in entries]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), M)


class Zip2ZipLM(nn.Module):
    def __init__(self, config: Zip2ZipConfig, lm: nn.Module, pad_id: int):
        super().__init__()
        self.config = config
        self.lm = lm  # a transformers *ForCausalLM (LoRA merged, or a PeftModel while training)
        c = config.compression
        self.V, self.C, self.M, self.pad_id = c.initial_vocab_size, c.max_codebook_size, c.max_subtokens, pad_id
        emb = lm.get_input_embeddings()
        head = lm.get_output_embeddings()
        if head is None:
            raise ValueError("the base model has no output embeddings (LM head)")
        if emb.weight.shape[0] < self.V or head.weight.shape[0] < self.V:
            raise ValueError(f"the base model has {emb.weight.shape[0]} embedding rows and "
                             f"{head.weight.shape[0]} LM head rows, fewer than the "
                             f"initial_vocab_size {self.V} of the zip2zip config")
        D = emb.weight.shape[1]
        if config.model_dim != D:
            raise ValueError(f"the hyper-encoders produce vectors of size {config.model_dim} "
                             f"but the base model's hidden size is {D}")
        enc = config.encoder
        self.input_encoder = build_encoder(config.encoder_type, enc, self.M, pad_id)
        self.output_encoder = None if enc["tie_encoders"] else build_encoder(config.encoder_type, enc, self.M, pad_id)
        w = emb.weight
        self.input_encoder.to(device=w.device, dtype=w.dtype)
        if self.output_encoder is not None:
            self.output_encoder.to(device=head.weight.device, dtype=head.weight.dtype)
        self.hyper = self.new_cache()  # the default one; each backend session makes its own

    # --- hypertoken vectors -------------------------------------------------------------------

    def new_cache(self) -> TorchHyperVectors:
        w = self.lm.get_input_embeddings().weight
        D = w.shape[1]
        return TorchHyperVectors(torch.zeros(self.C, D, dtype=w.dtype, device=w.device),
                          torch.zeros(self.C, D, dtype=w.dtype, device=w.device),
                          HyperSlots(self.V, self.C, self.M, self.pad_id))

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def output_encoder_or_tied(self) -> nn.Module:
        return self.output_encoder if self.output_encoder is not None else self.input_encoder

    def hyper_vectors(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, M) entry rows -> input vectors (N, D) and output vectors (N, D)."""
        emb = self.lm.get_input_embeddings().weight
        head = self.lm.get_output_embeddings().weight
        return self.input_encoder(rows, emb), self.output_encoder_or_tied(rows, head)

    @torch.no_grad()
    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None,
                    hyper: TorchHyperVectors | None = None) -> None:
        c = hyper or self.hyper
        plan = c.slots.plan(entries, candidate)
        if plan is not None:
            self.write_vectors(plan, c)

    @torch.no_grad()
    def write_vectors(self, plan: EncodePlan, c: TorchHyperVectors) -> None:
        """Encode the plan's rows into ``c``: both vectors for its entries, the output one for its candidate."""
        if not plan.slots:
            return
        rows = torch.tensor(plan.rows, dtype=torch.long, device=self.device)  # (N, M)
        idx = torch.tensor(plan.slots, device=rows.device)
        # one output-encoder call for the new entries and the candidate (a decode step has both)
        c.hyper_out[idx] = self.output_encoder_or_tied(rows, self.lm.get_output_embeddings().weight).to(c.hyper_out.dtype)
        n = plan.n_new
        if n:
            emb = self.lm.get_input_embeddings().weight
            c.hyper_in[idx[:n]] = self.input_encoder(rows[:n], emb).to(c.hyper_in.dtype)

    def reset_entries(self, hyper: TorchHyperVectors | None = None) -> None:
        (hyper or self.hyper).slots.reset()  # stale vectors are never read: slots mask them

    # --- forward ------------------------------------------------------------------------------

    def embed(self, codes: torch.Tensor, hyper: TorchHyperVectors | None = None) -> torch.Tensor:
        """(B, T) codes -> (B, T, D) input embeddings."""
        c = hyper or self.hyper
        c.slots.check_codes(codes.flatten().tolist())
        is_hyper = codes >= self.V
        base = self.lm.get_input_embeddings()(codes.clamp(max=self.V - 1))  # (B, T, D)
        if not bool(is_hyper.any()):
            return base
        hyper = c.hyper_in[(codes - self.V).clamp(min=0)]  # (B, T, D)
        return torch.where(is_hyper.unsqueeze(-1), hyper, base)

    def hidden(self, codes: torch.Tensor, positions: torch.Tensor, cache=None,
               hyper: TorchHyperVectors | None = None) -> torch.Tensor:
        """(B, T) codes at (B, T) positions -> (B, T, D) final hidden states; appends to ``cache``."""
        if cache is None:
            # Without a cache transformers reads gaps in position_ids as packed-sequence boundaries
            # and blocks attention across them; base_token_end positions have gaps by design.
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.config)
        out = self.lm.get_decoder()(inputs_embeds=self.embed(codes, hyper), position_ids=positions,
                                    cache=cache, use_cache=True)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor, hyper: TorchHyperVectors | None = None) -> torch.Tensor:
        """(..., D) -> (..., V + C) with slots that cannot be emitted at -inf."""
        c = hyper or self.hyper
        head = self.lm.get_output_embeddings()
        base = nn.functional.linear(hidden, head.weight[: self.V],
                                    None if head.bias is None else head.bias[: self.V])
        s = c.slots
        live = s.live
        hyper = hidden.new_full((*hidden.shape[:-1], self.C), float("-inf"))
        if live:
            hyper[..., :live] = hidden @ c.hyper_out[:live].T  # (..., live): one product per step
            if s.candidate is not None and s.candidate > s.n_created:
                hyper[..., s.n_created:s.candidate] = float("-inf")
        return torch.cat([base, hyper], dim=-1)

    def position_logits(self, h: torch.Tensor, masks: Sequence[Mask], hyper: TorchHyperVectors) -> np.ndarray:
        """(T, D) hidden states -> (T, V + C) logits, row t masked as inference masks it after code t
        (``backends/hyper.py``); the candidates' output vectors in one encoder call."""
        head = self.lm.get_output_embeddings()
        base = nn.functional.linear(h, head.weight[: self.V], None if head.bias is None else head.bias[: self.V])
        n_max = max(n for n, _ in masks)
        scores = h @ hyper.hyper_out[:n_max].T  # (T, n_max)
        ts, rows = candidate_rows(masks, self.M, self.pad_id)
        cand = torch.zeros(0)
        if ts:
            vc = self.output_encoder_or_tied(torch.tensor(rows, device=h.device), head.weight)  # (K, D)
            cand = (h[ts] * vc.to(h.dtype)).sum(-1)
        f = lambda x: x.float().cpu().numpy()  # noqa: E731
        return assemble(f(base), f(scores), masks, ts, f(cand), self.V, self.C)

    # --- whole sequences (tests, evaluation) --------------------------------------------------

    def sequence_logits(self, codes: Sequence[int], session: CodecSession) -> torch.Tensor:
        """Logits (T, V + C) of one compressed sequence fed to ``session`` (usually a fresh one).

        Position t sees exactly the hyper slots inference allows after code t: the entries
        created so far, and the valid new id scored with its would-be entry's output vector.
        """
        created, cands = [], []
        for t, c in enumerate(codes):
            session.push(c)
            created.append(len(session))
            cand = session.candidate()
            if cand is not None:
                cands.append((t, cand[1]))
        self.reset_entries()
        self.add_entries(session.take_new_entries())
        dev = self.device
        pos = positions([len(session.expand(c)) for c in codes], self.config.position_mode)
        h = self.hidden(torch.tensor([list(codes)], device=dev), torch.tensor([pos], device=dev))[0]  # (T, D)
        out = self.logits(h)  # (T, V + C), every final entry live
        slot = torch.arange(self.C, device=dev)
        not_yet = slot[None, :] >= torch.tensor(created, device=dev)[:, None]  # (T, C)
        out[:, self.V:] = out[:, self.V:].masked_fill(not_yet, float("-inf"))
        if cands:
            rows = entry_tensor([e for _, e in cands], self.M, self.pad_id, dev)
            with torch.no_grad():
                vc = self.output_encoder_or_tied(rows, self.lm.get_output_embeddings().weight)  # (K, D)
            ts = torch.tensor([t for t, _ in cands], device=dev)
            out[ts, self.V + torch.tensor(created, device=dev)[ts]] = (h[ts] * vc).sum(-1).to(out.dtype)
        return out
