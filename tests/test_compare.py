"""``z2z-bench compare`` end to end on the tiny checkpoint with the engines CI installs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow
FIELDS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "copy_decode_tok_s", "decode_tok_s_vs_ref",
          "codes_per_token", "peak_rss_mb", "correct", "errors")


def test_compare_reports_every_engine(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"group": "qa", "turns": ["What is x?"], "expect": ["x"]},
        {"group": "copy", "turns": ["Repeat: x = 1; y = 2; x = 1; y = 2"], "expect": ["x = 1"]},
        {"group": "followup", "turns": ["hello", "and again"], "expect": []},
    ]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "Z2Z_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.bench.cli", "compare", "--model", str(tiny_ckpt),
                        "--prompts", str(prompts), "--max-tokens", "8", "--json"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    names = {row["engine"] for row in rep["engines"]}
    assert {"z2z/torch", "z2z/torch+lookahead", "plain/torch", "transformers", "transformers+PLD"} <= names
    llama = {"z2z/llamacpp", "plain/llamacpp", "llama.cpp", "llama.cpp+PLD", "llama.cpp q8_0", "llama.cpp q8_0+PLD"}
    if importlib.util.find_spec("llama_cpp"):
        assert llama <= names, rep["skipped"]
    else:  # listed as skipped, with the reason
        assert llama <= {s["engine"] for s in rep["skipped"]}
    for row in rep["engines"]:
        missing = [f for f in FIELDS if row.get(f) is None]
        assert not missing, (row["engine"], missing)
        assert row["errors"] == 0, row
    skipped = {s["engine"]: s["skipped"] for s in rep["skipped"]}
    assert "z2z/mlx" in skipped and skipped["z2z/mlx"]  # listed with the reason, not dropped
    for a in rep["agreement"]:  # the same engine with and without lookahead writes the same replies
        assert a["same_replies"] == a["of"], a


def test_answers_flags_replies_that_loop_to_the_limit():
    from z2z_chat.app.bench.quality import loops

    stuck = "The capital of Japan Italy? Italy? Italy is Tokyo known for " + "named Sm named " * 20
    assert loops(stuck, "length")
    assert not loops(stuck, "stop")  # asked to repeat, and stopped on its own
    assert not loops("Rome is the capital of Italy, a city on the Tiber with a long history " * 1, "length")


def test_decode_rounds_report_each_sides_median_run():
    from z2z_chat.app.bench.model import _median

    runs = [{"seconds": s, "steps": n} for s, n in ((3.0, 1), (2.0, 2), (4.0, 2), (0.5, 1))]  # 3, 1, 2, 0.5 s a step
    assert _median(runs) == {"seconds": 2.0, "steps": 2}  # the lower middle of an even count
    assert _median(runs[:3]) == {"seconds": 4.0, "steps": 2}


def test_scale_makes_converts_and_measures_a_released_geometry(tmp_path):
    """``z2z-bench scale`` on the tiny geometry: the same code path as Phi-3.5-mini's (a Phi-3 base in
    shards, longrope, released-shape encoders, the adapter merged while converting)."""
    pytest.importorskip("llama_cpp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "Z2Z_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.app.bench.cli", "scale", "--geometry", "tiny", "--out",
                        str(tmp_path / "scale"), "--lengths", "64", "--prompt-tokens", "32", "--steps", "4", "--rounds", "2",
                        "--json"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert [row["engine"] for row in rep["load"]] == ["z2z/llamacpp (run 1)", "z2z/llamacpp (run 2)",
                                                      "llama-cpp-python"]
    assert all(row["load_s"] > 0 and row["peak_rss_mb"] > 50 for row in rep["load"])
    assert rep["load"][-1]["load_vs_plain"] == 1.0
    assert rep["prefill"][0]["tokens"] == 64
    forced = next(row for row in rep["decode"] if row.get("mode") == "forced")
    assert forced["zip_steps"] == forced["plain_steps"] == 4 and forced["step_overhead"] > -1
    assert (tmp_path / "scale" / "gguf" / "model.gguf").is_file()
    assert len(list((tmp_path / "scale" / "base").glob("model-*.safetensors"))) == 3  # two layers + the outer ones
