"""The CUDA-graph replay of a captured step (gpunet/backend/cuda_graph.py).

No GPU runs here, so the CuPy and cuBLAS calls are checked against stand-ins: NumPy arrays
play device memory, a stand-in stream records "kernels" while it captures and a graph
replays them, and a stand-in libcublas computes each column-major GEMM on the memory its
pointers name. The argument mapping (transposes, leading dimensions, alpha, beta) is checked
against NumPy products; the fallbacks (a capture error, an allocation from the shared pool, a
self-check mismatch, a blocker) each leave the launch list's result. The gpu-marked tests at
the end run the real thing and skip, saying why, without a device.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet import autodiff, nn, optim
from gpunet.backend import cuda_graph
from gpunet.backend.cuda_graph import GemmCall, plan_gemm, plan_matmul
from gpunet.capture.recording import _CHANGING, _Entry
from gpunet.nn import functional as F

rng = np.random.default_rng(0)


def _ints(shape: tuple, dtype: Any, gen: np.random.Generator = rng) -> np.ndarray:
    """Small integers: every product and sum below is exact, so results compare bit for bit."""
    return gen.integers(-3, 4, shape).astype(dtype)


# ---------------------------------------------------------------------- column-major on the host
def _matrix(a: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major rows x cols matrix with leading dimension ``ld`` at a's first element."""
    size = a.dtype.itemsize
    return np.lib.stride_tricks.as_strided(a, (rows, cols), (size, ld * size))


def emulate(call: GemmCall) -> None:
    """What cuBLAS computes for ``call``: C <- alpha op(A) op(B) + beta C, column-major."""
    a = _matrix(call.a, *((call.m, call.k) if call.trans_a == 0 else (call.k, call.m)), call.lda)
    b = _matrix(call.b, *((call.k, call.n) if call.trans_b == 0 else (call.n, call.k)), call.ldb)
    c = _matrix(call.c, call.m, call.n, call.ldc)
    op_a, op_b = (a.T if call.trans_a else a), (b.T if call.trans_b else b)
    product = call.alpha * (op_a @ op_b)
    c[...] = product if call.beta == 0 else product + call.beta * c  # (beta 0: C is not read)


SHAPES = [(5, 3, 4), (1, 3, 4), (5, 3, 1), (5, 1, 4), (7, 6, 2)]  # (n, k, m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True), (True, True)])
def test_plan_matmul_computes_the_product_column_major(dtype, n, k, m, tx, ty) -> None:
    x = _ints((k, n) if tx else (n, k), dtype)
    y = _ints((m, k) if ty else (k, m), dtype)
    a, b = (x.T if tx else x), (y.T if ty else y)
    out = np.full((n, m), np.nan, dtype)
    call = plan_matmul(out, a, b)
    assert call is not None and call.func == "gemmEx" and call.c is out
    assert (call.alpha, call.beta, call.ldc) == (1.0, 0.0, m)
    emulate(call)
    assert np.array_equal(out, a @ b)


def test_plan_matmul_passes_what_cupy_passes() -> None:
    """CuPy's dot: out^T = b^T a^T, b as it lies first; a C-contiguous operand is read
    transposed (trans 1), a transposed view of one as it lies (trans 0)."""
    x, y, out = np.ones((6, 3)), np.ones((3, 4)), np.empty((6, 4))
    plain = plan_matmul(out, x, y)
    assert (plain.trans_a, plain.trans_b, plain.m, plain.n, plain.k) == (0, 0, 4, 6, 3)
    assert (plain.a is y, plain.lda, plain.b is x, plain.ldb) == (True, 4, True, 3)
    xt, yt = np.ones((3, 6)).T, np.ones((4, 3)).T
    both = plan_matmul(out, xt, yt)
    assert (both.trans_a, both.trans_b, both.lda, both.ldb) == (1, 1, 3, 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.5)])
def test_plan_gemm_scales_and_accumulates_as_cupy_cublas_gemm(dtype, tx, ty, order, alpha, beta):
    m, k, n = 5, 3, 4
    x = _ints((k, m) if tx else (m, k), dtype)
    y = _ints((n, k) if ty else (k, n), dtype)
    out0 = np.asarray(_ints((m, n), dtype), order=order)
    out = out0.copy(order=order)
    call = plan_gemm(out, x, y, tx, ty, alpha, beta)
    assert call is not None and call.func == "gemm" and (call.alpha, call.beta) == (alpha, beta)
    assert call.ldc == (m if order == "F" else n)  # (a C-contiguous out is written as out^T)
    emulate(call)
    assert np.array_equal(out, alpha * ((x.T if tx else x) @ (y.T if ty else y)) + beta * out0)


def test_plans_refuse_what_cupy_would_copy_batch_or_reduce() -> None:
    x, y = np.ones((6, 8)), np.ones((8, 4))
    assert plan_matmul(np.empty((6, 4)), x[:, ::2][:, :4].T.T, y[::2]) is None  # strided
    assert plan_matmul(None, np.ones((2, 6, 8)), y) is None  # batched
    assert plan_matmul(None, x.astype(np.float16), y.astype(np.float16)) is None
    assert plan_matmul(None, np.ones((1, 8)), np.ones((8, 1))) is None  # CuPy reduces
    assert plan_matmul(x[:, :4], x, y) is None  # out overlaps an operand
    assert plan_matmul(np.empty((6, 4), order="F"), x, y) is None
    assert plan_gemm(np.empty((6, 4)), x[:, ::2], np.ones((4, 4)), False, False, 1, 0) is None


# ---------------------------------------------------------------------- stand-ins
class FakeLib:
    """libcublas on host memory: records each call's arguments (plain values) and, as a
    stream would, computes each GEMM now or, while a stand-in stream captures, at launch."""

    def __init__(self, world: World, wrong: bool = False) -> None:
        self.world, self.wrong, self.calls = world, wrong, []

    @staticmethod
    def _plain(v: Any) -> Any:
        v = getattr(v, "_obj", v)  # (a byref'd scalar)
        return v.value if hasattr(v, "value") else v

    def _record(self, name: str, args: tuple) -> list:
        values = [self._plain(a) for a in args]
        self.calls.append((name, values))
        return values

    def cublasSetStream_v2(self, *args: Any) -> int:
        self._record("setStream", args)
        return 0

    def cublasSetWorkspace_v2(self, *args: Any) -> int:
        self._record("setWorkspace", args)
        return 0

    def cublasSetPointerMode_v2(self, *args: Any) -> int:
        self._record("setPointerMode", args)
        return 0

    def cublasGemmEx(self, *args: Any) -> int:
        v = self._record("gemmEx", args)
        dt = {0: np.float32, 1: np.float64}[v[8]]
        self._gemm(dt, v[1:6], v[6], (v[7], v[9]), (v[10], v[12]), v[13], (v[14], v[16]))
        return 0

    def cublasSgemm_v2(self, *args: Any) -> int:
        v = self._record("sgemm", args)
        self._gemm(np.float32, v[1:6], v[6], (v[7], v[8]), (v[9], v[10]), v[11], (v[12], v[13]))
        return 0

    def cublasDgemm_v2(self, *args: Any) -> int:
        v = self._record("dgemm", args)
        self._gemm(np.float64, v[1:6], v[6], (v[7], v[8]), (v[9], v[10]), v[11], (v[12], v[13]))
        return 0

    def _gemm(self, dt, dims, alpha, a, b, beta, c) -> None:
        ta, tb, m, n, k = dims

        def at(ptr_ld: tuple, rows: int, cols: int) -> np.ndarray:
            ptr, ld = ptr_ld
            flat = np.ctypeslib.as_array(
                ctypes.cast(ptr, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dt))),
                (ld * (cols - 1) + rows,),
            )
            return _matrix(flat, rows, cols, ld)

        def kernel() -> None:
            op_a = at(a, *((m, k) if ta == 0 else (k, m)))
            op_b = at(b, *((k, n) if tb == 0 else (n, k)))
            out = at(c, m, n)
            product = alpha * ((op_a.T if ta else op_a) @ (op_b.T if tb else op_b))
            out[...] = product if beta == 0 else product + beta * out
            if self.wrong:
                out.flat[0] += 1

        self.world.enqueue(kernel)


class FakeStream:
    def __init__(self, world: World, non_blocking: bool = False) -> None:
        self.world, self.ptr, self.nodes = world, 4096 + len(world.streams), None
        world.streams.append(self)

    def __enter__(self) -> FakeStream:
        self.world.current.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.world.current.pop()

    def record(self) -> str:
        return "event"

    def wait_event(self, event: str) -> None:
        pass

    def begin_capture(self) -> None:
        self.nodes, self.world.capturing = [], self
        self.world.log.append("begin_capture")

    def end_capture(self) -> FakeGraph:
        self.world.capturing, nodes, self.nodes = None, self.nodes, None
        self.world.log.append("end_capture")
        return FakeGraph(self.world, nodes)


class FakeGraph:
    def __init__(self, world: World, nodes: list[Callable]) -> None:
        self.world, self.nodes = world, nodes

    def launch(self, stream: Any = None) -> None:
        self.world.launches += 1
        for kernel in self.nodes:
            kernel()


class FakePool:
    def __init__(self, world: World) -> None:
        self.world, self.used, self.mallocs = world, 0, 0

    def malloc(self, nbytes: int) -> int:
        self.mallocs += 1
        self.used += nbytes
        return self.used

    def used_bytes(self) -> int:
        return self.used

    def total_bytes(self) -> int:
        return self.used


class World:
    """The stand-in CuPy: NumPy arrays are device memory; a "kernel" runs now, or is
    recorded while a stream captures and run by each launch of its graph."""

    def __init__(self, wrong_gemms: bool = False) -> None:
        self.streams: list[FakeStream] = []
        self.current: list[FakeStream] = []
        self.capturing: FakeStream | None = None
        self.log: list[str] = []
        self.launches = 0
        self.allocator: list[Callable] = []
        self.shared = FakePool(self)
        self.lib = FakeLib(self, wrong_gemms)
        world = self

        @contextlib.contextmanager
        def using_allocator(malloc: Callable) -> Iterator[None]:
            self.allocator.append(malloc)
            try:
                yield
            finally:
                self.allocator.pop()

        default = FakeStream(self)
        self.cupy = SimpleNamespace(
            copyto=lambda dst, src: world.enqueue(lambda: np.copyto(dst, src)),
            empty=world.empty,
            uint8=np.uint8,
            array_equal=np.array_equal,
            matmul=world.matmul,
            get_default_memory_pool=lambda: world.shared,
            cuda=SimpleNamespace(
                Stream=lambda non_blocking=False: FakeStream(world, non_blocking),
                get_current_stream=lambda: world.current[-1] if world.current else default,
                MemoryPool=lambda: FakePool(world),
                using_allocator=using_allocator,
                Device=lambda: SimpleNamespace(compute_capability="90"),
                device=SimpleNamespace(get_cublas_handle=lambda: 77),
            ),
        )
        self.cublas = SimpleNamespace(gemm=world.gemm)

    def enqueue(self, kernel: Callable[[], None]) -> None:
        if self.capturing is not None:
            self.capturing.nodes.append(kernel)
        else:
            kernel()

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        if self.allocator:
            self.allocator[-1](int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return np.empty(shape, dtype)

    def matmul(self, a: np.ndarray, b: np.ndarray, out: Any = None) -> np.ndarray:
        """CuPy's own matmul: its cuBLAS wrapper refuses a capturing stream."""
        if self.capturing is not None:
            raise NotImplementedError("calling cuBLAS API during stream capture")
        out = self.empty((a.shape[0], b.shape[1]), a.dtype) if out is None else out
        self.enqueue(lambda: np.matmul(a, b, out=out))
        return out

    def gemm(self, ta: str, tb: str, x: Any, y: Any, out: Any, alpha: float, beta: float) -> Any:
        if self.capturing is not None:
            raise NotImplementedError("calling cuBLAS API during stream capture")
        a, b = (x.T if ta == "T" else x), (y.T if tb == "T" else y)
        self.enqueue(lambda: np.copyto(out, alpha * (a @ b) + beta * out))
        return out


class FakeBackend:
    """The CuPy backend's GEMM entry points (``self.cupy.matmul``, ``self.cublas.gemm``) and
    a few kernels, over the stand-in."""

    def __init__(self, world: World) -> None:
        self.world, self.cupy, self.xp, self._cublas = world, world.cupy, world.cupy, world.cublas
        self.name, self.array_type = "cupy", np.ndarray  # (the stand-in's device arrays)

    @property
    def cublas(self) -> Any:
        return self._cublas

    def matmul(self, x: Any, y: Any, *, tx: bool, ty: bool) -> Any:
        return self.cupy.matmul(x.T if tx else x, y.T if ty else y)

    def matmul_into(self, out, x, y, *, tx, ty, alpha=1.0, beta=0.0) -> None:
        if alpha == 1.0 and beta == 0.0:
            self.cupy.matmul(x.T if tx else x, y.T if ty else y, out=out)
        else:
            self.cublas.gemm("T" if tx else "N", "T" if ty else "N", x, y, out, alpha, beta)

    def relu(self, x: Any) -> Any:
        out = self.world.empty(x.shape, x.dtype)
        self.world.enqueue(lambda: np.maximum(x, 0, out=out))
        return out

    def scale_into(self, out: Any, *, by: Any) -> None:
        self.world.enqueue(lambda: np.multiply(out, by, out=out))

    def counted_into(self, out: Any) -> None:
        """Fills ``out`` with a host count of the eager calls, read when the call is made: a
        value a graph would freeze, equal to the first checked step's by coincidence."""
        if self.world.capturing is None:
            self.calls = getattr(self, "calls", 0) + 1
        value = float(getattr(self, "calls", 0))
        self.world.enqueue(lambda: out.fill(value))

    def host_read(self, x: Any) -> None:
        if self.world.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")

    def shared_alloc(self, x: Any) -> None:
        self.world.shared.malloc(64)


def _program(world: World, extra: list[tuple] = (), scale: Any = 1.0) -> SimpleNamespace:
    """A recorded step over the stand-in: h = x W, r = relu(h), G = x^T r, W <- W - G/2
    (a scaled GEMM), W <- W * scale; ``extra``: more (kind, name, method, ins, params)."""
    be = FakeBackend(world)
    gen = np.random.default_rng(1)  # (twins start equal)
    x, w, g = _ints((6, 4), np.float64, gen), _ints((4, 3), np.float64, gen), np.zeros((4, 3))
    arrays = [x, w, g, np.empty((6, 3)), np.empty((6, 3))]
    a = [("a", k) for k in range(5)]
    entries = [
        _Entry("made", "matmul", be.matmul, [a[0], a[1]], {"tx": False, "ty": False}, a[3]),
        _Entry("made", "relu", be.relu, [a[3]], {}, a[4]),
        _Entry("into", "matmul", be.matmul_into, [a[2], a[0], a[4]], {"tx": True, "ty": False},
               None),
        _Entry("into", "matmul", be.matmul_into, [a[1], a[0], a[4]],
               {"tx": True, "ty": False, "alpha": -0.5, "beta": 1.0}, None),
        _Entry("into", "scale", be.scale_into, [a[1]], {"by": scale}, None),
        *[_Entry(kind, name, getattr(be, m), [a[i] for i in ins], params, None)
          for kind, name, m, ins, params in extra],
    ]  # fmt: skip
    prog = SimpleNamespace(rec=SimpleNamespace(entries=entries, arrays=arrays), backend=be)
    prog.inputs, prog.n_inputs, prog.on_gpu, prog.folded = arrays[:1], 1, True, 0

    def replay(xs: list[Any]) -> None:  # the launch list, as capture generates it
        world.cupy.copyto(arrays[0], xs[0])
        for e in entries:
            ins = [arrays[r[1]] if r[0] == "a" else r[1] for r in e.ins]
            params = {k: v.fn() if isinstance(v, _CHANGING) else v for k, v in e.params.items()}
            result = e.fn(*ins, **params)
            if e.kind == "made":
                world.cupy.copyto(arrays[e.out[1]], result)

    prog.replay = replay
    return prog


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[..., World]:
    """A stand-in world whose cuBLAS and CuPy enums the graph module uses."""

    def make(wrong_gemms: bool = False) -> World:
        world = World(wrong_gemms)
        enums = cuda_graph.CupyEnums(
            cuda_types={"f": 0, "d": 1},
            computes={("f", "default"): 68, ("d", "default"): 70},
            double_computes=frozenset({70}),
            algo=99,
            compute_name=lambda dt: "default",
        )
        monkeypatch.setattr(cuda_graph, "_cublas_library", lambda: world.lib)
        monkeypatch.setattr(cuda_graph, "cupy_enums", lambda cp: enums)
        return world

    return make


def _steps(world: World, prog: Any, n: int) -> list[list[np.ndarray]]:
    out = []
    for i in range(n):
        prog.replay([np.full((6, 4), float(i % 3 - 1))])
        out.append([a.copy() for a in prog.rec.arrays])
    return out


# ---------------------------------------------------------------------- the graph path
def test_a_recording_replays_as_one_graph_equal_to_its_launch_list(stand_in) -> None:
    world, twin = stand_in(), World()  # (the twin runs the launch list only)
    prog, plain = _program(world), _program(twin)
    graph = cuda_graph.attach(prog, _CHANGING)
    assert "until its first replay" in graph.describe()
    got, want = _steps(world, prog, 5), _steps(twin, plain, 5)
    for g, w in zip(got, want):
        assert all(np.array_equal(a, b) for a, b in zip(g, w))
    assert graph.mode == "graph" and graph.describe() == "a CUDA graph"
    assert world.log == ["begin_capture", "end_capture"]  # captured once
    assert world.launches == 5  # the two checks' launches, then one per later replay
    calls = [name for name, _ in world.lib.calls]
    # before the capture: the handle on the capturing stream, then the workspace (a stream
    # resets it), host scalars; then the two plain GEMMs by GemmEx, the scaled one by Dgemm
    # and the stream set again after, which gives cuBLAS its own workspace back
    assert calls == [
        *("setStream", "setWorkspace", "setPointerMode", "gemmEx", "gemmEx", "dgemm"),
        "setStream",
    ]
    (_, set_stream), (_, workspace), (_, mode) = world.lib.calls[:3]
    capture_stream = world.streams[-1]
    assert set_stream == [77, capture_stream.ptr] and mode == [77, 0]
    assert workspace[2] == 32 * 2**20 and graph.owned[0].nbytes == 32 * 2**20  # (Hopper's)
    gemm_ex = world.lib.calls[3][1]
    assert gemm_ex[1:6] == [0, 0, 3, 6, 4]  # h^T = W^T x^T: (m, n, k) = (3, 6, 4)
    assert gemm_ex[6] == 1.0 and gemm_ex[13] == 0.0 and gemm_ex[-2:] == [70, 99]
    scaled = world.lib.calls[5][1]
    assert scaled[6] == -0.5 and scaled[11] == 1.0  # alpha = -1/2, beta = 1


def test_buffers_keep_their_addresses_and_temporaries_come_from_the_graph_s_pool(stand_in):
    world = stand_in()
    prog = _program(world)
    addresses = [a.__array_interface__["data"][0] for a in prog.rec.arrays]
    graph = cuda_graph.attach(prog, _CHANGING)
    _steps(world, prog, 3)
    assert [a.__array_interface__["data"][0] for a in prog.rec.arrays] == addresses
    pool = graph.pool
    assert pool.mallocs == 2 * 2  # h and r: once sizing the pool, once while capturing
    assert world.shared.used == 0  # nothing from the shared pool


def _fallback(stand_in, **kw: Any) -> tuple[World, Any, list, list]:
    world, twin = stand_in(kw.pop("wrong_gemms", False)), World()
    prog, plain = _program(world, **kw), _program(twin, **kw)
    with pytest.warns(RuntimeWarning, match="replays as a launch list, not a CUDA graph") as w:
        graph = cuda_graph.attach(prog, _CHANGING)
        got = _steps(world, prog, 3)
    want = _steps(twin, plain, 3)
    for g, v in zip(got, want):  # the launch list's result, the first replay's too
        assert all(np.array_equal(a, b) for a, b in zip(g, v))
    assert graph.mode == "list" and prog.replay == graph.plain and len(w) == 1
    return world, graph, got, want


def test_a_capture_error_falls_back_to_the_launch_list(stand_in) -> None:
    _, graph, _, _ = _fallback(stand_in, extra=[("into", "read", "host_read", [4], {})])
    assert graph.why.startswith("its capture failed: RuntimeError: operation not permitted")
    assert graph.describe().startswith("a launch list (its capture failed")


def test_a_frozen_value_that_matched_the_first_check_is_caught_by_the_second(stand_in):
    world, graph, _, _ = _fallback(stand_in, extra=[("into", "count", "counted_into", [4], {})])
    assert graph.why.startswith("its graph's second replay differed from the launch list in")
    assert world.launches == 2 and graph.graph is None  # (the graph is dropped)


def test_an_allocation_from_the_shared_pool_during_capture_falls_back(stand_in) -> None:
    _, graph, _, _ = _fallback(stand_in, extra=[("into", "alloc", "shared_alloc", [4], {})])
    assert "allocated from CuPy's shared memory pool during capture" in graph.why


def test_a_graph_that_differs_from_the_launch_list_is_dropped(stand_in) -> None:
    world, graph, _, _ = _fallback(stand_in, wrong_gemms=True)
    assert graph.why.startswith("its graph's first replay differed from the launch list in")
    assert world.launches == 1  # (the self-check's launch only)


def test_a_gemm_the_route_cannot_take_under_capture_falls_back(stand_in) -> None:
    """(Through a method the blockers do not see: it reaches cupy.matmul while capturing.)"""
    world = stand_in()
    prog = _program(world, extra=[("into", "t", "matmul_into", [2, 0, 4],
                                   {"tx": True, "ty": False})])  # fmt: skip
    prog.rec.entries[-1].fn = lambda out, x, y, **kw: prog.backend.cupy.matmul(x[:, ::2].T, y)
    with pytest.warns(RuntimeWarning, match="_Unsupported: cupy.matmul of"):
        cuda_graph.attach(prog, _CHANGING)
        _steps(world, prog, 1)


# ---------------------------------------------------------------------- blockers
def _dynamic(pure: bool, seen: list) -> autodiff.Dynamic:
    def fn() -> float:
        seen.append(1)
        return 1.0

    d = autodiff.Dynamic(1.0, fn)
    if pure:  # (a stand-in of what a device-held scalar will say about itself)
        d = type("DevicePure", (autodiff.Dynamic,), {"device_pure": True})(1.0, fn)
    return d


def test_per_step_host_scalars_keep_a_launch_list_and_say_so(stand_in) -> None:
    world, seen = stand_in(), []
    prog = _program(world, scale=_dynamic(False, seen))
    graph = cuda_graph.attach(prog, _CHANGING)
    assert graph.mode == "list" and prog.replay == graph.plain
    assert graph.describe() == (
        "a launch list (CUDA graph blockers: 1 calls with per-step host scalars a graph "
        "would freeze (an optimizer's lr: make it with capturable=True))"
    )
    _steps(world, prog, 2)
    assert world.log == [] and len(seen) == 2  # never captured; the scalar read per replay


def test_device_pure_scalars_are_captured_and_read_at_each_replay(stand_in) -> None:
    world, seen = stand_in(), []
    prog = _program(world, scale=_dynamic(True, seen))
    graph = cuda_graph.attach(prog, _CHANGING)
    _steps(world, prog, 4)
    assert graph.mode == "graph" and len(seen) == 5  # (4 replays, and the capture's run)


@pytest.mark.parametrize("on", ["parameter", "value"])
def test_a_device_pure_value_that_changes_on_the_host_sends_the_step_back_to_its_list(
    stand_in, on: str
) -> None:
    """(A momentum or an eps set between steps: the graph holds the old one as a constant;
    the lr, a device array, may change: the graph reads it.)"""

    @dataclasses.dataclass
    class Hyper:
        scale: float
        lr: Any
        device_pure: bool = on == "value"

    def run(world: World, scales: list[float], views: bool) -> np.ndarray:
        lr = np.ones(1)
        now = {"hyper": Hyper(1.0, lr)}
        pure = type("P", (autodiff.Dynamic,), {"device_pure": on == "parameter"})
        prog = _program(world, scale=pure(now["hyper"], lambda: now["hyper"]))
        prog.rec.entries[4].fn = lambda out, *, by: world.enqueue(
            lambda value=by.scale: np.multiply(out, value, out=out)
        )
        graph = cuda_graph.attach(prog, _CHANGING) if views else None
        for i, scale in enumerate(scales):  # (a view of the same lr: the same memory)
            now["hyper"] = Hyper(scale, lr.view() if views and i % 2 else lr)
            prog.replay([np.full((6, 4), float(i % 3 - 1))])
        assert graph is None or graph.mode == "list"
        return prog.rec.arrays[1]

    world = stand_in()
    with pytest.warns(RuntimeWarning, match="a per-step value the graph holds as a constant"):
        got = run(world, [1.0] * 4 + [0.5, 0.5], views=True)
    assert world.launches == 4  # (replays 1-4; the 5th went back to the list)
    assert np.array_equal(got, run(World(), [1.0] * 4 + [0.5, 0.5], views=False))


def test_segments_random_draws_unsupported_gemms_and_folds_are_blockers(stand_in) -> None:
    world = stand_in()
    prog = _program(world)
    be, arrays = prog.backend, prog.rec.arrays
    arrays.append(np.ones((2, 6, 4)))
    seg = _Entry("segment", "clip", lambda: None, [], {}, None)
    draw = _Entry("into", "random", be.scale_into, [("a", 1)], {"by": 1.0}, None)
    batched = _Entry("made", "matmul", be.matmul, [("a", 5), ("a", 1)], {"tx": False, "ty": False},
                     ("a", 3))  # fmt: skip
    prog.rec.entries += [seg, draw, batched]
    prog.folded = 2
    assert cuda_graph.blockers(prog, _CHANGING) == [
        "1 GEMMs the graph's cuBLAS route does not take (batched, half precision or copied "
        "operands)",
        "1 Python segments (clipping, schedules)",
        "1 random draws (the self-check cannot restore the generator's device state)",
        "plain SGD folded into its GEMMs with the lr read on the host (alpha = -lr)",
    ]
    seg.fn.device_pure = True  # (a device-pure segment is captured as it runs)
    assert "Python segments" not in " ".join(cuda_graph.blockers(prog, _CHANGING))


def test_the_cpu_replay_is_left_alone() -> None:
    prog = SimpleNamespace(on_gpu=False, backend=gpunet.get_backend("cpu"), replay=print)
    assert cuda_graph.attach(prog, _CHANGING) is None and prog.replay is print
    assert cuda_graph.describe(prog) == "a launch list (not on a CuPy device)"


def test_the_route_reports_a_failed_cublas_call(stand_in) -> None:
    world = stand_in()
    world.lib.cublasGemmEx = lambda *args: 13  # CUBLAS_STATUS_EXECUTION_FAILED
    route = cuda_graph.CublasRoute(world.lib, cuda_graph.cupy_enums(None), 77, 1, np.empty(8))
    x = np.ones((2, 2))
    with pytest.raises(RuntimeError, match="cuBLAS cublasGemmEx returned status 13"):
        route.run(plan_matmul(np.empty((2, 2)), x, x))


def test_a_forward_backward_step_records_nothing_that_blocks_a_graph() -> None:
    """(On the CPU, the same recording a CuPy step makes: its GEMMs, kernels and sums.)"""
    _, step = _mlp_step((12, 16, 5), device="cpu")
    run = gpunet.capture(step)
    x, y = _batches(1, (12, 16, 5), 8, "cpu")[0]
    for _ in range(3):
        run(x, y)
    (cap,) = run._captures.values()
    assert cap.program.graph_blockers() == [] and cap.program.graph is None  # (CPU: no graph)


# ---------------------------------------------------------------------- on a GPU
def _mlp_step(sizes: tuple, device: str = "cuda") -> tuple[Any, Callable]:
    """An MLP's forward and backward (no update)."""
    gpunet.manual_seed(0)
    model = nn.MLP(list(sizes), device=device)
    opt = optim.SGD(model.parameters(), lr=0.1)  # (its zero_grad only)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return model, step


OPTIMIZERS = {
    "sgd-momentum": lambda ps: optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, capturable=True
    ),
    "adam": lambda ps: optim.Adam(ps, lr=1e-2, capturable=True),
    "adamw": lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1, capturable=True),
}


def _training_step(sizes: tuple, kind: str, device: str = "cuda") -> tuple[Any, Callable, Any]:
    """A whole training step (zero_grad, forward, backward, the update) with an optimizer
    whose lr and step counts live on the device, and a schedule stepped between steps."""
    gpunet.manual_seed(0)
    model = nn.MLP(list(sizes), device=device)
    opt = OPTIMIZERS[kind](model.parameters())
    schedule = optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, step, schedule


def _same_training(sizes: tuple, kind: str, batches: list[tuple]) -> Any:
    """Eager and captured runs of ``_training_step`` over ``batches``, parameters compared
    bit for bit after every step; the captured step returned."""
    (m1, eager, s1), (m2, step, s2) = _training_step(sizes, kind), _training_step(sizes, kind)
    run = gpunet.capture(step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a fallback fails, saying why)
        for x, y in batches:
            assert np.array_equal(eager(x, y).numpy(), run(x, y).numpy())
            s1.step(), s2.step()
            for p, q in zip(m1.parameters(), m2.parameters()):
                assert np.array_equal(p.numpy(), q.numpy())
    return run


def _batches(n: int, sizes: tuple, batch: int, device: str = "cuda") -> list[tuple]:
    gen = np.random.default_rng(0)
    return [
        (
            gpunet.tensor(gen.standard_normal((batch, sizes[0])).astype(np.float32), device=device),
            gpunet.tensor(gen.integers(0, sizes[-1], batch), device=device),
        )
        for _ in range(n)
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("sizes,batch", [((64, 32, 10), 32), ((784, 1024, 1024, 10), 256)])
def test_a_captured_step_replays_as_a_cuda_graph_equal_to_eager_bit_for_bit(sizes, batch):
    (m1, eager), (m2, step) = _mlp_step(sizes), _mlp_step(sizes)
    run = gpunet.capture(step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a fallback fails the test, saying why)
        for x, y in _batches(12, sizes, batch):
            assert np.array_equal(eager(x, y).numpy(), run(x, y).numpy())
            for p, q in zip(m1.parameters(), m2.parameters()):
                assert np.array_equal(p.grad.numpy(), q.grad.numpy())
    assert run.replays == 10 and "replayed as a CUDA graph" in repr(run), repr(run)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_captured_training_step_with_a_capturable_optimizer_replays_as_a_graph(kind):
    """The update in the graph: the lr (halved by the schedule every 2 steps) and the step
    counts read from the device, each replay equal to eager bit for bit."""
    sizes = (64, 32, 10)
    run = _same_training(sizes, kind, _batches(12, sizes, 32))
    assert run.replays == 10 and "replayed as a CUDA graph" in repr(run), repr(run)


@pytest.mark.gpu
def test_graph_replays_keep_their_buffers_and_memory_flat() -> None:
    import cupy

    _, step = _mlp_step((64, 32, 10))
    run = gpunet.capture(step)
    x, y = _batches(1, (64, 32, 10), 32)[0]
    for _ in range(4):  # two recordings, then the two checked replays
        loss = run(x, y)
    cupy.cuda.Device().synchronize()
    pool, address = cupy.get_default_memory_pool(), loss.data.data.ptr
    used, held = pool.used_bytes(), pool.total_bytes()
    for _ in range(1000):
        loss = run(x, y)
    cupy.cuda.Device().synchronize()
    assert loss.data.data.ptr == address and (pool.used_bytes(), pool.total_bytes()) == (used, held)
    assert "a CUDA graph" in repr(run), repr(run)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_cublas_route_under_capture_equals_cupy_s_own_gemms_bit_for_bit(dtype) -> None:
    """Each GEMM the backend makes (plain into out, scaled, and a fresh product), captured
    through the route, against the same call made eagerly through CuPy."""
    import cupy

    backend = gpunet.get_backend("cuda")
    gen = np.random.default_rng(0)
    capability = int(cupy.cuda.Device().compute_capability)
    for m, k, n in ((64, 48, 32), (257, 129, 65)):
        for tx, ty, alpha, beta in [(a, b, *s) for a in (0, 1) for b in (0, 1)
                                    for s in ((1.0, 0.0), (-0.1, 0.99))]:  # fmt: skip
            x = cupy.asarray(gen.standard_normal((k, m) if tx else (m, k)), dtype=dtype)
            y = cupy.asarray(gen.standard_normal((n, k) if ty else (k, n)), dtype=dtype)
            out0 = cupy.asarray(gen.standard_normal((m, n)), dtype=dtype)
            want, got = out0.copy(), out0.copy()
            backend.matmul_into(want, x, y, tx=bool(tx), ty=bool(ty), alpha=alpha, beta=beta)
            fresh = backend.matmul(x, y, tx=bool(tx), ty=bool(ty))
            stream = cupy.cuda.Stream(non_blocking=True)
            workspace = cupy.empty(cuda_graph.workspace_bytes(capability), cupy.uint8)
            route = cuda_graph.CublasRoute(
                cuda_graph._cublas_library(), cuda_graph.cupy_enums(cupy),
                cupy.cuda.device.get_cublas_handle(), stream.ptr, workspace,
            )  # fmt: skip
            route.begin()
            with stream, cuda_graph._gemms_through(backend, route):
                stream.begin_capture()
                backend.matmul_into(got, x, y, tx=bool(tx), ty=bool(ty), alpha=alpha, beta=beta)
                again = backend.matmul(x, y, tx=bool(tx), ty=bool(ty))
                graph = stream.end_capture()
            graph.launch(stream=stream)
            stream.synchronize()
            where = f"{np.dtype(dtype)} {(m, k, n)} tx={tx} ty={ty} alpha={alpha} beta={beta}"
            assert bool((got.view(cupy.uint8) == want.view(cupy.uint8)).all()), where
            assert bool((again.view(cupy.uint8) == fresh.view(cupy.uint8)).all()), where


def test_gpunet_info_says_how_captured_steps_replay() -> None:
    from gpunet.backend import device, replay_mode

    assert replay_mode(device("cpu")) == ("a launch list", "on the CPU there is no graph to launch")
    mode, why = replay_mode(device("cuda"))
    assert mode == "a CUDA graph where it can" and "bit for bit" in why and "Never yet run" in why


# ---------------------------------------------------------------------- the whole path, emulated
class Deferred(np.ndarray):
    """A "device" array of the emulated CUDA backend: while a stand-in stream captures, a
    ufunc on it (an operator, ``+=``, ``.sum()``) is recorded to run at each launch, as
    CuPy's kernels are; a new result is made now (its buffer) and refilled at each launch."""

    world: World | None = None

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = [x.view(np.ndarray) if isinstance(x, Deferred) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(
                o.view(np.ndarray) if isinstance(o, Deferred) else o for o in kwargs["out"]
            )
        return _deferred(getattr(ufunc, method), args, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: dict) -> Any:
        args = [x.view(np.ndarray) if isinstance(x, Deferred) else x for x in args]
        impl = getattr(func, "_implementation", func)  # (no second dispatch to this method)
        if func is np.copyto and Deferred.world is not None:  # (writes its first argument)
            return Deferred.world.enqueue(lambda: impl(*args, **kwargs))
        return _deferred(impl, args, kwargs)


def _deferred(f: Callable, args: Any, kwargs: dict) -> Any:
    """``f(*args, **kwargs)`` now, or, while capturing, at each launch (see Deferred)."""
    world = Deferred.world
    out = kwargs.get("out")
    if world is None or world.capturing is None:
        return _wrap(f(*args, **kwargs))
    if out is not None:
        world.enqueue(lambda: f(*args, **kwargs))
        return _wrap(out[0] if isinstance(out, tuple) and len(out) == 1 else out)
    result = f(*args, **kwargs)  # (the buffer; its values are made at each launch)
    if isinstance(result, np.generic):  # (a reduction to a scalar: CuPy's is a 0-d array)
        result = np.asarray(result)
    if isinstance(result, np.ndarray) and result.size:
        world.enqueue(lambda: np.copyto(result, f(*args, **kwargs)))
    return _wrap(result)


def _wrap(x: Any) -> Any:
    return x.view(Deferred) if type(x) is np.ndarray else x


class LazyNumpy:
    """NumPy under CuPy's names, its calls deferred while a stand-in stream captures;
    ``matmul`` refuses a capturing stream, as CuPy's cuBLAS wrappers do."""

    def __init__(self, world: World) -> None:
        self.world, self.cuda = world, world.cupy.cuda
        self.get_default_memory_pool = world.cupy.get_default_memory_pool
        self.asnumpy = lambda x: np.asarray(x).view(np.ndarray).copy()

    def matmul(self, a: Any, b: Any, out: Any = None) -> Any:
        if self.world.capturing is not None:
            raise NotImplementedError("calling cuBLAS API during stream capture")
        return _deferred(np.matmul, (a, b), {} if out is None else {"out": (out,)})

    def copyto(self, dst: Any, src: Any) -> None:
        self.world.enqueue(lambda: np.copyto(dst, src))

    def __getattr__(self, name: str) -> Any:
        f = getattr(np, name)
        if isinstance(f, type) or not callable(f):
            return f
        return lambda *args, **kwargs: _deferred(f, args, kwargs)


class _GemmOnNumpy:
    """``cupy.cublas.gemm`` on the emulated backend (refusing a capturing stream)."""

    def __init__(self, world: World) -> None:
        self.world = world

    def gemm(self, ta: str, tb: str, x: Any, y: Any, out: Any, alpha: float, beta: float) -> Any:
        if self.world.capturing is not None:
            raise NotImplementedError("calling cuBLAS API during stream capture")
        a, b = (x.T if ta == "T" else x), (y.T if tb == "T" else y)
        product = a @ b
        out[...] = alpha * product + beta * out if beta else alpha * product
        return out


@pytest.fixture
def emulated_cuda(stand_in, monkeypatch: pytest.MonkeyPatch) -> tuple[World, Any]:
    """gpunet's CuPy backend over the g++ build of its kernels, its arrays Deferred: the
    device "cuda" of this test, its launches recorded by a stand-in stream while it captures."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "kernels"))
    from kernel_tools import emulated_cupy_backend, emulated_kernels

    from gpunet.backend import _backends, device
    from gpunet.backend.cupy_backend import CupyBackend

    world = stand_in()
    monkeypatch.setattr(Deferred, "world", world)
    emu = emulated_kernels()
    run = emu._run
    monkeypatch.setattr(emu, "_run", lambda *a: world.enqueue(lambda: run(*a)))
    backend = emulated_cupy_backend(emu)
    lazy = LazyNumpy(world)
    emu.xp = backend.cupy = backend.xp = lazy  # (CuPy's backend: xp and cupy are one module)
    backend._cublas, backend._tf32_applied = _GemmOnNumpy(world), False
    monkeypatch.setattr(CupyBackend, "_linalg", SimpleNamespace(set_compute_type=print))
    monkeypatch.setitem(_backends, device("cuda"), backend)
    # (the default generator's stream for "cuda" is this backend's: it goes with the test)
    monkeypatch.setattr(gpunet.random.default_generator, "_device_rngs", {})
    return world, backend


def test_a_captured_mlp_step_on_the_emulated_cupy_backend_replays_as_a_graph(emulated_cuda):
    """The real recording (gpunet/capture/), the CuPy backend's own methods and kernels (g++
    build), its GEMMs through the route into the stand-in libcublas: the graph's replays
    equal the eager step's bit for bit."""
    world, _ = emulated_cuda
    (m1, eager), (m2, step) = _mlp_step((12, 16, 5)), _mlp_step((12, 16, 5))
    run = gpunet.capture(step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a fallback fails, saying why)
        for x, y in _batches(6, (12, 16, 5), 8):
            assert np.array_equal(eager(x, y).numpy(), run(x, y).numpy())
            for p, q in zip(m1.parameters(), m2.parameters()):
                assert np.array_equal(p.grad.numpy(), q.grad.numpy())
    (cap,) = run._captures.values()
    assert cap.program.graph.mode == "graph" and "replayed as a CUDA graph" in repr(run)
    assert world.log == ["begin_capture", "end_capture"] and world.launches == 4
    names = [n for n, _ in world.lib.calls]
    assert names.count("gemmEx") == 5  # 2 forward, 2 dW, 1 dX, all by cuBLAS's GemmEx


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_captured_training_step_on_the_emulated_cupy_backend_replays_as_a_graph(
    emulated_cuda, kind: str
) -> None:
    """Forward, backward and the fused update of a ``capturable=True`` optimizer (its kernels
    read the lr and the step counts from device arrays) captured into one graph; a schedule
    halves the lr between replays and each replay still equals eager bit for bit."""
    world, _ = emulated_cuda
    sizes = (12, 16, 5)
    run = _same_training(sizes, kind, _batches(7, sizes, 8))
    (cap,) = run._captures.values()
    assert cap.program.graph.mode == "graph" and "replayed as a CUDA graph" in repr(run)
    assert world.log == ["begin_capture", "end_capture"] and world.launches == 5
