"""``z2z-bench compare``: z2z-chat beside the engines a user would run instead, on one prompt set.

Every engine runs in its own worker process (so its load time and peak memory are its own) and
stays loaded; prompts go round-robin through the engines, the engine order rotating per prompt
and the whole set repeated, so machine noise hits all alike. Everything is greedy and every
engine gets the same prompt token ids (rendered with the model's chat template). For a
multi-turn prompt the earlier turns run first, unmeasured (z2z keeps its KV cache and codebook
across turns; the stateless engines re-read the conversation, which is their real cost), and
the last turn is measured.

Engines (those not installed are listed as skipped, with the reason):
- ``z2z/<backend>`` and ``z2z/<backend>+lookahead`` for llama.cpp and torch (and MLX with
  ``--mlx``); ``plain/<backend>``: the base model on the same backend through the same engine;
- ``llama.cpp`` and ``llama.cpp+PLD``: llama-cpp-python's ``Llama.create_completion`` on the
  base GGUF, without and with ``LlamaPromptLookupDecoding``;
- ``transformers`` and ``transformers+PLD``: ``generate`` on the same base, without and with
  ``prompt_lookup_num_tokens``;
- ``zip2zip-0.2.0``: the reference package's ``generate`` on the same checkpoint (torch).

This module schedules: which engines run here (``plan``), their workers, the round-robin. The
engines are in ``engines.py``, the figures and the table in ``report.py``.
"""

from __future__ import annotations

import json
import os
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from z2z_chat.app.bench.engines import Spec, build
from z2z_chat.app.bench.peer import peer_ggufs
from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR
from z2z_chat.app.bench.memory import peak_rss_mb
from z2z_chat.app.bench.report import agreement, correct, summary

PROMPTS_FILE = DEFAULT_MODEL_DIR / "eval" / "prompts.jsonl"


def load_prompts(path: str | Path | None, groups: list[str] | None = None) -> list[dict[str, Any]]:
    path = Path(path) if path else PROMPTS_FILE
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(p, str):
            p = {"group": "file", "turns": [p], "expect": []}
        if not isinstance(p, dict) or not p.get("turns"):
            raise ValueError(f"{path}:{n}: expected {{'turns': [...]}} or a JSON string")
        if not groups or p.get("group") in groups:
            out.append(p)
    return out


def _worker(conn: Any, spec: Spec, model: str | None, base: str | None, info: dict[str, Any]) -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        t = time.perf_counter()
        engine = build(spec, model, base, info)
        conn.send({"ok": True, "load_s": time.perf_counter() - t})
    except Exception as e:  # noqa: BLE001 - reported as a failed engine, with its reason
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    while True:
        msg = conn.recv()
        if msg is None:
            conn.send({"peak_rss_mb": peak_rss_mb()})
            return
        try:
            conn.send({"ok": True, **engine.run(msg["turns"], msg["max_tokens"])})
        except Exception as e:  # noqa: BLE001
            conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})


# --- the run ---------------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(info: dict[str, Any], mlx: bool) -> tuple[list[Spec], list[dict[str, str]]]:
    """The engines to run here, and those skipped with the reason."""
    specs, skipped = [], []

    def skip(name: str, why: str) -> None:
        skipped.append({"engine": name, "skipped": why})

    backends = [("llamacpp", "llama_cpp"), ("torch", "torch")] + ([("mlx", "mlx_lm")] if mlx else [])
    for be, module in backends:
        if not _installed(module):
            for n in (f"z2z/{be}", f"z2z/{be}+lookahead", f"plain/{be}"):
                skip(n, f"{module} is not installed")
            continue
        if be == "llamacpp" and info["position_mode"] != "compressed":
            skip(f"z2z/{be}", "llama.cpp needs contiguous positions (compressed checkpoints)")
            continue
        specs += [Spec(f"z2z/{be}", "z2z", be), Spec(f"z2z/{be}+lookahead", "z2z", be, lookahead=8)]
        if be != "mlx":
            specs += [Spec(f"plain/{be}", "plain", be), Spec(f"plain/{be}+lookahead", "plain", be, lookahead=8)]
    if not mlx:
        skip("z2z/mlx", "MLX runs here only on the CPU (for correctness, not speed); pass --mlx to include it")
    peers = ("llama.cpp", "llama.cpp+PLD", "llama.cpp q8_0", "llama.cpp q8_0+PLD")
    if not _installed("llama_cpp"):
        for n in peers:
            skip(n, "llama-cpp-python is not installed")
    elif not info.get("gguf"):
        for n in peers:
            skip(n, "the base model is not a GGUF file and no conversion was found")
    else:  # the base's file, and the base at the merged model's type (the peer at its best: peer.py)
        specs += [Spec("llama.cpp", "llamacpp"), Spec("llama.cpp+PLD", "llamacpp", pld=True)]
        for label, path in peer_ggufs(info["gguf"])[1:]:
            name = f"llama.cpp {label.rsplit(' ', 1)[-1]}"
            specs += [Spec(name, "llamacpp", gguf=str(path)), Spec(f"{name}+PLD", "llamacpp", pld=True, gguf=str(path))]
    if not _installed("torch"):
        skip("transformers", "torch is not installed")
        skip("zip2zip-0.2.0", "torch is not installed")
    else:
        specs += [Spec("transformers", "transformers"), Spec("transformers+PLD", "transformers", pld=True)]
        if not _installed("zip2zip"):
            skip("zip2zip-0.2.0", "pip install --no-deps zip2zip==0.2.0 zip2zip-compression==0.3.4 omegaconf")
        else:
            specs.append(Spec("zip2zip-0.2.0", "reference"))
    if mlx and _installed("mlx_lm"):
        skip("mlx-lm", "needs an MLX conversion of the base (python -m mlx_lm convert); not automated here")
    elif not mlx:
        skip("mlx-lm", "MLX runs here only on the CPU; pass --mlx to include it")
    return specs, skipped


def model_info(model: str | None, base: str | None) -> dict[str, Any]:
    """What every worker needs to know of the model, resolved once here."""
    from z2z_chat.backends.runtime import gguf_conversion
    from z2z_chat.backends.loading.sources import is_gguf

    if model is None:
        from z2z_chat.backends.loading.defaults import default_model

        model, default_base = default_model()
        base = base or default_base
    from z2z_chat.backends.config import Zip2ZipConfig

    cfg = Zip2ZipConfig.load(model)
    ckpt = Path(model)
    spec = base or cfg.base_model_name_or_path
    if spec != "." and not Path(spec).is_absolute() and (ckpt / spec).exists():
        spec = str(ckpt / spec)
    gguf = spec if is_gguf(spec) else None
    if gguf is None and _installed("llama_cpp") and cfg.position_mode == "compressed" and _installed("gguf"):
        conv = Path(gguf_conversion(str(model), base))  # the base (LoRA merged) as llama.cpp runs it
        gguf = str(conv / "model.gguf") if not (ckpt / "adapter_config.json").is_file() else None
    return {"model": str(model), "base": spec, "gguf": gguf, "checkpoint": str(model),
            "tokenizer": str(ckpt) if (ckpt / "tokenizer_config.json").is_file() else spec,
            "position_mode": cfg.position_mode, "n_ctx": int(os.environ.get("Z2Z_CONTEXT", 4096)),
            "codec": cfg.codec_config(_pad(ckpt, spec))}


def _pad(ckpt: Path, spec: str) -> int:
    from z2z_chat.backends.loading.sources import load_tokenizer, pad_id_of

    return pad_id_of(load_tokenizer(str(ckpt) if (ckpt / "tokenizer_config.json").is_file() else spec))


def run(model: str | None, base: str | None, prompts: list[dict[str, Any]], max_tokens: int, repeat: int,
        mlx: bool, progress: Callable[[str], None], only: list[str] | None = None) -> dict[str, Any]:
    info = model_info(model, base)
    specs, skipped = plan(info, mlx)
    if only:
        skipped += [{"engine": s.name, "skipped": "not selected (--engines)"} for s in specs if s.name not in only]
        specs = [s for s in specs if s.name in only]
    ctx = mp.get_context("spawn")
    workers = {}
    for s in specs:
        progress(f"loading {s.name}")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, s, model, base, info), daemon=True)
        p.start()
        msg = parent.recv()
        if not msg["ok"]:
            skipped.append({"engine": s.name, "skipped": f"failed to load: {msg['error']}"})
            p.join()
            continue
        workers[s.name] = (p, parent, msg["load_s"])
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in workers}
    names = list(workers)
    total = repeat * len(prompts) * len(names)
    done = 0
    for r in range(repeat):
        for i, pr in enumerate(prompts):
            k = (i + r) % max(len(names), 1)
            for n in names[k:] + names[:k]:  # rotating order: no engine always goes first
                done += 1
                progress(f"[{done}/{total}] {n}: {pr['group']} prompt {i + 1}")
                workers[n][1].send({"turns": pr["turns"], "max_tokens": max_tokens})
                out = workers[n][1].recv()
                out.update(prompt=i, repeat=r, group=pr.get("group", ""),
                           correct=correct(out.get("text", ""), pr.get("expect", [])))
                results[n].append(out)
    rows = []
    for n, (p, conn, load_s) in workers.items():
        conn.send(None)
        rss = conn.recv()["peak_rss_mb"]
        p.join()
        rows.append(summary(n, results[n], load_s, rss))
    reference = next((n for n in ("llama.cpp", "plain/llamacpp", "transformers", "plain/torch", *names) if n in workers),
                     None)
    for row in rows:
        ref = next((x for x in rows if x["engine"] == reference), None)
        for k in ("decode_tok_s", "prefill_tok_s"):
            row[f"{k}_vs_ref"] = row[k] / ref[k] if ref and ref[k] and row[k] is not None else None
    return {"reference": reference, "max_tokens": max_tokens, "repeat": repeat, "prompts": len(prompts),
            "engines": rows, "skipped": skipped, "agreement": agreement(results)}
