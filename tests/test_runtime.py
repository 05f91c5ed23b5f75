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
