"""A captured step's launch list replayed as one CUDA graph on CuPy.

``gpunet.capture`` records a step as a list of backend calls on buffers it owns; on CuPy this
module captures that list once into a CUDA graph (``Stream.begin_capture`` / ``end_capture``
on a stream of its own, ``Graph.launch`` after), so a replay costs one launch instead of one
per kernel. Two facts of CuPy shape it:

- CuPy's cuBLAS wrappers refuse stream capture (``cublas.setStream`` raises
  NotImplementedError when the stream captures). While capturing, the backend's two GEMM
  entry points (``cupy.matmul`` and ``cupy.cublas.gemm``) are routed to cuBLAS called here
  through ctypes, on the capturing stream with a workspace the graph owns set before the
  capture (PyTorch's way), with the very arguments CuPy would pass (``plan_matmul``,
  ``plan_gemm``: the same transposes, leading dimensions, alpha and beta, compute type and
  algorithm), so the same kernels run.
- CuPy has no memory pool private to a graph: a block freed after capture is handed out
  again and overwritten by the next replay. Every array the list names is the capture's own;
  the temporaries its calls make come, while capturing, from a pool that only this graph
  uses and that lives as long as it does. An allocation from CuPy's shared pool during the
  capture is detected and the graph dropped.

Never a silent wrong result: at each of the first two replays the launch list runs once and
the graph once, from the same saved state, and every array they write must agree bit for
bit (twice, so that a value frozen into the graph which happened to equal the first step's
is caught on the second); else the step stays a launch list and a one-line warning says why.
Host scalars that change between steps (an lr, Adam's step count) would be frozen into a
graph, as would a Python segment's values: such a recording stays a launch list
(``blockers`` says why) unless each one is *device-pure* (its ``device_pure`` attribute, or
its value's, is true: what changes lives in device arrays the kernels read). A device-pure
``fn()`` must not advance state: each replay reads it before the launch, and a host value
that differs from the capture's (a momentum, an eps; a device array elsewhere) sends the
step back to its launch list for good, which reads it again.

(This path has never run on a GPU: it is checked here with stand-ins of CuPy and cuBLAS and
by the gpu-marked tests in tests/backend/test_cuda_graph.py, which ``make gpu-check`` runs.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("gpunet")

enabled = True  # False: captured steps on CuPy stay launch lists (set before capturing)
GEMM_METHODS = frozenset({"matmul", "matmul_into", "linear_activation"})  # backend methods
_SKIPPED = ("view", "const", "folded")  # recorded entries a replay does not run


# ---------------------------------------------------------------------- the GEMM arguments
@dataclass(frozen=True)
class GemmCall:
    """One column-major cuBLAS GEMM, C(ldc) <- alpha op_a(A)(m x k) op_b(B)(k x n) + beta C:
    ``func`` 'gemmEx' (what ``cupy.matmul`` calls) or 'gemm' (``cublas<S|D>gemm_v2``, what
    ``cupy.cublas.gemm`` calls); ``trans_*`` 0 (N) or 1 (T); A, B, C the arrays whose first
    element each matrix starts at."""

    func: str
    trans_a: int
    trans_b: int
    m: int
    n: int
    k: int
    a: Any
    lda: int
    b: Any
    ldb: int
    c: Any
    ldc: int
    alpha: float = 1.0
    beta: float = 0.0


def _is_f(a: Any) -> bool:
    return bool(a.flags.f_contiguous)


def _is_c(a: Any) -> bool:
    return bool(a.flags.c_contiguous)


def _to_cublas(a: Any, trans: int) -> tuple[int, int] | None:
    """(trans, ld) of a 2-d operand as CuPy's ``_mat_to_cublas_contiguous`` gives them:
    column-major as it is, or row-major read as the transpose; None where CuPy would copy."""
    size = a.dtype.itemsize
    if _is_f(a):
        return trans, max(a.strides[1] // size, a.shape[0])
    if _is_c(a):
        return 1 - trans, a.strides[0] // size
    return None


def _gemm_dtype(*arrays: Any) -> bool:
    """float32 or float64 matrices of one dtype, none of them empty."""
    dt = arrays[0].dtype
    return all(a.ndim == 2 and a.dtype == dt and a.size for a in arrays) and dt.char in "fd"


def plan_matmul(out: Any, a: Any, b: Any) -> GemmCall | None:
    """``cupy.matmul(a, b, out=out)`` for 2-d a (n x k), b (k x m), out (n x m) C-contiguous
    (None: the fresh one CuPy would make): CuPy computes out^T = b^T a^T column-major, with
    a^T, b as they lie (its ``dot`` and ``tensordot_core_v11``). None for what CuPy does
    another way (a copy, a reduction, a batch)."""
    if not _gemm_dtype(a, b) or a.shape[1] != b.shape[0]:
        return None
    (n, k), m = a.shape, b.shape[1]
    if out is not None and not (
        _gemm_dtype(out, a)
        and _is_c(out)
        and out.shape == (n, m)
        and not (_overlaps(out, a) or _overlaps(out, b))
    ):
        return None
    at, bt = _to_cublas(a.T, 0), _to_cublas(b, 1)
    if at is None or bt is None or (n == 1 and m == 1):
        return None
    return GemmCall("gemmEx", bt[0], at[0], m, n, k, b, bt[1], a, at[1], out, m)


def plan_gemm(
    out: Any, x: Any, y: Any, tx: bool, ty: bool, alpha: float, beta: float
) -> GemmCall | None:
    """``cupy.cublas.gemm('T' if tx else 'N', 'T' if ty else 'N', x, y, out, alpha, beta)``:
    out <- alpha op(x) op(y) + beta out, each operand column-major as it lies or read
    transposed; a C-contiguous out as out^T = op(y)^T op(x)^T (CuPy's own arithmetic)."""
    if not _gemm_dtype(out, x, y):
        return None
    m, k = x.shape[::-1] if tx else x.shape
    n = y.shape[0] if ty else y.shape[1]
    if (y.shape[1] if ty else y.shape[0]) != k or out.shape != (m, n):
        return None
    xa, yb = _decide(x, int(tx)), _decide(y, int(ty))
    if xa is None or yb is None:
        return None
    (ta, lda), (tb, ldb) = xa, yb
    if _is_f(out):
        return GemmCall("gemm", ta, tb, m, n, k, x, lda, y, ldb, out, m, alpha, beta)
    if _is_c(out):
        return GemmCall("gemm", 1 - tb, 1 - ta, n, m, k, y, ldb, x, lda, out, n, alpha, beta)
    return None


def _decide(a: Any, trans: int) -> tuple[int, int] | None:
    """(trans, ld) as ``cupy.cublas`` decides them (``_decide_ld_and_trans``)."""
    if _is_f(a):
        return trans, a.shape[0]
    if _is_c(a):
        return 1 - trans, a.shape[1]
    return None


def _pointer(a: Any) -> int:
    face = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return int(face["data"][0])


def _overlaps(x: Any, y: Any) -> bool:
    """Do the address ranges of two arrays meet (CuPy's ``may_share_bounds``)?"""

    def bounds(a: Any) -> tuple[int, int]:
        lo = hi = _pointer(a)
        for n, s in zip(a.shape, a.strides):
            lo, hi = (lo + (n - 1) * s, hi) if s < 0 else (lo, hi + (n - 1) * s)
        return lo, hi + a.dtype.itemsize

    (a0, a1), (b0, b1) = bounds(x), bounds(y)
    return a0 < b1 and b0 < a1


# ---------------------------------------------------------------------- cuBLAS by ctypes
def _cublas_library() -> Any:
    """The libcublas CuPy loaded, so the handle CuPy made is valid in it: the one CuPy 14's
    loader (``cuda.pathfinder``) returns, else the one in this process's mappings, else the
    one the system's loader finds."""
    path = None
    with contextlib.suppress(Exception):
        from cuda import pathfinder

        path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps if path is None else ():
            name = line.rsplit(" ", 1)[-1].strip()
            if "/libcublas.so" in name:
                path = name
                break
    path = path or ctypes.util.find_library("cublas")
    if path is None:
        raise OSError("libcublas is not loaded in this process and the loader cannot find it")
    return ctypes.CDLL(path)


class CublasRoute:
    """cuBLAS GEMMs on one stream with a workspace set before capture, through ``lib``
    (libcublas by ctypes, or a stand-in). ``env``: CuPy's enum values and compute type."""

    def __init__(self, lib: Any, env: Any, handle: int, stream: int, workspace: Any) -> None:
        self.lib, self.env, self.handle = lib, env, ctypes.c_void_p(handle)
        self.stream, self.workspace = stream, workspace

    def _check(self, name: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLAS {name} returned status {status} during graph capture")

    def begin(self) -> None:
        """The handle on the capturing stream, then the graph's workspace (setting a stream
        resets cuBLAS to its own pool), scalars read from the host."""
        lib, h = self.lib, self.handle
        self._check("cublasSetStream_v2", lib.cublasSetStream_v2(h, ctypes.c_void_p(self.stream)))
        ws, size = ctypes.c_void_p(_pointer(self.workspace)), ctypes.c_size_t(self.workspace.nbytes)
        self._check("cublasSetWorkspace_v2", lib.cublasSetWorkspace_v2(h, ws, size))
        self._check("cublasSetPointerMode_v2", lib.cublasSetPointerMode_v2(h, 0))  # host

    def end(self) -> None:
        """cuBLAS's own workspace back on the handle (a stream set resets it): the graph's is
        addressed by the graph only."""
        status = self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(self.stream))
        self._check("cublasSetStream_v2", status)

    def run(self, call: GemmCall) -> None:
        """Enqueue ``call``: cublasGemmEx with CuPy's compute type and algorithm, or
        cublas<S|D>gemm_v2 (which reads the handle's math mode, as CuPy's does)."""
        env, dt = self.env, call.c.dtype
        compute = env.compute_type(dt)
        double = compute in env.double_computes
        scalar = ctypes.c_double if double else ctypes.c_float
        alpha, beta = scalar(call.alpha), scalar(call.beta)
        ptr = [ctypes.c_void_p(_pointer(x)) for x in (call.a, call.b, call.c)]
        dims = [ctypes.c_int(v) for v in (call.trans_a, call.trans_b, call.m, call.n, call.k)]
        lda, ldb, ldc = ctypes.c_int(call.lda), ctypes.c_int(call.ldb), ctypes.c_int(call.ldc)
        if call.func == "gemmEx":
            t = ctypes.c_int(env.cuda_type(dt))
            status = self.lib.cublasGemmEx(
                self.handle, *dims, ctypes.byref(alpha), ptr[0], t, lda, ptr[1], t, ldb,
                ctypes.byref(beta), ptr[2], t, ldc, ctypes.c_int(compute), ctypes.c_int(env.algo),
            )  # fmt: skip
            return self._check("cublasGemmEx", status)
        name = "cublasDgemm_v2" if dt.char == "d" else "cublasSgemm_v2"
        status = getattr(self.lib, name)(
            self.handle, *dims, ctypes.byref(alpha), ptr[0], lda, ptr[1], ldb,
            ctypes.byref(beta), ptr[2], ldc,
        )  # fmt: skip
        return self._check(name, status)


@dataclass
class CupyEnums:
    """What ``CublasRoute`` needs from CuPy: data types, compute types, the algorithm."""

    cuda_types: dict[str, int]  # dtype char -> cudaDataType
    computes: dict[tuple[str, str], int]  # (dtype char, CuPy compute type name) -> cuBLAS's
    double_computes: frozenset[int]
    algo: int
    compute_name: Callable[[Any], str]  # dtype -> CuPy's compute type for it, by name

    def cuda_type(self, dtype: Any) -> int:
        return self.cuda_types[np.dtype(dtype).char]

    def compute_type(self, dtype: Any) -> int:
        """cuBLAS's compute type as ``tensordot_core_v11`` maps CuPy's (TF32 for float32 when
        ``gpunet.backends.allow_tf32`` set it, pedantic if asked, else the dtype's own)."""
        char = np.dtype(dtype).char
        name = self.compute_name(dtype)
        return self.computes.get((char, name), self.computes[(char, "default")])


def cupy_enums(cupy: Any) -> CupyEnums:
    """CuPy's values for ``CublasRoute`` (read from the modules CuPy's GEMMs use)."""
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas

    names = {getattr(linalg, f"COMPUTE_TYPE_{n.upper()}"): n for n in ("pedantic", "tf32")}
    rt = cupy.cuda.runtime
    computes = {
        ("f", "default"): cublas.CUBLAS_COMPUTE_32F,
        ("f", "pedantic"): cublas.CUBLAS_COMPUTE_32F_PEDANTIC,
        ("f", "tf32"): cublas.CUBLAS_COMPUTE_32F_FAST_TF32,
        ("d", "default"): cublas.CUBLAS_COMPUTE_64F,
        ("d", "pedantic"): cublas.CUBLAS_COMPUTE_64F_PEDANTIC,
    }
    capability = int(cupy.cuda.Device().compute_capability)
    return CupyEnums(
        cuda_types={"f": rt.CUDA_R_32F, "d": rt.CUDA_R_64F},
        computes=computes,
        double_computes=frozenset({computes[("d", "default")], computes[("d", "pedantic")]}),
        algo=cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP
        if capability >= 80
        else cublas.CUBLAS_GEMM_DEFAULT,
        compute_name=lambda dt: names.get(linalg.get_compute_type(dt), "default"),
    )


def workspace_bytes(capability: int) -> int:
    """cuBLAS's recommended workspace: 32 MiB on Hopper and later, 4 MiB before."""
    return (32 if capability >= 90 else 4) * 2**20


# ---------------------------------------------------------------------- capturable GEMMs
class _Namespace:
    """A module with a few names replaced (the rest are the module's own)."""

    def __init__(self, module: Any, **names: Any) -> None:
        self._module = module
        self.__dict__.update(names)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _Unsupported(RuntimeError):
    """A GEMM the graph's cuBLAS route does not take (CuPy would copy or batch it)."""


def _capturable(cupy: Any, route: CublasRoute) -> tuple[Any, Any]:
    """Stand-ins for ``cupy`` and ``cupy.cublas`` whose GEMMs go through ``route``."""

    def matmul(a: Any, b: Any, out: Any = None) -> Any:
        call = plan_matmul(out, a, b)
        if call is None:
            raise _Unsupported(
                f"cupy.matmul of {a.shape} {a.dtype} by {b.shape} {b.dtype} is not a 2-d "
                "float32/float64 GEMM that the graph's cuBLAS route takes"
            )
        if out is None:  # (from the graph's own pool: the capture allocates there)
            out = cupy.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
            call = dataclasses.replace(call, c=out)
        route.run(call)
        return out

    def gemm(transa: str, transb: str, a: Any, b: Any, out: Any, alpha: float, beta: float) -> Any:
        call = plan_gemm(out, a, b, transa == "T", transb == "T", alpha, beta)
        if call is None:
            raise _Unsupported(f"cupy.cublas.gemm of {a.shape} by {b.shape} into {out.shape}")
        route.run(call)
        return out

    return _Namespace(cupy, matmul=matmul), _Namespace(None, gemm=gemm)


@contextlib.contextmanager
def _gemms_through(backend: Any, route: CublasRoute) -> Iterator[None]:
    """The backend's GEMM entry points (``self.cupy.matmul``, ``self.xp.matmul``,
    ``self.cublas.gemm``) routed to ``route`` for the capture, restored after."""
    cupy, cublas = _capturable(backend.cupy, route)
    saved = {k: backend.__dict__[k] for k in ("cupy", "xp", "_cublas") if k in backend.__dict__}
    backend.cupy, backend._cublas = cupy, cublas
    if saved.get("xp") is saved.get("cupy"):
        backend.xp = cupy
    try:
        yield
    finally:
        for k in ("cupy", "xp", "_cublas"):
            backend.__dict__.pop(k, None)
        backend.__dict__.update(saved)


# ---------------------------------------------------------------------- what blocks a graph
def _changing(e: Any, changing: tuple) -> list[Any]:
    return [v for v in e.params.values() if isinstance(v, changing)]


def _pure(x: Any) -> bool:
    """Does a changing parameter (or, for a ``Dynamic``, its value) say that what changes
    between steps lives in device arrays?"""
    value = getattr(x, "value", None)  # (a Dynamic's)
    return bool(getattr(x, "device_pure", False) or getattr(value, "device_pure", False))


def _recorded_value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else float(v)  # (Dynamic's value; Live is a float)


def _same_host_values(a: Any, b: Any) -> bool:
    """Would a graph captured with ``b`` compute what ``a`` asks? Host values equal, device
    arrays the same memory (the graph addresses them), field by field."""
    if a is b:
        return True
    if _is_array(a) or _is_array(b):
        return _is_array(a) and _is_array(b) and _pointer(a) == _pointer(b) and a.shape == b.shape
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        names = [f.name for f in dataclasses.fields(a)]
        return all(_same_host_values(getattr(a, n), getattr(b, n)) for n in names)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_host_values(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # (no plain ==: only the same object would do)
        return False


def _gemm_operands(e: Any, arrays: list[Any]) -> bool:
    """Can the graph's cuBLAS route take this recorded GEMM (2-d float32/float64 operands of
    one dtype, the layouts CuPy passes to cuBLAS without a copy)?"""
    ins = [arrays[r[1]] if r[0] == "a" else r[1] for r in e.ins]
    p, method = e.params, e.fn.__name__
    if method == "matmul_into":
        out, x, y = ins
        if p.get("alpha", 1.0) == 1.0 and p.get("beta", 0.0) == 0.0:
            return plan_matmul(out, _op(x, p["tx"]), _op(y, p["ty"])) is not None
        return plan_gemm(out, x, y, p["tx"], p["ty"], p["alpha"], p["beta"]) is not None
    x, y = ins[:2]
    x, y = (_op(x, p["tx"]), _op(y, p["ty"])) if method == "matmul" else (x, y)
    return plan_matmul(None, x, y) is not None


def _op(a: Any, t: bool) -> Any:
    return a.swapaxes(-1, -2) if t else a


def blockers(program: Any, changing: tuple) -> list[str]:
    """What keeps a recording (``program.rec``) from replaying as one CUDA graph, in words;
    empty when it may be captured (the capture and its self-check decide the rest)."""
    rec, live = program.rec, [e for e in program.rec.entries if e.kind not in _SKIPPED]
    calls = [e for e in live if e.kind != "segment"]
    gemms = [e for e in calls if getattr(e.fn, "__name__", "") in GEMM_METHODS]
    counts = {
        "GEMMs the graph's cuBLAS route does not take (batched, half precision or copied "
        "operands)": sum(not _gemm_operands(e, rec.arrays) for e in gemms),
        "calls with per-step host scalars a graph would freeze (an optimizer's lr: make it "
        "with capturable=True)": sum(
            any(not _pure(v) for v in _changing(e, changing)) for e in calls
        ),
        "Python segments (clipping, schedules)": sum(
            e.kind == "segment" and not _pure(e.fn) for e in live
        ),
        "random draws (the self-check cannot restore the generator's device state)": sum(
            e.name == "random" for e in calls
        ),
    }
    why = [f"{n} {what}" for what, n in counts.items() if n]
    if getattr(program, "folded", 0):
        why.append("plain SGD folded into its GEMMs with the lr read on the host (alpha = -lr)")
    backend = getattr(program, "backend", None)
    device = (
        getattr(backend, "array_type", None) if getattr(backend, "name", "") == "cupy" else None
    )
    if device is not None and any(not isinstance(a, device) for a in rec.arrays):
        why.append("host arrays among its arrays")
    return why


# ---------------------------------------------------------------------- the graph replay
class GraphReplay:
    """One recording's replay on CuPy: its launch list until the first replay, then one CUDA
    graph where the capture succeeds and matches the list bit for bit on the first two
    replays, else the list for good (with a one-line warning saying why). What the graph
    holds is the launch list itself, captured as it runs: the same calls by construction."""

    def __init__(self, program: Any, changing: tuple) -> None:
        self.program = program
        self.cupy = program.backend.cupy
        self.device = getattr(program.backend, "_cuda_device", None) or contextlib.nullcontext()
        self.plain = program.replay  # the launch list
        found = blockers(program, changing)
        self.why = "CUDA graph blockers: " + ", ".join(found) if found else ""
        self.mode = "list" if found else "pending"
        self.graph: Any = None
        self.pool: Any = None  # the graph's temporaries (made at the first replay)
        self.owned: tuple = ()  # what else the graph's nodes address: its workspace, stream
        live = [e for e in program.rec.entries if e.kind not in _SKIPPED]
        # (device-pure parameters: read at each replay, their host values held to the capture's)
        self.hooks = [(v.fn, _recorded_value(v)) for e in live for v in _changing(e, changing)]
        if not found:
            program.replay = self.first_replay

    def describe(self) -> str:
        if self.mode == "graph":
            return "a CUDA graph"
        if self.mode == "pending":
            return (
                "a launch list until its first replay, then a CUDA graph if it captures and "
                "matches the list bit for bit on its first two replays"
            )
        if self.mode == "checking":
            return "a CUDA graph (its next replay is checked against the launch list once more)"
        return f"a launch list ({self.why})"

    def launch(self, xs: list[Any]) -> None:
        """A replay: device-pure parameters read (a host value changed since the capture,
        a momentum or an eps, sends the step back to its launch list for good), the
        arguments copied in, one launch, on the caller's current stream (so it is ordered
        with the caller's own work)."""
        for fn, recorded in self.hooks:
            if not _same_host_values(fn(), recorded):
                self._fall_back("a per-step value the graph holds as a constant changed since")
                return self.plain(xs)
        cp = self.cupy
        with self.device:
            for a, x in zip(self.program.inputs, xs):
                cp.copyto(a, x)
            self.graph.launch(stream=cp.cuda.get_current_stream())

    def first_replay(self, xs: list[Any]) -> None:
        """This replay through the launch list, then the graph captured and run from the
        same state and compared; the graph kept only where they agree bit for bit."""
        self._checked(xs, first=True)

    def second_replay(self, xs: list[Any]) -> None:
        """The check once more, on the next step's values: a value frozen into the graph
        that happened to equal the first step's is caught here."""
        self._checked(xs, first=False)

    def _checked(self, xs: list[Any], first: bool) -> None:
        cp = self.cupy
        with self.device:
            for a, x in zip(self.program.inputs, xs):
                cp.copyto(a, x)
            caller = cp.cuda.get_current_stream()
            # (captured and checked on a stream of its own, ordered after the caller's work)
            stream = cp.cuda.Stream(non_blocking=True) if first else self.owned[1]
            stream.wait_event(caller.record())
            with stream:
                why = self._check(stream, first)
            caller.wait_event(stream.record())
        if why is None:
            self.mode = "checking" if first else "graph"
            self.program.replay = self.second_replay if first else self.launch
        else:
            self._fall_back(why)

    def _fall_back(self, why: str) -> None:
        """The launch list for good, saying why once."""
        self.mode, self.why, self.program.replay = "list", why, self.plain
        self.graph, self.owned = None, ()
        import warnings

        warnings.warn(
            f"gpunet.capture: a captured step replays as a launch list, not a CUDA graph: {why}",
            RuntimeWarning,
            stacklevel=6,
        )

    def _check(self, stream: Any, first: bool) -> str | None:
        """None when the graph is kept; else why not, with the state the list left. The
        first time, the graph is captured (its pool sized by the list's run)."""
        cp, state = self.cupy, _state_arrays(self.program)
        saved = [a.copy() for a in state]
        if first:  # the graph's own pool: nothing else allocates from it; it lives as long
            # as this replay does, graph or not (a block something kept stays valid)
            self.pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(self.pool.malloc) if first else contextlib.nullcontext():
            self.plain(self.program.inputs)  # the reference: this replay, as a list
        expected = [a.copy() for a in state]
        _restore(cp, state, saved)
        del saved
        try:
            if first:
                self.graph, workspace = self._capture(stream, self.pool)
                self.owned = (workspace, stream)
            self.graph.launch(stream=stream)
            bad = _first_difference(cp, state, expected)
        except Exception as e:  # (CaptureError, cuBLAS, an unsupported GEMM, an allocation)
            _restore(cp, state, expected)
            what = "its capture" if first else "its graph's second replay"
            return f"{what} failed: {type(e).__name__}: {_first_line(e)}"
        if bad is not None:
            _restore(cp, state, expected)
            which = "first" if first else "second"
            return f"its graph's {which} replay differed from the launch list in {bad}"
        return None

    def _capture(self, stream: Any, pool: Any) -> tuple[Any, Any]:
        """The recording's calls captured on ``stream``: GEMMs through cuBLAS by ctypes,
        temporaries from ``pool``; raises if anything took a block of CuPy's shared pool."""
        cp = self.cupy
        capability = int(cp.cuda.Device().compute_capability)
        workspace = cp.empty(workspace_bytes(capability), dtype=cp.uint8)
        handle = cp.cuda.device.get_cublas_handle()
        route = CublasRoute(_cublas_library(), cupy_enums(cp), handle, stream.ptr, workspace)
        shared = cp.get_default_memory_pool()
        before = (shared.used_bytes(), shared.total_bytes())
        route.begin()
        try:
            with _gemms_through(self.program.backend, route), cp.cuda.using_allocator(pool.malloc):
                # (the list's own input copies become copies of each buffer onto itself)
                graph = _captured(stream, lambda: self.plain(self.program.inputs))
        finally:
            route.end()
        # (a block taken shows as more bytes used or held; one taken and given back within
        # the capture does not, which is why every allocation is routed to ``pool`` first)
        if shared.used_bytes() > before[0] or shared.total_bytes() > before[1]:
            raise RuntimeError(
                "a call allocated from CuPy's shared memory pool during capture (the block "
                "would be handed out again and overwritten by each replay)"
            )
        return graph, workspace


def _captured(stream: Any, body: Callable[[], None]) -> Any:
    """The graph of what ``body`` enqueues on ``stream``; on an error the capture is ended
    (leaving the stream usable, the graph dropped) and the error raised."""
    stream.begin_capture()
    try:
        body()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.end_capture()
        raise
    return stream.end_capture()


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0] if lines else ""


def _is_array(x: Any) -> bool:
    return hasattr(x, "__cuda_array_interface__") or isinstance(x, np.ndarray)


def _state_arrays(program: Any) -> list[Any]:
    """The memory a replay may write: every array of the recording (and of its calls'
    parameters), each allocation once."""
    found = list(program.rec.arrays)
    for e in program.rec.entries:
        for v in e.params.values():
            v = v if _is_array(v) else getattr(v, "data", None)
            if _is_array(v):
                found.append(v)
    roots: dict[int, Any] = {}
    for a in found:
        while getattr(a, "base", None) is not None:
            a = a.base
        roots.setdefault(id(a), a)
    return list(roots.values())


def _restore(cp: Any, state: list[Any], copies: list[Any]) -> None:
    for a, c in zip(state, copies):
        cp.copyto(a, c)


def _first_difference(cp: Any, state: list[Any], expected: list[Any]) -> str | None:
    """The first array whose bits differ (NaNs and signed zeros compared as bits)."""
    for i, (a, e) in enumerate(zip(state, expected)):
        bits = [
            (x if x.flags.c_contiguous else x.copy()).reshape(-1).view(cp.uint8) for x in (a, e)
        ]
        if not bool(cp.array_equal(*bits)):
            return f"array {i} ({a.dtype} {tuple(a.shape)})"
    return None


# ---------------------------------------------------------------------- capture's hooks
def attach(program: Any, changing: tuple) -> GraphReplay | None:
    """Called by ``gpunet.capture`` once a recording's launch list is built: on CuPy its
    replays go through a ``GraphReplay``; on the CPU nothing changes (None)."""
    backend = program.backend
    if not enabled or getattr(backend, "name", None) != "cupy":
        return None
    return GraphReplay(program, changing)


def describe(program: Any) -> str:
    """How a recording on CuPy replays: 'a CUDA graph' or 'a launch list (why)'."""
    graph = getattr(program, "graph", None)
    if graph is not None:
        return graph.describe()
    if getattr(program.backend, "name", None) != "cupy":
        return "a launch list (not on a CuPy device)"
    return "a launch list (gpunet.backend.cuda_graph.enabled was False at its capture)"
