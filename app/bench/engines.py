"""The engines ``z2z-bench compare`` runs, each inside its own worker process (``compare.py``).

- ``Z2Z``: our engine, zip2zip (or the plain base, ``kind="plain"``) on one backend, keeping its
  KV cache and codebook across the turns of a prompt;
- ``Stateless`` engines, given the whole conversation's prompt ids each turn (their real cost):
  ``LlamaCppPython`` (``Llama.create_completion`` on the base GGUF, ``pld``: with
  ``LlamaPromptLookupDecoding``), ``Transformers`` (``generate`` on the same base, ``pld``: with
  ``prompt_lookup_num_tokens``), ``Reference`` (the ``zip2zip`` 0.2.0 package's ``generate``).

``run(turns, max_tokens)`` returns the last turn's reply and its timings; ``build`` makes the
engine a ``Spec`` names.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLD_TOKENS = 10  # drafted tokens per step for both prompt-lookup baselines


@dataclass
class Spec:
    name: str
    kind: str  # z2z | plain | llamacpp | transformers | reference
    backend: str = ""
    lookahead: int = 0
    pld: bool = False
    gguf: str = ""  # llama-cpp-python's file when it is not the base's own (the peer at q8_0: ``peer.py``)


class Z2Z:
    """Our engine: zip2zip (or the plain base, ``plain``) on one backend."""

    def __init__(self, spec: Spec, model: str | None, base: str | None):
        from z2z_chat.backends.runtime import open_plain, open_runtime

        self.rt = open_runtime(model, spec.backend, base=base)
        if spec.kind == "plain":
            self.rt = open_plain(self.rt)
        self.lookahead = spec.lookahead

    def run(self, turns: list[str], max_tokens: int) -> dict[str, Any]:
        from z2z_chat.backends.engine.events import GenerationSettings
        from z2z_chat.app.bench.quality import final_reply

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

        from z2z_chat.backends.llamacpp_backend.context import default_threads

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

        from z2z_chat.backends.torch_backend.checkpoint import load_base

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

        from z2z_chat.backends.torch_backend.checkpoint import load_base

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


def build(spec: Spec, model: str | None, base: str | None, info: dict[str, Any]) -> Any:
    if spec.kind in ("z2z", "plain"):
        os.environ["Z2Z_CONTEXT"] = str(info["n_ctx"])  # llama.cpp's window as llama-cpp-python's (own process)
        return Z2Z(spec, model, base)
    from z2z_chat.backends.loading.sources import load_tokenizer

    # llama-cpp-python's process reads the tokenizer as ours does (no transformers: 80+ MB of its
    # peak memory would be the harness's, not llama.cpp's)
    tok = load_tokenizer(info["tokenizer"], lean=spec.kind == "llamacpp")
    if spec.kind == "llamacpp":
        return LlamaCppPython(spec, spec.gguf or info["gguf"], tok, info["n_ctx"])
    if spec.kind == "transformers":
        return Transformers(spec, info["base"], tok)
    return Reference(info["checkpoint"], info["base"], tok, info["codec"])
