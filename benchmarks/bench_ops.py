"""Single ops at 10^3 to 10^7 float32 elements, per backend and peer: activation forward and
forward+backward (relu, tanh, exact GELU), a square matmul of about n elements per operand, a
full sum.

Implementations (``gpunet.bench.workloads``, shared with ``gpunet bench``): ``numpy`` (the plain
array expression: the floor), ``gpunet``, and ``torch`` / ``jax`` (jit) where installed. Each
runs on the CPU, and on the GPU (CuPy's expression, gpunet on CuPy, the peers' CUDA builds) when
one answers; a GPU call is timed to completion (the device is synchronized after it).

``test_same_values`` (not timed) holds every implementation to NumPy's result. Under
``--benchmark-disable`` (the smoke run of ``make test``) only the two smallest sizes run.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_ops.py
--benchmark-only`` (``-k "relu and 1000000"`` to narrow it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gpunet.backend import probe_cuda
from gpunet.bench.workloads import OP_IMPLS, OPS, Unavailable, to_numpy

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
SMOKE_SIZES = SIZES[:2]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Sizes by mode (all when measuring, the small ones in the smoke run); devices found."""
    if "n" in metafunc.fixturenames:
        smoke = metafunc.config.getoption("benchmark_disable", False)
        metafunc.parametrize("n", SMOKE_SIZES if smoke else SIZES)
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cpu", "cuda"] if probe_cuda().available else ["cpu"])


def _build(impl: str, op: str, n: int, device: str) -> Callable[[], Any]:
    try:
        step = OP_IMPLS[impl](op, n, device).step
    except Unavailable as e:
        pytest.skip(str(e))
    if device == "cpu":
        return step
    import cupy

    def synced() -> Any:  # wait for the queued kernels: the call is timed to completion
        out = step()
        cupy.cuda.Device().synchronize()
        return out

    return synced


@pytest.mark.parametrize("op", OPS)
def test_same_values(op: str, device: str) -> None:
    want = to_numpy(_build("numpy", op, 1000, device)())
    for impl in OP_IMPLS:
        try:
            got = to_numpy(OP_IMPLS[impl](op, 1000, device).step())
        except Unavailable:
            continue
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{op}: {impl}")


@pytest.mark.parametrize("impl", list(OP_IMPLS))
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark: Any, bench: Any, op: str, n: int, device: str, impl: str) -> None:
    fn = _build(impl, op, n, device)
    benchmark.group = f"op {op}, n={n:.0e}, {device}"
    assert bench(fn) is not None
