"""``z2z-chat --prompt`` end to end, in a subprocess, with its exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def z2z(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_one_shot_prints_reply_and_stats(ref_checkpoints):
    d = ref_checkpoints[("llama", "transformer", "compressed")][1]
    r = z2z("--model", str(d), "--prompt", "hello there", "--max-tokens", "8", "--stats", "--seed", "1",
            "--temperature", "0.7", "--top-p", "0.9", "--system", "Be brief.", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) > 1
    assert "reply" in r.stderr and "codebook" in r.stderr and "torch | " in r.stderr


def test_bad_model_path_is_a_one_line_error(tmp_path):
    r = z2z("--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("z2z-chat: error:") and "missing" in lines[0]


@pytest.mark.parametrize("args", [["--prompt", "hi", "--max-tokens", "0", "--model", "x"],
                                  ["--backend", "cuda", "--prompt", "hi", "--model", "x"]])
def test_usage_errors_exit_2(args):
    assert z2z(*args).returncode == 2


def test_help_does_not_import_frameworks():
    code = ("import sys; sys.argv=['z2z-chat','--help']\n"
            "import app.cli\n"
            "try:\n    app.cli.main()\nexcept SystemExit: pass\n"
            "import backends.engine, backends.runtime, backends.codec, convert, train\n"
            "assert not {'torch','mlx','llama_cpp','transformers'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
