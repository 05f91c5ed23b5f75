"""``backends/loading/checkpoint.py``: where a checkpoint's base, tokenizer, encoders and adapter come from,
one rule for every backend and converter (no framework needed), and the errors a damaged
checkpoint gives when a backend opens it (torch, marked)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

from z2z_chat.backends.loading.checkpoint import Checkpoint
from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR
from z2z_chat.backends.errors import CheckpointError

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason='torch backend: pip install "z2z-chat[torch]"')

def make(tmp_path: Path, base: str, *, tokenizer: bool = False, adapter: bool = False) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = json.loads((DEFAULT_MODEL_DIR / "zip2zip_config.json").read_text())
    (d / "zip2zip_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": base}))
    (d / "zip2zip_encoders.safetensors").write_bytes(b"")
    if tokenizer:
        (d / "tokenizer_config.json").write_text("{}")
    if adapter:
        shutil.copy(DEFAULT_MODEL_DIR / "adapter_config.json", d)
    return d


def test_a_relative_base_is_read_inside_the_checkpoint_and_an_override_from_the_current_directory(
        tmp_path, monkeypatch):
    d = make(tmp_path, "weights/base.gguf", adapter=True)
    (d / "weights").mkdir()
    (d / "weights" / "base.gguf").write_bytes(b"GGUF")
    ck = Checkpoint.open(d)
    assert ck.base == str((d / "weights" / "base.gguf").resolve()) and ck.has_adapter
    assert ck.tokenizer_source == ck.base and ck.encoders == d / "zip2zip_encoders.safetensors"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "other.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(elsewhere)
    assert Checkpoint.open(d, base="other.gguf").base == str(elsewhere / "other.gguf")


def test_a_checkpoint_that_holds_its_decoder_has_no_adapter_to_apply(tmp_path):
    d = make(tmp_path, ".", tokenizer=True, adapter=True)
    ck = Checkpoint.open(d)
    assert ck.base == str(d) and ck.tokenizer_source == str(d) and not ck.has_adapter


def test_the_default_model_runs_on_its_cached_gguf_wherever_it_is_opened_from():
    from z2z_chat.backends.loading.assets import smollm2_gguf

    assert Checkpoint.open(DEFAULT_MODEL_DIR).base == str(smollm2_gguf())


def test_a_hub_base_that_cannot_be_fetched_fails_in_seconds_naming_base(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    d = make(tmp_path, "some-org/some-model")
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*--base"):
        Checkpoint.open(d)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("base, match", [("missing/dir/model.gguf", "GGUF .* does not exist"),
                                         ("not a repo id", "neither a local path nor")])
def test_a_base_that_is_nowhere_is_named(tmp_path, base, match):
    with pytest.raises(CheckpointError, match=match):
        Checkpoint.open(make(tmp_path, base))


def test_no_encoders_is_named(tmp_path):
    d = make(tmp_path, ".")
    (d / "zip2zip_encoders.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no hyper-encoder weights"):
        Checkpoint.open(d)


def test_uncached_hub_id_fails_fast_offline(monkeypatch):
    from z2z_chat.backends.loading.checkpoint import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # unreachable, as offline
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="cannot be reached"):
        resolve("someone/not-cached-anywhere")
    assert time.perf_counter() - t < 10


@needs_torch
def test_nan_encoder_weights_are_refused(tiny_ckpt, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from z2z_chat.backends.torch_backend import checkpoint

    d = tmp_path / "nan"
    shutil.copytree(tiny_ckpt, d)
    st = load_file(d / "zip2zip_encoders.safetensors")
    k = next(iter(st))
    st[k] = np.full_like(st[k], np.nan)
    save_file(st, d / "zip2zip_encoders.safetensors")
    with pytest.raises(CheckpointError, match="NaN|finite"):
        checkpoint.load(d)


@needs_torch
def test_broken_chat_template_and_missing_tokenizer_are_clear_errors(tiny_ckpt, tmp_path):
    from z2z_chat.backends.runtime import open_runtime

    d = tmp_path / "tpl"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }"  # unclosed
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.jinja"):
        f.write_text(cfg["chat_template"])
    with pytest.raises(CheckpointError, match="chat template of .* does not render"):
        open_runtime(str(d), "torch", "cpu")
    e = tmp_path / "notok"
    shutil.copytree(tiny_ckpt, e)
    (e / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        open_runtime(str(e), "torch", "cpu")


def test_cached_conversions_follow_the_checkpoint(tmp_path):
    """A checkpoint retrained in place (or a new default model at the same path) must not run the
    stale MLX / llama.cpp conversion cached for the old one."""
    import os

    from z2z_chat.backends.runtime import conversion_key

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "zip2zip_config.json").write_text("{}")
    (ckpt / "zip2zip_encoders.safetensors").write_bytes(b"v0")
    first = conversion_key(str(ckpt), None)
    assert conversion_key(str(ckpt), None) == first
    assert conversion_key(str(ckpt), "other-base") != first
    (ckpt / "zip2zip_encoders.safetensors").write_bytes(b"v1")  # same size: the time tells
    st = (ckpt / "zip2zip_encoders.safetensors").stat()
    os.utime(ckpt / "zip2zip_encoders.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert conversion_key(str(ckpt), None) != first
