"""Benchmark session set-up: collect ``bench_*.py``, say which BLAS runs, print derived figures.

``pytest benchmarks --benchmark-only`` measures; ``pytest benchmarks --benchmark-disable -q``
runs every benchmark body once (a smoke test that keeps the suite from rotting).

OpenBLAS picks its GEMM kernel from the CPU, unless ``OPENBLAS_CORETYPE`` (and
``OPENBLAS_L2_SIZE``) force one: measure with both unset, as ``make bench`` does. The header
names the kernel that ran, so a figure always comes with the BLAS that produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FORCING_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ---------------------------------------------------------------------- collection
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` as test modules (``python_files`` stays ``test_*.py``)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):  # a named file is collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------- header
def blas_lines() -> list[str]:
    """One line per BLAS/OpenMP library loaded in this process (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return ["blas: threadpoolctl is not installed; the kernel in use is unknown"]
    lines = []
    for lib in threadpool_info():
        lines.append(
            f"{lib.get('user_api')}: {lib.get('internal_api')} {lib.get('version')}, "
            f"kernel (architecture) {lib.get('architecture', '-')}, "
            f"{lib.get('num_threads')} thread(s), {os.path.basename(lib.get('filepath', ''))}"
        )
    return lines or ["blas: none loaded"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    import numpy as np

    lines = [f"numpy {np.__version__}"]
    try:
        lines.append(
            f"torch {importlib.metadata.version('torch')} "
            "(the torch benchmarks run, on 1 intra-op thread)"
        )
    except importlib.metadata.PackageNotFoundError:
        lines.append("torch: not installed (the torch benchmarks skip)")
    lines += blas_lines()
    forced = [f"{v}={os.environ[v]}" for v in FORCING_VARS if v in os.environ]
    if forced:
        lines.append(
            f"WARNING: {' '.join(forced)} forces an OpenBLAS kernel; for figures, run under "
            f"`env {' '.join('-u ' + v for v in FORCING_VARS)} ...` (as `make bench` does)"
        )
    else:
        lines.append("OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset: OpenBLAS chose its own kernel")
    return lines


# ---------------------------------------------------------------------- measuring
@dataclass
class Result:
    group: str
    name: str
    median_s: float
    min_s: float
    ops: int  # primitive applications per call, for the per-op figures


_RESULTS = pytest.StashKey[list[Result]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []


@pytest.fixture
def bench(benchmark: Any, request: pytest.FixtureRequest) -> Any:
    """``bench(fn, ops=N)``: warm ``fn`` up, time it, keep its median for the summary."""

    def run(fn: Any, ops: int = 1, warmup: int = 3) -> Any:
        if not benchmark.disabled:
            for _ in range(warmup):  # first calls allocate, fill caches, load kernels
                fn()
        out = benchmark(fn)
        benchmark.extra_info["ops_per_call"] = ops
        stats = getattr(benchmark, "stats", None)
        if stats:
            request.config.stash[_RESULTS].append(
                Result(
                    benchmark.group or "", benchmark.name, stats.stats.median, stats.stats.min, ops
                )
            )
        return out

    return run


# ---------------------------------------------------------------------- summary
@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    tr = terminalreporter
    tr.section("gpunet overhead: medians, ratios and per-op costs")
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    for group, rs in groups.items():
        tr.write_line(f"{group}:")
        base = next((r for r in rs if "numpy" in r.name), None)
        for r in rs:
            line = f"  {r.name:<34} median {r.median_s * 1e6:9.1f} us  (min {r.min_s * 1e6:9.1f})"
            if r.ops > 1:
                line += (
                    f"  {r.median_s * 1e6 / r.ops:7.2f} us/op"
                    f" (min {r.min_s * 1e6 / r.ops:6.2f}, N={r.ops})"
                )
            if base is not None and r is not base:
                line += f"  {r.median_s / base.median_s:6.2f}x numpy"
            tr.write_line(line)
        ours = [r for r in rs if "gpunet" in r.name]
        for peer in ("torch", "minimal_tape"):
            theirs = [r for r in rs if peer in r.name]
            if len(ours) == 1 and len(theirs) == 1:
                tr.write_line(
                    f"  gpunet/{peer}: {ours[0].median_s / theirs[0].median_s:.2f}x (median),"
                    f" {ours[0].min_s / theirs[0].min_s:.2f}x (min)"
                )
    tr.write_line("BLAS/OpenMP libraries loaded at the end of the run:")
    for line in blas_lines():
        tr.write_line(f"  {line}")
