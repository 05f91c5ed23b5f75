"""``backends/runtime.py``: picking a backend imports no framework it does not use."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_auto_picks_llama_cpp_for_the_default_model_without_importing_torch():
    pytest.importorskip("llama_cpp", reason='llama.cpp backend: pip install "z2z-chat[llamacpp]"')
    pytest.importorskip("torch", reason="the point: torch is installed, and not imported")
    code = ("import sys\nfrom z2z_chat.backends.runtime import _pick\n"
            "from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR\n"
            "print(_pick('auto', str(DEFAULT_MODEL_DIR)), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    picked, imported = r.stdout.split()
    assert imported == "False", "deciding --backend auto imported torch"
    assert picked == "llamacpp"  # no NVIDIA driver here (CI has no GPU)


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from z2z_chat.backends.runtime import RuntimeOpenError, _check_exists

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeOpenError, match="no such checkpoint directory") as e:
        _check_exists("out/defgguf")  # the directory out/ is here: a typo, not a repo
    assert "--model" not in str(e.value)  # said in the app too, where there is no command line
    _check_exists("HuggingFaceTB/SmolLM2-135M-Instruct")  # a repo id: the hub lookup says the rest
