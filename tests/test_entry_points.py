"""Entry points started without the optional packages they need say which extra to install, in
one line, instead of a ``ModuleNotFoundError`` traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_without(blocked: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` (a script or ``-m module``) in a Python where importing ``blocked`` fails."""
    if argv[0] == "-m":
        start = f"import runpy; runpy.run_module({argv[1]!r}, run_name='__main__', alter_sys=True)"
        args = [argv[1], *argv[2:]]
    else:
        start = f"import runpy; runpy.run_path({argv[0]!r}, run_name='__main__')"
        args = list(argv)
    code = (f"import sys; sys.argv = {args!r}; "
            f"[sys.modules.__setitem__(m, None) for m in {blocked!r}]; {start}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("blocked, argv, extra", [
    (("torch",), ("-m", "train", "train/recipes/smollm2-default.toml", "--optim.steps", "1"), "train"),
    (("mlx", "mlx_lm"), ("convert/to_mlx.py", "backends/default_model", "OUT"), "torch,mlx"),
    (("gguf",), ("convert/to_gguf.py", "backends/default_model", "OUT"), "llamacpp"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, blocked, argv, extra):
    argv = tuple(str(tmp_path / "out") if a == "OUT" else a for a in argv)
    r = run_without(blocked, *argv)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f'pip install "z2z-chat[{extra}]"' in r.stderr and "not installed" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_to_gguf_needs_no_torch(tmp_path):
    """It used to blame huggingface-hub when torch was what it imported; it needs neither."""
    r = run_without(("torch",), "convert/to_gguf.py", "backends/default_model", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "model.gguf").is_file() and (tmp_path / "out" / "zip2zip_encoders.safetensors").is_file()
