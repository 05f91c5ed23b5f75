"""``backends/checkpoint.py``: where a checkpoint's base, tokenizer, encoders and adapter come from,
one rule for every backend and converter. No framework needed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from backends.checkpoint import Checkpoint
from backends.defaults import DEFAULT_MODEL_DIR
from backends.errors import CheckpointError


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
    from backends.assets import smollm2_gguf

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
