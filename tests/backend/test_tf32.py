"""gpunet.backends.allow_tf32: off by default, applied to CuPy's GEMMs per call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet.backend.cupy_backend import CupyBackend
from gpunet.backend.generic import ArrayBackend


@pytest.fixture(autouse=True)
def _tf32_off() -> Iterator[None]:
    yield
    gpunet.backends.allow_tf32 = False


class _Linalg:
    """Stands in for cupy._core._routines_linalg: records the compute types set."""

    COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int]] = []

    def set_compute_type(self, dtype: Any, kind: int) -> None:
        self.calls.append((dtype, kind))


def _standin(monkeypatch: pytest.MonkeyPatch) -> tuple[CupyBackend, _Linalg, list[bool]]:
    """A CuPy backend over NumPy arrays, its cuBLAS settings recorded instead of applied."""
    b = object.__new__(CupyBackend)
    ArrayBackend.__init__(b, np, gpunet.device("cpu"), np.ndarray)
    b.cupy, b._cuda_device, b._tf32_applied = np, contextlib.nullcontext(), None
    linalg, modes = _Linalg(), []
    monkeypatch.setattr(CupyBackend, "_linalg", linalg)
    monkeypatch.setattr(CupyBackend, "_math_mode", lambda self, tf32: modes.append(tf32))
    monkeypatch.setattr(CupyBackend, "cublas", property(lambda self: _Cublas()))
    return b, linalg, modes


class _Cublas:
    def gemm(self, ta: str, tb: str, x: Any, y: Any, *, out: Any, alpha: float, beta: float):  # type: ignore[no-untyped-def]
        a, b = (x.T if ta == "T" else x), (y.T if tb == "T" else y)
        out[...] = alpha * (a @ b) + beta * out


def test_off_by_default_and_settable_in_pytorchs_words() -> None:
    assert gpunet.backends.allow_tf32 is False
    assert gpunet.get_float32_matmul_precision() == "highest"
    gpunet.set_float32_matmul_precision("high")
    assert gpunet.backends.allow_tf32 is True
    gpunet.backends.allow_tf32 = False
    assert gpunet.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="highest"):
        gpunet.set_float32_matmul_precision("fast")
    with pytest.raises(TypeError, match="True or False"):
        gpunet.backends.allow_tf32 = 1


def test_cupy_gemms_set_the_compute_type_when_the_setting_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b, linalg, modes = _standin(monkeypatch)
    x, w = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
    b.matmul(x, w, tx=False, ty=False)
    b.matmul(x, w, tx=False, ty=False)  # unchanged: not set again
    assert linalg.calls == [(np.dtype(np.float32), 1)]
    gpunet.backends.allow_tf32 = True
    b.linear_activation(x, w, np.zeros(2, np.float32), activation=None, alpha=0.0)
    assert linalg.calls[-1] == (np.dtype(np.float32), 7)
    out = np.zeros((3, 2), np.float32)
    b.matmul_into(out, x, np.ones((4, 2), np.float32), tx=True, ty=False, alpha=-0.5, beta=1.0)
    np.testing.assert_array_equal(out, np.full((3, 2), -2.0, np.float32))
    assert modes == [True]  # cublasSgemm reads the handle's math mode: TF32 for this call
    gpunet.backends.allow_tf32 = False
    b.matmul_into(out, x, np.ones((4, 2), np.float32), tx=True, ty=False, alpha=1.0, beta=1.0)
    assert modes == [True, False] and linalg.calls[-1] == (np.dtype(np.float32), 1)


def test_info_says_tf32_is_a_no_op_on_the_cpu() -> None:
    assert "no-op on the CPU" in gpunet.info()["tf32"] or gpunet.info()["cuda_available"]


@pytest.mark.gpu
def test_tf32_changes_float32_gemms_on_a_gpu() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 512, 512)).astype(np.float32)
    x, y = gpunet.tensor(a, device="cuda"), gpunet.tensor(b, device="cuda")
    exact = a.astype(np.float64) @ b
    off = (x @ y).numpy()
    gpunet.backends.allow_tf32 = True
    on = (x @ y).numpy()
    err_off = np.abs(off - exact).max() / np.abs(exact).max()
    err_on = np.abs(on - exact).max() / np.abs(exact).max()
    assert err_off < 1e-5 < err_on < 1e-2  # TF32 keeps 10 mantissa bits


def test_the_sgemm_math_mode_is_set_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cublasSgemm`` reads the handle's math mode (stand-ins for CuPy's cuBLAS module)."""
    import types

    import cupy_backends.cuda.libs as libs

    calls: list[tuple[int, int]] = []
    fake = types.SimpleNamespace(
        CUBLAS_DEFAULT_MATH=0,
        CUBLAS_TF32_TENSOR_OP_MATH=3,
        setMathMode=lambda handle, mode: calls.append((handle, mode)),
    )
    monkeypatch.setitem(vars(libs), "cublas", fake)  # (getattr would load the library)
    b = object.__new__(CupyBackend)
    handle = types.SimpleNamespace(get_cublas_handle=lambda: 42)
    b.cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(device=handle))
    b._math_mode(False)  # the default: nothing to set
    b._math_mode(True)
    b._math_mode(True)
    b._math_mode(False)
    assert calls == [(42, 3), (42, 0)]
