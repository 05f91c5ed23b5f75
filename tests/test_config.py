"""Checkpoint config files read once for every backend: a damaged ``adapter_config.json`` is one
line naming the file on torch and on the llama.cpp converter, and both read a missing
``lora_alpha`` as peft does (8)."""

from __future__ import annotations

import shutil

import pytest

from z2z_chat.backends.config import ConfigError, lora_scale_of

DAMAGED = {
    "truncated": '{"r": 8, "lora_alpha": ',
    "not an object": "[1, 2, 3]",
    "wrong types": '{"r": "eight", "lora_alpha": 16}',
    "bad alpha": '{"r": 8, "lora_alpha": "sixteen"}',
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_adapter_config_is_one_clear_error(tmp_path, kind):
    (tmp_path / "adapter_config.json").write_text(DAMAGED[kind])
    with pytest.raises(ConfigError, match="adapter_config.json") as e:
        lora_scale_of(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_lora_alpha_is_peft_default(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    assert lora_scale_of(tmp_path) == (4, 8.0)


@pytest.fixture()
def damaged_ckpt(ref_checkpoints, tmp_path):
    src = ref_checkpoints[("llama", "transformer", "compressed")][1]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)  # its base path is absolute: the copy finds the same base
    (dst / "adapter_config.json").write_text(DAMAGED["wrong types"])
    return dst


def test_every_backend_names_the_damaged_adapter_config(damaged_ckpt, tmp_path):
    pytest.importorskip("torch")
    from z2z_chat.backends.errors import CheckpointError
    from z2z_chat.backends.llamacpp_backend.convert import convert
    from z2z_chat.backends.torch_backend import checkpoint

    with pytest.raises(CheckpointError, match="adapter_config.json: r must be a positive integer"):
        checkpoint.load(damaged_ckpt)
    with pytest.raises(CheckpointError, match="adapter_config.json: r must be a positive integer"):
        convert(str(damaged_ckpt), tmp_path / "out")


# --- wrong types are clear errors naming the file and key ---------------------------------------

@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(encoder=[64, 2]), "encoder"),
    (lambda d: d["compression"].update(disabled_ids=5), "disabled_ids"),
    (lambda d: d.update(base_model_name_or_path=123), "base_model_name_or_path"),
    (lambda d: d["compression"].update(max_subtokens=True), "max_subtokens"),
    (lambda d: d.update(format_version=99), "format_version"),
    (lambda d: d["encoder"].update(tie_encoders="no"), "tie_encoders"),
    (lambda d: d["compression"].update(max_codebook_size=10**9), "max_codebook_size"),
])
def test_config_with_wrong_types_is_a_clear_error(tiny_ckpt, mutate, key):
    import json

    from z2z_chat.backends.config import ConfigError, Zip2ZipConfig

    d = json.loads((tiny_ckpt / "zip2zip_config.json").read_text())
    mutate(d)
    with pytest.raises(ConfigError, match=key):
        Zip2ZipConfig.from_dict(d, "x/zip2zip_config.json")


def test_non_utf8_config_names_the_file(tmp_path):
    from z2z_chat.backends.config import ConfigError, Zip2ZipConfig

    (tmp_path / "zip2zip_config.json").write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="zip2zip_config.json is not UTF-8"):
        Zip2ZipConfig.load(tmp_path)
