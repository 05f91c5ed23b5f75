"""``z2z-bench scale``: z2z-chat on llama.cpp at the size of the released models, against plain llama.cpp.

Every other benchmark runs SmolLM2-135M, where a decode step is ~12 ms and the hyper-encoders are
a few MB; people run zip2zip on 4-14B models, where both scale differently. This command makes a
random-weight zip2zip checkpoint with a released model's geometry (``GEOMETRIES``; the default,
Phi-3.5-mini: 32 layers, d=3072, 32,064 head rows, long-context RoPE, and the released
hyper-encoders' shape: 2 post-LN layers of width 3072, FFN 12,288, untied, M=4, C=2048), converts
it with ``convert/to_gguf.py``'s code (``--quantize``, the LoRA adapter merged), then measures side
by side in one run:

- ``load``: each engine in a fresh process, opening the model and writing an 8-token reply to a
  short prompt: seconds to open, peak RSS (``memory.peak_rss_mb``); z2z-chat through
  ``open_runtime`` (twice: run 1 also fills the table and encoder caches if this model is new to
  them, run 2 is what every later open costs), plain llama.cpp through
  ``llama_cpp.Llama`` on the same GGUF with the same window (``--context``) and threads;
- ``prefill`` and ``decode`` (``bench/model.py``): zip2zip against the same GGUF fed token ids.

Random weights cost the same arithmetic as trained ones. What they cannot show is compression (a
random model writes no useful hypertokens), so the decode row to read is ``forced``: the codes of
real text, one per step. The tokenizer is a byte-level BPE trained here on this Python's standard
library (the hub is not reachable), with Phi-3.5's vocabulary size.

Building the checkpoint needs torch (the encoders are our torch modules) and ~8 GB of disk at the
default geometry; the conversion reads one tensor at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int  # tokenizer size (the codec's base vocabulary)
    head_rows: int  # embedding / LM head rows (Phi-3.5 pads its 32,011 tokens to 32,064)
    context: int
    encoder: dict[str, Any] = field(default_factory=dict)
    codebook: int = 2048
    max_subtokens: int = 4
    original_context: int = 4096
    lora_rank: int = 16

    @property
    def params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * (self.hidden // self.heads) + self.hidden ** 2
        return self.layers * (attn + 3 * self.hidden * self.ffn) + 2 * self.head_rows * self.hidden


def _encoder(width: int, ffn: int, heads: int) -> dict[str, Any]:
    return {"hidden_size": width, "num_hidden_layers": 2, "num_heads": heads, "intermediate_size": ffn,
            "position_encoding": "learnable", "tie_encoders": False}


GEOMETRIES = {
    # microsoft/Phi-3.5-mini-instruct, and the encoder of the released zip2zip Phi-3.5 checkpoints
    "phi3.5-mini": Geometry(32, 3072, 8192, 32, 32, 32011, 32064, 131072, _encoder(3072, 12288, 32)),
    # the same shape, small enough for a test
    "tiny": Geometry(2, 64, 128, 4, 4, 400, 413, 1024, _encoder(64, 96, 4), codebook=64, original_context=256,
                     lora_rank=4),
}


def _tokenizer(out: Path, vocab: int, max_bytes: int) -> None:
    """A byte-level BPE of ``vocab`` tokens (ChatML specials included), saved as transformers saves one."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))

    def texts():
        n = 0
        for f in files:
            if n > max_bytes:
                return
            text = f.read_text(encoding="utf-8", errors="replace")
            n += len(text)
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if tok.get_vocab_size() != vocab:
        raise RuntimeError(f"the BPE trainer stopped at {tok.get_vocab_size()} tokens of {vocab}: too little text")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", unk_token=None,
                                   additional_special_tokens=specials)
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def _base(out: Path, g: Geometry, rng: np.random.Generator, progress: Callable[[str], None]) -> None:
    """A Phi-3 decoder with random float16 weights, one safetensors shard per layer (low peak memory)."""
    from safetensors.numpy import save_file

    head_dim = g.hidden // g.heads
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": g.hidden,
        "intermediate_size": g.ffn, "num_hidden_layers": g.layers, "num_attention_heads": g.heads,
        "num_key_value_heads": g.kv_heads, "vocab_size": g.head_rows, "max_position_embeddings": g.context,
        "original_max_position_embeddings": g.original_context, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "long_factor": np.linspace(1.0, 40.0, head_dim // 2).round(3).tolist(),
                         "short_factor": np.linspace(1.0, 1.2, head_dim // 2).round(3).tolist()},
        "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 2, "bos_token_id": None,
        "pad_token_id": None, "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    def rand(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    ones = lambda n: np.ones(n, dtype=np.float16)  # noqa: E731
    save_file({"model.embed_tokens.weight": rand(g.head_rows, g.hidden), "model.norm.weight": ones(g.hidden),
               "lm_head.weight": rand(g.head_rows, g.hidden)}, out / "model-outer.safetensors")
    qkv = (g.heads + 2 * g.kv_heads) * head_dim
    for i in range(g.layers):
        progress(f"base: layer {i + 1}/{g.layers}")
        p = f"model.layers.{i}"
        save_file({f"{p}.self_attn.qkv_proj.weight": rand(qkv, g.hidden),
                   f"{p}.self_attn.o_proj.weight": rand(g.hidden, g.hidden),
                   f"{p}.mlp.gate_up_proj.weight": rand(2 * g.ffn, g.hidden),
                   f"{p}.mlp.down_proj.weight": rand(g.hidden, g.ffn),
                   f"{p}.input_layernorm.weight": ones(g.hidden),
                   f"{p}.post_attention_layernorm.weight": ones(g.hidden)}, out / f"model-{i:03d}.safetensors")


def _zip2zip(out: Path, base: Path, g: Geometry, pad_id: int, disabled: list[int], rng: np.random.Generator) -> None:
    """Random hyper-encoders and LoRA adapter in the checkpoint format every backend reads (the
    encoders' parameter names and shapes come from our torch modules)."""
    from safetensors.numpy import save_file

    from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
    from z2z_chat.backends.torch_backend.encoders import build_encoder

    config = Zip2ZipConfig(str(base), "transformer", dict(g.encoder),
                           CompressionSettings(g.vocab, g.codebook, g.max_subtokens, disabled))
    state = {}
    for side in ("input_encoder", "output_encoder"):
        enc = build_encoder("transformer", config.encoder | {"model_hidden_size": g.hidden}, g.max_subtokens, pad_id)
        for name, p in enc.state_dict().items():
            norm = "norm" in name and name.endswith("weight")
            a = np.ones(p.shape, np.float32) if norm else rng.standard_normal(tuple(p.shape), dtype=np.float32) * 0.02
            state[f"{side}.{name}"] = a
        del enc
    save_file(state, out / "zip2zip_encoders.safetensors")
    (out / "zip2zip_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    head_dim, r, lora = g.hidden // g.heads, g.lora_rank, {}
    shapes = {"self_attn.qkv_proj": ((g.heads + 2 * g.kv_heads) * head_dim, g.hidden),
              "self_attn.o_proj": (g.hidden, g.hidden), "mlp.gate_up_proj": (2 * g.ffn, g.hidden),
              "mlp.down_proj": (g.hidden, g.ffn)}
    for i in range(g.layers):
        for mod, (n_out, n_in) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{mod}"
            lora[f"{p}.lora_A.weight"] = rng.standard_normal((r, n_in), dtype=np.float32) * 0.02
            lora[f"{p}.lora_B.weight"] = rng.standard_normal((n_out, r), dtype=np.float32) * 0.02
    save_file(lora, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": str(base),
        "target_modules": [m.split(".")[1] for m in shapes], "bias": "none", "task_type": "CAUSAL_LM"}))


def make_checkpoint(out: Path, geometry: str, progress: Callable[[str], None], quantize: str = "q8_0") -> Path:
    """``out/base`` (HF), ``out/checkpoint`` (zip2zip) and ``out/gguf`` (converted); returns the last.
    Each part is kept when it is already there, so a second run only measures."""
    from transformers import AutoTokenizer

    from z2z_chat.backends.llamacpp_backend.convert import convert
    from z2z_chat.backends.loading.sources import pad_id_of

    g, rng = GEOMETRIES[geometry], np.random.default_rng(0)
    base, ckpt, gguf_dir = out / "base", out / "checkpoint", out / "gguf"
    progress(f"{geometry}: {g.params / 1e9:.2f}B parameters, encoders {g.encoder}")
    if not (base / "config.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        progress("training the tokenizer")
        _tokenizer(base, g.vocab, max_bytes=1000 * g.vocab)
        _base(base, g, rng, progress)
    if not (ckpt / "zip2zip_config.json").is_file():
        ckpt.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(base)
        progress("hyper-encoders and LoRA adapter")
        _zip2zip(ckpt, base, g, pad_id_of(tok), sorted(tok.all_special_ids), rng)
    if not (gguf_dir / "zip2zip_config.json").is_file():
        t = time.perf_counter()
        convert(str(ckpt), gguf_dir, quantize=quantize, force=True, progress=progress)
        progress(f"converted in {time.perf_counter() - t:.0f} s")
    return gguf_dir


_LOAD_Z2Z = """
import json, sys, time
t = time.perf_counter()
from z2z_chat.backends.runtime import open_runtime
from z2z_chat.backends.engine.events import GenerationSettings
rt = open_runtime(sys.argv[1], "llamacpp")
loaded = time.perf_counter() - t
for _ in rt.session().send("Write a Python function that adds two numbers.", GenerationSettings(max_tokens=8)):
    pass
from z2z_chat.app.bench.memory import peak_rss_mb
print(json.dumps({"load_s": loaded, "peak_rss_mb": peak_rss_mb(), "n_ctx": rt.model.ctx.n_ctx,
                  "threads": rt.model.ctx.n_threads}))
"""

_LOAD_PLAIN = """
import json, sys, time
t = time.perf_counter()
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
loaded = time.perf_counter() - t
llm.create_chat_completion([{"role": "user", "content": "Write a Python function that adds two numbers."}], max_tokens=8)
from z2z_chat.app.bench.memory import peak_rss_mb
print(json.dumps({"load_s": loaded, "peak_rss_mb": peak_rss_mb()}))
"""


def _child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python; the JSON object it prints last."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the measuring process failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def load(gguf_dir: Path, progress: Callable[[str], None]) -> list[dict]:
    """Open in a fresh process each: z2z-chat (run 1 may make the caches), llama-cpp-python, z2z-chat
    again, llama-cpp-python again; its second open is the row, so each warm open follows the other
    engine's (the order had given llama-cpp-python the warmest page cache: 1.3 vs 2.4 s)."""
    def z2z(run: int) -> dict:
        progress(f"load: z2z-chat (run {run})")
        return {"engine": f"z2z/llamacpp (run {run})", **_child(_LOAD_Z2Z, str(gguf_dir))}

    def plain(n_ctx: int, threads: int) -> dict:
        progress("load: llama-cpp-python")
        return {"engine": "llama-cpp-python", **_child(_LOAD_PLAIN, str(gguf_dir / "model.gguf"), str(n_ctx),
                                                        str(threads))}

    rows = [z2z(1)]
    n_ctx, threads = rows[0].pop("n_ctx"), rows[0].pop("threads")
    plain(n_ctx, threads)
    rows.append(z2z(2))
    rows[-1].pop("n_ctx"), rows[-1].pop("threads")
    rows.append(plain(n_ctx, threads))
    for r in rows:
        r["load_vs_plain"] = r["load_s"] / rows[-1]["load_s"]
        r["rss_vs_plain"] = r["peak_rss_mb"] / rows[-1]["peak_rss_mb"]
    return rows
