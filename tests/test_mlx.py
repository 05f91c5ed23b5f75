"""MLX backend and ``convert/to_mlx.py`` on Linux CPU (``mlx[cpu]``): torch vs MLX after conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm", reason='MLX backend: pip install "mlx[cpu]" mlx-lm')
torch = pytest.importorskip("torch")

from conftest import teacher_forced_agreement  # noqa: E402

from z2z_chat.backends.codec import CodecSession  # noqa: E402
from z2z_chat.backends.config import positions  # noqa: E402
from z2z_chat.backends.engine.events import GenerationSettings, Token  # noqa: E402
from z2z_chat.backends.engine.session import Session  # noqa: E402
from z2z_chat.backends.mlx_backend.backend import MLXModel  # noqa: E402
from z2z_chat.backends.errors import CheckpointError, ConvertError  # noqa: E402
from z2z_chat.backends.mlx_backend.convert import convert  # noqa: E402
from z2z_chat.backends.torch_backend import checkpoint  # noqa: E402
from z2z_chat.backends.torch_backend.backend import TorchState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [("llama", "transformer", "compressed"), ("llama", "res_latent_attn", "base_token_end"),
         ("phi3", "transformer", "compressed"), ("phi3", "res_latent_attn", "base_token_end")]
TEXT = "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 2\n\n" * 3


@pytest.fixture(scope="module")
def converted(ref_checkpoints, tmp_path_factory):
    out = {}
    for case in CASES:
        dst = tmp_path_factory.mktemp("mlx") / "-".join(case)
        convert(str(ref_checkpoints[case][1]), dst, dtype="float32")
        out[case] = dst
    return out


def stream(loaded, ids):
    """Codes of ``ids`` (a fresh codebook) and their positions in the checkpoint's position mode."""
    s = CodecSession(loaded.codec)
    codes = s.encode(ids)
    return codes, positions([len(s.expand(c)) for c in codes], loaded.config.position_mode)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_mlx_logits_match_torch(case, ref_checkpoints, converted):
    loaded = checkpoint.load(ref_checkpoints[case][1])
    mlx_model, _ = MLXModel.open(converted[case])
    mlx_backend = mlx_model.new_state()
    torch_backend = TorchState(loaded.model)
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    codes, pos = stream(loaded, ids)
    assert sum(c >= loaded.codec.base_vocab_size for c in codes) >= 5
    sessions = [CodecSession(loaded.codec), CodecSession(loaded.codec)]
    k, worst = 10, 0.0
    for backend, s in zip((torch_backend, mlx_backend), sessions):
        for c in codes[:k]:
            s.push(c)
    outs = [[], []]
    for i, (backend, s) in enumerate(zip((torch_backend, mlx_backend), sessions)):
        backend.add_entries(s.take_new_entries(), s.candidate())
        outs[i].append(backend.forward(codes[:k], pos[:k]))
        for t in range(k, len(codes)):  # hypertokens created mid-stream, as inputs and as targets
            s.push(codes[t])
            backend.add_entries(s.take_new_entries(), s.candidate())
            outs[i].append(backend.forward([codes[t]], [pos[t]]))
    for a, b in zip(*outs):
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        fin = np.isfinite(a)
        worst = max(worst, float(np.abs(a[fin] - b[fin]).max()))
    assert worst <= 1e-4


def greedy_codes(backend, loaded, n, prompt="Write code: x = x + 1; x = x + 1;"):
    session = Session(backend, loaded.tokenizer, loaded.codec, position_mode=loaded.config.position_mode)
    session.stop_ids = set()  # run the full length even through end-of-turn
    codes = [e.code for e in session.send(prompt, GenerationSettings(max_tokens=3 * n))  # base tokens
             if isinstance(e, Token) and e.code is not None]
    return codes[:n]


@pytest.mark.parametrize("case", CASES[:2], ids=["-".join(c) for c in CASES[:2]])
def test_greedy_codes_equal_torch(case, ref_checkpoints, converted):
    loaded = checkpoint.load(ref_checkpoints[case][1])
    a = greedy_codes(TorchState(loaded.model), loaded, 32)
    b = greedy_codes(MLXModel.open(converted[case])[0].new_state(), loaded, 32)
    assert a == b and len(a) == 32


def test_4bit_conversion_agrees_with_fp32(trained_ckpt, tmp_path):
    loaded = checkpoint.load(trained_ckpt)
    dst = tmp_path / "q4"
    convert(str(trained_ckpt), dst, quantize=4, q_group_size=32, dtype="float32")
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 4
    prompt = "def parse_args(self, args=None, namespace=None):"
    fp32 = greedy_codes(TorchState(loaded.model), loaded, 64, prompt)
    # teacher-forced: at each of the 64 steps, does the 4-bit model pick the fp32 model's code?
    assert teacher_forced_agreement(MLXModel.open(dst)[0].new_state(), loaded, fp32, prompt) >= 0.9


def test_converter_errors(ref_checkpoints, tmp_path, tokenizer_dir):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        convert(str(tmp_path / "missing"), tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(str(ref_checkpoints[CASES[0]][1]), tmp_path / "exists")
    r = subprocess.run([sys.executable, "convert/to_mlx.py", str(ref_checkpoints[CASES[0]][1]), str(tmp_path / "exists")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "already exists" in r.stderr
    # an architecture the MLX backend does not have
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
    from z2z_chat.backends.torch_backend.model import Zip2ZipLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4)).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = Zip2ZipConfig(str(base), "transformer", {"hidden_size": 64, "num_hidden_layers": 1, "num_heads": 4},
                        CompressionSettings(len(tok), 16, 3, sorted(tok.all_special_ids)))
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "gpt2-z2z"
    checkpoint.save(Zip2ZipLM(cfg, AutoModelForCausalLM.from_pretrained(base), tok.eos_token_id), ckpt, tok)
    with pytest.raises(ConvertError, match="'gpt2' is not supported by the MLX backend"):
        convert(str(ckpt), tmp_path / "gpt2-mlx")


def test_runtime_opens_a_converted_directory_with_auto(converted):
    from z2z_chat.backends.runtime import open_runtime

    rt = open_runtime(str(converted[CASES[0]]))
    assert rt.backend_name == "mlx"
    events = list(rt.session().send("hi", GenerationSettings(max_tokens=4)))
    assert events


@pytest.mark.slow
def test_default_model_on_mlx_matches_torch(tmp_path):
    """The default model itself (rope base 100,000 in the newer config layout) converted to MLX in
    float32: logits within 1e-3 of torch's over a prefill and a 60-step decode with hypertokens,
    and the same greedy reply."""
    from z2z_chat.backends.loading.assets import smollm2_gguf
    from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR
    from z2z_chat.backends.runtime import open_runtime

    base = smollm2_gguf()
    dst = tmp_path / "default-mlx"
    convert(str(DEFAULT_MODEL_DIR), dst, dtype="float32", base=base)
    assert json.loads((dst / "config.json").read_text())["rope_theta"] == 100000.0
    rt = open_runtime(None, "torch", "cpu", "float32")
    mlx_model, _ = MLXModel.open(dst)
    states = [rt.model.new_state(), mlx_model.new_state()]
    ids = rt.tokenizer(TEXT * 10, add_special_tokens=False)["input_ids"]
    s = CodecSession(rt.codec)
    codes = s.encode(ids)
    k = len(codes) - 60
    assert k >= 40
    sessions = [CodecSession(rt.codec), CodecSession(rt.codec)]
    outs: list[list[np.ndarray]] = [[], []]
    for i, (state, cs) in enumerate(zip(states, sessions)):
        for c in codes[:k]:
            cs.push(c)
        state.add_entries(cs.take_new_entries(), cs.candidate())
        outs[i].append(state.forward(codes[:k], list(range(k))))
        for t in range(k, len(codes)):  # 60 steps, hypertokens among them
            cs.push(codes[t])
            state.add_entries(cs.take_new_entries(), cs.candidate())
            outs[i].append(state.forward([codes[t]], [t]))
    assert sum(c >= rt.codec.base_vocab_size for c in codes[k:]) >= 5
    worst = 0.0
    for a, b in zip(*outs):
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        fin = np.isfinite(a)
        worst = max(worst, float(np.abs(a[fin] - b[fin]).max()))
    assert worst <= 1e-3, worst

    def reply(state) -> list[int]:
        session = Session(state, rt.tokenizer, rt.codec, position_mode=rt.config.position_mode)
        return [e.code for e in session.send("What is the capital of France?", GenerationSettings(max_tokens=60))
                if isinstance(e, Token) and e.code is not None]

    assert reply(rt.model.new_state()) == reply(mlx_model.new_state())


def test_a_dtype_the_directory_was_not_converted_in_is_an_error(converted):
    from z2z_chat.backends.runtime import RuntimeOpenError, open_runtime

    d = str(converted[CASES[0]])  # converted in float32
    with pytest.raises(RuntimeOpenError, match="converted in float32; for --dtype float16 convert it again"):
        open_runtime(d, "mlx", dtype="float16")
    open_runtime(d, "mlx", dtype="float32").close()
