"""``z2z-chat`` end to end, in a subprocess, with its exit codes. Tests that run a model take the
reference checkpoints (their fixture skips without torch); the others need no framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def z2z(*args: str, timeout: int = 120, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Standard input is /dev/null unless given: piped input is attached to the prompt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", *args], capture_output=True, timeout=timeout, env=env,
                       input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


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
    assert "no such checkpoint directory" in lines[0] and "pip install" not in lines[0]  # a typo, not a missing package


@pytest.mark.parametrize("args", [["--prompt", "hi", "--max-tokens", "0", "--model", "x"],
                                  ["--backend", "cuda", "--prompt", "hi", "--model", "x"]])
def test_usage_errors_exit_2(args):
    assert z2z(*args).returncode == 2


def test_help_does_not_import_frameworks():
    code = ("import sys; sys.argv=['z2z-chat','--help']\n"
            "import z2z_chat.app.cli\n"
            "try:\n    z2z_chat.app.cli.main()\nexcept SystemExit: pass\n"
            "import z2z_chat.backends.engine.session, z2z_chat.backends.runtime, z2z_chat.backends.codec, z2z_chat.convert, z2z_chat.train\n"
            "assert not {'torch','mlx','llama_cpp','transformers'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- command-line edge cases ----------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_invalid_utf8_and_empty_prompts_are_usage_errors():
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "UTF-8" in r.stderr and "Traceback" not in r.stderr
    r = z2z("--prompt", "  ")
    assert r.returncode == 2 and "empty" in r.stderr


@pytest.mark.parametrize("flag", [["--temperature", "nan"], ["--temperature", "inf"], ["--repetition-penalty", "nan"],
                                  ["--lookahead", "99"]])
def test_bad_settings_fail_before_loading_a_model(flag):
    r = z2z("--model", "/nonexistent", "--prompt", "hi", *flag, timeout=60)
    assert r.returncode == 2 and "nonexistent" not in r.stderr  # refused before the model path is looked at


def test_output_closed_early_exits_quietly(ref_checkpoints):
    d = ref_checkpoints[("llama", "transformer", "compressed")][1]
    cmd = (f"{sys.executable} -m z2z_chat.app.cli --model {d} --device cpu --prompt 'write a lot' --max-tokens 400 "
           "| head -c 10")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr


def test_sigterm_exits_143_with_a_message(ref_checkpoints):
    import signal
    import time

    d = ref_checkpoints[("llama", "transformer", "compressed")][1]
    p = subprocess.Popen([sys.executable, "-m", "z2z_chat.app.cli", "--model", str(d), "--device", "cpu", "--prompt",
                          "write a lot", "--max-tokens", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL,
                         text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = p.stdout.read(1)  # the reply has started
    assert first
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert (first + out).endswith("\n")  # the interrupted line is closed


def test_fetch_output_goes_to_the_progress_callback_not_the_terminal():
    from z2z_chat.backends.loading.assets import _run_pip

    lines = []
    rc = _run_pip([sys.executable, "-c", "print('Downloading x'); print('done')"], lines.append)
    assert rc == 0 and any("Downloading x" in x for x in lines)


def test_a_one_code_reply_shows_no_throughput():
    from z2z_chat.backends.engine.events import TurnStats

    assert "decode -" in TurnStats(reply_codes=1, reply_tokens=1, decode_s=0.0002).summary()
    assert "tok/s" in TurnStats(reply_codes=40, reply_tokens=50, decode_s=1.0).summary().split("| decode")[-1]


def test_files_and_standard_input_reach_the_model(ref_checkpoints, tmp_path):
    """--file, piped input and --prompt - each put the text in the message (the stats count its tokens)."""
    d = str(ref_checkpoints[("llama", "transformer", "compressed")][1])
    code = tmp_path / "x.py"
    code.write_text("def f(x):\n    return x + 1\n" * 20)
    base = ["--model", d, "--device", "cpu", "--max-tokens", "4", "--stats"]

    def prompt_tokens(r) -> int:
        assert r.returncode == 0, r.stderr
        return int(r.stderr.split("prompt ")[1].split(" tok")[0])

    alone = prompt_tokens(z2z(*base, "--prompt", "What does this do?"))
    with_file = prompt_tokens(z2z(*base, "--prompt", "What does this do?", "--file", str(code)))
    piped = prompt_tokens(z2z(*base, "--prompt", "What does this do?", stdin=code.read_bytes()))
    dash = prompt_tokens(z2z(*base, "--prompt", "-", stdin=b"What does this do?"))
    bare = prompt_tokens(z2z(*base, stdin=b"What does this do?"))  # no --prompt: piped text is the prompt
    assert with_file > alone + 100 and piped > alone + 100 and dash == alone == bare


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.txt", "no such file"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "b.bin").write_bytes(b"\x7fELF\x00\x01") and p / "b.bin", "binary"),
    (lambda p: (p / "l.txt").write_bytes(b"caf\xe9 au lait") and p / "l.txt", "byte 0xe9 at offset 3"),
])
def test_a_file_that_cannot_be_attached_is_a_usage_error(tmp_path, make, message):
    path = make(tmp_path)
    r = z2z("--model", "unused", "--prompt", "hi", "--file", str(path))
    assert r.returncode == 2 and message in r.stderr and str(path.name) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no usage block


def test_input_too_long_for_the_context_is_a_usage_error(ref_checkpoints, tmp_path):
    d = str(ref_checkpoints[("llama", "transformer", "compressed")][1])
    big = tmp_path / "big.txt"
    big.write_text(" ".join(f"w{i}" for i in range(20000)))
    r = z2z("--model", d, "--device", "cpu", "--prompt", "Summarize", "--file", str(big))
    assert r.returncode == 2 and "positions" in r.stderr and "context window" in r.stderr


def test_negative_seed_is_refused_before_loading():
    r = z2z("--model", "does-not-matter", "--prompt", "hi", "--seed", "-1")
    assert r.returncode == 2 and "--seed" in r.stderr


def test_cache_list_and_clean(tmp_path):
    cache = tmp_path / "cache"
    (cache / "llamacpp" / "tables-abc").mkdir(parents=True)
    (cache / "llamacpp" / "tables-abc" / "embed.npy").write_bytes(b"x" * 3000)
    (cache / "llamacpp" / "merged-abc.gguf").write_bytes(b"y" * 5000)
    (cache / "smollm2").mkdir()
    (cache / "smollm2" / "base.gguf").write_bytes(b"z" * 7000)
    env = {**os.environ, "Z2Z_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--cache", "list"], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "merged" in r.stdout and "download" in r.stdout and "tables" in r.stdout
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--cache", "clean"], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "removed" in r.stdout
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["base.gguf"]  # the download stays


def test_export_import_and_search_from_the_command_line(tmp_path):
    """A round trip through JSON Lines keeps every message; an OpenAI message list imports as a
    conversation; a malformed file names its line and imports nothing."""
    def run(*args, data: Path):
        return subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "Z2Z_DATA_DIR": str(data)}, stdin=subprocess.DEVNULL, cwd=ROOT)

    src = tmp_path / "openai.json"
    src.write_text(json.dumps([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Where is Paris?"},
                               {"role": "assistant", "content": "In France.\nOn the Seine."}]))
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("--import", str(src), data=a).returncode == 0
    r = run("--search", "seine", data=a)
    assert r.returncode == 0 and "assistant\tOn the Seine." in r.stdout
    out = tmp_path / "all.jsonl"
    assert run("--export", str(out), data=a).returncode == 0
    assert run("--import", str(out), data=b).returncode == 0
    again = tmp_path / "again.jsonl"
    run("--export", str(again), data=b)
    assert again.read_text() == out.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text() + '{"messages": [{"role": "robot", "content": 1}]}\n')
    r = run("--import", str(bad), data=tmp_path / "c")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    r = run("--search", "Paris", data=tmp_path / "c")  # nothing was imported
    assert r.returncode == 1 and "no message matches" in r.stderr and r.stdout == ""
    assert "1 already in the history" in run("--import", str(out), data=b).stdout  # idempotent


@pytest.mark.parametrize("target,message", [
    ("victim.py", "exists; choose another name, or add --force"),
    ("missing-dir/x.jsonl", "does not exist"),
    (".", "is a directory"),
    ("/proc/version", "exists"),
])
def test_export_errors_are_one_line_and_touch_nothing(tmp_path, target, message):
    victim = tmp_path / "victim.py"
    victim.write_text("print('keep me')\n")
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--export", target], capture_output=True,
                       text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, env={**os.environ, "Z2Z_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and victim.read_text() == "print('keep me')\n"


@pytest.mark.parametrize("args,code,message", [
    (["--search", ""], 2, "needs a word"),
    (["--search", b"\xff\xfe".decode("utf-8", "surrogateescape")], 2, "not valid UTF-8"),
    (["--max-tokens", "0"], 2, "max_tokens must be an integer in [1, 1048576], got 0"),
    (["--import", "/nonexistent/file.jsonl"], 2, "does not exist"),
])
def test_bad_values_are_one_line(tmp_path, args, code, message):
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, env={**os.environ, "Z2Z_DATA_DIR": str(tmp_path)})
    assert r.returncode == code and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_cache_directory_that_cannot_be_made_and_a_base_that_is_no_model_are_one_line_errors(tmp_path):
    env = {**os.environ, "Z2Z_DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--prompt", "hi"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, env=env | {"Z2Z_CACHE_DIR": "/proc/nope"}, timeout=120)
    assert r.returncode == 1 and "cache directory /proc/nope" in r.stderr and "Traceback" not in r.stderr
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--prompt", "hi", "--base", str(binary)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=120)
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
