"""Shared fixtures: a real BPE tokenizer trained here, tiny random Llama / Phi-3 models, and tiny
zip2zip checkpoints built from them. No network, no hub."""

from __future__ import annotations

import atexit
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _private_user_dirs() -> None:
    """The suite (and every process it starts) writes its cache and history into a directory of
    its own, not the user's: only the default model's base (a 98 MB download, which CI keeps) is
    shared with the real cache, through a link."""
    from z2z_chat.backends.loading.assets import cache_dir

    real = cache_dir() / "smollm2"
    real.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="z2z-tests-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "cache").mkdir()
    (root / "cache" / "smollm2").symlink_to(real, target_is_directory=True)
    os.environ["Z2Z_CACHE_DIR"] = str(root / "cache")
    os.environ["Z2Z_DATA_DIR"] = str(root / "data")


_private_user_dirs()

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = ["argparse.py", "textwrap.py", "string.py", "glob.py"]
    texts = [(stdlib / f).read_text() for f in files]
    texts.append("Le café est très bon. Über die Brücke gehen wir. ¿Dónde está el baño? 日本語のテキスト。🙂" * 20)
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 320, ChatML specials) trained on stdlib sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   unk_token=None, additional_special_tokens=SPECIALS)
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def tiny_lm(kind: str, vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        # what real models have, so a converter that drops them fails here: a non-default rope base
        # with linear scaling, GQA, tied embeddings
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                          tie_word_embeddings=True, eos_token_id=2, bos_token_id=None, pad_token_id=None)
        return LlamaForCausalLM(cfg).eval()
    # Phi-3 style: fused qkv / gate_up, untied head, more LM head rows than tokens, a non-default rope base
    cfg = Phi3Config(vocab_size=vocab + 13, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                     rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                     tie_word_embeddings=False, eos_token_id=2, bos_token_id=None, pad_token_id=None,
                     original_max_position_embeddings=512)
    return Phi3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Tiny random base models saved with the tokenizer: {'llama': dir, 'phi3': dir}."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dirs = {}
    for kind in ("llama", "phi3"):
        d = tmp_path_factory.mktemp(f"base-{kind}")
        tiny_lm(kind, len(tok)).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[kind] = d
    return dirs


@pytest.fixture(scope="session")
def ref_checkpoints(tmp_path_factory, base_dirs, tokenizer_dir):
    """Checkpoints saved by the reference package: {(kind, encoder, position mode): (model, dir)}."""
    pytest.importorskip("zip2zip", reason="reference: pip install --no-deps zip2zip==0.2.0 "
                        "zip2zip-compression==0.3.4 omegaconf")
    from reference import CASES, ref_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for kind, enc, mode in CASES:
        ref = ref_model(kind, enc, mode, base_dirs[kind], tok)
        d = tmp_path_factory.mktemp(f"ref-{kind}-{enc}")
        ref.save_pretrained(d)
        out[(kind, enc, mode)] = (ref, d)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, base_dirs, tokenizer_dir) -> Path:
    """A zip2zip checkpoint made with our own code: tiny Llama, random encoders (no LoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
    from z2z_chat.backends.torch_backend import checkpoint
    from z2z_chat.backends.torch_backend.model import Zip2ZipLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Zip2ZipConfig(str(base_dirs["llama"]), "transformer",
                        {"hidden_size": 64, "num_hidden_layers": 1, "num_heads": 4, "position_encoding": "learnable"},
                        CompressionSettings(len(tok), 64, 3, sorted(tok.all_special_ids)))
    model = Zip2ZipLM(cfg, AutoModelForCausalLM.from_pretrained(base_dirs["llama"]), tok.eos_token_id)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in [*model.input_encoder.named_parameters(), *model.output_encoder.named_parameters()]:
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("tiny-ckpt")
    checkpoint.save(model, d, tok)
    return d


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory, tokenizer_dir):
    """A tiny Llama trained for a few seconds on Python sources, under random encoders: a random
    model's logits are nearly flat, so quantization noise alone would decide its greedy picks."""
    import torch
    from transformers import AutoTokenizer

    from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
    from z2z_chat.backends.torch_backend import checkpoint
    from z2z_chat.backends.torch_backend.model import Zip2ZipLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lm = tiny_lm("llama", len(tok), seed=1).train()
    ids = torch.tensor(tok("".join(corpus()[:2]), add_special_tokens=False)["input_ids"])
    rows = ids[: len(ids) // 65 * 65].view(-1, 65)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = rows[torch.randint(len(rows), (16,), generator=g)]
        loss = lm(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    cfg = Zip2ZipConfig("trained-tiny", "transformer",
                        {"hidden_size": 64, "num_hidden_layers": 1, "num_heads": 4, "position_encoding": "learnable"},
                        CompressionSettings(len(tok), 64, 3, sorted(tok.all_special_ids)))
    d = tmp_path_factory.mktemp("trained")
    lm.eval().save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    cfg.base_model_name_or_path = "base"  # relative to the checkpoint
    checkpoint.save(Zip2ZipLM(cfg, lm, tok.eos_token_id), d, tok)
    return d


def teacher_forced_agreement(backend, loaded, want: list[int], prompt: str) -> float:
    """Fraction of steps at which ``backend`` picks the code of ``want`` (a reference's greedy codes
    for ``prompt``) when fed that reference's codes: agreement of a quantized model, step by step."""
    import numpy as np

    from z2z_chat.backends.codec import CodecSession
    from z2z_chat.backends.engine.prompt import render, tokenize

    tok = loaded.tokenizer
    ids = tokenize(tok, render(tok, None, [{"role": "user", "content": prompt}]), 0)[1]
    s, V = CodecSession(loaded.codec), loaded.codec.base_vocab_size
    codes = s.encode(ids)
    backend.add_entries(s.take_new_entries(), s.candidate())
    logits = backend.forward(codes, list(range(len(codes))))
    agree = 0
    for t, code in enumerate(want):
        masked = logits.copy()
        masked[V + s.num_allowed_hyper():] = -np.inf
        agree += int(np.argmax(masked)) == code
        s.push(code)
        backend.add_entries(s.take_new_entries(), s.candidate())
        logits = backend.forward([code], [len(codes) + t])
    return agree / len(want)


@pytest.fixture(scope="module", params=["llamacpp", "torch"])
def tiny_rt(request, ref_checkpoints, tmp_path_factory):
    """A runtime of the tiny reference checkpoint on llama.cpp (converted, default settings) and on torch."""
    from z2z_chat.backends.runtime import open_runtime

    ckpt = ref_checkpoints[("llama", "transformer", "compressed")][1]
    if request.param == "torch":
        r = open_runtime(str(ckpt), "torch", "cpu")
    else:
        pytest.importorskip("llama_cpp", reason='llama.cpp backend: pip install "z2z-chat[llamacpp]"')
        from z2z_chat.backends.llamacpp_backend.convert import convert

        dst = tmp_path_factory.mktemp("gguf") / "tiny"
        convert(str(ckpt), dst)
        r = open_runtime(str(dst), "llamacpp")
    yield r
    r.close()
