"""torch: ``TorchModel`` (a ``Zip2ZipLM``, shared) and ``TorchState`` (one conversation's
transformers KV cache and hyper vectors), the decode protocol of ``backends/protocol.py``.

Per decode step the work is one decoder step, the encoders on the step's new entry (and the
candidate's output side), and one (C_live, D) matrix-vector product for the hyper logits.
``pick_device("auto")`` prefers CUDA (bf16), then MPS (fp16), then the CPU (fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from z2z_chat.backends import kv_tensors
from z2z_chat.backends.codec import CodecConfig
from z2z_chat.backends.config import Zip2ZipConfig
from z2z_chat.backends.errors import BackendError
from z2z_chat.backends.protocol import Loaded
from z2z_chat.backends.hyper import Entry, Mask, saved_vectors
from z2z_chat.backends.loading.sources import context_length_of
from z2z_chat.backends.torch_backend import checkpoint
from z2z_chat.backends.torch_backend.model import Zip2ZipLM


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: no CUDA device is available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError("--device mps: MPS is not available here")
    if dtype == "auto":
        dt = {"cuda": torch.bfloat16, "mps": torch.float16}.get(dev.type, torch.float32)
    else:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return dev, dt


def open_model(path: str, base: str | None = None, device: str = "auto", dtype: str = "auto",
               progress=None) -> Loaded:
    """The backend's entry point (``protocol.Loaded``)."""
    dev, dt = pick_device(device, dtype)
    ck = checkpoint.load(path, base=base, device=dev, dtype=dt)
    return Loaded(TorchModel(ck.model), ck.tokenizer, ck.config, ck.codec, ck.base, _where(dev, dt))


def open_base(spec: str, tokenizer: Any, codec: CodecConfig, config: Zip2ZipConfig, device: str = "auto",
              dtype: str = "auto") -> Loaded:
    """The base model ``spec`` alone (no zip2zip: C = 0), with a zip2zip model's tokenizer, for
    side-by-side comparisons on the same engine."""
    dev, dt = pick_device(device, dtype)
    lm = checkpoint.load_base(spec, dt, dev)
    plain = CodecConfig(codec.base_vocab_size, 0, 1, codec.disabled_ids, codec.pad_id)
    return Loaded(PlainTorchModel(lm, codec.base_vocab_size), tokenizer, replace(config, position_mode="compressed"),
                  plain, spec, _where(dev, dt))


def _where(dev: torch.device, dt: torch.dtype) -> str:
    return f"{dev.type} {str(dt).removeprefix('torch.')}"


class _CachedDecoder:
    """What both torch backends share: a transformers KV cache and its trim/reset."""

    lm: torch.nn.Module

    def _new_cache(self) -> None:
        self.cache = DynamicCache(config=self.lm.config)

    def _tensors(self, codes: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.lm.parameters()).device
        return torch.tensor([list(codes)], device=dev), torch.tensor([list(positions)], device=dev)

    def trim(self, n: int) -> None:
        if n > 0:
            self.cache.crop(-n)

    def kv_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.nbytes for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))

    def close(self) -> None:
        self.cache = None


class TorchModel:
    """The loaded zip2zip model; every ``new_state()`` shares its weights."""

    def __init__(self, model: Zip2ZipLM):
        self.z2z = model.eval()
        self.context_length = context_length_of(model.lm.config)

    def new_state(self) -> TorchState:
        return TorchState(self.z2z)

    def close(self) -> None:
        pass


class TorchState(_CachedDecoder):
    def __init__(self, model: Zip2ZipLM):
        self.model = model.eval()
        self.lm = model.lm
        self.hyper = model.new_cache()  # this session's hypertoken vectors
        self.context_length = context_length_of(self.lm.config)
        self._new_cache()

    @torch.inference_mode()
    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        self.model.add_entries(entries, candidate, self.hyper)

    def drop_entries(self, keep: int) -> None:
        self.hyper.slots.drop(keep)

    @torch.inference_mode()
    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        ids, pos = self._tensors(codes, positions)
        h = self.model.hidden(ids, pos, self.cache, self.hyper)  # (1, T, D)
        return self.model.logits(h[0, -1], self.hyper).float().cpu().numpy()  # (V + C,)

    @torch.inference_mode()
    def forward_all(self, codes: Sequence[int], positions: Sequence[int], masks: Sequence[Mask]) -> np.ndarray:
        """Logits (T, V + C) of every position, each masked as inference masks it there."""
        ids, pos = self._tensors(codes, positions)
        h = self.model.hidden(ids, pos, self.cache, self.hyper)[0]  # (T, D)
        return self.model.position_logits(h, masks, self.hyper)

    def reset(self) -> None:
        self._new_cache()
        self.model.reset_entries(self.hyper)

    def export_kv(self) -> tuple[bytes, int]:
        """The KV cache and the live hyper vectors as safetensors bytes (``backends/kv_tensors.py``)."""
        layers = self.cache.layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise BackendError("a sliding-window KV cache is not saved")  # it holds only the window
        h, slots = self.hyper, self.hyper.slots
        t = {name: x.contiguous() for (k, v), layer in zip(kv_tensors.kv_names(len(layers)), layers)
             for name, x in ((k, layer.keys), (v, layer.values))}
        t |= {"hyper_in": h.hyper_in[:slots.n_created], "hyper_out": h.hyper_out[:slots.live],
              "rows": torch.from_numpy(slots.rows[:slots.live].copy()),
              "created": torch.tensor([slots.n_created], dtype=torch.int64)}
        return safetensors.torch.save(t), self.cache.get_seq_length()

    @torch.inference_mode()
    def import_kv(self, data: bytes, n_past: int, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        try:
            t = safetensors.torch.load(bytes(data))
        except safetensors.SafetensorError as e:
            raise BackendError(f"a saved KV cache is not readable: {e}") from e
        n_layers = self.lm.config.num_hidden_layers
        rows, created = kv_tensors.check(t, n_layers, n_past, self.hyper.hyper_out.shape[1], self.model.M)
        self.reset()
        dev, dt = self.hyper.hyper_out.device, self.hyper.hyper_out.dtype
        for i, (k, v) in enumerate(kv_tensors.kv_names(n_layers)):
            self.cache.update(t[k].to(dev, dt), t[v].to(dev, dt), i)
        plan = self.hyper.slots.plan(entries, candidate)
        if plan is None:
            return
        ok = saved_vectors(plan, rows, created)
        slots, same = torch.as_tensor(plan.slots, dtype=torch.long), torch.from_numpy(ok)
        entry = torch.arange(len(slots)) < plan.n_new
        out, inp = slots[same], slots[same & entry]  # a candidate has only its output vector
        self.hyper.hyper_out[out.to(dev)] = t["hyper_out"][out].to(dev, dt)
        self.hyper.hyper_in[inp.to(dev)] = t["hyper_in"][inp].to(dev, dt)
        self.model.write_vectors(plan.only(~ok), self.hyper)  # entries made after the export


class PlainTorchModel:
    """The base model without zip2zip, behind the same protocol (no hypertokens, C = 0): the
    baseline that benchmarks and quality comparisons run on the same engine and device."""

    def __init__(self, lm, vocab_size: int):
        self.lm, self.V = lm.eval(), vocab_size
        self.context_length = context_length_of(lm.config)

    def new_state(self) -> PlainTorchState:
        return PlainTorchState(self.lm, self.V)

    def close(self) -> None:
        pass


class PlainTorchState(_CachedDecoder):

    def __init__(self, lm, vocab_size: int):
        self.lm = lm.eval()
        self.V = vocab_size
        self.context_length = context_length_of(self.lm.config)
        self._new_cache()

    def add_entries(self, entries: Sequence[Entry], candidate: Entry | None = None) -> None:
        if entries:
            raise BackendError("the plain base model has no hypertokens")

    def drop_entries(self, keep: int) -> None:
        pass

    @torch.inference_mode()
    def forward(self, codes: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        ids, pos = self._tensors(codes, positions)
        out = self.lm(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1, : self.V].float().cpu().numpy()

    @torch.inference_mode()
    def forward_all(self, codes: Sequence[int], positions: Sequence[int], masks: Sequence[Mask]) -> np.ndarray:
        ids, pos = self._tensors(codes, positions)
        out = self.lm(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True)
        return out.logits[0, :, : self.V].float().cpu().numpy()  # (T, V): prompt-lookup on our engine

    def reset(self) -> None:
        self._new_cache()
