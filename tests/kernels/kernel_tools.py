"""Tools for checking the CUDA kernels without a GPU: NVRTC through ctypes, and the g++
host emulation of every kernel (kernels/host_emulation.h) behind the same Python glue that
CupyBackend uses. Used by test_kernels.py and test_kernels_gpu.py."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpunet.backend import Device
from gpunet.backend import kernels as K
from gpunet.backend.cupy_backend import CupyBackend
from gpunet.backend.generic import ArrayBackend

CI = os.environ.get("CI") == "true"
GXX_FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wextra")


def unavailable(reason: str) -> None:
    """Skip, saying why; under CI=true a missing tool fails instead."""
    if CI:
        pytest.fail(f"{reason} (CI=true: the kernel checks must run, not skip)")
    pytest.skip(reason)


# ---------------------------------------------------------------------- NVRTC through ctypes
class Nvrtc:
    """The few NVRTC entry points we need, from the pip package's libnvrtc."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(self.lib.nvrtcGetErrorString(status).decode())

    def compile(self, src: str, name: str, options: tuple[str, ...]) -> tuple[bool, str, str]:
        """(ok, log, ptx)."""
        lib, prog = self.lib, ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, log))
            if status != 0:
                return False, log.value.decode(errors="replace"), ""
            self._check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetPTX(prog, ptx))
            return True, log.value.decode(errors="replace"), ptx.value.decode()
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def find_libnvrtc() -> Path | None:
    try:
        import nvidia.cuda_nvrtc as pkg  # the pip package nvidia-cuda-nvrtc-cu12
    except ImportError:
        return None
    for root in pkg.__path__:
        libs = sorted(Path(root, "lib").glob("libnvrtc.so*")) + sorted(
            Path(root, "bin").glob("nvrtc64*.dll")
        )
        libs = [p for p in libs if "builtins" not in p.name and ".alt." not in p.name]
        if libs:
            return libs[0]
    return None


# ---------------------------------------------------------------------- host emulation
def shim_source() -> str:
    """Per kernel, an extern "C" launcher emu_<name>(grid, block, <params>)."""
    lines = [f'#include "{src}"' for src in K.SOURCES]
    for spec in K.TABLE.values():
        params = ", ".join(f"{t} {n}" for t, n in spec.params)
        names = ", ".join(n for _, n in spec.params)
        coop = "true" if spec.cooperative else "false"
        lines.append(
            f'extern "C" void emu_{spec.name}(unsigned grid, unsigned block, {params}) '
            f"{{ gn_emu::launch({coop}, {spec.name}, grid, block, {names}); }}"
        )
    return "\n".join(lines) + "\n"


def build_emulation(gxx: str) -> Path:
    """The g++ build of every kernel, cached by the hash of everything that goes into it."""
    root = K.kernel_dir()
    shim = shim_source()
    digest = hashlib.sha256(shim.encode() + " ".join(GXX_FLAGS).encode())
    for f in sorted(root.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    cache = Path(tempfile.gettempdir()) / "gpunet-kernel-emulation"
    cache.mkdir(exist_ok=True)
    lib = cache / f"emu-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cpp = Path(tmp) / "shim.cpp"
            cpp.write_text(shim)
            out = Path(tmp) / "emu.so"
            cmd = [gxx, *GXX_FLAGS, "-I", str(root), "-include", "host_emulation.h"]
            cmd += [str(cpp), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, f"g++ failed:\n{done.stderr}"
            os.replace(out, lib)  # atomic: concurrent sessions never see half a file
    return lib


_CTYPES = {
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
    np.int64: ctypes.c_longlong,
    np.int32: ctypes.c_int,
}


class EmulatedKernels(K.Kernels):
    """The kernels' Python glue over the g++ build: what CupyBackend runs, on the CPU."""

    def __init__(self, lib: ctypes.CDLL, sm_count: int = 2) -> None:
        super().__init__(np, sm_count)
        self.lib = lib
        self.launches: list[tuple[str, int, int]] = []

    def _run(self, spec: K.KernelSpec, grid: int, block: int, args: list[Any]) -> None:
        self.launches.append((spec.name, grid, block))
        cargs: list[Any] = [ctypes.c_uint(grid), ctypes.c_uint(block)]
        for value in args:
            if value is None:
                cargs.append(ctypes.c_void_p(None))
            elif isinstance(value, np.ndarray):
                cargs.append(ctypes.c_void_p(value.ctypes.data))
            else:
                cargs.append(_CTYPES[type(value)](value))
        getattr(self.lib, "emu_" + spec.name)(*cargs)


class _CublasOnNumpy:
    """cupy.cublas.gemm's contract (out = alpha op(a) op(b) + beta out, in place, 'N'/'T'),
    computed by NumPy: CupyBackend's call into cuBLAS is checked, not cuBLAS."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, float]] = []

    def gemm(self, transa: str, transb: str, a: Any, b: Any, out: Any, alpha: float, beta: float):
        assert a.ndim == b.ndim == out.ndim == 2 and a.dtype == b.dtype == out.dtype
        self.calls.append((transa, transb, alpha, beta))
        op = {"N": lambda m: m, "T": lambda m: m.T}
        product = op[transa](a) @ op[transb](b)
        assert product.shape == out.shape
        out[...] = alpha * product + (beta * out if beta != 0 else 0)
        return out


class _NumpyAsCupy:
    """NumPy under the names CupyBackend calls (cupy.asnumpy is the one NumPy lacks)."""

    asnumpy = staticmethod(np.asarray)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def emulated_cupy_backend(emu: EmulatedKernels) -> CupyBackend:
    """A CupyBackend whose kernels are the g++ build and whose arrays are NumPy's: its own
    methods (dtype dispatch, fallbacks, argument order) run unchanged, without CuPy."""
    backend = object.__new__(CupyBackend)
    ArrayBackend.__init__(backend, np, Device("cuda", 0), np.ndarray)
    backend.cupy = _NumpyAsCupy()
    backend._cuda_device = contextlib.nullcontext()
    backend._kernels = emu
    backend._cublas = _CublasOnNumpy()
    return backend


def find_gxx() -> str:
    path = shutil.which(os.environ.get("CXX", "g++"))
    if path is None:
        unavailable("g++ not found: the host emulation of the kernels needs a C++17 compiler")
    return path  # type: ignore[return-value]


def emulated_kernels() -> EmulatedKernels:
    """The g++ build of every kernel (cached), or skip saying why (fail under CI=true)."""
    if sys.platform == "win32":
        unavailable("the host emulation needs POSIX ucontext")
    return EmulatedKernels(ctypes.CDLL(str(build_emulation(find_gxx()))))
