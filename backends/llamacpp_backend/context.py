"""One llama.cpp model and context over llama-cpp-python's low-level API (``llama_cpp``).

``LlamaContext(model_path, adapter_path, n_ctx, n_threads)`` loads the model (and a LoRA adapter
GGUF; ``n_ctx`` 0 is ``default_window``, ``n_threads`` None ``default_threads``), creates a context with ``embeddings=True`` and pooling NONE, and decodes batches of
*input embeddings* (``llama_batch.embd``; tokens NULL), or of token ids (``decode_ids``).
``decode(rows, pos0)`` returns the
base-vocabulary logits and the final hidden state of the last row. With embeddings on and
pooling NONE, llama.cpp's per-token "embedding" is ``result_norm``: the RMS-normed state that
feeds the LM head (checked in ``tests/test_llamacpp.py``: hidden @ head.T == logits).

llama.cpp requires each batch of a sequence to start at the cache's last position + 1 and to be
contiguous; ``decode`` checks it and raises instead of letting ``llama_decode`` fail. It also
aborts the process on a batch larger than ``n_batch``, so larger inputs are split here.
``decode(..., during=f)`` runs ``f()`` on a side thread while llama.cpp decodes on the calling
thread (ctypes releases the GIL for the call): the backend computes the hyper-encoders' output
vectors there, which the step needs only after llama.cpp returns. The backend does that only on a
CPU llama.cpp's threads leave free (``spare_cpu``): beside busy llama.cpp threads it gained nothing
(README, "llama.cpp"). llama.cpp stays on the calling thread because its OpenMP thread team
belongs to the thread that calls it: a second calling thread makes a second team, and with more
OpenMP threads than cores libgomp stops spinning at barriers, and every decode in the process, ours
and any other, slowed by half (13.5 -> 21-26 ms per step on the default model here).
``exact=True`` turns flash attention off and keeps the KV cache in float32: logits within 1e-6 of a
float32 reference instead of ~1e-3 (the parity tests use it). The default keeps llama.cpp's own
settings (flash attention, f16 KV cache), which prefill faster (README, "llama.cpp").
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from pathlib import Path

import numpy as np

from z2z_chat.backends.errors import BackendError

N_BATCH = 512
_LOG_CALLBACK = None  # kept alive for the whole process: llama.cpp calls it from C


def _quiet_and_init():
    """Silence llama.cpp's logging (it would write over a full-screen UI) and init the backend once.

    Also caps numpy's BLAS at one thread: OpenBLAS threads spin while they wait, and on a small
    CPU they steal the cores llama.cpp's own threads need (README, "llama.cpp"). The numpy work
    per step (the hyper logits) is one small product anyway; the encoders run on ggml."""
    global _LOG_CALLBACK
    import llama_cpp as L
    from threadpoolctl import threadpool_limits

    if _LOG_CALLBACK is None:
        threadpool_limits(1, user_api="blas")
        _LOG_CALLBACK = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        L.llama_backend_init()
    return L


DEFAULT_WINDOW = 8192


def default_window(n_ctx_train: int) -> int:
    """Positions of the context window: ``Z2Z_CONTEXT``, else the model's own up to 8,192.
    llama.cpp allocates the whole window's KV cache up front: a 128k-position Phi-3.5-mini window
    is 48 GB of f16 cache, 8,192 positions 3 GB, SmolLM2-135M's 8,192 180 MB."""
    env = os.environ.get("Z2Z_CONTEXT")
    if env:
        # below one batch llama.cpp aborts the process on the first prefill; far above the model's
        # own window the cache llama.cpp allocates up front is an out-of-memory kill, not an error
        hi = 4 * max(n_ctx_train, DEFAULT_WINDOW)
        return _env_int("Z2Z_CONTEXT", env, N_BATCH, hi, "positions of the context window")
    return min(n_ctx_train, DEFAULT_WINDOW) if n_ctx_train > 0 else DEFAULT_WINDOW


def _env_int(name: str, text: str, lo: int, hi: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise BackendError(f"{name}={text!r}: the {what}, an integer in [{lo}, {hi}]; unset it for the default")
    return n


def flash_attention(L) -> int:
    """``Z2Z_FLASH_ATTN``: llama.cpp's flash attention ``auto`` (the default: on where the CPU
    backend supports it), ``on`` or ``off``. Measured on this project's 2-core build machine (README,
    "llama.cpp"): it prefills faster everywhere, decodes faster on SmolLM2-135M and 1.3-1.5x slower at
    Phi-3.5-mini's geometry, where ``off`` is llama-cpp-python's default."""
    value = os.environ.get("Z2Z_FLASH_ATTN", "auto")
    kinds = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
             "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}
    if value not in kinds:
        raise BackendError(f"Z2Z_FLASH_ATTN={value!r}: use auto (the default), on or off")
    return kinds[value]


def _cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """``Z2Z_THREADS``, else one thread per physical core this process may use, llama.cpp's own
    default (``-t``); the other hardware threads of those cores are then free for the
    hyper-encoders (``decode(during=...)``). Where the topology is unknown (not Linux), every CPU."""
    env = os.environ.get("Z2Z_THREADS")
    if env:
        return _env_int("Z2Z_THREADS", env, 1, 1024, "threads llama.cpp decodes on")
    cpus, cores = _cpus(), set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(cores))


class LlamaContext:
    def __init__(self, model_path: str | Path, adapter_path: str | Path | None = None, n_ctx: int = 0,
                 n_threads: int | None = None, exact: bool = False):
        L = self.L = _quiet_and_init()
        flash = flash_attention(L)  # a bad setting is refused before the model is read
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise BackendError(f"llama.cpp could not load {model_path} (unsupported architecture or damaged file)")
        self.ctx = self.adapter = None
        try:
            self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
            cp = L.llama_context_default_params()
            cp.n_ctx = n_ctx or default_window(self.n_ctx_train)
            cp.n_batch = cp.n_ubatch = N_BATCH
            cp.n_seq_max = 1
            self.n_threads = cp.n_threads = cp.n_threads_batch = n_threads or default_threads()
            # a CPU llama.cpp's threads leave free: only then does work overlapped with a decode run
            # beside it instead of taking turns with llama.cpp's threads (module docstring)
            self.cpus = len(_cpus())
            self.spare_cpu = self.cpus > self.n_threads
            cp.embeddings = True
            cp.pooling_type = L.LLAMA_POOLING_TYPE_NONE
            cp.no_perf = True
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED if exact else flash
            if exact:
                cp.type_k = cp.type_v = L.GGML_TYPE_F32
            self.ctx = L.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise BackendError(f"llama.cpp could not create a context of {cp.n_ctx} positions for {model_path} "
                                   "(out of memory?): set Z2Z_CONTEXT to fewer positions")
            if adapter_path is not None:
                self.adapter = L.llama_adapter_lora_init(self.model, str(adapter_path).encode())
                if not self.adapter:
                    raise BackendError(f"llama.cpp could not apply the LoRA adapter {adapter_path} "
                                       "(made for another model?)")
                ads = (L.llama_adapter_lora_p_ctypes * 1)(self.adapter)
                if L.llama_set_adapters_lora(self.ctx, ads, 1, (ctypes.c_float * 1)(1.0)) != 0:
                    raise BackendError(f"llama.cpp refused the LoRA adapter {adapter_path}")
            self.n_ctx = L.llama_n_ctx(self.ctx)
            self.n_embd = L.llama_model_n_embd(self.model)
            self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
            self.mem = L.llama_get_memory(self.ctx)
            self.batch = L.llama_batch_init(N_BATCH, self.n_embd, 1)  # embd set, token NULL
            self.id_batch = L.llama_batch_init(N_BATCH, 0, 1)  # token set: steps of base ids, plain llama.cpp
        except BaseException:
            self.close()
            raise
        self.n_past = 0
        self._side: ThreadPoolExecutor | None = None  # made at the first decode with ``during``

    def decode(self, rows: np.ndarray, pos0: int, every_row: bool = False,
               during: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Feed (T, D) input embeddings at positions pos0 .. pos0 + T - 1; logits (n_vocab,) and hidden
        state (D,) of the last row, or (T, n_vocab) and (T, D) with ``every_row``. ``during`` runs
        on a side thread meanwhile (module docstring)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd or rows.shape[0] == 0:
            raise BackendError(f"input rows must be (T >= 1, {self.n_embd}), got {rows.shape}")
        return self._decode(self.batch, rows, pos0, every_row, during)

    def decode_ids(self, ids: np.ndarray, pos0: int, every_row: bool = False,
                   during: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token-id input (what plain llama.cpp does; llama.cpp looks the embedding rows up), as
        ``decode``."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if ids.ndim != 1 or ids.shape[0] == 0 or ids.min() < 0 or ids.max() >= self.n_vocab:
            raise BackendError(f"token ids must be at least one id in [0, {self.n_vocab})")
        return self._decode(self.id_batch, ids, pos0, every_row, during)

    def _decode(self, b, data: np.ndarray, pos0: int, every_row: bool = False,
                during: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        T = data.shape[0]
        if every_row and T > N_BATCH:  # llama.cpp keeps the outputs of the last batch only
            raise BackendError(f"every_row decodes at most {N_BATCH} rows")
        if pos0 != self.n_past:
            raise BackendError(f"llama.cpp needs contiguous positions: the cache ends at {self.n_past - 1}, "
                               f"the input starts at {pos0}")
        if pos0 + T > self.n_ctx:
            raise BackendError(f"the context window ({self.n_ctx} positions) is full")
        if during is not None and self._side is None:
            self._side = ThreadPoolExecutor(1, thread_name_prefix="z2z-side")
        job = None if during is None else self._side.submit(during)
        try:
            self._feed(b, data, pos0, every_row)
        finally:
            if job is not None:
                _wait(job)
        if job is not None:
            job.result()  # its error, if it raised
        return self._outputs(T, every_row)

    def _feed(self, b, data: np.ndarray, pos0: int, every_row: bool) -> None:
        L, T = self.L, data.shape[0]
        for s in range(0, T, N_BATCH):
            chunk = data[s:s + N_BATCH]
            n = chunk.shape[0]
            ctypes.memmove(b.embd if b is self.batch else b.token, chunk.ctypes.data, chunk.nbytes)
            for i in range(n):
                b.pos[i] = pos0 + s + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if every_row or s + i == T - 1 else 0  # only rows that are read
            b.n_tokens = n
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                L.llama_memory_seq_rm(self.mem, 0, pos0, -1)  # leave the cache as it was
                raise BackendError(f"llama_decode failed with status {rc}"
                                   + (" (KV cache full)" if rc == 1 else ""))
        self.n_past = pos0 + T

    def _outputs(self, T: int, every_row: bool) -> tuple[np.ndarray, np.ndarray]:
        L = self.L
        if every_row:
            logits, hidden = L.llama_get_logits(self.ctx), L.llama_get_embeddings(self.ctx)
            if not logits or not hidden:
                raise BackendError("llama.cpp returned no outputs")
            return (np.ctypeslib.as_array(logits, shape=(T, self.n_vocab)).copy(),
                    np.ctypeslib.as_array(hidden, shape=(T, self.n_embd)).copy())
        logits = L.llama_get_logits_ith(self.ctx, -1)
        hidden = L.llama_get_embeddings_ith(self.ctx, -1)
        if not logits or not hidden:
            raise BackendError("llama.cpp returned no output for the last position")
        return (np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy(),
                np.ctypeslib.as_array(hidden, shape=(self.n_embd,)).copy())

    def trim(self, n: int) -> None:
        if n <= 0:
            return
        keep = max(self.n_past - n, 0)
        if not self.L.llama_memory_seq_rm(self.mem, 0, keep, -1):
            raise BackendError("llama.cpp could not remove positions from its KV cache")
        self.n_past = keep

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)
        self.n_past = 0

    def seq_bytes(self) -> int:
        return int(self.L.llama_state_seq_get_size(self.ctx, 0))

    def save_seq(self) -> bytes:
        """The KV cache of the sequence as bytes (its length, not the window's: a short conversation
        parks small)."""
        L = self.L
        n = self.seq_bytes()
        buf = (ctypes.c_uint8 * n)()
        if L.llama_state_seq_get_data(self.ctx, buf, n, 0) != n:
            raise BackendError("llama.cpp could not save a conversation's KV cache")
        return bytes(buf)

    def load_seq(self, data: bytes | memoryview | None, n_past: int) -> None:
        """Replace the KV cache with one ``save_seq`` returned (None: empty) of ``n_past`` positions."""
        self.clear()
        if data:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if self.L.llama_state_seq_set_data(self.ctx, buf, len(data), 0) == 0:
                raise BackendError("llama.cpp could not restore a conversation's KV cache (out of memory?)")
            held = self.L.llama_memory_seq_pos_max(self.mem, 0) + 1
            if held != n_past:  # positions are contiguous from 0: the last one says how many it holds
                self.clear()
                raise BackendError(f"a saved KV cache holds {held} positions, not {n_past}")
        self.n_past = n_past

    def close(self) -> None:
        L = getattr(self, "L", None)
        if L is None:
            return
        if getattr(self, "_side", None) is not None:
            self._side.shutdown()
            self._side = None
        for name in ("batch", "id_batch"):
            if getattr(self, name, None) is not None:
                L.llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.adapter:
            L.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


def _wait(job: Future) -> None:
    """Wait for ``job`` to end even through Ctrl-C (it writes the state the next step reads), then
    raise the interrupt."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait_all([job])
            break
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted
