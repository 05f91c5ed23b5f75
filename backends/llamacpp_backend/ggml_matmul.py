"""Products by q8_0 (or float16) matrices on ggml's CPU kernels (the ``libggml`` that
llama-cpp-python ships, called through ctypes), for the hyper-encoders' large matrices.

At a released model's size the encoders are ~226M float32 parameters each (1.8 GB for the pair),
and a call multiplies a few rows by each matrix: numpy reads every byte of it, so memory and
time go with the bytes. q8_0 (blocks of 32 int8 with one float16 scale, 34 bytes per 32 weights)
is 3.8x fewer bytes, the type the llama.cpp path already merges the adapted model into, and
ggml's kernels for it are the ones llama.cpp runs (activations rounded to q8_0 per block of 32).

``quantize(w, kind)``: (out, in) float32 -> (out, row bytes) uint8 blocks (what the cache
stores). ``QuantMatrix(blocks, kind)``: those blocks in ggml memory; ``m.matmul(x, threads)``:
(N, in) float32 -> (N, out) float32, ``x @ w.T`` within ``kind``'s rounding, on
``threads`` ggml threads of the calling thread (llama.cpp's own OpenMP team when that is the
thread that decodes).
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache
from pathlib import Path

import numpy as np

F32 = 0  # enum ggml_type
TYPES = {"f16": (1, 1, 2), "q8_0": (8, 32, 34)}  # name: (enum ggml_type, weights per block, bytes per block)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def _lib() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(ggml-base, ggml-cpu) as llama-cpp-python loaded them, with the signatures used here."""
    import llama_cpp  # loads libllama and, with it, the ggml libraries (the same handles below)

    libdir = Path(llama_cpp.__file__).parent / "lib"
    base, cpu = ctypes.CDLL(str(libdir / "libggml-base.so")), ctypes.CDLL(str(libdir / "libggml-cpu.so"))
    p, sz, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    for name, res, args in (
        ("ggml_init", p, [_InitParams]), ("ggml_free", None, [p]), ("ggml_tensor_overhead", sz, []),
        ("ggml_graph_overhead_custom", sz, [sz, ctypes.c_bool]), ("ggml_new_tensor_2d", p, [p, ctypes.c_int, i64, i64]),
        ("ggml_get_data", p, [p]), ("ggml_mul_mat", p, [p, p, p]),
        ("ggml_new_graph_custom", p, [p, sz, ctypes.c_bool]), ("ggml_build_forward_expand", None, [p, p]),
        ("ggml_quantize_chunk", sz, [ctypes.c_int, p, p, i64, i64, i64, p]),
        ("ggml_backend_cpu_buffer_from_ptr", p, [p, sz]), ("ggml_backend_tensor_alloc", ctypes.c_int, [p, p, p]),
        ("ggml_backend_buffer_free", None, [p]),
    ):
        f = getattr(base, name)
        f.restype, f.argtypes = res, args
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_cpu_init.restype, cpu.ggml_cpu_init.argtypes = None, []
    cpu.ggml_cpu_init()  # its lookup tables (llama.cpp's CPU backend has made them already; idempotent)
    return base, cpu


def available() -> bool:
    """Whether ggml can be loaded here (llama-cpp-python installed with its shared libraries)."""
    try:
        _lib()
    except (ImportError, OSError, AttributeError):
        return False
    return True


def fits(w: np.ndarray, kind: str) -> bool:
    """Whether (out, in) ``w`` can be stored as ``kind`` (rows a whole number of blocks)."""
    return w.ndim == 2 and w.shape[1] % TYPES[kind][1] == 0


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    """(out, in) float32 -> (out, row bytes) uint8: its rows as ``kind`` blocks (``fits``)."""
    base, _ = _lib()
    w = np.ascontiguousarray(w, dtype=np.float32)
    (out, n), (t, per, size) = w.shape, TYPES[kind]
    blocks = np.empty((out, n // per * size), dtype=np.uint8)
    base.ggml_quantize_chunk(t, w.ctypes.data, blocks.ctypes.data, 0, out, n, None)
    return blocks


_scratch = threading.local()  # .buf: a calling thread's memory for its products (grown, never shrunk)


class QuantMatrix:
    """A ``kind`` matrix: ``quantize``'s blocks, read by ggml where they lie (an array of ours, or a
    view of the memory-mapped encoder cache: nothing is copied, and the pages are read as the
    products first need them, as llama.cpp reads its own mapped GGUF)."""

    def __init__(self, blocks: np.ndarray, kind: str):
        base, _ = _lib()
        t, per, size = TYPES[kind]
        if not blocks.flags.c_contiguous:
            blocks = np.ascontiguousarray(blocks)
        self._blocks = blocks  # keeps the memory (or the map) alive for ggml
        self.out, self.inp, self.nbytes = blocks.shape[0], blocks.shape[1] // size * per, blocks.nbytes  # (out, in)
        self._ctx = base.ggml_init(_InitParams(2 * base.ggml_tensor_overhead(), None, True))  # metadata only
        self._t = base.ggml_new_tensor_2d(self._ctx, t, self.inp, self.out)  # ne0 = in: ggml's rows are ours
        # a CPU buffer over the blocks' memory; ggml wants its start aligned, so it starts at their page
        at = blocks.ctypes.data
        page = at & ~4095
        self._buf = base.ggml_backend_cpu_buffer_from_ptr(page, at + self.nbytes - page)
        if not self._buf or base.ggml_backend_tensor_alloc(self._buf, self._t, at) != 0:
            raise MemoryError("ggml could not take an encoder matrix's memory")

    def matmul(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """(N, in) float32 -> (N, out) float32: ``x @ w.T`` on ``threads`` ggml threads."""
        base, cpu = _lib()
        x = np.ascontiguousarray(x, dtype=np.float32)
        N = x.shape[0]
        over, nodes = base.ggml_tensor_overhead(), 4
        # x, the result and the graph, then ggml's work buffer: x in the weights' dot type (at most
        # float32's size), a cache line per thread
        need = 4 * over + base.ggml_graph_overhead_custom(nodes, False) + 2 * x.nbytes + 4 * N * self.out + 64 * (threads + 4) + 4096
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.nbytes < need + 64:
            buf = _scratch.buf = np.empty(need + 64, dtype=np.uint8)
        at = -buf.ctypes.data % 64  # ggml wants its memory aligned
        ctx = base.ggml_init(_InitParams(buf.nbytes - at, buf.ctypes.data + at, False))
        try:
            xt = base.ggml_new_tensor_2d(ctx, F32, self.inp, N)
            ctypes.memmove(base.ggml_get_data(xt), x.ctypes.data, x.nbytes)
            y = base.ggml_mul_mat(ctx, self._t, xt)  # (out, N) in ggml's order: (N, out) row-major
            graph = base.ggml_new_graph_custom(ctx, nodes, False)
            base.ggml_build_forward_expand(graph, y)
            status = cpu.ggml_graph_compute_with_ctx(ctx, graph, max(1, threads))
            if status != 0:
                raise RuntimeError(f"ggml could not multiply by an encoder matrix (status {status})")
            out = np.empty((N, self.out), dtype=np.float32)
            ctypes.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
            return out
        finally:
            base.ggml_free(ctx)

    def __del__(self) -> None:
        base = _lib()[0]
        if getattr(self, "_buf", None):
            base.ggml_backend_buffer_free(self._buf)  # the buffer's record: the memory is the blocks'
            self._buf = None
        if getattr(self, "_ctx", None):
            base.ggml_free(self._ctx)
            self._ctx = None
