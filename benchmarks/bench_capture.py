"""Captured training steps (``gpunet.capture``) against the hand-written NumPy step.

One SGD step (``nn.MLP`` + ``F.cross_entropy`` + ``optim.SGD``, ``backward(); step()``) of
the tiny 64-32-10 MLP at batch 32 and the small 784-128-10 at batch 64, float32: the NumPy step
by hand (the floor, ``gpunet.bench.workloads.numpy_step``), gpunet eager, gpunet captured (the
step recorded on its first two calls, replayed after), and captured with SGD in backward (the
update folded into the weight GEMMs). The summary prints each median as a ratio of the NumPy
step's. ``test_captured_steps_match`` (not timed) holds the captured steps to the eager one's
weights, bit for bit.

The medium 784-1024-1024-10 at batch 256 and the large 2048-4096x3-10 at batch 512, plain SGD
with ``backward(); step()``, eager and captured (with and without ``fold_sgd``: the update
folded into the weight GEMMs), against the GEMMs-only floor (``gemm_floor``): compare each
median with the floor's (the large size: three rounds; under ``--benchmark-disable`` a
sixteenth of its widths, once).

``test_a_replay_s_calls_and_bytes`` (not timed) prints medium's replay as calls and modelled
bytes, plain and folded: the deterministic side of those timings.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_capture.py
--benchmark-only``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpunet.bench.workloads import (
    MLP_SIZES,
    gemm_floor,
    gpunet_step,
    gpunet_step_captured,
    gpunet_step_captured_folded,
    gpunet_step_captured_in_backward,
    gpunet_step_in_backward,
    mlp_state,
    numpy_step,
    parameter_count,
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


FLOOR_IMPLS = {
    "gemm floor": gemm_floor,
    "gpunet eager": gpunet_step,
    "gpunet captured": gpunet_step_captured,
    "gpunet captured, SGD folded": gpunet_step_captured_folded,
}
FLOOR_CASES = [
    pytest.param(
        size,
        impl,
        marks=pytest.mark.benchmark(group=f"{size} step against the GEMM floor"),
        id=f"{size}-{impl}",
    )
    for size in ("medium", "large")
    for impl in FLOOR_IMPLS
]


@pytest.mark.parametrize("size, impl", FLOOR_CASES)
def test_step_against_the_gemm_floor(benchmark: Any, size: str, impl: str) -> None:
    sizes, batch = MLP_SIZES[size]
    if benchmark.disabled and size == "large":  # (seconds a step: not in make test)
        sizes, batch = [n // 16 for n in sizes[:-1]] + [sizes[-1]], batch // 16
    work = FLOOR_IMPLS[impl](mlp_state(sizes, batch))
    for _ in range(3):  # a captured step's first two calls record it
        work.step()
    benchmark.pedantic(work.step, rounds=3 if size == "large" else 20, warmup_rounds=0)
    if impl != "gemm floor":
        assert all(np.isfinite(w).all() for w in work.weights())  # type: ignore[misc]


GEMMS = ("matmul", "linear_activation")  # (the forward's bias and relu ride in the latter)


def replay_traffic(step: Any) -> dict[str, int]:
    """A profiled replay of a captured step (``gpunet.profile``, modelled bytes): its calls,
    and the calls and bytes of those that are not GEMMs (bias, relu, loss, update passes)."""
    import gpunet

    with gpunet.profile() as prof:
        step()
    others = [r for r in prof.records if r.name not in GEMMS and not r.is_view]
    return {
        "calls": sum(not r.is_view for r in prof.records),
        "other calls": len(others),
        "other bytes": sum(r.bytes for r in others),
        "all bytes": sum(r.bytes for r in prof.records),
        "update bytes": sum(r.bytes for r in prof.records if r.name == "sgd_update"),
    }


def test_a_replay_s_calls_and_bytes(capsys: Any) -> None:
    """Deterministic (not timed): medium's replayed step, plain and with ``fold_sgd``, as
    calls and modelled bytes; the fold takes the update's pass (p, g read, p written)."""
    sizes, batch = MLP_SIZES["medium"]
    seen = {}
    for name, make in (("captured", gpunet_step_captured), ("folded", gpunet_step_captured_folded)):
        work = make(mlp_state(sizes, batch))
        for _ in range(3):
            work.step()
        seen[name] = replay_traffic(work.step)
    with capsys.disabled():
        for name, t in seen.items():
            print(f"\nmedium {name}: {t['calls']} calls, {t['other calls']} not GEMMs moving "
                  f"{t['other bytes'] / 1e6:.1f} MB of {t['all bytes'] / 1e6:.1f} MB")  # fmt: skip
    assert seen["folded"]["calls"] == seen["captured"]["calls"] - 1
    assert seen["folded"]["update bytes"] == 0
    assert seen["captured"]["update bytes"] == 3 * 4 * parameter_count(sizes)  # (p, g; p)


def interleaved(size: str, rounds: int) -> dict[str, float]:
    """Each implementation of FLOOR_IMPLS timed once per round, in turn (so a burst of load
    falls on all of them): {name: median over rounds of its time / the floor's}."""
    import time

    works = {name: make(mlp_state(*MLP_SIZES[size])) for name, make in FLOOR_IMPLS.items()}
    for work in works.values():
        for _ in range(3):  # a captured step's first two calls record it
            work.step()
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            start = time.perf_counter()
            work.step()
            times[name].append(time.perf_counter() - start)
    floor = np.array(times["gemm floor"])
    return {name: float(np.median(np.array(t) / floor)) for name, t in times.items()}


if __name__ == "__main__":  # python benchmarks/bench_capture.py medium 30
    import sys

    size, rounds = sys.argv[1], int(sys.argv[2])
    ratios = interleaved(size, rounds)
    print(f"{size}, {rounds} interleaved rounds, median ratio to the GEMM floor:")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio:.3f}x")
