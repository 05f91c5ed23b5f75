"""The llama.cpp backend on tiny random models converted by convert/to_gguf.py: numpy encoders ==
torch encoders, logits == torch over prefill and decode with hypertokens created mid-stream,
greedy parity, quantized agreement, position-mode refusal, and bad files failing cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason='llama.cpp backend: pip install "z2z-chat[llamacpp]"')
torch = pytest.importorskip("torch")

from conftest import teacher_forced_agreement  # noqa: E402

from z2z_chat.backends.codec import CodecSession, encode  # noqa: E402
from z2z_chat.backends.engine.events import GenerationSettings, Token  # noqa: E402
from z2z_chat.backends.engine.session import Session  # noqa: E402
from z2z_chat.backends.errors import CheckpointError, ConvertError, Z2ZError  # noqa: E402
from z2z_chat.backends.llamacpp_backend.convert import convert  # noqa: E402
from z2z_chat.backends.llamacpp_backend.checkpoint import open_checkpoint  # noqa: E402
from z2z_chat.backends.llamacpp_backend.encoders import build_encoder  # noqa: E402
from z2z_chat.backends.llamacpp_backend.tensors import SafetensorsFile  # noqa: E402
from z2z_chat.backends.runtime import RuntimeOpenError, open_runtime  # noqa: E402
from z2z_chat.backends.torch_backend import checkpoint  # noqa: E402
from z2z_chat.backends.torch_backend.backend import TorchState  # noqa: E402

LLAMA = ("llama", "transformer", "compressed")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gguf_dirs(ref_checkpoints, tmp_path_factory):
    """The reference llama checkpoint (LoRA + transformer encoders) converted to f32, f16, q8_0."""
    out = {}
    for lora in ("adapter", "merge"):
        d = tmp_path_factory.mktemp(f"gguf-{lora}")
        convert(str(ref_checkpoints[LLAMA][1]), d, "f32", force=True, lora=lora)
        out[lora] = d
    out["f32"] = out["adapter"]
    assert (out["adapter"] / "lora.gguf").is_file() and not (out["merge"] / "lora.gguf").exists()
    return out


def stream(tok, codec):
    text = "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\nprint(f(1), f(1), f(1))\n" * 2
    codes, _ = encode(tok(text, add_special_tokens=False)["input_ids"], codec)
    return codes


def run_stream(backend, codes, codec, k=20):
    s = CodecSession(codec)
    for c in codes[:k]:
        s.push(c)
    backend.add_entries(s.take_new_entries(), s.candidate())
    outs = [backend.forward(codes[:k], list(range(k)))]
    for t in range(k, len(codes)):  # hypertokens created mid-stream, as inputs and as targets
        s.push(codes[t])
        backend.add_entries(s.take_new_entries(), s.candidate())
        outs.append(backend.forward([codes[t]], [t]))
    return outs


# f32: every matrix float32 (1 thread, then 3); q8_0, f16: every matrix of that type (3 threads),
# torch's within its rounding
@pytest.mark.parametrize("kind", ["f32", "q8_0", "f16"])
@pytest.mark.parametrize("enc", ["transformer", "res_latent_attn"])
def test_ggml_encoders_equal_torch(enc, kind, ref_checkpoints, monkeypatch):
    from z2z_chat.backends.llamacpp_backend import encoders

    monkeypatch.setattr(encoders, "QUANT", 0)
    monkeypatch.setattr(encoders, "CHUNK", 3)  # the 5 entries below in two graphs used once;
    monkeypatch.setattr(encoders, "KEEP", 2)  # calls of 2 entries (as a step's) run kept graphs
    case = LLAMA if enc == "transformer" else ("llama", "res_latent_attn", "base_token_end")
    loaded = checkpoint.load(ref_checkpoints[case][1])
    m = loaded.model
    # a call's products skip pad slots (entries of 1-3 ids); the last row: all pads, as a stand-in
    # row of zeros is where the pad id is 0 (no key anywhere)
    rows = np.array([[5, 6, 7], [8, 9, m.pad_id], [10, m.pad_id, m.pad_id], [11, 12, 11], [m.pad_id] * 3])
    table = m.lm.get_input_embeddings().weight.detach().numpy()
    for side, module in (("input_encoder", m.input_encoder), ("output_encoder", m.output_encoder)):
        weights = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        prepared = encoders.prepare(weights, loaded.config.encoder, kind)
        assert any(k.endswith((".q8_0", ".f16")) for k in prepared) == (kind != "f32")
        encoder = build_encoder(enc, prepared, loaded.config.encoder, m.pad_id, prepared=True)
        with encoders.use_threads(3):
            ours = encoder(rows, table)
        with torch.no_grad():
            want = module(torch.tensor(rows), torch.tensor(table)).numpy()
        assert encoder(rows[:0], table).shape == (0, want.shape[1])
        if kind == "f32":
            np.testing.assert_allclose(ours, want, atol=1e-5, err_msg=side)
            np.testing.assert_allclose(encoder(rows[1:2], table)[0], want[1], atol=1e-5, err_msg=side)  # 1 thread, 1 row
            np.testing.assert_allclose(encoder(rows[4:], table), want[4:], atol=1e-5, err_msg=side)  # pads only
            other = table * 2  # another table, another pad row: its pads' rows are its own, not the first's
            with torch.no_grad():
                want_other = module(torch.tensor(rows), torch.tensor(other)).numpy()
            np.testing.assert_allclose(encoder(rows, other), want_other, atol=1e-5, err_msg=side)
            # kept graphs run again: fed other ids (the same pad slots), or other pad slots (same shape)
            np.testing.assert_allclose(encoder(rows[3:], table), want[3:], atol=1e-5, err_msg=side)
            shifted = np.where(rows == m.pad_id, m.pad_id, rows + 20)
            with torch.no_grad():
                want_shifted = module(torch.tensor(shifted), torch.tensor(table)).numpy()
            np.testing.assert_allclose(encoder(shifted[3:], table), want_shifted[3:], atol=1e-5, err_msg=side)
            np.testing.assert_allclose(encoder(rows[[4, 3]], table), want[[4, 3]], atol=1e-5, err_msg=side)
        else:  # measured: q8_0 1.6-2.5%, f16 0.07-0.09% (norm of the difference)
            err = np.linalg.norm(ours - want) / np.linalg.norm(want)
            assert err < {"q8_0": 0.04, "f16": 0.003}[kind], (side, err)


def test_q8_0_products_equal_numpy_within_rounding():
    from z2z_chat.backends.llamacpp_backend.ggml_graph import Graph, Tensors, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 128)).astype(np.float32)  # (out, in)
    x = rng.standard_normal((5, 256)).astype(np.float32)[:, ::2]  # (N, in), not contiguous
    t = Tensors({"w": (quantize(w, "q8_0"), "q8_0")})

    def product(x: np.ndarray, threads: int) -> np.ndarray:
        with Graph() as g:
            return g.run(g.mm(t["w"], g.input(x)), (len(x), 96), threads=threads)

    want, ours = x @ w.T, product(x, 1)
    assert 0 < np.linalg.norm(ours - want) < 0.01 * np.linalg.norm(want)
    assert np.array_equal(product(x, 3), ours)  # threads split the work, not the sums
    assert np.array_equal(product(x[:1], 2)[0], ours[0])  # one row as in a batch


@pytest.mark.parametrize("lora", ["adapter", "merge"])
def test_logits_equal_torch_over_prefill_and_decode(ref_checkpoints, gguf_dirs, lora):
    loaded = checkpoint.load(ref_checkpoints[LLAMA][1])
    codes = stream(loaded.tokenizer, loaded.codec)
    assert sum(c >= loaded.codec.base_vocab_size for c in codes[20:]) >= 8  # hypertokens mid-stream
    ours = run_stream(open_checkpoint(gguf_dirs[lora], n_threads=1, exact=True).model.new_state(), codes, loaded.codec)
    want = run_stream(TorchState(loaded.model), codes, loaded.codec)
    for a, b in zip(ours, want):
        assert np.array_equal(np.isfinite(a), np.isfinite(b))  # the same slots masked
        fin = np.isfinite(a)
        np.testing.assert_allclose(a[fin], b[fin], atol=1e-3)


def greedy(backend, loaded, n, prompt="Write code: x = x + 1; x = x + 1;"):
    session = Session(backend, loaded.tokenizer, loaded.codec, position_mode=loaded.config.position_mode)
    session.stop_ids = set()
    codes = [e.code for e in session.send(prompt, GenerationSettings(max_tokens=3 * n))
             if isinstance(e, Token) and e.code is not None]
    return codes[:n]


def test_greedy_codes_equal_torch(ref_checkpoints, gguf_dirs):
    loaded = checkpoint.load(ref_checkpoints[LLAMA][1])
    a = greedy(TorchState(loaded.model), loaded, 32)
    b = greedy(open_checkpoint(gguf_dirs["f32"], n_threads=1, exact=True).model.new_state(), loaded, 32)
    assert a == b and len(a) == 32
    assert any(c >= loaded.codec.base_vocab_size for c in a)


def test_output_vectors_of_rows_seen_before_are_not_encoded_again(gguf_dirs):
    model = open_checkpoint(gguf_dirs["merge"], n_threads=1, exact=True).model
    encoder, calls = model.output_encoder, []
    model.output_encoder = lambda rows, table: calls.append(rows.tolist()) or encoder(rows, table)
    state, V, pad = model.new_state(), model.V, model.pad_id
    state.add_entries([(V, (5, 6))], (V + 1, (6, 6)))
    state.add_entries([(V + 1, (6, 7))], (V + 2, (5, 6)))  # the candidate's entry is slot 0's
    state.add_entries([(V + 2, (6, 6))], None)  # the first step's candidate, now an entry
    vectors = state.hyper_out[:3]
    assert calls == [[[5, 6, pad], [6, 6, pad]], [[6, 7, pad]]]
    want = encoder(np.array([[5, 6, pad], [6, 7, pad], [6, 6, pad]]), model.head_table)
    np.testing.assert_allclose(vectors, want, atol=1e-6)


def test_output_vectors_computed_beside_the_decode_give_the_same_logits(gguf_dirs, ref_checkpoints):
    """The output encoder runs beside llama.cpp's decode where a CPU is free, else before it: the
    same logits either way, hypertokens mid-stream."""
    loaded = open_checkpoint(gguf_dirs["merge"], n_threads=1, exact=True)
    codes = stream(loaded.tokenizer, loaded.codec)
    runs = []
    for spare in (True, False):
        loaded.model.ctx.spare_cpu = spare
        runs.append(run_stream(loaded.model.new_state(), codes, loaded.codec))
    assert sum(c >= loaded.codec.base_vocab_size for c in codes[20:]) >= 8
    np.testing.assert_array_equal(np.stack(runs[0]), np.stack(runs[1]))


def test_an_error_beside_the_decode_leaves_the_context_usable(gguf_dirs):
    """What runs beside a decode (``during``) may fail or be interrupted: the decode still ends
    before the error is raised, so the cache holds the step and the next decode follows it."""
    model = open_checkpoint(gguf_dirs["f32"], n_threads=1, exact=True).model
    rows = model.embed_table[[5, 6, 7, 8]]

    def boom() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.ctx.decode(rows[:2], 0, during=boom)
    assert model.ctx.n_past == 2
    logits, _ = model.ctx.decode(rows[2:], 2)
    model.ctx.clear()
    expected, _ = model.ctx.decode(rows, 0)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_hidden_state_is_the_final_norm_output(gguf_dirs):
    """The module docstring's claim: llama.cpp's per-token embedding is what feeds the LM head."""
    model = open_checkpoint(gguf_dirs["f32"], n_threads=1, exact=True).model
    rows = model.embed_table[[5, 6, 7, 8]]
    logits, h = model.ctx.decode(rows, 0)
    head = model.head_table[np.arange(model.head_table.shape[0])]  # (rows, D)
    np.testing.assert_allclose(head @ h, logits[: head.shape[0]], atol=1e-4)


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_base_token_steps_fed_as_ids_equal_their_embedding_rows(ref_checkpoints, gguf_dirs, tmp_path, qtype):
    """Codes that are all base tokens go to llama.cpp as token ids (it looks their rows up itself):
    the logits are bit-equal to feeding the table's rows (f16, q8_0: dequantized the same way)."""
    d = gguf_dirs["merge"]
    if qtype != "f32":
        d = tmp_path / qtype
        convert(str(ref_checkpoints[LLAMA][1]), d, qtype, lora="adapter")
    model = open_checkpoint(d, n_threads=1, exact=True).model
    state, codes = model.new_state(), [5, 6, 7, 8, 9]
    by_ids = [state.forward(codes[:3], [0, 1, 2])] + [state.forward([c], [t]) for t, c in enumerate(codes[3:], 3)]
    model.ctx.clear()
    by_rows = [model.ctx.decode(model.embed_table[codes[:3]], 0)[0]]
    by_rows += [model.ctx.decode(model.embed_table[[c]], t)[0] for t, c in enumerate(codes[3:], 3)]
    for a, b in zip(by_ids, by_rows):
        assert np.array_equal(a[: model.V], b[: model.V])


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_quantized_bases_agree_with_f32(trained_ckpt, tmp_path, qtype):
    loaded = checkpoint.load(trained_ckpt)
    ref_dir, q_dir = tmp_path / "f32", tmp_path / qtype
    convert(str(trained_ckpt), ref_dir, "f32")
    convert(str(trained_ckpt), q_dir, qtype)
    assert (q_dir / "model.gguf").stat().st_size < (ref_dir / "model.gguf").stat().st_size
    prompt = "def parse_args(self, args=None, namespace=None):"
    want = greedy(open_checkpoint(ref_dir, n_threads=1, exact=True).model.new_state(), loaded, 64, prompt)
    # teacher-forced: at each step, does the quantized model pick the f32 model's code?
    assert teacher_forced_agreement(open_checkpoint(q_dir, n_threads=1, exact=True).model.new_state(), loaded, want, prompt) >= 0.9


def test_trim_and_rewind_match_a_fresh_run(gguf_dirs, ref_checkpoints):
    loaded = checkpoint.load(ref_checkpoints[LLAMA][1])
    codes = stream(loaded.tokenizer, loaded.codec)
    be = open_checkpoint(gguf_dirs["f32"], n_threads=1, exact=True).model.new_state()
    full = run_stream(be, codes, loaded.codec)
    be.trim(10)  # back to len(codes) - 10 positions; re-feed the last 10 codes one by one
    s = CodecSession(loaded.codec)
    for c in codes[:-10]:
        s.push(c)
    be.drop_entries(len(s))
    s.take_new_entries()
    n = len(codes) - 10
    for t in range(n, len(codes)):
        s.push(codes[t])
        be.add_entries(s.take_new_entries(), s.candidate())
        out = be.forward([codes[t]], [t])
    np.testing.assert_allclose(out, full[-1], atol=1e-5)


def test_base_token_end_is_refused_and_auto_runs_it_on_torch(ref_checkpoints, tmp_path):
    d = ref_checkpoints[("llama", "res_latent_attn", "base_token_end")][1]
    with pytest.raises(Z2ZError, match="position_mode .base_token_end.*--backend torch"):
        open_runtime(str(d), "llamacpp")
    with pytest.raises(ConvertError, match="base_token_end"):
        convert(str(d), tmp_path / "x")
    assert open_runtime(str(d), "auto").backend_name == "torch"


def test_auto_picks_llamacpp_for_compressed_checkpoints(gguf_dirs):
    rt = open_runtime(str(gguf_dirs["f32"]), "auto")
    assert rt.backend_name == "llamacpp"
    events = list(rt.session().send("hi", GenerationSettings(max_tokens=4)))
    assert events[-1].reason in ("stop", "length")


# --- bad input: a clear error, exit 1, no traceback, no crash of the process --------------------

def broken(gguf_dirs, tmp_path, how):
    d = tmp_path / how
    shutil.copytree(gguf_dirs["f32"], d)
    model = d / "model.gguf"
    if how == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif how == "garbage":
        model.write_bytes(b"GGUF" + b"\x00" * 200)
    elif how == "missing-adapter":
        (d / "lora.gguf").unlink()
        (d / "adapter_config.json").write_text("{}")
    elif how == "adapter-is-a-model":
        shutil.copyfile(model, d / "lora.gguf")
    elif how in ("nan-encoder", "other-width"):  # NaN weights, or an encoder file for another hidden size
        from safetensors.numpy import load_file, save_file

        st = load_file(d / "zip2zip_encoders.safetensors")
        if how == "nan-encoder":
            st = {k: (np.full_like(v, np.nan) if "output_encoder" in k else v) for k, v in st.items()}
        else:
            st = {k: (v[:, :32] if v.ndim == 2 else v) for k, v in st.items()}
        save_file(st, d / "zip2zip_encoders.safetensors")
    return d


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing-adapter", "adapter-is-a-model", "other-width",
                                 "nan-encoder"])
def test_bad_files_are_clear_errors(gguf_dirs, tmp_path, how):
    d = broken(gguf_dirs, tmp_path, how)
    with pytest.raises((CheckpointError, RuntimeOpenError)):
        open_checkpoint(d, n_threads=1, exact=True)
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--backend", "llamacpp", "--model", str(d), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("z2z-chat: error:") and "Traceback" not in r.stderr, r.stderr


def test_vocabulary_mismatch_is_refused(gguf_dirs, tmp_path):
    import json

    d = tmp_path / "vocab"
    shutil.copytree(gguf_dirs["f32"], d)
    cfg = json.loads((d / "zip2zip_config.json").read_text())
    cfg["compression"]["initial_vocab_size"] += 50
    (d / "zip2zip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer has"):
        open_checkpoint(d, n_threads=1, exact=True)


def test_a_saved_kv_cache_reopens_a_conversation_without_reading_it_again(gguf_dirs, tmp_path):
    """What the app keeps on disk when a chat is left: a fresh runtime (a relaunch) takes it back,
    the next turn reads only the new message and writes what a full re-read writes."""
    from z2z_chat.backends.engine.kv_store import KVStore

    settings = GenerationSettings(max_tokens=12)
    rt = open_runtime(str(gguf_dirs["merge"]), "llamacpp")
    a = rt.session()
    for text in ("def f(x):\n    return x + 1\n", "Again, for g."):
        list(a.send(text, settings))
    saved, snap = a.to_dict(), a.saved_kv()
    assert snap is not None and snap.fed == a.fed > 0
    KVStore(tmp_path / "kv", rt.identity).save("chat-1", snap)
    rt.close()

    again = open_runtime(str(gguf_dirs["merge"]), "llamacpp")
    kv = KVStore(tmp_path / "kv", again.identity).load("chat-1")
    warm, cold = again.session(), again.session()
    assert warm.restore(saved, kv) is None and warm.fed == snap.fed
    cold.restore(saved)
    assert cold.fed == 0
    live = cold.state.slots.live
    assert live > 0 and warm.state.slots.live == live  # the entries' vectors came with the cache
    np.testing.assert_allclose(warm.state.hyper_out[:live], cold.state.hyper_out[:live], atol=1e-5)  # batch rounding
    ev_warm, ev_cold = list(warm.send("And once more.", settings)), list(cold.send("And once more.", settings))
    codes = [[e.code for e in evs if isinstance(e, Token) and e.code is not None] for evs in (ev_warm, ev_cold)]
    assert codes[0] == codes[1] and codes[0]
    assert ev_warm[-1].stats.cached_codes == snap.fed and ev_cold[-1].stats.cached_codes == 0
    # a cache that does not hold this conversation's codes is not taken; the turn reads it all
    other = again.session()
    changed = dict(saved, codes=list(saved["codes"][:-1]) + [saved["codes"][0]], fed=saved["fed"])
    try:
        note = other.restore(changed, kv)
    except ValueError:
        note = "the saved state itself was refused"
    assert note is not None and other.fed == 0


@pytest.fixture(scope="module")
def arch_ckpts(ref_checkpoints, tmp_path_factory, tokenizer_dir):
    """Reference-made zip2zip checkpoints (LoRA on every projection, hypertokens) on the other bases
    llama.cpp runs: Phi-3 (fused qkv / gate_up, untied head with extra rows) and Qwen2 (attention
    biases, GQA, tied embeddings, a rope base of 1e6)."""
    from reference import ref_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                      eos_token_id=2, bos_token_id=None, pad_token_id=None)
    lm = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # biases are zero at init: random ones, so a converter that drops them fails
        for name, p in lm.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    base = tmp_path_factory.mktemp("qwen2-base")
    lm.save_pretrained(base)
    tok.save_pretrained(base)
    d = tmp_path_factory.mktemp("qwen2-ckpt")
    ref_model("llama", "transformer", "compressed", base, tok).save_pretrained(d)  # q/k/v/o/gate/up/down LoRA
    return {"phi3": ref_checkpoints[("phi3", "transformer", "compressed")][1], "qwen2": d}


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
@pytest.mark.parametrize("lora", ["adapter", "merge"])
def test_phi3_and_qwen2_convert_and_equal_torch(arch_ckpts, tmp_path, arch, lora):
    d = tmp_path / f"{arch}-{lora}"
    convert(str(arch_ckpts[arch]), d, "f32", force=True, lora=lora)
    loaded = checkpoint.load(arch_ckpts[arch])
    codes = stream(loaded.tokenizer, loaded.codec)
    assert sum(c >= loaded.codec.base_vocab_size for c in codes[20:]) >= 8  # hypertokens mid-stream
    ours = run_stream(open_checkpoint(d, n_threads=1, exact=True).model.new_state(), codes, loaded.codec)
    want = run_stream(TorchState(loaded.model), codes, loaded.codec)
    for a, b in zip(ours, want):
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        fin = np.isfinite(a)
        np.testing.assert_allclose(a[fin], b[fin], atol=1e-3)


def test_phi3_long_context_rope_factors_are_written_as_llama_cpp_reads_them(tmp_path, tokenizer_dir):
    """Phi-3.5's longrope: both factor tables and the attention factor llama.cpp's converter computes
    (run against transformers in ``test_phi3_longrope_logits_equal_transformers``)."""
    import math

    import gguf
    from transformers import AutoTokenizer

    from z2z_chat.backends.llamacpp_backend.tensors import check_gguf, write_model_gguf

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    long, short = np.linspace(1, 4, 8).tolist(), np.linspace(1, 1.5, 8).tolist()
    config = {"architectures": ["Phi3ForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 4,
              "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 4096,
              "original_max_position_embeddings": 512, "rope_theta": 10000.0,
              "rope_scaling": {"type": "longrope", "long_factor": long, "short_factor": short}}
    rng = np.random.default_rng(0)
    state = {"model.embed_tokens.weight": rng.standard_normal((len(tok), 64)), "model.norm.weight": np.ones(64),
             "lm_head.weight": rng.standard_normal((len(tok), 64))}
    for hf, shape in (("self_attn.qkv_proj", (192, 64)), ("self_attn.o_proj", (64, 64)), ("mlp.gate_up_proj", (256, 64)),
                      ("mlp.down_proj", (64, 128)), ("input_layernorm", (64,)), ("post_attention_layernorm", (64,))):
        state[f"model.layers.0.{hf}.weight"] = rng.standard_normal(shape)
    path = write_model_gguf(tmp_path / "phi3.gguf", state, config, tok)
    r = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    np.testing.assert_allclose(tensors["rope_factors_long.weight"], long)
    np.testing.assert_allclose(tensors["rope_factors_short.weight"], short)
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= set(tensors)
    assert r.fields["general.architecture"].contents() == "phi3"
    assert r.fields["phi3.rope.scaling.original_context_length"].contents() == 512
    assert r.fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(math.sqrt(1 + math.log(8) / math.log(512)))
    check_gguf(path)  # and it parses as a model llama.cpp can be handed


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_encoder_weights_are_prepared_once_and_a_damaged_cache_is_made_again(gguf_dirs, tmp_path, monkeypatch, kind):
    """The encoders' layout is kept in the cache and read back: the same vectors from a fresh
    preparation, the cached file and a rebuilt one (q8_0: every matrix that fits, as ggml blocks)."""
    from z2z_chat.backends.llamacpp_backend import encoders

    monkeypatch.setenv("Z2Z_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("Z2Z_ENCODER_WEIGHTS", kind)
    monkeypatch.setattr(encoders, "QUANT", 0)
    rows = np.array([[5, 6, 7], [8, 9, 2]])

    def vectors() -> np.ndarray:
        loaded = open_checkpoint(gguf_dirs["merge"], n_threads=1, exact=True)
        m = loaded.model
        out = np.concatenate([m.input_encoder(rows, m.embed_table), m.output_encoder(rows, m.head_table)])
        m.close()
        return out

    fresh = vectors()
    (cached,) = (tmp_path / "cache" / "llamacpp").glob("encoders-*.safetensors")
    assert any(k.endswith(".q8_0") for k in SafetensorsFile(cached)) == (kind == "q8_0")
    np.testing.assert_array_equal(vectors(), fresh)
    cached.write_bytes(cached.read_bytes()[:100])  # cut short, as a full disk would leave it
    np.testing.assert_array_equal(vectors(), fresh)
    assert cached.stat().st_size > 100
    (table,) = (tmp_path / "cache" / "llamacpp").glob("tables-*/embed.npy")  # the same for the tables
    table.write_bytes(table.read_bytes()[:1000])
    np.testing.assert_array_equal(vectors(), fresh)


def test_an_unknown_encoder_weight_type_is_a_clear_error(gguf_dirs, monkeypatch):
    monkeypatch.setenv("Z2Z_ENCODER_WEIGHTS", "q4")
    with pytest.raises(CheckpointError, match="Z2Z_ENCODER_WEIGHTS='q4': use q8_0"):
        open_checkpoint(gguf_dirs["merge"], n_threads=1)


def test_an_encoder_config_edited_after_the_first_open_is_checked_again(gguf_dirs, tmp_path, monkeypatch):
    """The encoders are checked when their cache entry is made; the entry's key holds the encoder
    config, so a config that no longer fits the weights fails at open, not at the first hypertoken."""
    import json

    monkeypatch.setenv("Z2Z_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "edited"
    shutil.copytree(gguf_dirs["f32"], d)
    open_checkpoint(d, n_threads=1, exact=True).model.close()
    cfg = json.loads((d / "zip2zip_config.json").read_text())
    cfg["encoder"]["num_hidden_layers"] += 1  # a layer the weights do not have
    (d / "zip2zip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="input_encoder does not match"):
        open_checkpoint(d, n_threads=1, exact=True)


@pytest.mark.parametrize("n_ctx,length", [(512, 200), (1024, 600)], ids=["short-factors", "long-factors"])
def test_phi3_longrope_logits_equal_transformers(tmp_path, tokenizer_dir, n_ctx, length):
    """Phi-3.5's long-context RoPE through convert and llama.cpp against transformers, in the two
    regimes where both pick the same factors: a window and sequence within the original context
    (short factors), and past it (long factors and the attention factor). llama.cpp rounds its
    window up to a multiple of 256, so the original context here is 512."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from z2z_chat.backends.llamacpp_backend.context import LlamaContext
    from z2z_chat.backends.llamacpp_backend.tensors import write_model_gguf

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                     original_max_position_embeddings=512, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "long_factor": np.linspace(1, 6, 8).tolist(),
                                      "short_factor": np.linspace(1, 1.3, 8).tolist()},
                     eos_token_id=2, bos_token_id=None, pad_token_id=None)
    lm = Phi3ForCausalLM(cfg).eval()
    state = {k: v.detach().numpy() for k, v in lm.state_dict().items()}
    config = json.loads(cfg.to_json_string()) | {"architectures": ["Phi3ForCausalLM"]}
    path = write_model_gguf(tmp_path / "phi3.gguf", state, config, tok)
    ids = np.random.default_rng(1).integers(3, len(tok), size=length)
    with torch.no_grad():
        want = lm(torch.tensor(ids[None])).logits[0].numpy()  # (T, V)
    ctx = LlamaContext(path, n_ctx=n_ctx, n_threads=1, exact=True)
    try:
        with pytest.raises(Z2ZError, match="at most"):  # llama.cpp keeps the last batch's outputs only
            ctx.decode_ids(np.full(513, 5), 0, every_row=True)
        got = np.concatenate([ctx.decode_ids(ids[s:s + 256], s, every_row=True)[0] for s in range(0, length, 256)])
    finally:
        ctx.close()
    np.testing.assert_allclose(got[:, :len(tok)], want[:, :len(tok)], atol=1e-5, rtol=1e-4)


def test_missing_ggml_libraries_are_a_clear_error(tmp_path):
    from z2z_chat.backends.errors import BackendError
    from z2z_chat.backends.llamacpp_backend.ggml_graph import _load

    with pytest.raises(BackendError, match="no ggml-cpu library in .*reinstall llama-cpp-python"):
        _load(tmp_path, "ggml-cpu")


def test_flash_attention_is_a_setting(gguf_dirs, monkeypatch):
    """``Z2Z_FLASH_ATTN`` (auto, on, off): a bad value is refused before the model is read; on and
    off give the same logits within the f16 cache's rounding (the two attention kernels)."""
    monkeypatch.setenv("Z2Z_FLASH_ATTN", "sometimes")
    with pytest.raises(Z2ZError, match="Z2Z_FLASH_ATTN='sometimes': use auto"):
        open_checkpoint(gguf_dirs["merge"], n_threads=1)
    logits = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("Z2Z_FLASH_ATTN", setting)
        loaded = open_checkpoint(gguf_dirs["merge"], n_threads=1)
        try:
            logits[setting] = loaded.model.new_state().forward(list(range(5, 45)), list(range(40)))
        finally:
            loaded.model.close()
    finite = np.isfinite(logits["off"])
    assert (finite == np.isfinite(logits["on"])).all()
    np.testing.assert_allclose(logits["on"][finite], logits["off"][finite], atol=2e-3)  # measured: 3e-4
    assert not np.array_equal(logits["on"], logits["off"])  # the kernels round differently: the setting took


@pytest.mark.parametrize("name,value", [("Z2Z_CONTEXT", "24"), ("Z2Z_CONTEXT", "0"), ("Z2Z_CONTEXT", "-5"),
                                        ("Z2Z_CONTEXT", "1000000000"), ("Z2Z_CONTEXT", "lots"),
                                        ("Z2Z_THREADS", "0"), ("Z2Z_THREADS", "two")])
def test_window_and_thread_settings_out_of_range_are_one_line_errors(gguf_dirs, name, value):
    """Below one batch llama.cpp aborted the process (GGML_ASSERT); a billion positions was an
    out-of-memory kill. Both ends are checked before anything is allocated."""
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--backend", "llamacpp", "--model",
                        str(gguf_dirs["f32"]), "--prompt", "hi"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, stdin=subprocess.DEVNULL, env=os.environ | {name: value})
    assert r.returncode == 1 and f"{name}={value!r}" in r.stderr and "Traceback" not in r.stderr, r.stderr
