"""``train/device_run.py --tiny``: the GPU run's CPU rehearsal, end to end: prompts by program, the
base's replies, training under a time budget, evaluation, and files ``z2z-chat --model`` opens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate", reason='training: pip install "z2z-chat[train]"')

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_rehearsal_writes_a_checkpoint_the_app_opens_and_an_evaluation(tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "z2z_chat.train.device_run", str(out), "--tiny", "--budget-s", "100",
                        "--pack"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval v3: 4/4" in r.stderr and "eval base: 4/4" in r.stderr
    summary = json.loads((out / "eval.json").read_text())["summary"]
    assert set(summary) == {"v3", "base"} and "codes_per_token" in summary["v3"]
    assert "| v3 |" in (out / "eval.md").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics) and json.loads((out / "timing.json").read_text())["total_s"] < 120
    convs = [json.loads(line)["messages"] for line in (out / "distill.jsonl").read_text().splitlines()]
    assert convs and all(c[-1]["role"] == "assistant" for c in convs)  # the base wrote every reply
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "v3").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as their siblings (not 0600)
    with tarfile.open(out / "v3.tar.gz") as tar:
        assert {"v3/zip2zip_config.json", "v3/adapter_model.safetensors"} <= set(tar.getnames())
    chat = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "--model", str(out / "v3"), "--backend", "torch",
                           "--device", "cpu", "--prompt", "hi", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert chat.returncode == 0, chat.stderr[-2000:]


def test_the_prompts_keep_the_evaluation_set_out_and_need_no_files_outside_the_checkout():
    from z2z_chat.train.device_run import EVAL_SET, distill_prompts

    prompts = distill_prompts(300, seed=1)
    evals = {t for line in EVAL_SET.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]}
    assert len(prompts) == 300 and not evals & {t for p in prompts for t in p}
    assert sum(len(p) > 1 for p in prompts) > 50  # follow-ups: the base answers each turn in order
