"""Builders for models of the reference ``zip2zip`` 0.2.0 package, shared by the parity tests."""

from __future__ import annotations

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from zip2zip.config import CompressionConfig as RefCompression
from zip2zip.config import Zip2ZipConfig as RefConfig
from zip2zip.model import Zip2ZipModel
from zip2zip.nn.encoders.config import ResLatentAttnConfig, TransformerEncoderConfig

C, M = 64, 3
LORA = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
ENCODERS = {
    "transformer": lambda: TransformerEncoderConfig(hidden_size=64, num_hidden_layers=2, num_heads=4,
                                                    intermediate_size=96, position_encoding="learnable",
                                                    tie_encoders=False),
    "res_latent_attn": lambda: ResLatentAttnConfig(hidden_size=32, model_hidden_size=64, num_hidden_layers=2,
                                                   num_heads=4, intermediate_size=48, causal=True,
                                                   residual=True, tie_encoders=False),
}
CASES = [("llama", "transformer", "compressed"), ("llama", "res_latent_attn", "base_token_end"),
         ("phi3", "transformer", "compressed"), ("phi3", "res_latent_attn", "base_token_end")]


def randomize(modules, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + scale * torch.randn(p.shape, generator=g))


def ref_model(kind, enc, mode, base_dir, tok):
    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = RefConfig(base_model_name_or_path=str(base_dir), position_mode=mode, encoder_type=enc,
                    encoder=ENCODERS[enc](),
                    compression=RefCompression(initial_vocab_size=len(tok), max_codebook_size=C,
                                               max_subtokens=M, disabled_ids=list(tok.get_added_vocab().values())))
    ref = Zip2ZipModel(cfg, base_model=lm, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA[kind]))
    # every random part is set from a seeded generator (lora_A's own init uses the global RNG)
    named = list(ref.base_model.named_modules())
    randomize([ref.input_encoder, ref.output_encoder, *[m for n, m in named if n.endswith("lora_B")]])
    randomize([m for n, m in named if n.endswith("lora_A")], seed=2, scale=0.02)  # seed: hypertokens among greedy picks
    return ref.eval()


def ref_logits(ref, codes):
    ref.codebook_manager.reset()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([codes])).logits[0]
    ref.codebook_manager.reset()
    return out
