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

Per engine: load time, time to first token (median), prefill and decode base tokens/s (sums over
the prompts), codes per base token of the replies, peak RSS of its process, correct replies
(``expect`` substrings) and ratios against the reference engine. Replies of engines that must
agree (z2z with and without lookahead on one backend) are compared and disagreements reported.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "default_model" / "eval" / "prompts.jsonl"
PLD_TOKENS = 10  # drafted tokens per step for both prompt-lookup baselines


@dataclass
class Spec:
    name: str
    kind: str  # z2z | plain | llamacpp | transformers | reference
    backend: str = ""
    lookahead: int = 0
    pld: bool = False


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


# --- engines (each runs inside its worker) ------------------------------------------------------


class Z2Z:
    """Our engine: zip2zip (or the plain base, ``plain``) on one backend."""

    def __init__(self, spec: Spec, model: str | None, base: str | None):
        from ..runtime import open_plain, open_runtime

        self.rt = open_runtime(model, spec.backend, base=base)
        if spec.kind == "plain":
            self.rt = open_plain(self.rt)
        self.lookahead = spec.lookahead

    def run(self, turns: list[str], max_tokens: int) -> dict[str, Any]:
        from ..engine import GenerationSettings
        from .quality import final_reply

        text, st, _ = final_reply(self.rt.session(), turns,
                               GenerationSettings(max_tokens=max_tokens, lookahead=self.lookahead))
        return {"text": text, "prompt_tokens": st.prompt_tokens, "prefill_s": st.prefill_s,
                "ttft_s": st.ttft_s, "reply_tokens": st.reply_tokens, "reply_codes": st.reply_codes,
                "decode_s": st.decode_s}


def _prompt_ids(tok: Any, turns: list[str], replies: list[str]) -> list[int]:
    msgs = []
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t})
        if i < len(replies):
            msgs.append({"role": "assistant", "content": replies[i]})
    return tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)


class Stateless(ABC):
    """Engines that take the whole conversation as prompt ids each turn."""

    def __init__(self, tok: Any):
        self.tok = tok

    @abstractmethod
    def generate(self, ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        """(reply ids, seconds to the first token, seconds after it)."""

    def run(self, turns: list[str], max_tokens: int) -> dict[str, Any]:
        replies: list[str] = []
        for i in range(len(turns)):
            ids = _prompt_ids(self.tok, turns[: i + 1], replies)
            out, ttft, dec = self.generate(ids, max_tokens)
            replies.append(self.tok.decode(out, skip_special_tokens=True))
        return {"text": replies[-1], "prompt_tokens": len(ids), "prefill_s": ttft, "ttft_s": ttft,
                "reply_tokens": len(out), "reply_codes": len(out), "decode_s": dec}


class LlamaCppPython(Stateless):
    def __init__(self, spec: Spec, gguf: str, tok: Any, n_ctx: int):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        from ..llamacpp_backend.context import default_threads

        super().__init__(tok)
        draft = LlamaPromptLookupDecoding(num_pred_tokens=PLD_TOKENS) if spec.pld else None
        n = default_threads()
        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=n, n_threads_batch=n, draft_model=draft,
                         verbose=False)
        self.eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}

    def generate(self, ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        out, t1 = [], 0.0
        for chunk in self.llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, stream=True):
            if not out:
                t1 = time.perf_counter()
            out.append(chunk)
        t2 = time.perf_counter()
        text = "".join(c["choices"][0]["text"] for c in out)
        reply = self.tok(text, add_special_tokens=False)["input_ids"]
        return reply, (t1 or t2) - t0, t2 - (t1 or t2)


class Transformers(Stateless):
    def __init__(self, spec: Spec, base: str, tok: Any):
        import torch

        from ..torch_backend.checkpoint import load_base

        super().__init__(tok)
        self.lm = load_base(base, torch.float32, torch.device("cpu"))
        self.pld = spec.pld

    def generate(self, ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        import torch

        x = torch.tensor([ids])
        kw = {"do_sample": False, "attention_mask": torch.ones_like(x), "pad_token_id": self.tok.eos_token_id}
        if self.pld:
            kw["prompt_lookup_num_tokens"] = PLD_TOKENS
        with torch.no_grad():
            t0 = time.perf_counter()
            self.lm.generate(x, max_new_tokens=1, **kw)  # time to first token, separately: assisted
            t1 = time.perf_counter()  # generation cannot stream
            out = self.lm.generate(x, max_new_tokens=max_tokens, **kw)[0, len(ids):].tolist()
            t2 = time.perf_counter()
        ttft = t1 - t0
        return out, ttft, max(t2 - t1 - ttft, 1e-9)


class Reference(Stateless):
    """The zip2zip 0.2.0 package's generate (re-encodes the conversation each call), on torch."""

    def __init__(self, checkpoint: str, base: str, tok: Any, codec: Any):
        import torch
        import zip2zip_compression as zc
        from zip2zip.model import Zip2ZipModel

        from ..torch_backend.checkpoint import load_base

        super().__init__(tok)
        lm = load_base(base, torch.float32, torch.device("cpu"))
        # the package loads its tokenizer from base_model_name_or_path: point it at a local copy
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="z2z-ref-"))
        shutil.copytree(checkpoint, tmp / "ckpt")
        tok.save_pretrained(tmp / "tok")
        cfg = json.loads((tmp / "ckpt" / "zip2zip_config.json").read_text())
        (tmp / "ckpt" / "zip2zip_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(tmp / "tok")}))
        self.ref = Zip2ZipModel.from_pretrained(str(tmp / "ckpt"), base_model=lm).eval()
        c = codec
        self.comp = zc.LZWCompressor(c.base_vocab_size, c.max_codebook_size, c.max_merge_size, c.pad_id,
                                     sorted(c.disabled_ids))
        self.V = c.base_vocab_size

    def generate(self, ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        import torch

        codes = self.comp.encode(ids)[0]
        x = torch.tensor([codes])
        kw = {"do_sample": False, "attention_mask": torch.ones_like(x)}
        with torch.no_grad():
            t0 = time.perf_counter()
            self.ref.generate(input_ids=x, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            out = self.ref.generate(input_ids=x, max_new_tokens=max_tokens, **kw)[0, len(codes):].tolist()
            t2 = time.perf_counter()
        self.ref.codebook_manager.reset()
        base = self.comp.decode(codes + out)[0][len(ids):]
        ttft = t1 - t0
        return base, ttft, max(t2 - t1 - ttft, 1e-9)


def _build(spec: Spec, model: str | None, base: str | None, info: dict[str, Any]) -> Any:
    if spec.kind in ("z2z", "plain"):
        return Z2Z(spec, model, base)
    from ..sources import load_tokenizer

    tok = load_tokenizer(info["tokenizer"])
    if spec.kind == "llamacpp":
        return LlamaCppPython(spec, info["gguf"], tok, info["n_ctx"])
    if spec.kind == "transformers":
        return Transformers(spec, info["base"], tok)
    return Reference(info["checkpoint"], info["base"], tok, info["codec"])


def _worker(conn: Any, spec: Spec, model: str | None, base: str | None, info: dict[str, Any]) -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        t = time.perf_counter()
        engine = _build(spec, model, base, info)
        conn.send({"ok": True, "load_s": time.perf_counter() - t})
    except Exception as e:  # noqa: BLE001 - reported as a failed engine, with its reason
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    while True:
        msg = conn.recv()
        if msg is None:
            conn.send({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
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
    if not _installed("llama_cpp"):
        skip("llama.cpp", "llama-cpp-python is not installed")
    elif not info.get("gguf"):
        skip("llama.cpp", "the base model is not a GGUF file and no conversion was found")
    else:
        specs += [Spec("llama.cpp", "llamacpp"), Spec("llama.cpp+PLD", "llamacpp", pld=True)]
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
    from ..runtime import gguf_conversion
    from ..sources import is_gguf

    if model is None:
        from ..defaults import default_model

        model, default_base = default_model()
        base = base or default_base
    from ..config import Zip2ZipConfig

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
            "position_mode": cfg.position_mode, "n_ctx": 4096,
            "codec": cfg.codec_config(_pad(ckpt, spec))}


def _pad(ckpt: Path, spec: str) -> int:
    from ..sources import load_tokenizer, pad_id_of

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
                           correct=_correct(out.get("text", ""), pr.get("expect", [])))
                results[n].append(out)
    rows = []
    for n, (p, conn, load_s) in workers.items():
        conn.send(None)
        rss = conn.recv()["peak_rss_mb"]
        p.join()
        rows.append(_summary(n, results[n], load_s, rss))
    reference = next((n for n in ("llama.cpp", "plain/llamacpp", "transformers", "plain/torch", *names) if n in workers),
                     None)
    for row in rows:
        ref = next((x for x in rows if x["engine"] == reference), None)
        for k in ("decode_tok_s", "prefill_tok_s"):
            row[f"{k}_vs_ref"] = row[k] / ref[k] if ref and ref[k] and row[k] is not None else None
    return {"reference": reference, "max_tokens": max_tokens, "repeat": repeat, "prompts": len(prompts),
            "engines": rows, "skipped": skipped, "agreement": _agreement(results)}


def _correct(text: str, expect: list[str]) -> bool | None:
    return any(e.lower() in text.lower() for e in expect) if expect else None


def _summary(name: str, runs: list[dict[str, Any]], load_s: float, rss: float) -> dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    errors = len(runs) - len(ok)
    tot = lambda k: sum(r[k] for r in ok)  # noqa: E731
    checked = [r["correct"] for r in ok if r["correct"] is not None]
    return {"engine": name, "load_s": load_s, "first_error": next((r["error"] for r in runs if not r.get("ok")), None), "ttft_s": statistics.median([r["ttft_s"] for r in ok]) if ok else None,
            "prefill_tok_s": tot("prompt_tokens") / tot("prefill_s") if ok and tot("prefill_s") else None,
            "decode_tok_s": tot("reply_tokens") / tot("decode_s") if ok and tot("decode_s") else None,
            "codes_per_token": tot("reply_codes") / tot("reply_tokens") if ok and tot("reply_tokens") else None,
            "peak_rss_mb": rss, "correct": f"{sum(checked)}/{len(checked)}", "errors": errors,
            "copy_decode_tok_s": _group_rate(ok, "copy")}


def _group_rate(runs: list[dict[str, Any]], group: str) -> float | None:
    g = [r for r in runs if r["group"] == group]
    t = sum(r["decode_s"] for r in g)
    return sum(r["reply_tokens"] for r in g) / t if g and t else None


def _agreement(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Engines that must write the same greedy text: the same engine with and without lookahead."""
    out = []
    for n in results:
        if n.endswith("+lookahead") and n.removesuffix("+lookahead") in results:
            a, b = results[n.removesuffix("+lookahead")], results[n]
            same = sum(x.get("text") == y.get("text") for x, y in zip(a, b))
            out.append({"engines": [n.removesuffix("+lookahead"), n], "same_replies": same, "of": len(a)})
    return out


def format_report(rep: dict[str, Any]) -> str:
    cols = ["engine", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "copy_decode_tok_s", "decode_tok_s_vs_ref",
            "codes_per_token", "peak_rss_mb", "correct", "errors"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else (  # noqa: E731
        f"{v:.1f}" if isinstance(v, float) else str(v))
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rep["engines"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    lines.append(f"reference: {rep['reference']}; {rep['prompts']} prompts x {rep['repeat']}, "
                 f"at most {rep['max_tokens']} tokens per reply, greedy")
    for a in rep["agreement"]:
        flag = "" if a["same_replies"] == a["of"] else "  <- DISAGREE"
        lines.append(f"agreement {a['engines'][0]} vs {a['engines'][1]}: {a['same_replies']}/{a['of']} replies identical{flag}")
    lines += [f"skipped {s['engine']}: {s['skipped']}" for s in rep["skipped"]]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in rep["engines"] if r["decode_tok_s"]]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh([r["engine"] for r in rows], [r["decode_tok_s"] for r in rows], color="#2f80ed", label="all prompts")
    ax.barh([r["engine"] for r in rows], [r["copy_decode_tok_s"] or 0 for r in rows], color="#e67e22", alpha=0.5,
            label="copy/edit prompts")
    ax.set_xlabel("decode, base tokens/s (greedy)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
