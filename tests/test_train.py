"""train/ on a tiny random Llama on the CPU: loss goes down, checkpoints round-trip, resume and
2-process data parallelism reproduce the single run, config and data errors are clear."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from transformers import AutoTokenizer  # noqa: E402

from z2z_chat.backends.codec import CodecConfig, CodecSession, decode  # noqa: E402
from z2z_chat.backends.torch_backend import checkpoint  # noqa: E402
from z2z_chat.train.config import TrainConfigError, load_config  # noqa: E402
from z2z_chat.train.data import chunk_codes, tokenize_document  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(tmp: Path, base: Path, **over) -> Path:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    text = (ROOT / "backends" / "codec.py").read_text()
    for i in range(4):
        (data / f"doc{i}.txt").write_text(text[i * 3000:(i + 1) * 3000])
    (data / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello hello hello"}]},
        {"messages": [{"role": "wizard", "content": "?"}]},  # unknown role: skipped, counted
        {"text": ""},  # empty: skipped, counted
    ]))
    cfg = f"""
base_model = "{base}"
output = "{tmp / 'run'}"
max_codebook_size = 64
seed = 1
eval_every = 4
eval_batches = 2
save_every = 4
log_every = 1
[data]
seq_len = 64
val_fraction = 0.1
num_workers = 1
sources = [{{ path = "{data}/*.txt", weight = 3.0 }}, {{ path = "{data}/chat.jsonl", weight = 1.0 }}]
[encoder]
num_hidden_layers = 1
[lora]
r = 4
alpha = 8
[optim]
max_lr = 3e-3
min_lr = 1e-4
warmup_steps = 1
steps = 8
tokens_per_batch = 128
micro_batch_size = 1
"""
    p = tmp / "recipe.toml"
    p.write_text(cfg)
    return p


def run_train(recipe: Path, *over: str, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if procs == 1:
        cmd = [sys.executable, "-m", "z2z_chat.train", str(recipe), *over]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master_port=29517", "-m", "z2z_chat.train", str(recipe), *over]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dirs):
    tmp = tmp_path_factory.mktemp("train")
    recipe = write_recipe(tmp, base_dirs["llama"])
    r = run_train(recipe)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, recipe, r


def test_short_run_lowers_the_loss(trained):
    tmp, _, r = trained
    rows = [m for m in metrics(tmp / "run") if "loss" in m]
    assert len(rows) == 8
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"]
    assert all(k in rows[0] for k in ("recon_loss", "tokens_per_s", "compression", "lr"))
    assert 0 < rows[0]["compression"] < 1
    assert any("val_lm_loss" in m for m in metrics(tmp / "run"))
    assert "records skipped" in r.stdout + r.stderr


def test_checkpoint_loads_with_identical_logits(trained):
    tmp, _, _ = trained
    loaded = checkpoint.load(tmp / "run" / "final", merge_lora=False)
    again = checkpoint.load(tmp / "run" / "final", merge_lora=True)
    codes = [5, 6, 7, 5, 6, 7, 5, 6, 7, 8]
    with torch.no_grad():
        a = loaded.model.sequence_logits(codes, CodecSession(loaded.codec))
        b = again.model.sequence_logits(codes, CodecSession(again.codec))
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b))
    assert (a[fin] - b[fin]).abs().max() < 1e-4  # merged LoRA == adapter


def test_reference_package_loads_our_trained_checkpoint(trained, base_dirs):
    z2z = pytest.importorskip("zip2zip")
    from transformers import AutoModelForCausalLM

    tmp, _, _ = trained
    ref = z2z.Zip2ZipModel.from_pretrained(str(tmp / "run" / "final"),
                                           base_model=AutoModelForCausalLM.from_pretrained(base_dirs["llama"]))
    assert ref.input_encoder is not None


def test_resume_reproduces_the_uninterrupted_run(trained, tmp_path):
    tmp, recipe, _ = trained
    out = tmp_path / "resumed"
    r = run_train(recipe, "--output", str(out), "--stop_at", "3")  # interrupted after step 3 of 8
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint: {out / 'checkpoint-3'}" in r.stdout and "final checkpoint" not in r.stdout
    assert (out / "checkpoint-3").is_dir() and not (out / "final").exists()
    r = run_train(recipe, "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout + r.stderr
    full = [m["loss"] for m in metrics(tmp / "run") if "loss" in m]
    resumed = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(resumed) == 8
    assert resumed == pytest.approx(full, abs=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(trained, tmp_path):
    tmp, recipe, _ = trained
    one = run_train(recipe, "--output", str(tmp_path / "one"), "--optim.steps", "3",
                    "--optim.tokens_per_batch", "128")  # 1 proc x 1 seq x 2 accumulation
    two = run_train(recipe, "--output", str(tmp_path / "two"), "--optim.steps", "3",
                    "--optim.tokens_per_batch", "128", procs=2)  # 2 procs x 1 seq x 1
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x 1 sequences x 1 accumulation" in two.stdout + two.stderr
    assert "1 process(es) x 1 sequences x 2 accumulation" in one.stdout + one.stderr
    assert [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m], abs=1e-5)
    a = torch.load(tmp_path / "one" / "state.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "two" / "state.pt", weights_only=False)["trainable"]
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in a)  # it did train
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def run_fsdp_pair(recipe: Path, tmp: Path, *over: str):
    """The same 3 steps on 1 process (2 accumulated micro-batches) and sharded over 2 (1 each)."""
    common = ["--optim.steps", "3", "--optim.tokens_per_batch", "128", *over]
    one = run_train(recipe, "--output", str(tmp / "one"), *common)
    two = run_train(recipe, "--output", str(tmp / "fsdp"), "--fsdp", "true", *common, procs=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 processes" in two.stdout + two.stderr
    return one, two


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run) if "loss" in m]


@pytest.mark.slow
def test_fsdp_equals_one_process_and_saves_the_same_checkpoint(trained, tmp_path):
    """FSDP2 over 2 gloo processes: same loss curve and weights as 1 process with the same global
    batch; the checkpoint it gathers loads in our backend with the single run's logits."""
    _, recipe, _ = trained
    run_fsdp_pair(recipe, tmp_path)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "fsdp"), abs=1e-4)
    a = torch.load(tmp_path / "one" / "state.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "fsdp" / "state.pt", weights_only=False)["trainable"]
    assert a.keys() == b.keys() and all(type(v) is torch.Tensor for v in b.values())  # whole tensors, no shards
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    codes = [5, 6, 7, 5, 6, 7, 5, 6, 7, 8]
    logits = []
    for run in ("one", "fsdp"):
        loaded = checkpoint.load(tmp_path / run / "final")
        with torch.no_grad():
            logits.append(loaded.model.sequence_logits(codes, CodecSession(loaded.codec)))
    fin = torch.isfinite(logits[0])
    assert torch.equal(fin, torch.isfinite(logits[1]))
    assert (logits[0][fin] - logits[1][fin]).abs().max() < 1e-3


@pytest.mark.slow
def test_fsdp_resume_reproduces_the_uninterrupted_run(trained, tmp_path):
    """Interrupted after step 1 and resumed, sharded: the optimizer state goes back into the shards."""
    _, recipe, _ = trained
    _, full = run_fsdp_pair(recipe, tmp_path / "full")
    out = tmp_path / "resumed"
    common = ["--output", str(out), "--fsdp", "true", "--optim.steps", "3", "--optim.tokens_per_batch", "128"]
    r = run_train(recipe, *common, "--stop_at", "1", procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(recipe, *common, procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout + r.stderr
    assert losses(out) == pytest.approx(losses(tmp_path / "full" / "fsdp"), abs=1e-5)


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_config(trained, tmp_path):
    """The README's 8-GPU command scaled to 2 processes on a machine without GPUs (the trainer then
    uses gloo): accelerate's launcher reads our config file and the run shards with FSDP."""
    _, recipe, _ = trained
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "train/recipes/accelerate/one-node.yaml"), "--num_processes", "2",
           "--main_process_port", "29519", "-m", "z2z_chat.train", str(recipe), "--output", str(tmp_path / "acc"),
           "--fsdp", "true", "--optim.steps", "2", "--optim.tokens_per_batch", "128"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sharded over 2 processes" in r.stdout + r.stderr
    assert (tmp_path / "acc" / "final" / "zip2zip_config.json").is_file()


def test_fsdp_on_one_process_is_a_clear_error(trained, tmp_path):
    _, recipe, _ = trained
    r = run_train(recipe, "--output", str(tmp_path / "x"), "--fsdp", "true", "--optim.steps", "1")
    assert r.returncode == 2
    assert "fsdp = true needs several processes" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flag, tol", [("gradient_checkpointing", 1e-5), ("mixed_precision", 0.05), ("compile", 1e-3)])
def test_memory_and_speed_options_train_like_the_plain_run(trained, tmp_path, flag, tol):
    """Gradient checkpointing recomputes the same numbers; bf16 autocast stays within 5% of fp32
    and keeps fp32 master weights; torch.compile (inductor on the CPU) computes the same loss."""
    tmp, recipe, _ = trained
    value = "bf16" if flag == "mixed_precision" else "true"
    r = run_train(recipe, "--output", str(tmp_path / flag), f"--{flag}", value, "--stop_at", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    plain = losses(tmp / "run")[:4]
    got = losses(tmp_path / flag)
    assert len(got) == 4 and all(math.isfinite(x) for x in got)
    assert got == pytest.approx(plain, rel=tol, abs=tol)
    weights = torch.load(tmp_path / flag / "state.pt", weights_only=False)["trainable"]
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_init_from_continues_from_a_trained_checkpoint(trained, tmp_path):
    """init_from loads a checkpoint's LoRA and encoders: the new run starts where that one ended."""
    tmp, recipe, _ = trained
    r = run_train(recipe, "--output", str(tmp_path / "cont"), "--init_from", str(tmp / "run" / "final"),
                  "--optim.steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    ended = [m["val_lm_loss"] for m in metrics(tmp / "run") if "val_lm_loss" in m][-1]
    starts = [m["val_lm_loss"] for m in metrics(tmp_path / "cont") if "val_lm_loss" in m][0]
    assert starts == pytest.approx(ended, abs=1e-4)
    r = run_train(recipe, "--output", str(tmp_path / "bad"), "--init_from", str(tmp / "run" / "final"),
                  "--encoder.num_hidden_layers", "2")
    assert r.returncode == 2
    assert "init_from" in r.stderr and "make the recipe match the checkpoint" in r.stderr


# --- config and data ---------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path, base_dirs):
    recipe = write_recipe(tmp_path, base_dirs["llama"])
    with pytest.raises(TrainConfigError, match="unknown key.*optim.stepz"):
        load_config(recipe, ["--optim.stepz", "3"])
    with pytest.raises(TrainConfigError, match="optim.steps: expected a number"):
        load_config(recipe, ["--optim.steps", "many"])
    with pytest.raises(TrainConfigError, match="position_mode"):
        load_config(recipe, ["--position_mode", "sideways"])
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    assert load_config(recipe, ["--optim.steps=3", "--lora.r", "2"]).optim.steps == 3


def test_unknown_lora_target_is_an_error(tmp_path, base_dirs):
    recipe = write_recipe(tmp_path, base_dirs["llama"])
    r = run_train(recipe, "--lora.target_modules", '["q_proj", "qkv_proj"]')
    assert r.returncode == 2
    assert "['qkv_proj'] match no linear layer" in r.stderr


def test_chunking_counts_codes_and_loses_nothing(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    codec = CodecConfig(len(tok), 64, 3, frozenset(tok.all_special_ids), tok.eos_token_id)
    ids = tokenize_document(tok, "abc abc abc " * 200, tok.eos_token_id)  # longer than a sequence
    seqs = chunk_codes(ids, codec, 33)
    assert all(len(s) == 33 for s in seqs[:-1]) and 2 <= len(seqs)
    assert [t for s in seqs for t in decode(s, codec)[0]] == ids  # each with its own codebook
    assert tokenize_document(tok, "   ", tok.eos_token_id) is None
    assert tokenize_document(tok, [{"role": "robot", "content": "x"}], tok.eos_token_id) is None
    chat = tokenize_document(tok, [{"role": "user", "content": "x"}], tok.eos_token_id)
    assert chat[-1] == tok.eos_token_id


def test_objective_masks_like_inference(tokenizer_dir, base_dirs):
    """With causal_codebook the training logits equal the inference logits at every position."""
    from transformers import AutoModelForCausalLM

    from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
    from z2z_chat.backends.torch_backend.model import Zip2ZipLM
    from z2z_chat.train.objective import ZipObjective, collate

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Zip2ZipConfig("x", "transformer", {"hidden_size": 64, "num_hidden_layers": 1, "num_heads": 4,
                                             "position_encoding": "learnable"},
                        CompressionSettings(len(tok), 64, 3, sorted(tok.all_special_ids)))
    model = Zip2ZipLM(cfg, AutoModelForCausalLM.from_pretrained(base_dirs["llama"]), tok.eos_token_id).eval()
    codec = cfg.codec_config(tok.eos_token_id)
    ids = tok("x = x + 1\n" * 12, add_special_tokens=False)["input_ids"]
    codes = chunk_codes(ids, codec, 40)[0]
    batch = collate([(codes, len(codes))], codec, "compressed")
    obj = ZipObjective(model, 0.0, True)
    with torch.no_grad():
        loss = obj(batch)["lm_loss"]
        ref = model.sequence_logits(codes, CodecSession(codec))[:-1]  # (T-1, V + C)
        logp = torch.log_softmax(ref.float(), -1)
        want = -logp[torch.arange(len(codes) - 1), torch.tensor(codes[1:])].mean()
    assert abs(loss.item() - want.item()) < 1e-4


def test_first_subtoken_marginal_folds_entries_onto_their_first_token():
    from z2z_chat.train.objective import first_subtoken_marginal

    g = torch.Generator().manual_seed(0)
    B, L, V, n = 2, 3, 5, 2
    logits = torch.randn(B, L, V + n + 1, generator=g)
    first = torch.tensor([[1, 1], [4, 0]])
    cand_at, cand_first = torch.tensor([[0, 2], [1, 0]]), torch.tensor([3, 1])
    keep = torch.zeros(B, L, dtype=torch.bool)
    keep[cand_at[:, 0], cand_at[:, 1]] = True
    logits[..., -1] = logits[..., -1].masked_fill(~keep, float("-inf"))  # a candidate only where one exists
    q = first_subtoken_marginal(logits, V, first, cand_at, cand_first)
    p = torch.softmax(logits, -1)
    want = p[..., :V].clone()
    for b in range(B):
        for t in range(L):
            for j in range(n):
                want[b, t, first[b, j]] += p[b, t, V + j]
    for (b, t), f in zip(cand_at.tolist(), cand_first.tolist()):
        want[b, t, f] += p[b, t, -1]
    assert torch.allclose(q, want, atol=1e-6)
    assert torch.allclose(q.sum(-1), torch.ones(B, L), atol=1e-6)


def test_kl_to_base_is_zero_for_the_base_itself_and_trains_the_adapter(tokenizer_dir, base_dirs):
    """Without hypertokens (an empty codebook) and with the adapter at its start (B = 0) the
    zip2zip model is its base: KL 0. Once the adapter moves, KL is positive and its gradient
    reaches the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
    from z2z_chat.backends.torch_backend.model import Zip2ZipLM
    from z2z_chat.train.objective import ZipObjective, collate

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Zip2ZipConfig("x", "transformer", {"hidden_size": 64, "num_hidden_layers": 1, "num_heads": 4,
                                             "position_encoding": "learnable"},
                        CompressionSettings(len(tok), 0, 3, sorted(tok.all_special_ids)))
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dirs["llama"]),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = Zip2ZipLM(cfg, lm, tok.eos_token_id)
    codec = cfg.codec_config(tok.eos_token_id)
    ids = tok("def f(x):\n    return x * 2\n" * 3, add_special_tokens=False)["input_ids"]
    batch = collate([(ids[:40], 40), (ids[:40], 30)], codec, "compressed")
    obj = ZipObjective(model, 0.0, True, kl_lambda=1.0)
    assert obj(batch)["kl_loss"].item() < 1e-5
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = obj(batch)
    assert out["kl_loss"].item() > 1e-3
    out["loss"].backward()
    grads = [p.grad for n, p in lm.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# --- data sources through the datasets library -------------------------------------------------


def data_sources(tmp: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (ROOT / "backends" / "codec.py").read_text()
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(text[i * 2000:(i + 1) * 2000])
    chat = tmp / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w} {w}"},
                                                       {"role": "assistant", "content": f"{w} {w} {w}"}]})
                              for w in ("alpha", "beta", "gamma", "delta")))
    table = tmp / "code.parquet"
    pq.write_table(pa.table({"content": [text[i:i + 1500] for i in range(0, 9000, 1500)]}), table)
    return {"text": docs, "chat": chat, "parquet": table}


def test_local_sources_stream_through_datasets(tmp_path, tokenizer_dir):
    """Text files (a document each), chat JSONL rendered with the chat template and a Parquet
    column, mixed by weight; the same seed gives the same sequences, another seed another order."""
    from z2z_chat.train.config import DataConfig, Source
    from z2z_chat.train.data import iter_documents, prepare

    src = data_sources(tmp_path)
    assert len(list(iter_documents(Source(path=str(src["text"]))))) == 3
    assert list(iter_documents(Source(path=str(src["chat"]))))[0][1] == {"role": "assistant", "content": "alpha alpha alpha"}
    assert len(list(iter_documents(Source(path=str(src["parquet"]), field="content")))) == 6
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    codec = CodecConfig(len(tok), 64, 3, frozenset(tok.all_special_ids), tok.eos_token_id)
    cfg = DataConfig(sources=[Source(path=str(src["text"]), weight=2.0), Source(path=str(src["chat"])),
                              Source(path=str(src["parquet"]), field="content")],
                     seq_len=32, val_fraction=0.1, num_workers=1)
    a = prepare(cfg, codec, str(tokenizer_dir), tmp_path / "cache-a", seed=0, log=lambda *_: None)
    b = prepare(cfg, codec, str(tokenizer_dir), tmp_path / "cache-b", seed=0, log=lambda *_: None)
    c = prepare(cfg, codec, str(tokenizer_dir), tmp_path / "cache-c", seed=1, log=lambda *_: None)
    assert (a.train == b.train).all() and (a.val == b.val).all()
    assert not (a.train == c.train).all()
    rows = [decode(r[:n].tolist(), codec)[0] for r, n in zip(a.train, a.train_len)]
    text = [tok.decode(ids) for ids in rows]
    assert any("<|im_start|>assistant" in t for t in text)  # chat records went through the template
    assert a.skipped == 0


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch):
    import time

    from z2z_chat.train.config import Source
    from z2z_chat.train.data import DataError, iter_documents

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: not JSON lines"):
        list(iter_documents(Source(path=str(bad))))
    with pytest.raises(DataError, match="no such file or nothing matches"):
        list(iter_documents(Source(path=str(tmp_path / "missing*.txt"))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub for the dataset nobody/nothing"):
        list(iter_documents(Source(path="hf:nobody/nothing")))
    assert time.perf_counter() - t0 < 10  # no minute of retries


def test_gpu_check_reports_throughput_memory_and_loss(trained, tmp_path):
    _, recipe, _ = trained
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "Z2Z_GPU_CHECK_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.train.gpu_check", str(recipe), "--steps", "3", "--recipe-data"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("on 1 x CPU", "throughput:", "base tokens/s", "peak memory:", "loss:", "held-out lm loss"):
        assert line in r.stdout, r.stdout
    assert not (tmp_path / "z2z-gpu-check").exists()  # its output is temporary


def test_ctrl_c_saves_the_state_it_asks_to_resume_from(trained, tmp_path):
    """Ctrl+C (SIGINT) before the first save_every: the step is finished and saved, and the same
    command resumes from it instead of from step 0."""
    import signal
    import time

    _, recipe, _ = trained
    out = tmp_path / "run"
    args = [str(recipe), "--output", str(out), "--optim.steps", "400", "--save_every", "1000", "--log_every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen([sys.executable, "-m", "z2z_chat.train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").is_file() or len(metrics(out)) < 3:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    log = "".join(p.communicate(timeout=120))
    assert p.returncode != 0 and "interrupted after step" in log, log[-2000:]
    saved = torch.load(out / "state.pt", weights_only=False)["step"]
    assert saved >= 2
    r = run_train(recipe, *args[1:], "--stop_at", str(saved + 1))
    assert r.returncode == 0 and f"at step {saved}" in r.stdout + r.stderr, r.stderr[-2000:]


def test_stdlib_stands_for_the_running_pythons_standard_library():
    import json as json_module

    from z2z_chat.train.data import _files

    found = _files("{stdlib}/json/*.py")
    assert Path(json_module.__file__) in found and all(p.suffix == ".py" for p in found)
