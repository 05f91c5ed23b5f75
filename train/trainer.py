"""The training loop: one CPU, one GPU, or many GPUs / nodes through ``accelerate launch`` or
``torchrun`` (DDP, or FSDP2 sharding with ``fsdp = true``: ``sharding.py``), never a home-made
distributed engine.

Data order is a pure function of (seed, step): micro-batch k of the global order goes to
process ``k % world``, and an optimizer step consumes ``grad_accum x world`` micro-batches. So
2 processes with 1 micro-batch each and 1 process accumulating 2 see the same global batch and
produce the same update, and a resumed run continues exactly where it stopped (``state/`` holds
the optimizer, scheduler, RNG and trainable weights; the step is in ``state/step.json``).

Outputs in ``cfg.output``: ``checkpoint-<step>/`` and ``final/`` (zip2zip checkpoints, loadable
by our backends and by the ``zip2zip`` package), ``metrics.jsonl`` / ``metrics.csv`` (and
TensorBoard when installed), ``config.json`` (the resolved config).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from z2z_chat.backends.loading.checkpoint import encoder_file, locate_base
from z2z_chat.backends.config import CompressionSettings, Zip2ZipConfig
from z2z_chat.backends.loading.sources import load_tokenizer, pad_id_of
from z2z_chat.backends.torch_backend import checkpoint
from z2z_chat.backends.torch_backend.model import Zip2ZipLM

from z2z_chat.train.config import LORA_PRESETS, TrainConfig, TrainConfigError
from z2z_chat.train.data import Prepared, prepare
from z2z_chat.train.objective import ZipObjective, collate
from z2z_chat.train.sharding import gather_trainable, load_optimizer_state, load_trainable, optimizer_state, reshard, shard


@dataclass
class Built:
    model: Zip2ZipLM
    tokenizer: Any
    tokenizer_dir: Path


def encoder_config(cfg: TrainConfig, lm: nn.Module) -> dict[str, Any]:
    e, hc = cfg.encoder, lm.config
    D = hc.hidden_size
    hidden = e.hidden_size or D
    out = {"hidden_size": hidden, "tie_encoders": e.tie_encoders,
           "position_encoding": e.position_encoding or None, "num_hidden_layers": e.num_hidden_layers,
           "intermediate_size": e.intermediate_size or None,
           "num_heads": e.num_heads or (hc.num_attention_heads if hidden == D else max(1, hidden // 64))}
    if e.type == "res_latent_attn":
        out |= {"model_hidden_size": e.model_hidden_size or D, "causal": e.causal, "residual": e.residual,
                "position_encoding": None}
    elif hidden != D:
        raise TrainConfigError(f"encoder.hidden_size: the transformer encoder works in the model's width ({D})")
    return out


def add_lora(lm: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules or LORA_PRESETS.get(lm.config.model_type)
    if not targets:
        raise TrainConfigError(f"lora.target_modules: no preset for model type {lm.config.model_type!r}; list them")
    linear_names = {n.rsplit(".", 1)[-1] for n, mod in lm.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise TrainConfigError(f"lora.target_modules {missing} match no linear layer of this "
                               f"{lm.config.model_type} model (it has {sorted(linear_names)})")
    return get_peft_model(lm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))


def build_model(cfg: TrainConfig, device: torch.device) -> Built:
    """A fresh zip2zip model on the base (random encoders, zero-initialised LoRA)."""
    tok = load_tokenizer(cfg.base_model)
    tok_dir = Path(cfg.output) / "tokenizer"
    tok.save_pretrained(tok_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    lm = checkpoint.load_base(locate_base(cfg.base_model), dtype, device)
    for p in lm.parameters():
        p.requires_grad_(False)
    disabled = sorted(set(tok.get_added_vocab().values()) | set(tok.all_special_ids))
    base = str(Path(cfg.base_model).resolve()) if Path(cfg.base_model).exists() else cfg.base_model
    zcfg = Zip2ZipConfig(base_model_name_or_path=base,
                         encoder_type=cfg.encoder.type, encoder=encoder_config(cfg, lm),
                         compression=CompressionSettings(len(tok), cfg.max_codebook_size, cfg.max_subtokens, disabled),
                         position_mode=cfg.position_mode)
    if cfg.lora.enabled:
        lm = add_lora(lm, cfg)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    pad = pad_id_of(tok)
    torch.manual_seed(cfg.seed)
    model = Zip2ZipLM(zcfg, lm, pad)
    if cfg.init_from:
        init_from(model, Path(cfg.init_from))
    return Built(model, tok, tok_dir)


def init_from(model: Zip2ZipLM, ckpt: Path) -> None:
    """Start from a trained checkpoint's encoders and LoRA weights (continued training); its
    encoder and compression settings must be the recipe's."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    theirs = Zip2ZipConfig.load(ckpt) if ckpt.is_dir() else None
    if theirs is None:
        raise TrainConfigError(f"init_from: {ckpt} is not a zip2zip checkpoint directory")
    ours = model.config
    for key in ("encoder_type", "encoder", "compression", "position_mode"):
        if getattr(theirs, key) != getattr(ours, key):
            raise TrainConfigError(f"init_from: {ckpt} has {key} {getattr(theirs, key)}, the recipe "
                                   f"{getattr(ours, key)}; make the recipe match the checkpoint")
    checkpoint.load_encoders(model, encoder_file(ckpt))
    adapter = ckpt / "adapter_model.safetensors"
    if hasattr(model.lm, "peft_config") and adapter.is_file():
        result = set_peft_model_state_dict(model.lm, load_file(adapter))
        if result.unexpected_keys:
            raise TrainConfigError(f"init_from: {adapter} has weights the recipe's LoRA lacks: "
                                   f"{result.unexpected_keys[:3]}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    warm = o.warmup_steps if o.warmup_steps >= 0 else min(1000, o.steps // 10)
    if step < warm:
        return o.max_lr * (step + 1) / warm
    t = (step - warm) / max(1, o.steps - warm)
    return o.min_lr + 0.5 * (o.max_lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class Order:
    """Micro-batch k of the global order, as row indices; a new permutation each epoch."""

    def __init__(self, n: int, micro: int, seed: int):
        if n < micro:
            raise TrainConfigError(f"optim.micro_batch_size {micro} is larger than the training set ({n} sequences)")
        self.n, self.micro, self.seed = n, micro, seed
        self.per_epoch = n // micro
        self._perm: dict[int, np.ndarray] = {}

    def __call__(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.per_epoch)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return self._perm[epoch][i * self.micro:(i + 1) * self.micro]


class MetricsLog:
    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = out / "metrics.jsonl"
        self.csv = out / "metrics.csv"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])


def train(cfg: TrainConfig, log=print) -> Path:
    """Run (or resume) training; returns the checkpoint it ended with: ``final/`` after the last
    step, ``checkpoint-<step>/`` when ``stop_at`` ended it earlier."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # a batch without hypertokens leaves the encoders unused: DDP must allow that
    # torchrun on a machine without an accelerator: accelerate only goes multi-process (gloo) with cpu=True
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_ddp,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    try:
        return _train(acc, cfg, log)
    finally:
        # a process that leaves with gloo's threads alive aborts ("terminate called without an active
        # exception", exit -6), which fails the whole launch after a good run
        acc.end_training()


def _train(acc, cfg: TrainConfig, log) -> Path:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.output)
    say = log if acc.is_main_process else (lambda *a, **k: None)
    set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    built = build_model(cfg, acc.device)
    model, codec = built.model, built.model.config.codec_config(built.model.pad_id)
    with acc.local_main_process_first():  # prepare is deterministic: each node may build its own cache
        data: Prepared = prepare(cfg.data, codec, str(built.tokenizer_dir),
                                 Path(cfg.data.cache_dir or out / "data-cache"), cfg.seed, log=say)
    objective = ZipObjective(model, cfg.recon_lambda, cfg.causal_codebook, kl_lambda=cfg.kl_lambda)
    if cfg.compile:
        model.lm.get_decoder().compile()
    world, rank = acc.num_processes, acc.process_index
    say(f"trainable parameters: {sum(p.numel() for p in objective.parameters() if p.requires_grad):,} "
        f"of {sum(p.numel() for p in objective.parameters()):,}")
    if cfg.fsdp:
        if world < 2:
            raise TrainConfigError("fsdp = true needs several processes: accelerate launch --num_processes N "
                                   "(or torchrun --nproc_per_node N)")
        shard(objective, acc.device, cfg.mixed_precision)
        say(f"fsdp: every weight, gradient and optimizer state sharded over {world} processes")
    params = [p for p in objective.parameters() if p.requires_grad]  # after sharding: the sharded ones
    opt = torch.optim.AdamW(params, lr=cfg.optim.max_lr, weight_decay=cfg.optim.weight_decay)
    if cfg.fsdp:
        opt = acc.prepare(opt)
    else:
        objective, opt = acc.prepare(objective, opt)
    micro = cfg.optim.micro_batch_size
    ga = max(1, round(cfg.optim.tokens_per_batch / (cfg.data.seq_len * micro * world)))
    order = Order(len(data.train), micro, cfg.seed)
    say(f"{world} process(es) x {micro} sequences x {ga} accumulation = "
        f"{world * micro * ga * cfg.data.seq_len} codes per step")

    def rows(idx: np.ndarray, arr: np.ndarray, lens: np.ndarray):
        return collate([(arr[i].tolist(), int(lens[i])) for i in idx], codec, cfg.position_mode).to(acc.device)

    start = resume(out / "state.pt", acc.unwrap_model(objective), opt.optimizer, say)
    metrics = MetricsLog(out, acc.is_main_process)
    bar = tqdm(total=cfg.optim.steps, initial=start, desc="train", disable=not acc.is_main_process)
    t_last, toks, codes_seen = time.perf_counter(), 0, 0
    if start == 0 and len(data.val):  # the starting point, so the curve that follows can be judged
        val0 = evaluate(acc.unwrap_model(objective), data, cfg, rows)
        metrics.write({"step": 0, "val_lm_loss": round(val0, 5)})
        say(f"step 0: held-out lm loss {val0:.4f} per code (before training; it should fall)")
    interrupted = _Interrupts()
    began = time.monotonic()
    for step in range(start, cfg.optim.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        sums: dict[str, float] = {}
        for a in range(ga):
            k = (step * ga + a) * world + rank
            batch = rows(order(k), data.train, data.train_len)
            toks += batch.base_tokens
            codes_seen += int(batch.lengths.sum())
            ctx = acc.no_sync(objective) if a < ga - 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                losses = objective(batch)
                acc.backward(losses["loss"] / ga)
            for name, v in losses.items():
                sums[name] = sums.get(name, 0.0) + v.item() / ga
        if cfg.optim.grad_clip > 0:
            acc.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.optim.steps:
            if world > 1:  # the mean over processes: the loss of the whole global batch
                sums = {k: acc.reduce(torch.tensor(v, device=acc.device), "mean").item() for k, v in sums.items()}
            dt = time.perf_counter() - t_last
            row = {"step": done, **{k: round(v, 5) for k, v in sums.items()}, "lr": lr_at(step, cfg),
                   "tokens_per_s": round(toks * world / dt, 1), "compression": round(codes_seen / max(toks, 1), 4),
                   "peak_memory_mb": round(peak_memory_mb(acc.device))}
            metrics.write(row)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            t_last, toks, codes_seen = time.perf_counter(), 0, 0
        if len(data.val) and (done % cfg.eval_every == 0 or done == cfg.optim.steps):
            val = evaluate(acc.unwrap_model(objective), data, cfg, rows)
            metrics.write({"step": done, "val_lm_loss": round(val, 5)})
            say(f"step {done}: held-out lm loss {val:.4f}")
        over = _over_budget(acc, cfg, began, world)
        if done % cfg.save_every == 0 or done == cfg.optim.steps or done == cfg.stop_at or over:
            save(acc, objective, opt, built, out, done, final=done == cfg.optim.steps)
        if (done == cfg.stop_at or over) and done != cfg.optim.steps:
            why = f"the time budget of {cfg.time_budget_s:.0f} s" if over else "stop_at"
            say(f"stopping after step {done} ({why}); run the same command to resume")
            interrupted.restore()
            bar.close()
            return out / f"checkpoint-{done}"
        if interrupted.now(acc, world):  # Ctrl+C: this step is finished, save it before leaving
            if done % cfg.save_every and done != cfg.optim.steps:
                save(acc, objective, opt, built, out, done, final=False)
            say(f"interrupted after step {done}: saved {out / 'state.pt'}")
            interrupted.restore()
            raise KeyboardInterrupt
    interrupted.restore()
    bar.close()
    if cfg.push_to_hub and acc.is_main_process and (out / "final").is_dir():
        push_to_hub(out / "final", cfg.push_to_hub, say)
    return out / "final"


def _over_budget(acc, cfg: TrainConfig, began: float, world: int) -> bool:
    """``time_budget_s`` has passed; every process decides the same (the slowest clock wins)."""
    if cfg.time_budget_s <= 0:
        return False
    over = float(time.monotonic() - began > cfg.time_budget_s)
    if world > 1:
        over = acc.reduce(torch.tensor(over, device=acc.device), "max").item()
    return bool(over)


class _Interrupts:
    """Ctrl+C (SIGINT) during training finishes the step and saves the state it asks the user to
    resume from; a second Ctrl+C interrupts at once. All processes agree on the step to stop at."""

    def __init__(self) -> None:
        import signal
        import threading

        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.flag:  # the second one
            self.restore()
            raise KeyboardInterrupt
        self.flag = True

    def now(self, acc, world: int) -> bool:
        if world == 1:
            return self.flag
        flag = torch.tensor(float(self.flag), device=acc.device)
        return bool(acc.reduce(flag, "max").item())

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated by torch, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def push_to_hub(folder: Path, repo_id: str, say) -> None:
    """Upload the final checkpoint (needs `hf auth login` or HF_TOKEN, and the hub)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="zip2zip checkpoint from z2z-train")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise TrainConfigError(f"push_to_hub: could not upload {folder} to {repo_id} ({e}); the checkpoint "
                               "is saved locally, upload it later with `hf upload`") from None
    say(f"pushed {folder} to https://huggingface.co/{repo_id}")


@torch.no_grad()
def evaluate(objective: ZipObjective, data: Prepared, cfg: TrainConfig, rows) -> float:
    was, causal = objective.training, objective.causal
    objective.eval()
    objective.causal = True  # held-out loss is always scored as inference sees it
    micro = cfg.optim.micro_batch_size
    n = min(len(data.val), cfg.eval_batches * micro)
    total, weight = 0.0, 0
    for i in range(0, n, micro):
        idx = np.arange(i, min(i + micro, n))
        batch = rows(idx, data.val, data.val_len)
        w = int((batch.lengths - 1).sum())
        total += objective(batch)["lm_loss"].item() * w
        weight += w
    objective.train(was)
    objective.causal = causal
    reshard(objective)
    return total / max(weight, 1)


def save(acc, objective, opt, built: Built, out: Path, step: int, final: bool) -> None:
    """A zip2zip checkpoint, and ``state.pt`` (trainable weights, optimizer, RNG) to resume from;
    whole tensors, gathered from the shards under FSDP (every process takes part)."""
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(objective)
    trainable = gather_trainable(unwrapped)
    optim = optimizer_state(unwrapped, opt.optimizer)
    if acc.is_main_process:
        tmp = out / "state.pt.tmp"
        torch.save({"step": step, "trainable": trainable, "optimizer": optim, "rng": torch.get_rng_state()}, tmp)
        tmp.replace(out / "state.pt")  # atomic: an interrupted save leaves the previous state
        model_full = {k.removeprefix("model."): v for k, v in trainable.items() if k.startswith("model.")}
        for name in [f"checkpoint-{step}"] + (["final"] if final else []):
            checkpoint.save(unwrapped.model, out / name, built.tokenizer, full=model_full)
    acc.wait_for_everyone()


def resume(path: Path, objective: nn.Module, opt: torch.optim.Optimizer, say) -> int:
    """Load ``state.pt`` if a previous run left one; returns the step to continue from."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    want = {n for n, p in objective.named_parameters() if p.requires_grad}
    missing = set(state["trainable"]) ^ want
    if missing:
        raise TrainConfigError(f"{path} was written by a different model/config (mismatched parameters "
                               f"{sorted(missing)[:3]}); use a new output directory")
    load_trainable(objective, state["trainable"])
    load_optimizer_state(objective, opt, state["optimizer"])
    torch.set_rng_state(state["rng"])
    say(f"resuming from {path} at step {state['step']}")
    return int(state["step"])
