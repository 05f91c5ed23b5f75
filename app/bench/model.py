"""``z2z-bench prefill | decode | chat``: zip2zip against the same model without it, side by side.

"Plain" is the same checkpoint on the same backend fed base ids only (no codebook, no encoders):
the base model as it runs without zip2zip. All throughput is in base-token equivalents per
second, so the two compare directly; every number is measured in this run.

- ``prefill``: prompts of 256/512/1024/2048 base tokens (the paper's Table 5), Python sources.
- ``decode``: after a 256-token prompt, 256 steps of (a) the model's own greedy output and
  (b) "forced" decoding: the canonical codes of a known continuation fed one step at a time
  (plain: its base ids), so the step count and per-step cost reflect real compression even for
  a model that does not emit hypertokens yet.
- ``chat``: time to first token at each turn of a scripted conversation (ours keeps the KV cache
  and codebook; with ``--reference``, the ``zip2zip`` package's ``generate``, which re-encodes the
  whole conversation every turn).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from z2z_chat.backends.codec import CodecConfig, CodecSession
from z2z_chat.backends.engine.events import GenerationSettings
from z2z_chat.backends.engine.generate import generate_codes
from z2z_chat.backends.engine.generate import prefill as prefill_stream
from z2z_chat.backends.runtime import Runtime
from z2z_chat.backends.engine.sampling import Sampler, SamplingSettings
from z2z_chat.backends.engine.steps import Stream, sync_entries
from z2z_chat.app.bench.codec import documents


def _code_ids(rt: Runtime, n: int) -> list[int]:
    docs, _ = documents(rt.tokenizer, "code", 1, n)
    if not docs:
        raise RuntimeError(f"no {n}-token Python source document found on this machine")
    ids = [t for t in docs[0] if t not in rt.codec.disabled_ids]
    return ids[:n]


def _best(f: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def _plain_state(rt: Runtime):
    """Plain = what a user runs without zip2zip: on llama.cpp the base GGUF fed token ids (no adapter,
    no embeddings) at the merged model's type (the peer at its best: ``peer.py``); elsewhere a state
    of the same model fed base ids."""
    if rt.backend_name == "llamacpp":
        from z2z_chat.app.bench.peer import peer_ggufs
        from z2z_chat.backends.runtime import open_plain

        return open_plain(rt, str(peer_ggufs(rt.base)[-1][1])).model.new_state()
    return rt.model.new_state()


def prefill(rt: Runtime, lengths: list[int], repeat: int, progress: Callable[[str], None]) -> list[dict]:
    be, rows = rt.model.new_state(), []
    pb = _plain_state(rt)
    ids_all = _code_ids(rt, max(lengths))
    for n in lengths:
        ids = ids_all[:n]
        if n + 1 > be.context_length:
            progress(f"prefill {n}: longer than the context window ({be.context_length}), skipped")
            continue
        progress(f"prefill {n} tokens")

        def plain() -> None:
            pb.reset()
            pb.forward(ids, list(range(n)))

        def zipped() -> int:
            be.reset()
            s, stream = CodecSession(rt.codec), Stream(rt.config.position_mode)
            stream.extend(s.encode(ids), s)
            sync_entries(be, s)
            be.forward(stream.codes, stream.positions)  # one forward: the figure is throughput
            return len(stream.codes)

        n_codes = zipped()
        tp, tz = _best(plain, repeat), _best(zipped, repeat)
        rho = n_codes / n
        rows.append({"tokens": n, "codes": n_codes, "rho": rho, "plain_tok_s": n / tp, "zip_tok_s": n / tz,
                     "ratio": tp / tz, "target_ratio": 0.9 / rho})
    return rows


class _Forced:
    """A sampler that returns given codes (then greedy): forced decoding through the real loop."""

    def __init__(self, codes: list[int], V: int):
        self.codes, self.argmax = list(codes), Sampler(SamplingSettings(), V)
        self.s, self.V = self.argmax.s, V
        self.greedy = False  # forced codes are not argmax picks: no lookahead over them

    def sample(self, logits, n_allowed: int, repeats=None) -> int:
        return self.codes.pop(0) if self.codes else self.argmax.sample(logits, n_allowed)


def _decode_loop(rt: Runtime, prompt: list[int], steps: int, zip2zip: bool, forced: list[int] | None,
                 be: Any = None, hyper_batch: int = 1) -> dict:
    """One decode run through ``generate_codes``; returns steps, base tokens and seconds spent in
    the step loop. Plain: ``be`` fed base ids (a codec without a codebook)."""
    be, c = be or rt.model.new_state(), rt.codec
    be.reset()
    config = c if zip2zip else CodecConfig(c.base_vocab_size, 0, 1, c.disabled_ids, c.pad_id)
    codec, stream = CodecSession(config), Stream(rt.config.position_mode if zip2zip else "compressed")
    stream.extend(codec.encode(prompt), codec)
    sync_entries(be, codec)
    logits = prefill_stream(be, stream)
    sampler = Sampler(SamplingSettings(), c.base_vocab_size)
    if forced is not None:  # an eos is fed on like any code
        feed = CodecSession.from_dict(codec.to_dict()).encode(forced)
        sampler, steps = _Forced(feed, c.base_vocab_size), len(feed)
    n = base_tokens = 0
    t = time.perf_counter()
    # each yielded step was preceded by one forward; the (steps + 1)-th yield closes the last one
    settings = GenerationSettings(max_tokens=1 << 20, hyper_batch=hyper_batch if zip2zip else 1)
    for step in generate_codes(be, codec, stream, logits, settings, stop_ids=frozenset(),
                               context_length=be.context_length, sampler=sampler):
        if n == steps or step.reason is not None:
            break
        n += 1
        base_tokens += len(step.ids)
    return {"steps": n, "base_tokens": base_tokens, "seconds": time.perf_counter() - t}


def decode(rt: Runtime, prompt_tokens: int, steps: int, progress: Callable[[str], None],
           hyper_batch: int = 1, rounds: int = 1) -> list[dict]:
    """Own and forced decoding, plain vs zip2zip; on llama.cpp also forced decoding with the
    output encoder placed the other way (beside llama.cpp's step where it runs before it by
    default, or before where it runs beside: ``LlamaContext.spare_cpu``), and llama-cpp-python's
    loop. With ``rounds`` the plain and zip2zip runs of a row alternate that many times and the row
    gives each side's median run: timings here drift within a run by more than the differences
    measured (a first run also pays for reading the model's pages)."""
    ids = _code_ids(rt, prompt_tokens + steps)
    prompt, cont = ids[:prompt_tokens], ids[prompt_tokens:prompt_tokens + steps]
    pb = _plain_state(rt)

    def alternate(mode: str, forced: list[int] | None) -> dict:
        ps, zs = [], []
        for r in range(rounds):
            tag = f"decode ({mode}{f', round {r + 1}/{rounds}' if rounds > 1 else ''})"
            progress(f"{tag}: plain")
            ps.append(_decode_loop(rt, prompt, steps, False, forced, pb))
            progress(f"{tag}: zip2zip")
            zs.append(_decode_loop(rt, prompt, steps, True, forced, hyper_batch=hyper_batch))
        return _row(mode, _median(ps), _median(zs))

    rows = [alternate("own", None), alternate("forced", cont)]
    if rt.backend_name == "llamacpp":
        ctx = rt.model.ctx
        ctx.spare_cpu = not ctx.spare_cpu
        try:
            rows.append(alternate("forced, encoder " + ("beside" if ctx.spare_cpu else "before"), cont))
        finally:
            ctx.spare_cpu = not ctx.spare_cpu
        progress("decode: llama-cpp-python Llama.create_completion on the base GGUF")
        rows.append(_create_completion(rt, prompt, steps))
    return rows


def _median(runs: list[dict]) -> dict:
    """The run with the median time per step (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["seconds"] / max(r["steps"], 1))[(len(runs) - 1) // 2]


def _row(mode: str, p: dict, z: dict) -> dict:
    step_p, step_z = p["seconds"] / p["steps"], z["seconds"] / z["steps"]
    return {"mode": mode, "plain_steps": p["steps"], "zip_steps": z["steps"],
            "zip_base_tokens": z["base_tokens"], "plain_ms_step": step_p * 1e3, "zip_ms_step": step_z * 1e3,
            "step_overhead": step_z / step_p - 1,
            "plain_tok_s": p["base_tokens"] / p["seconds"], "zip_tok_s": z["base_tokens"] / z["seconds"],
            "ratio": (z["base_tokens"] / z["seconds"]) / (p["base_tokens"] / p["seconds"])}


def _create_completion(rt: Runtime, prompt: list[int], steps: int) -> dict:
    """What a user would run instead: llama-cpp-python's high-level API, greedy, same threads, on the
    base at the merged model's type (the peer at its best: ``peer.py``)."""
    from llama_cpp import Llama

    from z2z_chat.app.bench.peer import peer_ggufs

    ctx = rt.model.ctx
    llm = Llama(model_path=str(peer_ggufs(rt.base)[-1][1]), n_ctx=ctx.n_ctx, n_threads=ctx.n_threads,
                n_threads_batch=ctx.n_threads, verbose=False)
    llm.create_completion(prompt[:8], max_tokens=2, temperature=0.0)  # warm-up
    # create_completion is generate() plus text handling; generate() lets the clock start at the
    # first sampled token, so the figure is decode alone (an eos is decoded on, like ours)
    n, t_first = 0, 0.0
    t = time.perf_counter()
    for _ in llm.generate(prompt, temp=0.0, reset=True):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if n == steps + 1:
            break
    dt = time.perf_counter() - t_first
    llm.close()
    return {"mode": "create_completion", "plain_steps": n - 1, "plain_ms_step": dt / (n - 1) * 1e3,
            "plain_tok_s": (n - 1) / dt, "ttft_s": t_first - t}

CHAT_SCRIPT = [
    "Write a Python function that returns the squares of a list of numbers.",
    "Now make it skip negative numbers.",
    "Add a docstring and type hints.",
    "Write a test for it with pytest.",
    "Explain what a list comprehension is.",
    "Rewrite the function with a for loop instead.",
    "What is the time complexity?",
    "Write a version that works on a generator.",
    "Summarize what we did so far.",
    "Thank you! One more: reverse a string in Python.",
]


def chat(rt: Runtime, turns: int, reply_tokens: int, reference: Any, progress: Callable[[str], None]) -> list[dict]:
    from z2z_chat.backends.engine.events import Done

    session = rt.session()
    settings = GenerationSettings(max_tokens=reply_tokens)
    rows, history = [], []
    for i, text in enumerate((CHAT_SCRIPT * 2)[:turns]):
        progress(f"chat turn {i + 1}/{turns}")
        done = [e for e in session.send(text, settings) if isinstance(e, Done)][-1]
        row = {"turn": i + 1, "ttft_s": done.stats.ttft_s, "prompt_codes": done.stats.prompt_codes,
               "context_codes": len(session.codes)}
        history = session.messages
        if reference is not None:
            row["reference_ttft_s"] = reference(history[:-1])
        rows.append(row)
    return rows


def reference_ttft(rt: Runtime, checkpoint_dir: str, base_dir: str) -> Callable[[list[dict]], float]:
    """Time to first token of the zip2zip package's generate on the whole conversation so far.

    The package loads its tokenizer from ``base_model_name_or_path``, so it gets a copy of the
    checkpoint whose config names ``base_dir`` (an HF directory of the base model)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    import zip2zip_compression as zc
    from transformers import AutoModelForCausalLM
    from zip2zip.model import Zip2ZipModel

    tmp = Path(tempfile.mkdtemp(prefix="z2z-ref-"))
    shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
    cfg = json.loads((tmp / "zip2zip_config.json").read_text()) | {"base_model_name_or_path": str(base_dir)}
    (tmp / "zip2zip_config.json").write_text(json.dumps(cfg))
    ref = Zip2ZipModel.from_pretrained(str(tmp), base_model=AutoModelForCausalLM.from_pretrained(base_dir)).eval()
    c = rt.codec
    comp = zc.LZWCompressor(c.base_vocab_size, c.max_codebook_size, c.max_merge_size, c.pad_id, sorted(c.disabled_ids))

    def ttft(messages: list[dict]) -> float:
        t = time.perf_counter()
        text = rt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        codes = comp.encode(rt.tokenizer(text, add_special_tokens=False)["input_ids"])[0]
        with torch.no_grad():
            ref.generate(input_ids=torch.tensor([codes]), max_new_tokens=1, do_sample=False,
                         attention_mask=torch.ones(1, len(codes), dtype=torch.long))
        return time.perf_counter() - t

    return ttft


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "(nothing measured)"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(fmt(r.get(k, "")).rjust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)
