"""A short, self-contained training run that says what a machine does with a recipe.

    python -m z2z_chat.train.gpu_check train/recipes/phi3.5-mini.toml --steps 20             # one GPU
    accelerate launch --num_processes 8 -m train.gpu_check RECIPE --steps 20 --fsdp  # 8 GPUs, sharded

It runs ``steps`` optimizer steps of the recipe's model, encoder, LoRA, batch and precision
settings on built-in data (this Python's standard-library sources, so it needs no dataset and
no network beyond the base model), then prints the throughput in base tokens/s (all processes),
the peak memory of one process, and the loss before and after. Pass ``--recipe-data`` to use the
recipe's own data sources instead. Any ``--key value`` override of ``z2z-train`` applies. Its
output goes to a temporary directory, removed afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m z2z_chat.train.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a recipe (train/recipes/*.toml)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fsdp", action="store_true", help="shard over the processes (FSDP2)")
    p.add_argument("--recipe-data", action="store_true", help="train on the recipe's data sources")
    p.add_argument("--keep", action="store_true", help="keep the output directory")
    args, overrides = p.parse_known_args(argv)
    from z2z_chat.backends.errors import Z2ZError

    from z2z_chat.train.config import load_config
    from z2z_chat.train.trainer import train

    rank0 = os.environ.get("RANK", "0") == "0"
    out = Path(os.environ.get("Z2Z_GPU_CHECK_DIR") or tempfile.gettempdir()) / "z2z-gpu-check"
    if rank0 and out.exists() and not args.keep:
        shutil.rmtree(out)
    more = ["--output", str(out), "--optim.steps", str(args.steps), "--save_every",
            str(10**9), "--eval_every", str(args.steps), "--eval_batches", "4", "--log_every", "1", "--push_to_hub", ""]
    if args.fsdp:
        more += ["--fsdp", "true"]
    if not args.recipe_data:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        more += ["--data.sources", f'[{{ path = "{stdlib}/*.py" }}]', "--data.total_codes", "0",
                 "--data.val_fraction", "0.02", "--data.cache_dir", str(out.parent / "z2z-gpu-check-data")]
    try:
        cfg = load_config(args.config, overrides + more)
        train(cfg)
    except Z2ZError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 1
    if rank0:
        print(summary(cfg, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def summary(cfg, rows: list[dict]) -> str:
    import torch

    steps = [r for r in rows if "loss" in r]
    val = [r["val_lm_loss"] for r in rows if "val_lm_loss" in r]
    timed = steps[1:] or steps  # the first step includes warm-up (allocation, compile)
    tok_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lines = [
        f"gpu_check: {cfg.base_model} on {world} x {device}",
        f"  settings: dtype {cfg.dtype}, mixed precision {cfg.mixed_precision}, fsdp {cfg.fsdp}, "
        f"gradient checkpointing {cfg.gradient_checkpointing}, compile {cfg.compile}, "
        f"{cfg.optim.tokens_per_batch} codes/step of {cfg.data.seq_len}",
        f"  throughput: {tok_s:,.0f} base tokens/s (all processes; mean of steps 2..{len(steps)})",
        f"  peak memory: {max(r['peak_memory_mb'] for r in steps):,.0f} MB per process",
        f"  loss: {steps[0]['loss']:.3f} (step 1) -> {steps[-1]['loss']:.3f} (step {steps[-1]['step']})",
    ]
    if len(val) > 1:
        lines.append(f"  held-out lm loss per code: {val[0]:.3f} (before) -> {val[-1]:.3f} (after)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
