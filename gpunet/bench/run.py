"""Orchestration of ``gpunet bench``: which workloads run, in which order, with a progress bar.

A *group* is one piece of work at one size (``mlp small``, ``ops relu fwd at 10^6``); every
implementation of it (floors, gpunet, peers, on each device) is built, cold-called and warmed up
in turn, then all are sampled round-robin, so the ratios within a group come from one run under
the same machine noise. On a GPU the run also sweeps the batch size of gpunet's ``small`` step
on both devices to find where the GPU overtakes the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import timing
from . import workloads as W

SUITES = ("ops", "mlp")
DEFAULT_OP_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
QUICK_MLP_SIZES = ("tiny", "small")
QUICK_OP_SIZES = (10**3, 10**4)
CROSSOVER_MODEL = "small"
CROSSOVER_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_CROSSOVER_BATCHES = (16, 256)
MODEL_GPU = "H100"
CUPY_POOL_USERS = frozenset(
    {"gemm-floor", "numpy", "gpunet", "gpunet-in-backward", "gpunet-captured"}
)  # whose GPU memory the pool shows
CHECK_RTOL = 1e-3  # first-call results of one group must agree to this (float32, many BLASes)


@dataclass
class Config:
    """What to run. ``devices`` are "cpu" and/or "cuda"; ``peers`` adds PyTorch, JAX and HIPS
    autograd to the floors and gpunet."""

    suites: tuple[str, ...] = SUITES
    mlp_sizes: tuple[str, ...] = tuple(W.MLP_SIZES)
    op_sizes: tuple[int, ...] = DEFAULT_OP_SIZES
    ops: tuple[str, ...] = W.OPS
    peers: bool = False
    devices: tuple[str, ...] = ("cpu",)
    repeats: int = 7
    warmup: int = 2
    min_sample_s: float = 0.005
    crossover_batches: tuple[int, ...] = CROSSOVER_BATCHES
    threads: int | None = None  # CPU threads for every framework; None: each one's default

    @classmethod
    def quick(cls, **overrides: Any) -> Config:
        """Tiny sizes, one repeat, no warm-up: the smoke run of ``make test``."""
        base = dict(
            mlp_sizes=QUICK_MLP_SIZES,
            op_sizes=QUICK_OP_SIZES,
            repeats=1,
            warmup=0,
            min_sample_s=0.0,
            crossover_batches=QUICK_CROSSOVER_BATCHES,
        )
        return cls(**{**base, **overrides})


@dataclass
class Row:
    """One implementation of one group, timed."""

    suite: str
    workload: str  # "mlp small", "relu fwd", ...
    size: str  # "784-128-10 batch 64", "10^6"
    elements: int  # op: elements per operand; MLP: parameters
    flops: int | None  # per call, where counted (matmul, MLP steps)
    framework: str
    device: str
    timing: timing.Timing
    check: str = ""  # "", or why the first-call result disagrees with the group's reference
    modelled_s: float | None = None  # gpunet rows: gpunet.profiler's roofline time on MODEL_GPU


@dataclass
class Results:
    config: Config
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    crossover: dict[str, Any] | None = None
    blas: list[dict[str, Any]] = field(default_factory=list)  # as it ran (thread limits on)
    # "mlp small" -> {"fp32": s, "tf32": s, "bf16": s, "fp16": s}: the step modelled on
    # MODEL_GPU in each precision (gpunet.profiler.precision_times), or {"error": why}
    precisions: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Group:
    suite: str
    workload: str
    size: str
    elements: int
    flops: int | None
    impls: list[tuple[str, str, Callable[[], W.Workload]]]  # framework, device, build
    reference: str  # the framework whose first-call result the others are held to


def power_label(n: int) -> str:
    """10**6 -> "10^6"; other counts as they are."""
    k = round(math.log10(n)) if n > 0 else 0
    return f"10^{k}" if 10**k == n else str(n)


def _frameworks(
    floors: dict, peers: dict, with_peers: bool, variants: dict | None = None
) -> list[str]:
    return [*floors, "gpunet", *(variants or ()), *(peers if with_peers else ())]


def plan(config: Config) -> list[Group]:
    """The groups of a run, in order: MLP sizes small to large, then ops by size."""
    groups = []
    if "mlp" in config.suites:
        names = _frameworks(W.MLP_FLOORS, W.MLP_PEERS, config.peers, W.MLP_VARIANTS)
        for size in config.mlp_sizes:
            sizes, batch = W.MLP_SIZES[size]
            state = _lazy_state(sizes, batch)
            impls = [
                (fw, dev, _bind(W.MLP_IMPLS[fw], state, dev))
                for dev in config.devices
                for fw in names
            ]
            groups.append(
                Group(
                    "mlp",
                    f"mlp {size}",
                    f"{'-'.join(map(str, sizes))} batch {batch}",
                    W.parameter_count(sizes),
                    W.flops_per_step(sizes, batch),
                    impls,
                    "gpunet",
                )
            )
    if "ops" in config.suites:
        names = _frameworks(W.OP_FLOORS, W.OP_PEERS, config.peers)
        for n in config.op_sizes:
            for op in config.ops:
                impls = [
                    (fw, dev, _bind_op(W.OP_IMPLS[fw], op, n, dev))
                    for dev in config.devices
                    for fw in names
                ]
                side = W.matmul_side(n)
                groups.append(
                    Group(
                        "ops",
                        op,
                        f"{side}x{side}" if op == "matmul" else power_label(n),
                        side * side if op == "matmul" else n,
                        2 * side**3 if op == "matmul" else None,
                        impls,
                        "numpy",
                    )
                )
    return groups


def _lazy_state(sizes: Sequence[int], batch: int) -> Callable[[], W.MlpState]:
    cache: list[W.MlpState] = []

    def get() -> W.MlpState:
        if not cache:
            cache.append(W.mlp_state(sizes, batch))
        return cache[0]

    return get


def _bind(factory: W.MlpFactory, state: Callable[[], W.MlpState], dev: str) -> Callable:
    return lambda: factory(state(), dev)


def _bind_op(factory: W.OpFactory, op: str, n: int, dev: str) -> Callable:
    return lambda: factory(op, n, dev)


def _agree(got: Any, want: Any) -> str:
    """ "" when two first-call results match (float32 tolerance), else what differs."""
    if got is None or want is None:
        return ""
    a, b = W.to_numpy(got).astype(np.float64), W.to_numpy(want).astype(np.float64)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    err = float(np.abs(a - b).max(initial=0.0))
    return "" if err <= CHECK_RTOL * scale else f"differs by {err:.3g} (scale {scale:.3g})"


def modelled_time(step: Callable[[], Any], gpu: str = MODEL_GPU) -> float | None:
    """One more call of a gpunet step under ``gpunet.profiler``: its roofline time on ``gpu``
    (FLOPs at peak, bytes at bandwidth, launch overheads), or None where the profiler is
    missing or cannot price the step. A model, not a measurement: it is labelled as such."""
    try:
        from ..profiler import profile
    except ImportError:
        return None
    try:
        with profile() as p:
            step()
        return float(p.roofline(gpu).total_s)
    except Exception:  # the profiler is optional here; the measured figures stand without it
        return None


def modelled_precisions(config: Config) -> dict[str, dict[str, Any]]:
    """Each MLP size's step modelled on ``MODEL_GPU`` in fp32, tf32, bf16 and fp16 (profiled
    on the CPU: the counts do not depend on the device). A model that fails is recorded with
    its reason, in the place of its figures, and the measured rows stand."""
    if "mlp" not in config.suites:
        return {}
    from ..profiler import precision_times

    out: dict[str, dict[str, Any]] = {}
    for name in config.mlp_sizes:
        sizes, batch = W.MLP_SIZES[name]
        try:
            out[f"mlp {name}"] = precision_times(sizes, batch, MODEL_GPU)
        except Exception as e:  # (reported beside the table; the timings are still valid)
            out[f"mlp {name}"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def run_group(
    group: Group,
    config: Config,
    timers: dict[str, Any],
    results: Results,
    tick: Callable[[int], None],
) -> None:
    """Build, cold-call and warm up every implementation of ``group``, then sample them
    round-robin; append a Row per implementation (and a ``skipped`` entry per unavailable)."""
    built, firsts = [], []
    models: dict[tuple[str, str], float | None] = {}  # (gpunet way, device) -> modelled time
    for fw, dev, build in group.impls:
        timer = timers[dev]
        timer.memory_mark()
        try:
            wl = build()
            t, first = timing.prepare(wl.step, timer, config.warmup, config.min_sample_s)
        except Exception as e:  # Unavailable, or a peer failing: the run goes on without it
            why = str(e) if isinstance(e, W.Unavailable) else f"failed: {type(e).__name__}: {e}"
            results.skipped.append(
                {"workload": group.workload, "framework": fw, "device": dev, "reason": why}
            )
            tick(1 + config.repeats)
            continue
        if fw not in CUPY_POOL_USERS:  # their allocators are not CuPy's pool
            t.peak_bytes = None
        built.append((fw, dev, wl, t))
        firsts.append(first)
        tick(1)
    ref = {dev: first for (fw, dev, _, _), first in zip(built, firsts) if fw == group.reference}
    steps = [wl.step for _, _, wl, _ in built]
    tims = [t for *_, t in built]
    for _ in range(config.repeats):
        timing.sample(steps, [timers[dev] for _, dev, _, _ in built], tims, 1)
        tick(len(built))
    for fw, dev, wl, _ in built:  # after the samples: a captured step replays by now
        if fw.startswith("gpunet"):  # on a GPU, the model sits beside the measured time
            models[fw, dev] = modelled_time(wl.step)
    for (fw, dev, _, t), first in zip(built, firsts):
        results.rows.append(
            Row(
                group.suite,
                group.workload,
                group.size,
                group.elements,
                group.flops,
                fw,
                dev,
                t,
                _agree(first, ref.get(dev)),
                models.get((fw, dev)),
            )
        )
    del built, firsts, steps
    gc.collect()


def run_crossover(config: Config, timers: dict[str, Any], tick: Callable[[int], None]) -> dict:
    """gpunet's ``small`` step on the CPU and the GPU over ``crossover_batches``, interleaved;
    the batch from which the GPU is faster."""
    sizes, _ = W.MLP_SIZES[CROSSOVER_MODEL]
    cpu_s, gpu_s = [], []
    for batch in config.crossover_batches:
        state = W.mlp_state(sizes, batch)
        steps, tims, tmrs = [], [], []
        for dev in ("cpu", "cuda"):
            timer = timers[dev]
            timer.memory_mark()
            wl = W.gpunet_step(state, dev)
            t, _ = timing.prepare(wl.step, timer, config.warmup, config.min_sample_s)
            steps.append(wl.step)
            tims.append(t)
            tmrs.append(timer)
        timing.sample(steps, tmrs, tims, config.repeats)
        cpu_s.append(tims[0].median_s)
        gpu_s.append(tims[1].median_s)
        tick(1)
    batches = list(config.crossover_batches)
    return {
        "model": "-".join(map(str, sizes)),
        "batches": batches,
        "cpu_median_s": cpu_s,
        "cuda_median_s": gpu_s,
        "batch": timing.crossover(batches, cpu_s, gpu_s),
    }


@contextlib.contextmanager
def limit_threads(threads: int | None, peers: bool) -> Iterator[None]:
    """Run every framework on ``threads`` CPU threads (None: leave each its default).

    On a small shared machine a team of threads stalls whenever one of them loses its core,
    and two spinning thread pools (OpenBLAS's and PyTorch's OpenMP) starve each other; one
    thread each gives steadier medians. The peers are imported first so that their thread
    pools exist when they are limited; JAX reads its thread flags at import.
    """
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    if threads == 1 and "jax" not in sys.modules:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    torch = None
    if peers:
        for name in ("torch", "jax", "autograd"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=threads):
        if torch is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)


def run(config: Config, progress: bool | None = None) -> Results:
    """Run every group of ``config``; ``progress`` None shows a bar only on a terminal."""
    from .report import blas

    with limit_threads(config.threads, config.peers):
        results = _run(config, progress)
        results.blas = blas()
    return results


def _run(config: Config, progress: bool | None) -> Results:
    from tqdm.auto import tqdm

    timers = {dev: timing.timer_for(dev) for dev in config.devices}  # no GPU: RuntimeError
    groups = plan(config)
    crossing = "cuda" in config.devices and "cpu" in config.devices and "mlp" in config.suites
    total = sum(len(g.impls) * (1 + config.repeats) for g in groups)
    total += len(config.crossover_batches) if crossing else 0
    results = Results(config)
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="gpunet bench", unit="call", disable=disable) as bar:
        for group in groups:
            bar.set_postfix_str(f"{group.workload} {group.size}", refresh=False)
            run_group(group, config, timers, results, bar.update)
            group.impls.clear()  # their states (the large MLP's: 170 MB each) can go
        if crossing:
            bar.set_postfix_str("GPU/CPU crossover", refresh=False)
            results.crossover = run_crossover(config, timers, bar.update)
    results.precisions = modelled_precisions(config)  # (after the timings: no noise in them)
    return results
