"""GEMM with alpha and beta, C <- alpha op(A) op(B) + beta C, from the BLAS NumPy itself runs.

NumPy's ``matmul`` computes C = A B only: accumulating a product into an existing array
(``C += A @ B``) or scaling it (``W -= lr * X.T @ dY``) costs a temporary and one more pass
over memory. BLAS's GEMM does both in its own pass (beta scales C as the kernel writes its
tiles). SciPy exposes that GEMM, but through its own OpenBLAS with its own thread pool, which
fights NumPy's for the cores; so this module calls ``cblas_?gemm`` in the library NumPy has
already loaded (the scipy-openblas that NumPy's wheels bundle), through ctypes: one library,
one thread pool, threadpoolctl's limits apply.

Only 64-bit-integer (ILP64) entry points with a known suffix are used, so the integer width
is never guessed. Where none is found (NumPy built against Accelerate or MKL, say),
``gemm`` declines (returns False) and callers take NumPy's path (a product, then a scaled add).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable
from typing import Any

import numpy as np

Array = Any

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_ORDER / CBLAS_TRANSPOSE values
# (prefix, suffix) of ILP64 CBLAS symbols: NumPy >= 2 wheels, then OpenBLAS's own 64_ build.
_SYMBOLS = (("scipy_cblas_", "64_"), ("cblas_", "64_"))


def _candidate_libraries() -> list[str]:
    """Paths of the OpenBLAS NumPy loaded: its wheel's bundled copy, else (Linux) the
    library mapped into this process."""
    root = os.path.dirname(np.__file__)
    found = []
    for where in (os.path.join(root, os.pardir, "numpy.libs"), os.path.join(root, ".dylibs")):
        found += sorted(glob.glob(os.path.join(where, "*openblas*")))
    try:
        with open("/proc/self/maps") as maps:
            found += sorted({line.split()[-1] for line in maps if "openblas" in line})
    except OSError:
        pass
    return found


@functools.cache
def _load() -> tuple[dict[np.dtype, Callable[..., None]], str]:
    """``({float32: sgemm, float64: dgemm}`` as ctypes functions, where they come from), or
    ({}, why not). Looked up on first use, not at import."""
    for path in _candidate_libraries():
        try:
            lib = ctypes.CDLL(path)  # already loaded by NumPy: the same handle, no second copy
        except OSError:
            continue
        for prefix, suffix in _SYMBOLS:
            try:
                fns = {
                    np.dtype(np.float32): (getattr(lib, f"{prefix}sgemm{suffix}"), ctypes.c_float),
                    np.dtype(np.float64): (getattr(lib, f"{prefix}dgemm{suffix}"), ctypes.c_double),
                }
            except AttributeError:
                continue
            out = {}
            for dtype, (fn, scalar) in fns.items():
                i, n, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
                fn.argtypes = [i, i, i, n, n, n, scalar, p, n, p, n, scalar, p, n]
                fn.restype = None
                out[dtype] = fn
            return out, f"{prefix}?gemm{suffix} in {os.path.basename(path)}"
    return {}, "no ILP64 cblas_?gemm found in NumPy's BLAS: a GEMM, then a scaled add"


def available() -> bool:
    """Did this process find a GEMM with beta in NumPy's BLAS?"""
    return bool(_load()[0])


def describe() -> str:
    """Where the GEMM with alpha and beta comes from, or why there is none (``gpunet info``)."""
    return _load()[1]


def _operand(a: Array, trans: bool) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) for the row-major matrix op(a), or None when
    a's strides are not those of a row-major matrix or of its transpose."""
    item = a.itemsize
    s0, s1 = a.strides
    rows, cols = a.shape
    if s1 == item and s0 % item == 0 and s0 >= item * cols:
        return (_TRANS if trans else _NO_TRANS), s0 // item
    if s0 == item and s1 % item == 0 and s1 >= item * rows:  # a is the transpose of one
        return (_NO_TRANS if trans else _TRANS), s1 // item
    return None


def gemm(out: Array, a: Array, b: Array, ta: bool, tb: bool, alpha: float, beta: float) -> bool:
    """out <- alpha op(a) op(b) + beta out, in place, in one BLAS call; False (nothing done)
    when this BLAS or these arrays do not allow it: the caller then computes it otherwise.

    Allowed: 2-d float32 or float64 operands of out's dtype, non-empty, each row-major or
    the transpose of one, out row-major, writeable and sharing no memory with a or b.
    """
    fn = _load()[0].get(out.dtype) if isinstance(out, np.ndarray) else None
    if (
        fn is None
        or out.ndim != 2
        or a.ndim != 2
        or b.ndim != 2
        or a.dtype != out.dtype
        or b.dtype != out.dtype
        or out.size == 0
        or a.size == 0
        or not out.flags.writeable
        or out.strides[1] != out.itemsize
        or np.may_share_memory(out, a)
        or np.may_share_memory(out, b)
    ):
        return False
    m, n = out.shape
    k = a.shape[0] if ta else a.shape[1]
    if (a.shape[1] if ta else a.shape[0]) != m or (b.shape[0] if tb else b.shape[1]) != n:
        raise ValueError(f"gemm: op(a) op(b) of {a.shape}, {b.shape} does not fit {out.shape}")
    if (b.shape[1] if tb else b.shape[0]) != k:
        raise ValueError(f"gemm: inner dimensions of {a.shape} and {b.shape} differ")
    opa, opb = _operand(a, ta), _operand(b, tb)
    ldc = out.strides[0] // out.itemsize
    if opa is None or opb is None or out.strides[0] % out.itemsize or ldc < n:
        return False
    fn(_ROW_MAJOR, opa[0], opb[0], m, n, k, alpha, a.ctypes.data, opa[1],
       b.ctypes.data, opb[1], beta, out.ctypes.data, ldc)  # fmt: skip
    return True
