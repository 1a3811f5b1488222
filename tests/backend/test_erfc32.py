"""erfc32.erfc against SciPy's double-precision erfc over the whole float32 range."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from gpunet.backend import erfc32
from gpunet.backend.numpy_backend import NumpyBackend

TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
SUBNORMAL = 2.0**-149


def assert_close(z: np.ndarray, bound: float = 1.3e-7) -> None:
    """Relative error <= bound where erfc(z) is a normal float32; below, within one subnormal."""
    got = erfc32.erfc(z).astype(np.float64)
    want = scipy.special.erfc(z.astype(np.float64))
    normal = want >= TINY
    rel = np.abs(got[normal] / want[normal] - 1.0)
    worst = int(np.argmax(rel))
    assert rel[worst] <= bound, f"relative error {rel[worst]:.3g} at z = {z[normal][worst]!r}"
    np.testing.assert_allclose(got[~normal], want[~normal], rtol=0, atol=SUBNORMAL)


def test_dense_grid_including_the_tails() -> None:
    # 4M evenly spaced points over the whole range where erfc is not 2 or 0 to float32
    assert_close(np.linspace(-4.0, 10.1, 4_000_001, dtype=np.float32))
    # every 1024th float32 in [-1/8, 1/8] (all exponents down to the subnormals), and every
    # float32 from 8 to 10.1 (the far tail, where exp(-z^2) is most sensitive to z)
    bits = np.arange(0, np.float32(0.125).view(np.int32), 1024, dtype=np.int32)
    small = bits.view(np.float32)
    assert_close(np.concatenate([small, -small]))
    lo, hi = np.float32(8.0).view(np.int32), np.float32(10.1).view(np.int32)
    assert_close(np.arange(lo, hi, dtype=np.int32).view(np.float32))


def test_random_float32_bit_patterns() -> None:
    # uniform over bit patterns: every exponent, both signs, subnormals, inf and NaN alike
    rng = np.random.default_rng(0)
    z = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    z = z[np.isfinite(z)]
    assert_close(z)
    assert_close(rng.standard_normal(1_000_000, dtype=np.float32) * 3)


def test_limits_and_nan() -> None:
    z = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3e38, -3e38, 26.0, 27.0, 1e-45, -1e-45])
    got = erfc32.erfc(z.astype(np.float32))
    want = np.array([0.0, 2.0, np.nan, 1.0, 1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 1.0], np.float32)
    np.testing.assert_array_equal(got, want)
    assert not np.signbit(got[[0, 5, 7, 8]]).any()  # +0, never -0


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 40_000)])
def test_shapes_and_in_place(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    z = np.asarray(rng.standard_normal(shape) * 4, np.float32)
    want = erfc32.erfc(z)
    assert want.shape == z.shape and want.dtype == np.float32
    if z.size:
        assert_close(z.reshape(-1))
    np.testing.assert_array_equal(erfc32.erfc(z, out=z), want)  # in place


def test_strided_input_and_output() -> None:
    z = np.linspace(-5, 5, 2 * 50_001, dtype=np.float32)
    out = np.empty(z.size, np.float32)[::2]
    erfc32.erfc(z[::2], out=out)
    np.testing.assert_array_equal(out, erfc32.erfc(np.ascontiguousarray(z[::2])))
    assert_close(z[::2])


def test_float32_only() -> None:
    with pytest.raises(TypeError, match="float32"):
        erfc32.erfc(np.zeros(3))


@pytest.mark.parametrize("n", [100, 300_000])  # whole, and CHUNK at a time
def test_exact_gelu_float32_uses_it(n: int) -> None:
    """GELU and its derivative in float32 to ~float32 accuracy against float64 SciPy."""
    ops = NumpyBackend(None)
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32) * 5
    x64 = x.astype(np.float64)
    # the formula's own argument, z = x (-1/sqrt 2) rounded to float32 as on CUDA
    z = (x * np.float32(-(0.5**0.5))).astype(np.float64)
    cdf = 0.5 * scipy.special.erfc(z)
    pdf = np.exp(-0.5 * x64 * x64) / np.sqrt(2 * np.pi)
    f = ops.activation(x, name="gelu")
    df = ops.activation_backward(np.ones_like(x), x, name="gelu")
    assert f.dtype == df.dtype == np.float32
    np.testing.assert_allclose(f, x64 * cdf, rtol=3e-7, atol=1e-37)
    np.testing.assert_allclose(df, cdf + x64 * pdf, rtol=1e-6, atol=1e-6)  # pdf: float32 exp
