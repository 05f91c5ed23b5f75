"""The zip2zip training objective: cross-entropy over base + hyper vocabulary on compressed
sequences, plus lambda x a hypertoken reconstruction loss (the paper's Eq. 3).

``collate`` runs each sequence through a ``CodecSession`` (microseconds per code) to get its
codebook, and, per position t, how many entries exist after code t and the valid new id (LZW's
cScSc case) with the entry it would create. ``ZipObjective.forward(batch)`` then:

1. encodes every entry once (input and output side): (N, D) each;
2. embeds the codes (base rows or input vectors) and runs the decoder at the sequence's
   positions (consecutive, or each code at its last base token's index);
3. scores base ids, the row's entries and the candidate column. With ``causal_codebook`` (the
   default) position t's softmax holds only the entries that exist there plus the valid new id,
   exactly what the engine allows at inference; without it every entry of the sequence is
   visible everywhere (the paper's precomputed codebook, whose future entries act as negatives
   that inference never sees);
4. adds ``lambda`` x reconstruction: ``Reconstructor`` maps a hypertoken's input vector to M
   slot vectors (one linear layer D -> M x D, then LayerNorm) and scores each slot against the
   frozen base embedding matrix; cross-entropy against the entry's base ids (pad slots ignored).
   It is tied to the embeddings so it stays small (M x D x D parameters) and pushes the input
   vector to keep what the subtokens were. It is a training-only module: checkpoints do not
   carry it;
5. adds ``kl_lambda`` x KL(base || zip2zip) at every position: the base model (the adapter
   disabled, no gradient) reads the same text as base tokens, and its next-token distribution at
   the end of each code is compared with the zip2zip distribution marginalised over first
   subtokens (a hypertoken's probability counts for its first base token). It keeps the adapter
   from forgetting what the base would say while it learns to write hypertokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from z2z_chat.backends.codec import CodecConfig, CodecSession
from z2z_chat.backends.config import positions
from z2z_chat.backends.torch_backend.model import Zip2ZipLM, entry_tensor


@dataclass
class Batch:
    codes: torch.Tensor  # (B, L + 1)
    lengths: torch.Tensor  # (B,) real codes per row
    positions: torch.Tensor  # (B, L) positions of the input codes
    entries: torch.Tensor  # (N, M) every row's final entries, pad-filled
    offsets: torch.Tensor  # (B,) first entry of each row in ``entries``
    n_entries: torch.Tensor  # (B,)
    created: torch.Tensor  # (B, L) entries existing after input code t
    cand_rows: torch.Tensor  # (K, M) would-be entries of the valid new ids
    cand_at: torch.Tensor  # (K, 2) (row, position) of each candidate
    base_ids: torch.Tensor  # (B, Lb) the rows as base tokens, pad-filled
    base_mask: torch.Tensor  # (B, Lb) 1 for real base tokens
    base_at: torch.Tensor  # (B, L) index in base_ids of the last base token of input code t
    base_tokens: int  # base tokens behind the real codes

    def to(self, device) -> Batch:
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


def collate(rows: list[tuple[list[int], int]], codec: CodecConfig, position_mode: str) -> Batch:
    """Batch of (codes, length) rows; codes are padded to a common L + 1."""
    M, pad = codec.max_merge_size, codec.pad_id
    L = len(rows[0][0]) - 1
    entries, offsets, n_entries, created, pos_rows, cand_rows, cand_at = [], [], [], [], [], [], []
    base_rows, base_at = [], []
    base_tokens = 0
    for b, (codes, n) in enumerate(rows):
        s = CodecSession(codec)
        row_created, spans, ids = [], [], []
        for t, c in enumerate(codes[:n]):
            ids += s.push(c)
            spans.append(len(ids) - sum(spans))
            if t < L:
                row_created.append(len(s))
                cand = s.candidate()
                if cand is not None:
                    cand_rows.append(cand[1])
                    cand_at.append((b, t))
        base_tokens += sum(spans)
        row_created += [len(s)] * (L - len(row_created))
        offsets.append(len(entries))
        n_entries.append(len(s))
        entries += [e for _, e in s.codebook.items()]
        created.append(row_created)
        pos = positions(spans, position_mode)
        pos_rows.append((pos + [0] * (L + 1))[:L])
        ends = [i - 1 for i in itertools.accumulate(spans)]
        base_at.append((ends + [0] * (L + 1))[:L])
        base_rows.append(ids)
    Lb = max(len(r) for r in base_rows)
    return Batch(
        codes=torch.tensor([c for c, _ in rows], dtype=torch.long),
        lengths=torch.tensor([n for _, n in rows], dtype=torch.long),
        positions=torch.tensor(pos_rows, dtype=torch.long),
        entries=entry_tensor(entries, M, pad, "cpu"),
        offsets=torch.tensor(offsets, dtype=torch.long),
        n_entries=torch.tensor(n_entries, dtype=torch.long),
        created=torch.tensor(created, dtype=torch.long),
        cand_rows=entry_tensor(cand_rows, M, pad, "cpu"),
        cand_at=torch.tensor(cand_at, dtype=torch.long).view(-1, 2),
        base_ids=torch.tensor([r + [pad] * (Lb - len(r)) for r in base_rows], dtype=torch.long),
        base_mask=torch.tensor([[1] * len(r) + [0] * (Lb - len(r)) for r in base_rows], dtype=torch.long),
        base_at=torch.tensor(base_at, dtype=torch.long),
        base_tokens=base_tokens,
    )


class Reconstructor(nn.Module):
    """Hypertoken input vector (D) -> M slot vectors, scored against the base embeddings."""

    def __init__(self, dim: int, max_subtokens: int):
        super().__init__()
        self.M = max_subtokens
        self.proj = nn.Linear(dim, max_subtokens * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, vin: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(vin).view(vin.shape[0], self.M, -1))  # (N, M, D)
        return x @ embeddings.T  # (N, M, V)


class ZipObjective(nn.Module):
    """Wraps the model so DDP/FSDP see one ``forward`` that returns the losses."""

    def __init__(self, model: Zip2ZipLM, recon_lambda: float, causal_codebook: bool, recon_sample: int = 256,
                 kl_lambda: float = 0.0):
        super().__init__()
        self.model = model
        self.recon_lambda = recon_lambda
        self.kl_lambda = kl_lambda
        self.causal = causal_codebook
        self.recon_sample = recon_sample
        self.recon = Reconstructor(model.lm.get_input_embeddings().weight.shape[1], model.M) if recon_lambda > 0 else None

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        m = self.model
        V = m.V
        inp, tgt = batch.codes[:, :-1], batch.codes[:, 1:]  # (B, L)
        B, L = inp.shape
        t_idx = torch.arange(L, device=inp.device)
        in_mask = t_idx[None, :] < (batch.lengths - 1)[:, None]  # (B, L): real inputs with a target
        emb_w = m.lm.get_input_embeddings().weight
        vin, vout = m.hyper_vectors(batch.entries) if len(batch.entries) else (emb_w[:0], emb_w[:0])
        is_hyper = inp >= V
        x = m.lm.get_input_embeddings()(inp.clamp(max=V - 1))  # (B, L, D)
        if len(vin):
            hyper_idx = (batch.offsets[:, None] + (inp - V).clamp(min=0)).clamp(max=len(vin) - 1)
            x = torch.where(is_hyper.unsqueeze(-1), vin[hyper_idx].to(x.dtype), x)
        h = m.lm.get_decoder()(inputs_embeds=x, position_ids=batch.positions,
                               attention_mask=in_mask.long(), use_cache=False).last_hidden_state  # (B, L, D)
        head = m.lm.get_output_embeddings()
        base = F.linear(h, head.weight[:V], None if head.bias is None else head.bias[:V])  # (B, L, V)
        n_max = int(batch.n_entries.max()) if len(vout) else 0
        slot = torch.arange(n_max, device=inp.device)
        if n_max:
            rows = (batch.offsets[:, None] + slot[None, :]).clamp(max=len(vout) - 1)  # (B, n_max)
            hyper = torch.einsum("bld,bnd->bln", h, vout[rows].to(h.dtype))  # (B, L, n_max)
            limit = batch.created if self.causal else batch.n_entries[:, None].expand(B, L)
            hyper = hyper.masked_fill(slot[None, None, :] >= limit[:, :, None], float("-inf"))
        else:
            hyper = h.new_zeros(B, L, 0)
        cand = h.new_full((B, L, 1), float("-inf"))
        if self.causal and len(batch.cand_rows):
            vc = m.output_encoder_or_tied(batch.cand_rows, head.weight)  # (K, D)
            b, t = batch.cand_at[:, 0], batch.cand_at[:, 1]
            cand = cand.index_put((b, t, torch.zeros_like(b)), (h[b, t] * vc.to(h.dtype)).sum(-1))
        logits = torch.cat([base, hyper, cand], dim=-1)  # (B, L, V + n_max + 1)
        j = tgt - V
        target = torch.where(tgt < V, tgt, V + j)
        if self.causal:
            target = torch.where((tgt >= V) & (j == batch.created), V + n_max, target)
        target = target.masked_fill(~in_mask, -100)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1), ignore_index=-100)
        out = {"lm_loss": lm_loss, "loss": lm_loss}
        if self.kl_lambda > 0:
            first = batch.entries[rows, 0] if n_max else inp.new_zeros(B, 0)  # (B, n_max)
            cand_first = batch.cand_rows[:, 0] if self.causal and len(batch.cand_rows) else None
            q = first_subtoken_marginal(logits, V, first, batch.cand_at, cand_first)  # (B, L, V)
            p_log = self.base_log_probs(batch, head)  # (B, L, V)
            kl = (p_log.exp() * (p_log - q.clamp_min(1e-30).log())).sum(-1)  # (B, L)
            out["kl_loss"] = (kl * in_mask).sum() / in_mask.sum().clamp_min(1)
            out["loss"] = out["loss"] + self.kl_lambda * out["kl_loss"]
        if self.recon is not None and len(vin):
            # a deterministic subsample keeps the loss identical however the batch is sharded
            pick = torch.linspace(0, len(vin) - 1, min(len(vin), self.recon_sample), device=vin.device).long()
            rec = self.recon(vin[pick].float(), emb_w[:V].detach().float())  # (n, M, V)
            want = batch.entries[pick].masked_fill(batch.entries[pick] == m.pad_id, -100)
            recon_loss = F.cross_entropy(rec.reshape(-1, V), want.reshape(-1), ignore_index=-100)
            out["recon_loss"] = recon_loss
            out["loss"] = out["loss"] + self.recon_lambda * recon_loss
        return out

    @torch.no_grad()
    def base_log_probs(self, batch: Batch, head: nn.Module) -> torch.Tensor:
        """The base model's next-token log-probabilities after each input code: (B, L, V)."""
        m = self.model
        with m.lm.disable_adapter():
            hb = m.lm.get_decoder()(input_ids=batch.base_ids, attention_mask=batch.base_mask,
                                    use_cache=False).last_hidden_state  # (B, Lb, D)
            at = batch.base_at[..., None].expand(-1, -1, hb.shape[-1])  # (B, L, D)
            h = hb.gather(1, at)
            logits = F.linear(h, head.weight[:m.V], None if head.bias is None else head.bias[:m.V])
        return F.log_softmax(logits.float(), dim=-1)


def first_subtoken_marginal(logits: torch.Tensor, V: int, first: torch.Tensor, cand_at: torch.Tensor,
                            cand_first: torch.Tensor | None) -> torch.Tensor:
    """The zip2zip distribution over [base | entries | candidate] folded onto base ids: each
    entry's probability is added to its first subtoken's. logits (B, L, V + n + 1), first (B, n),
    cand_at (K, 2) with cand_first (K,) -> (B, L, V); rows sum to 1."""
    probs = F.softmax(logits.float(), dim=-1)
    B, L, _ = probs.shape
    n = first.shape[1]
    q = probs[..., :V].clone()
    if n:
        q = q.scatter_add(-1, first[:, None, :].expand(B, L, n), probs[..., V:V + n])
    if cand_first is not None:
        b, t = cand_at[:, 0], cand_at[:, 1]
        q = q.index_put((b, t, cand_first), probs[b, t, -1], accumulate=True)
    return q
