"""The GEMM with alpha and beta called in NumPy's own OpenBLAS (gpunet/backend/blas.py)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet.backend import blas, get_backend

R = np.random.default_rng(7)


def test_found_in_numpys_openblas() -> None:
    """NumPy's wheels bundle scipy-openblas with ILP64 CBLAS symbols; CI installs such a
    wheel, so there the fast path must be live (elsewhere it may fall back)."""
    if os.environ.get("CI") == "true":
        assert blas.available(), blas.describe()
    elif not blas.available():
        pytest.skip(blas.describe())
    assert "gemm" in gpunet.info()["blas_gemm"] and "openblas" in blas.describe()


def _operand(shape: tuple[int, int], layout: str, dtype: Any) -> np.ndarray:
    """A matrix of ``shape`` stored row-major ("C"), as a transpose ("F"), or as a row-major
    view with a padded leading dimension ("padded")."""
    if layout == "C":
        return R.standard_normal(shape).astype(dtype)
    if layout == "F":
        return np.asfortranarray(R.standard_normal(shape).astype(dtype))
    big = R.standard_normal((shape[0], shape[1] + 3)).astype(dtype)
    return big[:, : shape[1]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("layout", ["C", "F", "padded"])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (1.0, 1.0), (-0.01, 1.0), (2.0, 0.5)])
def test_gemm_matches_numpy(dtype: Any, ta: bool, tb: bool, layout: str, alpha: float, beta: float):
    if not blas.available():
        pytest.skip("no ILP64 cblas_?gemm in NumPy's BLAS")
    m, n, k = 6, 5, 7
    a = _operand((k, m) if ta else (m, k), layout, dtype)
    b = _operand((n, k) if tb else (k, n), layout, dtype)
    c = R.standard_normal((m, n)).astype(dtype)
    expect = alpha * ((a.T if ta else a) @ (b.T if tb else b)) + beta * c
    a0, b0 = a.copy(), b.copy()
    assert blas.gemm(c, a, b, ta, tb, alpha, beta)
    np.testing.assert_allclose(c, expect, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    np.testing.assert_array_equal(a, a0)  # the operands are only read
    np.testing.assert_array_equal(b, b0)


def test_gemm_writes_into_a_view_and_nothing_around_it() -> None:
    """An optimizer's parameter is a view into one flat array: the GEMM writes that range
    and leaves the neighbours alone."""
    if not blas.available():
        pytest.skip("no ILP64 cblas_?gemm in NumPy's BLAS")
    flat = np.arange(50, dtype=np.float32)
    w = flat[10:40].reshape(6, 5)
    x, dy = R.standard_normal((4, 6)).astype(np.float32), R.standard_normal((4, 5))
    dy = dy.astype(np.float32)
    expect = w - 0.1 * (x.T @ dy)
    assert blas.gemm(w, x, dy, True, False, -0.1, 1.0)
    np.testing.assert_allclose(w, expect, rtol=1e-5)
    np.testing.assert_array_equal(flat[:10], np.arange(10))
    np.testing.assert_array_equal(flat[40:], np.arange(40, 50))


def _declined(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    before = out.copy()
    done = blas.gemm(out, a, b, False, False, 1.0, 1.0)
    if not done:  # nothing was written
        np.testing.assert_array_equal(out, before)
    return not done


def test_gemm_declines_what_it_cannot_do_and_changes_nothing() -> None:
    f32 = np.float32
    a, b = R.standard_normal((4, 3)).astype(f32), R.standard_normal((3, 2)).astype(f32)
    assert _declined(np.zeros((4, 2), np.float64), a, b)  # mixed dtypes
    assert _declined(np.zeros((4, 2), np.int32), a.astype(np.int32), b.astype(np.int32))
    assert _declined(np.zeros((4, 4), f32)[:, ::2], a, b)  # out not row-major
    assert _declined(np.zeros((2, 4, 2), f32), a, b)  # batched
    assert _declined(np.zeros((4, 2), f32), a[::-1], b)  # negative strides
    shared = np.zeros((4, 3), f32)
    assert _declined(shared[:, :2], shared, b)  # out overlaps a
    frozen = np.zeros((4, 2), f32)
    frozen.flags.writeable = False
    assert _declined(frozen, a, b)
    assert _declined(np.zeros((0, 2), f32), a[:0], b)  # empty


def test_gemm_checks_shapes() -> None:
    if not blas.available():
        pytest.skip("no ILP64 cblas_?gemm in NumPy's BLAS")
    a, b = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"gemm: .*\(4, 3\).*\(3, 2\).*\(4, 5\)"):
        blas.gemm(np.zeros((4, 5), np.float32), a, b, False, False, 1.0, 0.0)
    with pytest.raises(ValueError, match="inner dimensions"):
        blas.gemm(np.zeros((4, 2), np.float32), a, np.ones((4, 2), np.float32), False, False, 1, 0)


def test_backend_falls_back_where_blas_declines() -> None:
    """The NumPy backend's matmul_into gives the same answer on the paths BLAS declines
    (batched operands, an out that overlaps nothing but is not row-major)."""
    be = get_backend("cpu")
    x, y = R.standard_normal((2, 4, 3)), R.standard_normal((2, 3, 5))
    out = R.standard_normal((2, 4, 5))
    expect = 0.5 * out - 2.0 * (x @ y)
    be.matmul_into(out, x, y, tx=False, ty=False, alpha=-2.0, beta=0.5)
    np.testing.assert_allclose(out, expect, rtol=1e-12)
    big = R.standard_normal((4, 10))
    out = big[:, ::2]
    expect = out + x[0] @ y[0]
    be.matmul_into(out, x[0], y[0], tx=False, ty=False, alpha=1.0, beta=1.0)
    np.testing.assert_allclose(out, expect, rtol=1e-12)
