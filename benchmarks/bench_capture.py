"""Captured training steps (``gpunet.capture``) against the hand-written NumPy step.

One SGD step (``nn.MLP`` + ``F.cross_entropy`` + ``optim.SGD``, ``backward(); step()``) of
the tiny 64-32-10 MLP at batch 32 and the small 784-128-10 at batch 64, float32: the NumPy step
by hand (the floor, ``gpunet.bench.workloads.numpy_step``), gpunet eager, gpunet captured (the
step recorded on its first two calls, replayed after), and captured with SGD in backward (the
update folded into the weight GEMMs). The summary prints each median as a ratio of the NumPy
step's. ``test_captured_steps_match`` (not timed) holds the captured steps to the eager one's
weights, bit for bit.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_capture.py
--benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpunet.bench.workloads import (
    MLP_SIZES,
    gpunet_step,
    gpunet_step_captured,
    gpunet_step_captured_in_backward,
    gpunet_step_in_backward,
    mlp_state,
    numpy_step,
)

SIZES = ["tiny", "small"]
GROUP = {
    size: f"captured step {'-'.join(map(str, MLP_SIZES[size][0]))} batch {MLP_SIZES[size][1]}"
    for size in SIZES
}


def _state(size: str) -> Any:
    return mlp_state(*MLP_SIZES[size])


@pytest.mark.parametrize("size", SIZES)
def test_captured_steps_match(size: str) -> None:
    """Five steps: captured == eager, bit for bit (with and without SGD in backward)."""
    for eager, captured in (
        (gpunet_step, gpunet_step_captured),
        (gpunet_step_in_backward, gpunet_step_captured_in_backward),
    ):
        a, b = eager(_state(size)), captured(_state(size))
        for _ in range(5):
            assert np.array_equal(a.step().numpy(), b.step().numpy())
        for u, v in zip(a.weights(), b.weights()):  # type: ignore[misc]
            assert np.array_equal(u, v)


IMPLS = {
    "numpy": numpy_step,
    "gpunet eager": gpunet_step,
    "gpunet captured": gpunet_step_captured,
    "gpunet captured in-backward": gpunet_step_captured_in_backward,
}
CASES = [
    pytest.param(size, impl, marks=pytest.mark.benchmark(group=GROUP[size]), id=f"{size}-{impl}")
    for size in SIZES
    for impl in IMPLS
]


@pytest.mark.parametrize("size, impl", CASES)
def test_step(bench: Any, size: str, impl: str) -> None:
    out = bench(IMPLS[impl](_state(size)).step)
    assert np.isfinite(out.numpy() if hasattr(out, "numpy") else np.asarray(out)).all()
