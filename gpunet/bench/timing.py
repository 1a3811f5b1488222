"""Timers for ``gpunet bench``: medians of interleaved repeats, with the cold first call apart.

A CPU timer reads ``time.perf_counter`` around the calls. A CUDA timer records CUDA events on
the current stream around them and waits for the end event, so a step's queued kernels are
counted; it also reports how far the device memory pool grew for the workload (its peak).

``prepare`` times a workload's cold call and warms it up; ``sample`` then times several
workloads *interleaved*: repeat r of every workload runs before repeat r + 1 of any, so that
noise on a shared machine hits them alike and ratios within one run stay meaningful.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    """Seconds per call of one workload: ``samples`` (one per repeat), the cold first call
    (compilation, allocation, caches) and, on a GPU, the pool memory the workload took."""

    samples: list[float] = field(default_factory=list)
    cold_s: float = math.nan
    loops: int = 1  # calls per sample (the sample is the mean over them)
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min_s(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def max_s(self) -> float:
        return max(self.samples) if self.samples else math.nan


class CpuTimer:
    """Wall time of ``loops`` calls (``perf_counter``); the work is done when they return."""

    device = "cpu"

    def time(self, fn: Callable[[], Any], loops: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        return (time.perf_counter() - start) / loops

    def memory_mark(self) -> None:
        """Start counting pool growth (nothing to count on the CPU)."""

    def memory_peak(self) -> int | None:
        return None


class CudaTimer:
    """GPU time of ``loops`` calls between two CUDA events on the current stream.

    The end event is recorded after the calls return and waited for, so the time spans from
    when the GPU reached the start to when it finished the last queued kernel: launch-bound
    steps (the GPU idles while Python dispatches) are timed as the user sees them, and a cold
    call's compilation shows up as the gap before its kernels. PyTorch's and CuPy's default
    streams are the same legacy default stream, so one timer serves both.
    """

    device = "cuda"

    def __init__(self) -> None:
        cupy = require_cuda()
        self._cupy = cupy
        self._pool = cupy.get_default_memory_pool()
        self._base = 0

    def time(self, fn: Callable[[], Any], loops: int = 1) -> float:
        cuda = self._cupy.cuda
        start, end = cuda.Event(), cuda.Event()
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        return cuda.get_elapsed_time(start, end) / 1e3 / loops

    def memory_mark(self) -> None:
        """Drop the pool's cached blocks: what it holds from here on is in use, or new."""
        self._cupy.cuda.Device().synchronize()
        self._pool.free_all_blocks()
        self._base = self._pool.total_bytes()

    def memory_peak(self) -> int | None:
        """Bytes the pool grew since ``memory_mark``: a workload's state plus its largest
        transient set (freed blocks are cached and reused, so the pool only grows to the peak).
        """
        return int(self._pool.total_bytes() - self._base)


def require_cuda() -> Any:
    """CuPy, when a CUDA device answers; otherwise a RuntimeError saying why not."""
    from ..backend import probe_cuda

    found = probe_cuda()
    if not found.available:
        raise RuntimeError(f"no CUDA device to benchmark on: {found.reason}")
    import cupy

    return cupy


def timer_for(device: str) -> CpuTimer | CudaTimer:
    """The timer for ``"cpu"`` or ``"cuda"`` (a RuntimeError, with the reason, without a GPU)."""
    if device == "cpu":
        return CpuTimer()
    if device == "cuda":
        return CudaTimer()
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


def calibrate(seconds_per_call: float, min_sample_s: float, max_loops: int = 10_000) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s`` (timer resolution
    and per-sample overhead then stay small against it)."""
    if not seconds_per_call > 0:  # also NaN
        return 1
    return max(1, min(max_loops, math.ceil(min_sample_s / seconds_per_call)))


def prepare(
    step: Callable[[], Any],
    timer: CpuTimer | CudaTimer,
    warmup: int = 2,
    min_sample_s: float = 0.005,
) -> tuple[Timing, Any]:
    """Time ``step``'s cold first call, warm it up, and choose its calls per sample.

    Returns the Timing (no samples yet) and what the first call returned (the loss of the
    starting weights, for checking that peers do the same work). Call ``timer.memory_mark()``
    before building the workload to count its state in ``peak_bytes``.
    """
    first: list[Any] = []
    t = Timing(cold_s=timer.time(lambda: first.append(step())))
    warm = [timer.time(step) for _ in range(warmup)]
    t.loops = calibrate(min(warm) if warm else t.cold_s, min_sample_s)
    t.peak_bytes = timer.memory_peak()
    return t, first[0]


def sample(
    steps: Sequence[Callable[[], Any]],
    timers: Sequence[CpuTimer | CudaTimer],
    timings: Sequence[Timing],
    repeats: int,
) -> None:
    """Append ``repeats`` samples to each Timing, round-robin: repeat r of every step runs
    before repeat r + 1 of any."""
    for _ in range(repeats):
        for step, timer, t in zip(steps, timers, timings):
            t.samples.append(timer.time(step, t.loops))


def crossover(batches: Sequence[int], cpu_s: Sequence[float], gpu_s: Sequence[float]) -> int | None:
    """The smallest measured batch from which on the GPU step is faster than the CPU one (at
    that batch and every larger one measured); None when the GPU never overtakes."""
    order = sorted(range(len(batches)), key=lambda i: batches[i])
    found = None
    for i in reversed(order):
        if gpu_s[i] < cpu_s[i]:
            found = batches[i]
        else:
            break
    return found
