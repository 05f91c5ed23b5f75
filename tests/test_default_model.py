"""The embedded default model (zip2zip SmolLM2-135M-Instruct) from the package, over the real base
GGUF (fetched once by ``assets.smollm2_gguf`` into the user cache; CI keeps that cache)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("torch")

from z2z_chat.backends.loading.assets import SMOLLM2_GGUF, AssetError, smollm2_gguf  # noqa: E402
from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR  # noqa: E402
from z2z_chat.backends.engine.events import Done, GenerationSettings, Token  # noqa: E402

pytestmark = pytest.mark.slow

if not (DEFAULT_MODEL_DIR / "zip2zip_config.json").is_file():
    pytest.skip("the embedded default model is not in this checkout", allow_module_level=True)

# recorded_codes.json (shipped with the model) holds the first greedy codes for this prompt
# (torch, CPU, float32), written by train/recipes/record_default_codes.py.
FIXED_PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def runtime():
    from z2z_chat.backends.runtime import open_runtime

    smollm2_gguf()  # fetch once (or find it cached)
    return open_runtime(None, "torch", "cpu", "float32")


def reply(rt, prompt: str, n: int):
    codes, text, done = [], [], None
    for ev in rt.session().send(prompt, GenerationSettings(max_tokens=n)):
        if isinstance(ev, Token):
            text.append(ev.text)
            if ev.code is not None:
                codes.append(ev.code)
        elif isinstance(ev, Done):
            done = ev
    return codes, "".join(text), done


def test_fixed_prompt_is_deterministic(runtime):
    import json

    recorded = json.loads((DEFAULT_MODEL_DIR / "recorded_codes.json").read_text())
    assert recorded["prompt"] == FIXED_PROMPT
    codes, text, _ = reply(runtime, FIXED_PROMPT, recorded["max_tokens"])  # base tokens, not codes
    assert codes == recorded["codes"], text
    assert "Paris" in text


@pytest.mark.xfail(strict=True, reason="the CPU-trained default (v2: 440 steps, ~1.2M tokens) writes hypertokens "
                   "in chat (0.85 codes per token on the evaluation set) but stops after one line here; see "
                   "MODEL_CARD.md. strict: this fails loudly once it passes")
def test_emits_hypertokens_on_a_repetitive_prompt(runtime):
    prompt = "Repeat exactly, five times, one per line: print('hello world')"
    codes, text, done = reply(runtime, prompt, 80)
    V = runtime.codec.base_vocab_size
    assert sum(c >= V for c in codes) >= 5, text
    assert done.stats.reply_codes < done.stats.reply_tokens


def test_missing_or_corrupt_base_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("Z2Z_CACHE_DIR", str(tmp_path))
    with pytest.raises(AssetError, match="is missing. Run `z2z-chat --fetch-default`"):
        smollm2_gguf(fetch=False)
    bad = tmp_path / "smollm2" / SMOLLM2_GGUF
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(AssetError, match="corrupt"):
        smollm2_gguf(fetch=False)
    from z2z_chat.backends.runtime import open_runtime

    with pytest.raises(AssetError, match="corrupt"):  # ours: it reaches the user unchanged
        open_runtime(None, "torch", "cpu")
    shutil.rmtree(bad.parent)


def test_llamacpp_gives_the_recorded_codes():
    """The same adapter and encoders on llama.cpp (base GGUF as is, LoRA as a llama.cpp adapter,
    numpy encoders) write the codes torch recorded."""
    pytest.importorskip("llama_cpp")
    import json

    from z2z_chat.backends.runtime import open_runtime

    rt = open_runtime(None, "llamacpp")
    recorded = json.loads((DEFAULT_MODEL_DIR / "recorded_codes.json").read_text())
    codes, text, _ = reply(rt, FIXED_PROMPT, 3 * len(recorded["codes"]))
    assert codes[: len(recorded["codes"])] == recorded["codes"], text
    rt.close()


def test_a_damaged_cached_merge_is_made_again(tmp_path, monkeypatch):
    """The q8_0 merge of the default model lives in the cache; a truncated one (a full disk, a
    crash while writing) or one damaged to the same size is noticed (its size, time and digest
    were recorded when it was made) and rebuilt, not loaded or left to fail every run."""
    pytest.importorskip("llama_cpp")
    import z2z_chat.backends.llamacpp_backend.checkpoint as ckpt_mod

    base = smollm2_gguf()
    monkeypatch.setattr(ckpt_mod, "cache_dir", lambda: tmp_path)
    notes: list[str] = []
    ckpt_mod.open_checkpoint(DEFAULT_MODEL_DIR, base=base, progress=notes.append).model.close()
    merged = next((tmp_path / "llamacpp").glob("merged-*/model.gguf"))
    with open(merged, "r+b") as f:
        f.truncate(merged.stat().st_size // 2)
    notes.clear()
    model = ckpt_mod.open_checkpoint(DEFAULT_MODEL_DIR, base=base, progress=notes.append).model
    model.close()
    assert any("changed since it was made" in n for n in notes) and merged.stat().st_size > 0
    size = merged.stat().st_size
    with open(merged, "r+b") as f:  # same-size damage: the header still parses, the weights do not
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    notes.clear()
    ckpt_mod.open_checkpoint(DEFAULT_MODEL_DIR, base=base, progress=notes.append).model.close()
    assert any("changed since it was made" in n for n in notes) and merged.stat().st_size == size
    notes.clear()
    ckpt_mod.open_checkpoint(DEFAULT_MODEL_DIR, base=base, progress=notes.append).model.close()
    assert not any("merg" in n or "changed" in n for n in notes)  # sound again: used as it is


def test_an_error_after_loading_the_gguf_base_is_one_line_in_a_pipe(tmp_path):
    """transformers draws a de-quantization bar per GGUF tensor; in a pipe that buried the error."""
    import subprocess
    import sys

    ckpt = tmp_path / "damaged"
    shutil.copytree(DEFAULT_MODEL_DIR, ckpt)
    enc = ckpt / "zip2zip_encoders.safetensors"
    enc.write_bytes(enc.read_bytes()[:1000])
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--backend", "torch", "--model", str(ckpt), "--base",
                        str(smollm2_gguf()), "--prompt", "hi"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 1 and "zip2zip_encoders.safetensors is not a readable safetensors file" in r.stderr
    assert "de-quantizing" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr[-2000:]


@pytest.mark.slow
def test_one_shot_says_that_it_builds_the_merged_model(tmp_path):
    """A fresh cache (after --cache clean, or a new checkpoint): the merge takes seconds, and the
    one-shot mode says so on stderr instead of sitting silent."""
    pytest.importorskip("llama_cpp", reason='llama.cpp backend: pip install "z2z-chat[llamacpp]"')
    import os
    import subprocess
    import sys

    from z2z_chat.backends.loading.assets import cache_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2").symlink_to(cache_dir() / "smollm2", target_is_directory=True)  # the base, not the merge
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--backend", "llamacpp", "--prompt", "hi",
                        "--max-tokens", "4"], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       env=os.environ | {"Z2Z_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "merg" in r.stderr.lower(), r.stderr
