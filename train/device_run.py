"""``python -m z2z_chat.train.device_run OUT [--budget-s 500] [--tiny] [--pack]``: default model v3 by
self-distillation, in one command sized for a GPU lent for minutes (and the same command, with a
bigger budget, on any GPU server).

1. **Prompts by program** (``distill_prompts``): the chat-reuse tasks of
   ``train/recipes/chat_reuse_data.py`` (code edits, lists and records, repeated and quoted
   sentences, capitals and arithmetic follow-ups), their material taken from the running Python's
   standard library and the word lists in that file, so nothing outside the checkout is read;
   the published evaluation prompts are kept out (checked).
2. **The base writes the replies** (``distill``): turn by turn, in batches, greedy, with the
   tokenizer's chat template: the targets are what the base would say, so v3 can be as right as it.
3. **v3 trains from v2** (``train_v3``): LoRA + hyper-encoders from ``--init`` with ``kl_lambda`` to
   the base, bf16 on a GPU, until ``--budget-s`` is spent (``time_budget_s``) or ``--steps`` are done.
4. **Evaluation** (``evaluate``): v3 and the base answer the published set; right answers per
   group, codes per base token, loops to the limit.
5. **OUT** gets ``v3/`` (a checkpoint ``z2z-chat --model`` opens; ``v3.tar.gz`` instead with
   ``--pack``, for tools that return a few files), ``metrics.jsonl`` (the training log),
   ``eval.json`` and ``eval.md`` (the table), ``run.json`` (the training config) and ``timing.json``.

Every phase reports progress on stderr and the whole command keeps to the budget: prompt writing
and evaluation take their share first, training gets what is left. ``--tiny`` rehearses the whole
pipeline on the CPU with a tiny random base (the default model's tokenizer, 2 layers, hidden 64):
a few prompts, a few steps, minutes at most; the tests run it.

Reads from the checkout: ``backends/default_model`` (v2, the tokenizer, the evaluation set) and
``train/recipes``; the base comes from ``--base`` (a hub id on a server with the hub, a local HF
directory or a GGUF file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "train" / "recipes"
EVAL_SET = DEFAULT_MODEL_DIR / "eval" / "prompts.jsonl"
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
Messages = list[dict[str, str]]


def say(message: str) -> None:
    print(f"[device_run {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- 1. prompts ------------------------------------------------------------------------------------

def _recipe(name: str) -> Any:
    """A module of ``train/recipes`` (scripts, not a package: loaded by path, their folder importable)."""
    sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SENTENCES = {  # a few per language: the man pages the CPU recipe reads are not on every machine
    "fr": ["Le train part à huit heures.", "Nous avons lu trois livres cet été.", "La rivière traverse la vieille ville.",
           "Il pleut depuis ce matin.", "Elle répare son vélo dans le garage."],
    "de": ["Der Zug fährt um acht Uhr ab.", "Wir haben im Sommer drei Bücher gelesen.", "Der Fluss fließt durch die Altstadt.",
           "Seit heute Morgen regnet es.", "Sie repariert ihr Fahrrad in der Garage."],
    "es": ["El tren sale a las ocho.", "Leímos tres libros este verano.", "El río cruza el casco antiguo.",
           "Llueve desde esta mañana.", "Ella arregla su bicicleta en el garaje."],
    "zh": ["火车八点出发。", "今年夏天我们读了三本书。", "河流穿过老城区。", "从早上开始一直在下雨。", "她在车库里修自行车。"],
    "ja": ["電車は八時に出発します。", "この夏に本を三冊読みました。", "川が旧市街を流れています。", "朝から雨が降っています。",
           "彼女はガレージで自転車を直しています。"],
    "ko": ["기차는 여덟 시에 출발합니다.", "올여름에 책을 세 권 읽었습니다.", "강이 구시가지를 지나갑니다.", "아침부터 비가 옵니다.",
           "그녀는 차고에서 자전거를 고칩니다."],
}


def distill_prompts(n: int, seed: int) -> list[list[str]]:
    """``n`` conversations as their user turns (the base answers each in turn)."""
    reuse = _recipe("chat_reuse_data")

    class PortableMaterial(reuse.Material):  # the same tasks, from what every machine has
        def __init__(self) -> None:
            self.functions = reuse.stdlib_functions()
            self.renamable = [f for f in self.functions if len(reuse.identifiers(f)) >= 2]
            english = [s for mod in ("argparse", "textwrap", "json", "pathlib", "random", "statistics")
                       for s in reuse.sentences(__import__(mod).__doc__ or "")]
            self.sentences = {"en": sorted(set(english))} | {k: list(v) for k, v in SENTENCES.items()}
            for lang, s in self.sentences.items():
                self.sentences[lang] = [x for x in s if not any(w in x for w in reuse.EVAL_WORDS)] or s

        def sentence(self, rng: random.Random, lang: str = "en", k: int = 1) -> str:
            k = min(k, len(self.sentences[lang]) - 1)
            return super().sentence(rng, lang, k)

    convs = reuse.conversations(PortableMaterial(), n, random.Random(seed))
    reuse.check_eval_kept_out(convs, EVAL_SET)
    return [[m["content"] for m in c if m["role"] == "user"] for c in convs]


# --- 2. the base writes the replies ---------------------------------------------------------------

def distill(base: Any, tok: Any, prompts: list[list[str]], max_new_tokens: int, batch: int,
            deadline: float) -> list[Messages]:
    """The base's greedy replies, turn by turn, ``batch`` conversations at a time (left-padded);
    conversations not reached by ``deadline`` are left out (the first batch is always written)."""
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out: list[Messages] = []
    for b in range(0, len(prompts), batch):
        if out and time.monotonic() > deadline:
            say(f"distill: the budget ends here, {len(out)} of {len(prompts)} conversations written")
            break
        group = prompts[b:b + batch]
        convs: list[Messages] = [[] for _ in group]
        for turn in range(max(len(p) for p in group)):
            live = [i for i, p in enumerate(group) if turn < len(p)]
            for i in live:
                convs[i].append({"role": "user", "content": group[i][turn]})
            texts = [tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True) for i in live]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
            with torch.no_grad():
                gen = base.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
            for i, row in zip(live, gen[:, enc["input_ids"].shape[1]:]):
                convs[i].append({"role": "assistant", "content": tok.decode(row, skip_special_tokens=True).strip()})
        out += convs
        say(f"distill: {len(out)}/{len(prompts)} conversations")
    return out


# --- 3. training -----------------------------------------------------------------------------------

def train_config(out: Path, base: str, init: str, data: Path, steps: int, budget_s: float, tiny: bool,
                 gpu: bool) -> dict[str, Any]:
    """The v3 recipe (``train/recipes/smollm2-v3.toml``) on the distilled data, sized for the budget."""
    import tomllib

    cfg = tomllib.loads((RECIPES / "smollm2-v3.toml").read_text())
    cfg |= {"base_model": base, "init_from": init, "output": str(out / "run"), "time_budget_s": budget_s,
            "mixed_precision": "bf16" if gpu else "no", "save_every": 10**9, "eval_every": max(steps // 4, 1),
            "log_every": max(steps // 20, 1), "eval_batches": 2 if tiny else 8}
    cfg["data"] = {"seq_len": 128 if tiny else 512, "val_fraction": 0.1 if tiny else 0.03,
                   "cache_dir": str(out / "data-cache"), "sources": [{"path": str(data), "weight": 1.0}]}
    cfg["optim"] |= {"steps": steps, "warmup_steps": max(steps // 20, 1),
                     "tokens_per_batch": 256 if tiny else 16384, "micro_batch_size": 2 if tiny else 16}
    if tiny:  # a tiny base: small encoders and adapter, nothing to start from
        cfg["encoder"] |= {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
        cfg["lora"] = {"r": 4, "alpha": 8}
    return cfg


def train_v3(cfg: dict[str, Any], out: Path) -> Path:
    from z2z_chat.train.config import load_config
    from z2z_chat.train.trainer import train

    path = out / "run.json"  # JSON: the GPU machine may lack a YAML package
    path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    return train(load_config(path), log=say)


# --- 4. evaluation ---------------------------------------------------------------------------------

def evaluate(rt: Any, prompts: list[dict[str, Any]], max_tokens: int, label: str) -> list[dict[str, Any]]:
    """Each prompt's final reply (earlier turns answered first), greedy: right or not, codes per
    base token, whether it looped to the limit."""
    from z2z_chat.backends.engine.events import Done, GenerationSettings, Token

    rows = []
    for i, p in enumerate(prompts):
        session, settings = rt.session(), GenerationSettings(max_tokens=max_tokens)
        for t in p["turns"][:-1]:
            list(session.send(t, settings))
        text, done = "", None
        for ev in session.send(p["turns"][-1], settings):
            text += ev.text if isinstance(ev, Token) else ""
            done = ev if isinstance(ev, Done) else done
        words = text.split()
        grams = [tuple(words[j:j + 4]) for j in range(len(words) - 3)]
        expect = p.get("expect") or []
        rows.append({"group": p["group"], "answer": text.strip(),
                     "correct": any(e.lower() in text.lower() for e in expect) if expect else None,
                     "codes": done.stats.reply_codes, "tokens": done.stats.reply_tokens,
                     "loops": done.reason == "length" and len(grams) >= 8 and len(set(grams)) < len(grams) / 2})
        say(f"eval {label}: {i + 1}/{len(prompts)}")
    return rows


def table(results: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], str]:
    """Right answers per group, codes per token and loops, per model; as data and as Markdown."""
    groups = sorted({r["group"] for rows in results.values() for r in rows})
    summary: dict[str, Any] = {}
    for name, rows in results.items():
        checked = [r for r in rows if r["correct"] is not None]
        summary[name] = {g: f"{sum(r['correct'] for r in checked if r['group'] == g)}/"
                            f"{sum(1 for r in checked if r['group'] == g)}" for g in groups}
        summary[name] |= {"right": f"{sum(r['correct'] for r in checked)}/{len(checked)}",
                          "codes_per_token": round(sum(r["codes"] for r in rows) / max(sum(r["tokens"] for r in rows), 1), 3),
                          "loops": sum(r["loops"] for r in rows)}
    cols = groups + ["right", "codes_per_token", "loops"]
    md = "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    md += "".join(f"| {name} | " + " | ".join(str(s[c]) for c in cols) + " |\n" for name, s in summary.items())
    return summary, md


# --- the command -----------------------------------------------------------------------------------

def tiny_base(out: Path) -> Path:
    """A random 2-layer Llama with the default model's tokenizer and chat template (the rehearsal)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = out / "tiny-base"
    if (d / "config.json").is_file():
        return d
    torch.manual_seed(0)
    vocab = json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rope_theta=100000.0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(DEFAULT_MODEL_DIR / name, d / name)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m z2z_chat.train.device_run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=500, help="the whole command's time (default 500 s)")
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"the base model (default {DEFAULT_BASE})")
    ap.add_argument("--init", default=str(DEFAULT_MODEL_DIR), help="the checkpoint v3 starts from (default: v2)")
    ap.add_argument("--prompts", type=int, default=4000, help="conversations to distill (default 4000)")
    ap.add_argument("--steps", type=int, default=0, help="training steps of the schedule (default 1500; the budget "
                                                         "ends training earlier where it must)")
    ap.add_argument("--tiny", action="store_true", help="rehearse on the CPU with a tiny random base")
    ap.add_argument("--pack", action="store_true", help="write v3 as one v3.tar.gz instead of a directory")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from z2z_chat.backends.runtime import open_plain, open_runtime
    from z2z_chat.train.export import export

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    base, init = (str(tiny_base(out)), "") if args.tiny else (args.base, args.init)
    n = min(args.prompts, 12) if args.tiny else args.prompts
    # the budget's shares: distilling a fifth, evaluation and export a fifth, training the rest
    say(f"{device}; budget {args.budget_s:.0f} s; base {base}")
    prompts = distill_prompts(n, seed=3)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR if args.tiny else base)
    kw = {"gguf_file": Path(base).name} if base.endswith(".gguf") else {}
    src = str(Path(base).parent) if kw else base
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16 if gpu else torch.float32, **kw)
    model.to(device).eval()
    convs = distill(model, tok, prompts, 24 if args.tiny else 256, 4 if args.tiny else 256,
                    t0 + args.budget_s * 0.2)
    del model
    data = out / "distill.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))
    timing["distill_s"] = time.monotonic() - t0
    left = args.budget_s - (time.monotonic() - t0)
    steps = args.steps or (6 if args.tiny else 1500)  # the time budget ends it earlier on a slower GPU
    cfg = train_config(out, base, init, data, steps, max(left - args.budget_s * 0.2, 10), args.tiny, gpu)
    ckpt = train_v3(cfg, out)
    timing["train_s"] = time.monotonic() - t0 - timing["distill_s"]
    v3 = out / "v3"
    export(ckpt, v3, base if args.tiny else DEFAULT_BASE, torch.bfloat16)
    (out / "metrics.jsonl").write_bytes((out / "run" / "metrics.jsonl").read_bytes())
    eval_set = [json.loads(line) for line in EVAL_SET.read_text().splitlines() if line.strip()]
    eval_set = eval_set[:4] if args.tiny else eval_set
    rt = open_runtime(str(v3), "torch", device, base=base, progress=say)
    results = {"v3": evaluate(rt, eval_set, 16 if args.tiny else 160, "v3"),
               "base": evaluate(open_plain(rt, base, device), eval_set, 16 if args.tiny else 160, "base")}
    summary, md = table(results)
    (out / "eval.json").write_text(json.dumps({"summary": summary, "rows": results}, ensure_ascii=False, indent=1))
    (out / "eval.md").write_text(md)
    if args.pack:
        with tarfile.open(out / "v3.tar.gz", "w:gz") as tar:
            tar.add(v3, arcname="v3")
    timing["total_s"] = time.monotonic() - t0
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    say(f"done in {timing['total_s']:.0f} s\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
