"""The torch zip2zip model against the ``zip2zip`` 0.2.0 package on the same tiny random weights."""

from __future__ import annotations

import json
import random
import shutil

import pytest

torch = pytest.importorskip("torch")
z2z = pytest.importorskip("zip2zip", reason="reference: pip install --no-deps zip2zip==0.2.0 zip2zip-compression==0.3.4 omegaconf")

from peft import LoraConfig, get_peft_model  # noqa: E402
from reference import CASES, LORA, C, randomize, ref_logits, ref_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from zip2zip.model import Zip2ZipModel  # noqa: E402

from z2z_chat.backends.codec import CodecSession, encode  # noqa: E402
from z2z_chat.backends.config import (
    Zip2ZipConfig,  # noqa: E402
    positions,  # noqa: E402
)
from z2z_chat.backends.torch_backend import checkpoint  # noqa: E402
from z2z_chat.backends.torch_backend.checkpoint import CheckpointError  # noqa: E402
from z2z_chat.backends.torch_backend.model import Zip2ZipLM  # noqa: E402


def sequences(tok, codec, seed=0):
    """A canonical chat-formatted sequence with repetition, and a model-like one."""
    text = "def f(x):\n    return x + 1\n\n" * 4 + "print(f(1), f(2), f(3))\n" * 3
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    canonical, _ = encode(ids, codec)
    rng = random.Random(seed)
    s, model_like = CodecSession(codec), []
    for t in ids[:60]:
        k = s.num_allowed_hyper()
        c = codec.base_vocab_size + rng.randrange(k) if k and rng.random() < 0.5 else t
        s.push(c)
        model_like.append(c)
    return [canonical, model_like]


def comparable(ours, codes, session_codec):
    """Masks over (T, V + C): what both sides define (base, created entries, candidates whose entry
    is the one finally created at that id: the reference installs final entries only), and what
    we allow at all (base, created, any candidate)."""
    s = CodecSession(session_codec)
    V = session_codec.base_vocab_size
    final = CodecSession(session_codec)
    for c in codes:
        final.push(c)
    mask = torch.zeros_like(ours, dtype=torch.bool)
    live = mask.clone()
    for t, c in enumerate(codes):
        s.push(c)
        mask[t, :V + len(s)] = live[t, :V + len(s)] = True
        cand = s.candidate()
        if cand:
            live[t, cand[0]] = True
            if cand[0] < V + len(final) and final.expand(cand[0]) == cand[1]:
                mask[t, cand[0]] = True
    return mask, live


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_ours_loads_reference_checkpoint_and_matches_logits(case, ref_checkpoints):
    ref, d = ref_checkpoints[case]
    loaded = checkpoint.load(d)
    assert loaded.config.position_mode == case[2]
    n_hyper = 0
    for codes in sequences(loaded.tokenizer, loaded.codec):
        n_hyper += sum(c >= loaded.codec.base_vocab_size for c in codes)
        want = ref_logits(ref, codes)[:, :loaded.codec.base_vocab_size + C]
        with torch.no_grad():
            got = loaded.model.sequence_logits(codes, CodecSession(loaded.codec))
        mask, live = comparable(got, codes, loaded.codec)
        assert torch.isfinite(got[mask]).all() and torch.isfinite(want[mask]).all()
        assert (got[mask] - want[mask]).abs().max().item() <= 1e-4
        assert torch.isfinite(got[live]).all() and torch.isinf(got[~live]).all()  # nothing else can be emitted
    assert n_hyper >= 10  # hypertokens as inputs (and hence targets) were exercised


@pytest.mark.parametrize("case", CASES[:2], ids=["-".join(c) for c in CASES[:2]])
def test_reference_loads_our_checkpoint(case, base_dirs, tokenizer_dir, tmp_path):
    kind, enc, mode = case
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Zip2ZipConfig.from_dict(json.loads(json.dumps(
        ref_model(kind, enc, mode, base_dirs[kind], tok).zip2zip_config.to_dict())))
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dirs[kind]),
                        LoraConfig(r=4, lora_alpha=8, target_modules=LORA[kind]))
    ours = Zip2ZipLM(cfg, lm, tok.eos_token_id)
    randomize([ours.input_encoder, ours.output_encoder,
               *[m for n, m in lm.named_modules() if n.endswith("lora_B")]], seed=3)
    checkpoint.save(ours, tmp_path)
    ref = Zip2ZipModel.from_pretrained(str(tmp_path), base_model=AutoModelForCausalLM.from_pretrained(base_dirs[kind])).eval()
    codec = cfg.codec_config(tok.eos_token_id)
    for codes in sequences(tok, codec, seed=1):
        with torch.no_grad():
            got = ours.eval().sequence_logits(codes, CodecSession(codec))
        want = ref_logits(ref, codes)[:, :codec.base_vocab_size + C]
        mask, _ = comparable(got, codes, codec)
        assert (got[mask] - want[mask]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASES[:2], ids=["-".join(c) for c in CASES[:2]])
def test_full_forward_equals_prefill_plus_cached_steps(case, ref_checkpoints):
    _, d = ref_checkpoints[case]
    loaded = checkpoint.load(d)
    model, codec = loaded.model, loaded.codec
    codes = sequences(loaded.tokenizer, codec)[0]
    with torch.no_grad():
        full = model.sequence_logits(codes, CodecSession(codec))
        s, cache, k = CodecSession(codec), DynamicCache(), 10
        spans = [len(s.push(c)) for c in codes]
        s = CodecSession(codec)
        model.reset_entries()
        for c in codes[:k]:
            s.push(c)
        pos = positions(spans, loaded.config.position_mode)
        model.add_entries(s.take_new_entries(), s.candidate())
        h = model.hidden(torch.tensor([codes[:k]]), torch.tensor([pos[:k]]), cache)
        steps = [model.logits(h[0, -1])]
        for t in range(k, len(codes)):
            s.push(codes[t])
            model.add_entries(s.take_new_entries(), s.candidate())
            h = model.hidden(torch.tensor([[codes[t]]]), torch.tensor([[pos[t]]]), cache)
            steps.append(model.logits(h[0, -1]))
    stepped = torch.stack(steps)  # logits after codes[k-1], ..., codes[-1]
    want = full[k - 1:]
    assert torch.equal(torch.isinf(stepped), torch.isinf(want))
    fin = torch.isfinite(want)
    assert (stepped[fin] - want[fin]).abs().max().item() <= 1e-4
    assert len(s) > 5


def test_no_repetition_gives_the_base_logits(base_dirs, ref_checkpoints):
    _, d = ref_checkpoints[("llama", "transformer", "compressed")]
    loaded = checkpoint.load(d, merge_lora=True)
    ids = list(range(40, 90))  # all distinct: no merges, no hypertokens
    codes, cb = encode(ids, loaded.codec)
    assert codes == ids
    with torch.no_grad():
        ours = loaded.model.sequence_logits(codes, CodecSession(loaded.codec))
        base = loaded.model.lm(input_ids=torch.tensor([ids])).logits[0]
    V = loaded.codec.base_vocab_size
    assert torch.allclose(ours[:, :V], base[:, :V], atol=1e-6, rtol=0)


def test_unused_slots_are_minus_inf_unlike_the_reference(ref_checkpoints):
    ref, d = ref_checkpoints[("llama", "transformer", "compressed")]
    loaded = checkpoint.load(d)
    codes = sequences(loaded.tokenizer, loaded.codec)[0]
    with torch.no_grad():
        got = loaded.model.sequence_logits(codes, CodecSession(loaded.codec))
    want = ref_logits(ref, codes)
    V = loaded.codec.base_vocab_size
    assert torch.isinf(got[0, V:]).all()  # after the first code nothing exists yet
    assert torch.isfinite(want[0, V:V + 10]).all()  # the reference shows every final entry everywhere


# --- load errors ----------------------------------------------------------------------------


@pytest.fixture
def ckpt_copy(ref_checkpoints, tmp_path):
    _, d = ref_checkpoints[("llama", "transformer", "compressed")]
    dst = tmp_path / "ckpt"
    shutil.copytree(d, dst)
    return dst


def edit_config(d, fn):
    p = d / "zip2zip_config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def test_error_missing_encoder_file(ckpt_copy):
    (ckpt_copy / "zip2zip_encoders.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no hyper-encoder weights"):
        checkpoint.load(ckpt_copy)


def test_error_encoder_shape_mismatch(ckpt_copy):
    edit_config(ckpt_copy, lambda c: c["encoder"].update(intermediate_size=80))
    with pytest.raises(CheckpointError, match="zip2zip_encoders.safetensors: input_encoder does not match"):
        checkpoint.load(ckpt_copy)


def test_error_encoder_positions_for_other_M(ckpt_copy):
    edit_config(ckpt_copy, lambda c: c["compression"].update(max_subtokens=4))
    with pytest.raises(CheckpointError, match="pos_embed"):
        checkpoint.load(ckpt_copy)


def test_error_empty_disabled_ids(ckpt_copy):
    edit_config(ckpt_copy, lambda c: c["compression"].update(disabled_ids=[]))
    with pytest.raises(CheckpointError, match="disabled_ids is empty"):
        checkpoint.load(ckpt_copy)


def test_error_corrupt_safetensors(ckpt_copy):
    p = ckpt_copy / "zip2zip_encoders.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="zip2zip_encoders.safetensors is not a readable safetensors"):
        checkpoint.load(ckpt_copy)


def test_error_corrupt_adapter(ckpt_copy):
    p = ckpt_copy / "adapter_model.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is not a readable"):
        checkpoint.load(ckpt_copy)


def test_error_tokenizer_size_mismatch(ckpt_copy):
    edit_config(ckpt_copy, lambda c: c["compression"].update(initial_vocab_size=300))
    with pytest.raises(CheckpointError, match="tokens but .* says initial_vocab_size=300"):
        checkpoint.load(ckpt_copy)


def test_error_wrong_paths(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a Hugging Face repo id"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no zip2zip_config.json"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        checkpoint.load("someone/not-cached-model")


def test_error_unknown_encoder_type(ckpt_copy):
    edit_config(ckpt_copy, lambda c: c.update(encoder_type="attention"))
    with pytest.raises(CheckpointError, match="broken upstream"):
        checkpoint.load(ckpt_copy)


def test_relative_base_path_moves_with_the_checkpoint(ckpt_copy, base_dirs):
    shutil.copytree(base_dirs["llama"], ckpt_copy / "base")
    edit_config(ckpt_copy, lambda c: c.update(base_model_name_or_path="base"))
    moved = ckpt_copy.parent / "moved"
    ckpt_copy.rename(moved)
    assert checkpoint.load(moved).model is not None


def test_bfloat16_on_cpu_runs_close_to_float32(ref_checkpoints):
    _, d = ref_checkpoints[("llama", "res_latent_attn", "base_token_end")]
    fp = checkpoint.load(d)
    bf = checkpoint.load(d, dtype=torch.bfloat16)
    assert bf.model.input_encoder.pos_embed.weight.dtype == torch.bfloat16
    codes = sequences(fp.tokenizer, fp.codec)[0]
    with torch.no_grad():
        a = fp.model.sequence_logits(codes, CodecSession(fp.codec))
        b = bf.model.sequence_logits(codes, CodecSession(bf.codec)).float()
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b))
    assert (a[fin] - b[fin]).abs().max() / a[fin].abs().max() < 0.05
