"""The hyper-encoders' arithmetic on ggml's CPU kernels: the libggml that llama-cpp-python ships,
called through ctypes, so an encoder call is one graph on llama.cpp's own kernels instead of ~100
numpy calls (their per-call cost was most of a call at the default model's size) and its large
matrices can be q8_0 (at a released 4B model's size the float32 encoders are 1.8 GB, and a call
was bound by reading them).

``quantize(w, kind)``: (out, in) float32 -> (out, row bytes) uint8 blocks of ``kind`` (q8_0: 32
int8 and a float16 scale per 34 bytes; f16), what the encoder cache stores.
``Tensors({name: (array, kind)})``: float32 arrays (numpy's last axis is ggml's first) and such
blocks as ggml tensors over their own memory: nothing is copied (an array of ours, or a view of
the memory-mapped cache whose pages are read when a product first needs them).
``Graph()``: one call: inputs (``input(a)``, a constant; ``feed(f, shape)``, ``f(arg)`` at each
run), ops (``mm``, ``add``, ...), ``run(t, shape, arg, threads)`` -> numpy. It runs on ``threads``
ggml threads of the calling thread: llama.cpp's OpenMP team when that thread is the one that
decodes. A graph used once (a context manager) builds in memory kept per calling thread; a kept
one (``keep=True``) has its own, so it can run again with other feeds: building a graph in
Python costs more than computing a decode step's small one.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from z2z_chat.backends.errors import BackendError

F32, I32 = 0, 26  # enum ggml_type
TYPES = {"f16": (1, 1, 2), "q8_0": (8, 32, 34)}  # name: (enum ggml_type, weights per block, bytes per block)
NODES = 256  # graph size unless told: a 2-layer encoder makes ~80 nodes (``build_encoder`` sizes its own)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def _lib() -> Any:
    """ggml-base with ggml-cpu's entry points added, as llama-cpp-python loaded them."""
    import llama_cpp  # loads libllama and, with it, the ggml libraries (the same handles below)

    libdir = Path(llama_cpp.__file__).parent / "lib"
    base, cpu = _load(libdir, "ggml-base"), _load(libdir, "ggml-cpu")
    p, sz, i64, i, f, b = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_bool
    sigs = {
        "ggml_init": (p, [_InitParams]), "ggml_free": (None, [p]), "ggml_tensor_overhead": (sz, []),
        "ggml_graph_overhead_custom": (sz, [sz, b]), "ggml_new_graph_custom": (p, [p, sz, b]),
        "ggml_build_forward_expand": (None, [p, p]), "ggml_set_input": (None, [p]), "ggml_set_output": (None, [p]),
        "ggml_new_tensor_1d": (p, [p, i, i64]), "ggml_new_tensor_2d": (p, [p, i, i64, i64]),
        "ggml_new_tensor_3d": (p, [p, i, i64, i64, i64]), "ggml_new_tensor_4d": (p, [p, i, i64, i64, i64, i64]),
        "ggml_mul_mat": (p, [p, p, p]), "ggml_add": (p, [p, p, p]), "ggml_mul": (p, [p, p, p]),
        "ggml_norm": (p, [p, p, f]), "ggml_gelu_erf": (p, [p, p]), "ggml_soft_max_ext": (p, [p, p, p, f, f]),
        "ggml_reshape_2d": (p, [p, p, i64, i64]), "ggml_reshape_3d": (p, [p, p, i64, i64, i64]),
        "ggml_reshape_4d": (p, [p, p, i64, i64, i64, i64]), "ggml_permute": (p, [p, p, i, i, i, i]),
        "ggml_cont": (p, [p, p]), "ggml_get_rows": (p, [p, p, p]),
        "ggml_quantize_chunk": (sz, [i, p, p, i64, i64, i64, p]),
        "ggml_backend_cpu_buffer_from_ptr": (p, [p, sz]), "ggml_backend_tensor_alloc": (i, [p, p, p]),
        "ggml_backend_buffer_free": (None, [p]), "ggml_backend_cpu_buffer_type": (p, []),
        "ggml_gallocr_new": (p, [p]), "ggml_gallocr_alloc_graph": (b, [p, p]), "ggml_gallocr_free": (None, [p]),
        "ggml_backend_free": (None, [p]),
        "ggml_backend_tensor_set": (None, [p, p, sz, sz]), "ggml_backend_tensor_get": (None, [p, p, sz, sz]),
        "ggml_backend_graph_compute": (i, [p, p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(base, name)
        fn.restype, fn.argtypes = res, args
    for name, (res, args) in {"ggml_cpu_init": (None, []), "ggml_backend_cpu_init": (p, []),
                              "ggml_backend_cpu_set_n_threads": (None, [p, i])}.items():
        fn = getattr(cpu, name)
        fn.restype, fn.argtypes = res, args
        setattr(base, name, fn)
    base.ggml_cpu_init()  # its lookup tables (llama.cpp's CPU backend has made them already; idempotent)
    return base


def _load(libdir: Path, name: str) -> ctypes.CDLL:
    """``name``'s shared library in llama-cpp-python's ``lib`` folder (Linux, macOS or Windows names)."""
    for file in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (libdir / file).is_file():
            return ctypes.CDLL(str(libdir / file))
    raise BackendError(f"llama-cpp-python has no {name} library in {libdir} (the hyper-encoders run on it): "
                       "reinstall llama-cpp-python, or run with --backend torch")


def fits(w: np.ndarray, kind: str) -> bool:
    """Whether (out, in) ``w`` can be stored as ``kind`` (rows a whole number of blocks)."""
    return w.ndim == 2 and w.shape[1] % TYPES[kind][1] == 0


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    """(out, in) float32 -> (out, row bytes) uint8: its rows as ``kind`` blocks (``fits``)."""
    L = _lib()
    w = np.ascontiguousarray(w, dtype=np.float32)
    (out, n), (t, per, size) = w.shape, TYPES[kind]
    blocks = np.empty((out, n // per * size), dtype=np.uint8)
    L.ggml_quantize_chunk(t, w.ctypes.data, blocks.ctypes.data, 0, out, n, None)
    return blocks


class Tensors:
    """Arrays as ggml tensors where they lie: ``{name: (array, kind)}``, kind ``f32`` (float32, up
    to 4-D) or a ``TYPES`` name (``quantize``'s (out, row bytes) blocks: an (in, out) ggml matrix).
    ``self[name]`` is the tensor."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, str]]):
        L = _lib()
        self._arrays, self._bufs, self._t = [], [], {}
        self.ne: dict[int, tuple[int, ...]] = {}  # tensor -> its shape in ggml's order (for ``Graph(check=True)``)
        self._ctx = L.ggml_init(_InitParams((len(arrays) + 1) * L.ggml_tensor_overhead(), None, True))  # metadata
        for name, (a, kind) in arrays.items():
            a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
            self._arrays.append(a)  # keeps the memory (or the map) alive for ggml
            if kind == "f32":
                t, ne = _new(L, self._ctx, a.shape), tuple(reversed(a.shape))
            else:
                typ, per, size = TYPES[kind]
                ne = (a.shape[1] // size * per, a.shape[0])  # (in, out): ggml's rows are the blocks' rows
                t = L.ggml_new_tensor_2d(self._ctx, typ, *ne)
            self.ne[t] = ne
            # a CPU buffer over the array's memory; ggml wants its start aligned, so it starts at its page
            at = a.ctypes.data
            page = at & ~4095
            buf = L.ggml_backend_cpu_buffer_from_ptr(page, at + a.nbytes - page)
            if buf:
                self._bufs.append(buf)
            if not buf or L.ggml_backend_tensor_alloc(buf, t, at) != 0:
                raise MemoryError(f"ggml could not take the memory of encoder weight {name}")
            self._t[name] = t

    def __getitem__(self, name: str) -> int:
        return self._t[name]

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def __del__(self) -> None:
        L = _lib()
        for buf in getattr(self, "_bufs", []):
            L.ggml_backend_buffer_free(buf)  # the buffer's record: the memory is the arrays'
        if getattr(self, "_ctx", None):
            L.ggml_free(self._ctx)


def _new(L: Any, ctx: int, shape: tuple[int, ...]) -> int:
    """A float32 tensor of numpy shape ``shape``."""
    ne = tuple(reversed(shape))  # numpy's last axis is ggml's first
    return getattr(L, f"ggml_new_tensor_{len(ne)}d")(ctx, F32, *ne)


def _records(L: Any, nodes: int, meta: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(memory, address, size) for a graph of ``nodes`` nodes' records, aligned as ggml wants;
    ``meta`` when it is large enough."""
    need = nodes * L.ggml_tensor_overhead() + L.ggml_graph_overhead_custom(nodes, False) + 64  # tensors <= nodes
    if meta.nbytes < need:
        meta = np.empty(need, dtype=np.uint8)
    at = -meta.ctypes.data % 64
    return meta, meta.ctypes.data + at, meta.nbytes - at


class _ThreadState:
    """A calling thread's CPU backend, and the memory of its graphs used once: tensor records and
    ggml's graph allocator (its buffer grows to the largest call); freed with the thread (the side
    thread of each context)."""

    def __init__(self, L: Any):
        self.L, self.meta = L, np.empty(0, dtype=np.uint8)
        self.alloc = L.ggml_gallocr_new(L.ggml_backend_cpu_buffer_type())
        self.cpu = L.ggml_backend_cpu_init()
        self.busy = False

    def __del__(self) -> None:
        self.L.ggml_gallocr_free(self.alloc)
        self.L.ggml_backend_free(self.cpu)


_local = threading.local()  # .state: the calling thread's _ThreadState


class Graph:
    """One encoder call's graph (see the module docstring): a context manager, or with ``keep`` a
    graph that runs again (on the thread that built it) until it is dropped.

    ggml aborts the process on operands whose shapes do not fit. With ``check`` every op checks
    them first (``known``: the shapes of tensors made elsewhere, ``Tensors.ne``) and raises
    ValueError: an encoder is built once that way on a stand-in call, after which its shapes are
    known to fit for any number of entries and of ids in them (the sizes that vary) and calls skip
    the checks."""

    def __init__(self, check: bool = False, known: dict[int, tuple[int, ...]] | None = None,
                 nodes: int = NODES, keep: bool = False):
        L = self.L = _lib()
        st = self._st = getattr(_local, "state", None) or _ThreadState(L)
        _local.state = st
        self.keep, self.nodes, self._inputs, self._graph = keep, nodes, [], None
        if keep:  # its own records and allocator: they outlive this call
            self._meta, at, size = _records(L, nodes, np.empty(0, dtype=np.uint8))
            self._alloc = L.ggml_gallocr_new(L.ggml_backend_cpu_buffer_type())
        else:  # the thread's: one such graph at a time
            if st.busy:
                raise RuntimeError("a ggml graph is already being built on this thread")
            st.meta, at, size = _records(L, nodes, st.meta)
            self._alloc, st.busy = st.alloc, True
        self.ctx = L.ggml_init(_InitParams(size, at, True))
        self.ne = dict(known or {}) if check else None

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            self.L.ggml_free(self.ctx)
            self.ctx, self._st.busy = None, False

    def __del__(self) -> None:
        if self.keep and getattr(self, "ctx", None):
            self.L.ggml_gallocr_free(self._alloc)
            self.L.ggml_free(self.ctx)

    def _op(self, t: int, ne: tuple[int, ...] | None) -> int:
        if self.ne is not None:
            self.ne[t] = ne
        return t

    def _shape(self, t: int) -> tuple[int, ...]:
        ne = self.ne[t]
        return ne + (1,) * (4 - len(ne))

    def need(self, ok: bool, what: str) -> None:
        """ValueError(``what``) unless ``ok``: the checks of ``check``."""
        if not ok:
            raise ValueError(what)

    def input(self, a: np.ndarray) -> int:
        """A float32 constant (copied in at each ``run``)."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        return self.feed(lambda arg: a, a.shape)

    def feed(self, f: Callable[[Any], np.ndarray], shape: tuple[int, ...]) -> int:
        """A float32 input of numpy shape ``shape``: ``f(arg)`` at each ``run``."""
        t = _new(self.L, self.ctx, shape)
        self.L.ggml_set_input(t)
        self._inputs.append((t, f, np.float32))
        return self._op(t, tuple(reversed(shape)))

    def index(self, a: np.ndarray) -> int:
        """A 1-D int32 constant: row numbers for ``take``."""
        a = np.ascontiguousarray(a, dtype=np.int32)
        t = self.L.ggml_new_tensor_1d(self.ctx, I32, len(a))
        self.L.ggml_set_input(t)
        self._inputs.append((t, lambda arg: a, np.int32))
        return self._op(t, (len(a), int(a.max(initial=-1)) + 1))  # (n, rows it needs): checked by ``take``

    def run(self, out: int, shape: tuple[int, ...], arg: Any = None, threads: int = 1) -> np.ndarray:
        """Compute ``out`` on ``threads`` threads, the feeds given ``arg``, and return it as a float32
        array of ``shape`` (numpy's axis order). A kept graph's first run ends its building."""
        L = self.L
        if self._graph is None:
            if self.ne is not None:
                self.need(int(np.prod(self._shape(out))) == int(np.prod(shape)), f"output {self.ne[out]} is not {shape}")
            L.ggml_set_output(out)
            self._graph = L.ggml_new_graph_custom(self.ctx, self.nodes, False)
            L.ggml_build_forward_expand(self._graph, out)
            # a kept graph's buffers are its own allocator's: placed once
            if not L.ggml_gallocr_alloc_graph(self._alloc, self._graph):
                raise MemoryError("ggml could not allocate an encoder call's memory")
        # every input set at each run: the allocator may reuse an input's memory once it is read
        for t, f, dtype in self._inputs:
            a = np.ascontiguousarray(f(arg), dtype=dtype)
            L.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
        L.ggml_backend_cpu_set_n_threads(self._st.cpu, max(1, threads))
        status = L.ggml_backend_graph_compute(self._st.cpu, self._graph)
        if status != 0:
            raise RuntimeError(f"ggml could not compute an encoder call (status {status})")
        res = np.empty(shape, dtype=np.float32)
        L.ggml_backend_tensor_get(out, res.ctypes.data, 0, res.nbytes)
        return res

    # ops, in ggml's axis order (ne0 first); with ``check``, shapes as ggml asserts them
    def mm(self, a: int, b: int) -> int:
        """a (K, R, ...), b (K, S, ...) -> (R, S, ...): b @ a.T per batch; a is the weight."""
        ne = None
        if self.ne is not None:
            x, y = self._shape(a), self._shape(b)
            self.need(x[0] == y[0] and y[2] % x[2] == 0 and y[3] % x[3] == 0, f"cannot multiply {x} by {y}")
            ne = (x[1], y[1], y[2], y[3])
        return self._op(self.L.ggml_mul_mat(self.ctx, a, b), ne)

    def _broadcast(self, a: int, b: int, what: str) -> tuple[int, ...] | None:
        if self.ne is None:
            return None
        x, y = self._shape(a), self._shape(b)
        self.need(all(i % j == 0 for i, j in zip(x, y)), f"cannot {what} {y} to {x}")
        return x

    def add(self, a: int, b: int) -> int:
        return self._op(self.L.ggml_add(self.ctx, a, b), self._broadcast(a, b, "add"))

    def mul(self, a: int, b: int) -> int:
        return self._op(self.L.ggml_mul(self.ctx, a, b), self._broadcast(a, b, "multiply"))

    def layer_norm(self, x: int, w: int, b: int, eps: float = 1e-5) -> int:
        return self.add(self.mul(self._op(self.L.ggml_norm(self.ctx, x, eps), self.ne and self.ne[x]), w), b)

    def gelu(self, x: int) -> int:  # the exact (erf) one, as torch's default
        return self._op(self.L.ggml_gelu_erf(self.ctx, x), self.ne and self.ne[x])

    def softmax(self, x: int, mask: int, scale: float) -> int:
        if self.ne is not None:
            a, m = self._shape(x), self._shape(mask)
            self.need(m[0] == a[0] and m[1] >= a[1] and a[2] % m[2] == 0 and a[3] % m[3] == 0,
                       f"mask {m} does not fit scores {a}")
        return self._op(self.L.ggml_soft_max_ext(self.ctx, x, mask, scale, 0.0), self.ne and self.ne[x])

    def reshape(self, x: int, *ne: int) -> int:
        if self.ne is not None:
            self.need(int(np.prod(self.ne[x])) == int(np.prod(ne)), f"cannot reshape {self.ne[x]} to {ne}")
        return self._op(getattr(self.L, f"ggml_reshape_{len(ne)}d")(self.ctx, x, *ne), ne)

    def permute(self, x: int, *axes: int) -> int:
        ne = None
        if self.ne is not None:
            src, out = self._shape(x), [0] * 4
            for i, ax in enumerate(axes):
                out[ax] = src[i]
            ne = tuple(out)
        return self._op(self.L.ggml_permute(self.ctx, x, *axes), ne)

    def cont(self, x: int) -> int:
        return self._op(self.L.ggml_cont(self.ctx, x), self.ne and self.ne[x])

    def take(self, x: int, index: int) -> int:
        """Rows of the 2-D float32 ``x`` (ne0, rows) at ``index`` (``self.index``): (ne0, len(index))."""
        ne = None
        if self.ne is not None:
            src, (n, need) = self._shape(x), self.ne[index]
            self.need(src[2] == src[3] == 1 and need <= src[1], f"no row {need - 1} in {self.ne[x]}")
            ne = (src[0], n)
        return self._op(self.L.ggml_get_rows(self.ctx, x, index), ne)
