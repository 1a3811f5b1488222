"""``make gpu-check``: on a machine with a CUDA device, run everything that needs one, in
under 8 minutes, and write one report.

Stages, each in its own process with its own time limit (a hung stage is killed and marked
``timeout``; the next still runs, inside the overall budget):

1. ``gpu tests``: ``pytest -m gpu`` over the suite but the kernel goldens (among them NCCL
   through CuPy on a world of one GPU, ``tests/distributed/test_comm.py``: it skips, saying
   so, where the ``nvidia-nccl-cu12`` wheel of the ``cuda12`` extra is not installed);
2. ``kernels``: ``tests/kernels/test_kernels_gpu.py``, every fused kernel (float16/32/64)
   against the golden float64 outputs in ``tests/kernels/golden/kernels.npz``;
3. ``cublas gemm``: ``matmul_into`` with alpha and beta through cuBLAS against float64 NumPy,
   and the time of one large scaled GEMM;
4. ``cuda graph``: ``tests/backend/test_cuda_graph.py``'s gpu tests (a captured step replayed
   as one CUDA graph equals eager bit for bit; buffers and memory stay put; the cuBLAS route
   under capture equals CuPy's GEMMs bit for bit), then the time of a captured forward and
   backward step of the tiny and medium MLPs replayed as a CUDA graph and as a launch list;
5. ``bench``: ``gpunet bench --device cuda`` at the MLP sizes whose training state fits a
   quarter of the free device memory, and the single ops.

The report, ``runs/gpu-check-<timestamp>.md``, names the device, the driver, CUDA runtime
and CuPy versions, and gives each stage's result, time and figures (the bench table; the
failing output's tail). Exit status: 0 when every stage passed, 1 otherwise. Without a CUDA
device it writes nothing and exits 1 at once with the reason: a check that checked nothing
must not pass.

    python -m gpunet.bench.gpu_check [--out runs] [--budget 480]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/ and kernels/ live here
BUDGET_S = 480.0  # everything, stages and their start-up included: under 8 minutes
# Each stage's own limit; a stage gets the smaller of this and what is left of the budget.
LIMITS_S = {
    "gpu tests": 140.0,
    "kernels": 90.0,
    "cublas gemm": 60.0,
    "cuda graph": 50.0,
    "bench": 130.0,
}
GRAPH_TESTS = "tests/backend/test_cuda_graph.py"  # (the cuda graph stage runs them)
GEMM_SHAPES = ((64, 48, 32), (257, 129, 65))  # (m, k, n): small, and not multiples of 32
GEMM_SCALES = ((1.0, 0.0), (1.0, 1.0), (-0.1, 0.99), (2.0, 0.5))  # (alpha, beta)


@dataclass
class Stage:
    """One command and its limit."""

    name: str
    argv: list[str]
    limit_s: float


@dataclass
class StageResult:
    name: str
    status: str  # "pass", "fail" or "timeout"
    seconds: float
    output: str
    figures: str = ""  # Markdown to show in the report (the bench table)


@dataclass
class Report:
    device: dict[str, Any]
    results: list[StageResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.status == "pass" for r in self.results)


# ---------------------------------------------------------------------- the device
def device_info() -> dict[str, Any]:
    """Name, memory, driver/runtime/CuPy versions of CUDA device 0 (CuPy must answer)."""
    import cupy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props["name"]
    free, total = cupy.cuda.Device(0).mem_info
    return {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute capability": f"{props['major']}.{props['minor']}",
        "memory GiB": round(total / 2**30, 1),
        "free GiB": round(free / 2**30, 1),
        "driver": _cuda_version(rt.driverGetVersion()),
        "CUDA runtime": _cuda_version(rt.runtimeGetVersion()),
        "CuPy": cupy.__version__,
        "devices": rt.getDeviceCount(),
    }


def _cuda_version(v: int) -> str:
    """12040 -> '12.4' (CUDA's encoding: 1000 major + 10 minor)."""
    return f"{v // 1000}.{v % 1000 // 10}"


def mlp_sizes_that_fit(free_bytes: float) -> list[str]:
    """The benchmark MLP sizes whose step (parameters, gradients, momentum, activations and
    their gradients, float32, twice over for the allocator) fits a quarter of ``free_bytes``."""
    from .workloads import MLP_SIZES, parameter_count

    fit = []
    for name, (sizes, batch) in MLP_SIZES.items():
        params, activations = parameter_count(sizes), batch * sum(sizes)
        if 2 * 4 * (3 * params + 3 * activations) <= free_bytes / 4:
            fit.append(name)
    return fit


# ---------------------------------------------------------------------- the stages
def stages(python: str, free_bytes: float, bench_out: Path) -> list[Stage]:
    tests = ROOT / "tests"
    kernels = tests / "kernels" / "test_kernels_gpu.py"
    pytest = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    pytest += ["--benchmark-disable"]
    fit = mlp_sizes_that_fit(free_bytes)
    sizes = ",".join([*fit, "1e3", "1e5", "1e7"])
    bench = [python, "-m", "gpunet.cli", "bench", "--device", "cuda", "--suite", "all"]
    bench += ["--sizes", sizes, "--repeats", "5", "--no-progress", "--markdown"]
    argv = {
        "gpu tests": [*pytest, "-m", "gpu", str(tests), f"--ignore={kernels}"]
        + [f"--ignore={ROOT / GRAPH_TESTS}"],
        "kernels": [*pytest, str(kernels)],
        "cublas gemm": [
            *[python, "-m", "gpunet.bench.gpu_check", "--gemm-only"],
            *["--precisions", ",".join(s for s in fit if s in ("medium", "large"))],
        ],
        "cuda graph": [python, "-m", "gpunet.bench.gpu_check", "--graph-only"],
        "bench": [*bench, "--out", str(bench_out)],
    }
    return [Stage(name, argv[name], LIMITS_S[name]) for name in LIMITS_S]


def run_stage(stage: Stage, env: dict[str, str]) -> StageResult:
    """Run one stage in its own process, killed at its limit."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            stage.argv,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=stage.limit_s,
        )
    except subprocess.TimeoutExpired as e:
        out = _text(e.stdout) + _text(e.stderr)
        return StageResult(stage.name, "timeout", time.perf_counter() - start, out)
    status = "pass" if done.returncode == 0 else "fail"
    return StageResult(stage.name, status, time.perf_counter() - start, done.stdout + done.stderr)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def check_gemm() -> str:
    """``matmul_into`` with (alpha, beta) on the CUDA backend, every op(x) op(y), float32 and
    float64, against float64 NumPy; then the time of one scaled 4096^3 float32 GEMM. Raises
    AssertionError on a wrong result; returns the figures as a line."""
    import numpy as np

    import gpunet

    backend = gpunet.get_backend("cuda")
    rng = np.random.default_rng(0)
    tol = {np.float32: 2e-5, np.float64: 1e-12}
    checked = 0
    for dtype in (np.float32, np.float64):
        for m, k, n in GEMM_SHAPES:
            for tx in (False, True):
                for ty in (False, True):
                    x = rng.standard_normal((k, m) if tx else (m, k)).astype(dtype)
                    y = rng.standard_normal((n, k) if ty else (k, n)).astype(dtype)
                    for alpha, beta in GEMM_SCALES:
                        out0 = rng.standard_normal((m, n)).astype(dtype)
                        out = backend.asarray(out0)
                        x_, y_ = backend.asarray(x), backend.asarray(y)
                        backend.matmul_into(out, x_, y_, tx=tx, ty=ty, alpha=alpha, beta=beta)
                        a, b = (x.T if tx else x), (y.T if ty else y)
                        want = alpha * (a.astype(np.float64) @ b) + beta * out0
                        got = backend.to_numpy(out)
                        err = np.max(np.abs(got - want) / (1 + np.abs(want)))
                        assert err <= tol[dtype], (
                            f"matmul_into {np.dtype(dtype)} {(m, k, n)} tx={tx} ty={ty} "
                            f"alpha={alpha} beta={beta}: relative error {err:.2e}"
                        )
                        checked += 1
    import cupy

    size = 4096
    x = cupy.asarray(rng.standard_normal((size, size)), dtype=cupy.float32)
    out = cupy.zeros((size, size), dtype=cupy.float32)
    backend.matmul_into(out, x, x, tx=True, ty=False, alpha=-0.1, beta=0.99)  # warm up
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(5):
        backend.matmul_into(out, x, x, tx=True, ty=False, alpha=-0.1, beta=0.99)
    stop.record()
    stop.synchronize()
    ms = cupy.cuda.get_elapsed_time(start, stop) / 5
    tflops = 2 * size**3 / (ms * 1e-3) / 1e12
    return (
        f"{checked} scaled GEMMs match float64 NumPy; {size}^3 float32 with alpha and beta "
        f"(x^T x): {ms:.3g} ms, {tflops:.3g} TFLOP/s"
    )


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def time_precisions(names: Sequence[str], steps: int = 10) -> str:
    """One training step (``nn.MLP``, SGD with momentum 0.9, cross-entropy) of each named
    MLP size on CUDA in fp32, tf32, bf16 and fp16 (autocast; fp16 with ``GradScaler``): the
    median of ``steps`` synchronized steps after 3 warm-up steps, as a Markdown table. A
    precision that fails is named in its cell, and the call raises after the table."""
    import statistics

    import cupy
    import numpy as np

    import gpunet
    from gpunet import amp, backends

    from ..formatting import seconds
    from .workloads import MLP_SIZES

    lines = ["| MLP, batch | " + " | ".join(PRECISIONS) + " |", "| --- |" + " ---: |" * 4]
    errors = []
    for name in names:
        sizes, batch = MLP_SIZES[name]
        cells = []
        for precision in PRECISIONS:
            gpunet.manual_seed(0)
            model = gpunet.nn.MLP(list(sizes), device="cuda")
            opt = gpunet.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = gpunet.randn(batch, sizes[0], device="cuda")
            labels = np.random.default_rng(0).integers(0, sizes[-1], batch)
            y = gpunet.tensor(labels, device="cuda")
            low = {"bf16": gpunet.bfloat16, "fp16": gpunet.float16}.get(precision)
            scaler = amp.GradScaler() if precision == "fp16" else None
            context = amp.autocast(dtype=low or gpunet.bfloat16, enabled=low is not None)
            backends.allow_tf32 = precision == "tf32"

            samples = []
            try:
                for i in range(3 + steps):
                    cupy.cuda.Device().synchronize()
                    start = time.perf_counter()
                    _step(model, opt, x, y, context, scaler)
                    cupy.cuda.Device().synchronize()
                    if i >= 3:
                        samples.append(time.perf_counter() - start)
                cells.append(seconds(statistics.median(samples)))
            except Exception as e:  # (named in the table, raised after it)
                cells.append(f"error: {type(e).__name__}")
                errors.append(f"{name} {precision}: {type(e).__name__}: {e}")
            finally:
                backends.allow_tf32 = False
        lines.append(f"| {'-'.join(map(str, sizes))}, batch {batch} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if errors:
        raise RuntimeError(table + "\n\n" + "\n".join(errors))
    return table


def _step(model: Any, opt: Any, x: Any, y: Any, context: Any, scaler: Any) -> None:
    """One training step under ``context`` (autocast or not), through ``scaler`` if any: the
    step the profiler models (``gpunet.profiler.training_step``)."""
    from gpunet.profiler import training_step

    training_step(model, opt, x, y, context, scaler)


def check_graph(names: Sequence[str] = ("tiny", "medium"), replays: int = 200) -> str:
    """The gpu tests of the CUDA-graph replay, then a captured forward and backward step of
    each named MLP size replayed ``replays`` times as a CUDA graph and as a launch list
    (wall time per replay, the host's included: launches are what a graph saves), as a
    Markdown table. Raises where a test fails or the graph path fell back."""
    import pytest

    code = pytest.main(
        ["-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / GRAPH_TESTS)]
    )
    lines = ["| MLP, batch | CUDA graph | launch list | list / graph |", "| --- |" + " ---: |" * 3]
    for name in names:
        per = [_time_replays(name, graph, replays) for graph in (True, False)]
        sizes, batch = _mlp(name)
        lines.append(
            f"| {'-'.join(map(str, sizes))}, batch {batch} | "
            + " | ".join(_seconds(t) for t in per)
            + f" | {per[1] / per[0]:.2f}x |"
        )
    table = "\n".join(lines)
    if code != 0:
        raise RuntimeError(table + f"\n\nthe CUDA-graph gpu tests failed (pytest exit {code})")
    return table


def _mlp(name: str) -> tuple[tuple[int, ...], int]:
    from .workloads import MLP_SIZES

    return MLP_SIZES[name]


def _seconds(s: float) -> str:
    from ..formatting import seconds

    return seconds(s)


def _time_replays(name: str, graph: bool, replays: int) -> float:
    """Seconds per replay of the captured step, as a graph or (``graph`` False) a list."""
    import warnings

    import cupy
    import numpy as np

    import gpunet
    from gpunet.backend import cuda_graph
    from gpunet.nn import functional as F

    sizes, batch = _mlp(name)
    cuda_graph.enabled = graph
    try:
        gpunet.manual_seed(0)
        model = gpunet.nn.MLP(list(sizes), device="cuda")
        opt = gpunet.optim.SGD(model.parameters(), lr=0.01)

        def step(x: Any, y: Any) -> Any:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        run = gpunet.capture(step)
        x = gpunet.randn(batch, sizes[0], device="cuda")
        labels = np.random.default_rng(0).integers(0, sizes[-1], batch)
        y = gpunet.tensor(labels, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (a fallback is an error here)
            for _ in range(5):  # two recordings, the first replay (the graph's check), two more
                run(x, y)
        if graph and "a CUDA graph" not in repr(run):
            raise RuntimeError(f"{name}: the captured step did not become a graph: {run!r}")
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(replays):
            run(x, y)
        cupy.cuda.Device().synchronize()
        return (time.perf_counter() - start) / replays
    finally:
        cuda_graph.enabled = True


# ---------------------------------------------------------------------- the report
def write_report(report: Report, path: Path, budget_s: float, wall_s: float) -> None:
    lines = [f"# gpu-check {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    verdict = "PASS" if report.passed else "FAIL"
    lines += [f"**{verdict}** in {wall_s:.0f} s (budget {budget_s:.0f} s)", "", "## Device", ""]
    lines += [f"- {k}: {v}" for k, v in report.device.items()]
    lines += [
        "",
        "## Stages",
        "",
        "| stage | result | seconds | summary |",
        "| --- | --- | ---: | --- |",
    ]
    for r in report.results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {_summary(r)} |")
    for r in report.results:
        if r.figures:
            lines += ["", f"## {r.name}", "", r.figures.strip()]
        if r.status != "pass":
            tail = "\n".join(r.output.strip().splitlines()[-40:])
            lines += [
                "",
                f"## {r.name}: {r.status}, the output's last lines",
                "",
                "```",
                tail,
                "```",
            ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _summary(r: StageResult) -> str:
    """The stage's last non-empty output line (pytest's counts, the GEMM figures)."""
    if r.status == "timeout":
        return "killed at its time limit"
    lines = [ln.strip() for ln in r.output.splitlines() if ln.strip()]
    return (lines[-1] if lines else "").replace("|", "/")


def _bench_figures(out: Path) -> str:
    md = out / "results.md"
    return md.read_text() if md.is_file() else ""


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gpunet.bench.gpu_check", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", default="runs", help="folder for the report (default runs)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages")
    ap.add_argument("--gemm-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precisions", default="", help=argparse.SUPPRESS)  # (with --gemm-only)
    ap.add_argument("--graph-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from ..backend import probe_cuda

    probe = probe_cuda()
    if not probe.available:
        print(f"gpu-check: no CUDA device, nothing checked: {probe.reason}", file=sys.stderr)
        return 1
    if args.graph_only:
        print(check_graph(), flush=True)
        return 0
    if args.gemm_only:
        names = [n for n in args.precisions.split(",") if n]
        if names:
            print(time_precisions(names), flush=True)
        print(check_gemm())
        return 0
    start = time.perf_counter()
    report = Report(device_info())
    path = Path(args.out) / time.strftime("gpu-check-%Y%m%d-%H%M%S.md")
    env = {**os.environ, "CI": "true"}  # a missing tool fails the kernel tests, never skips
    with tempfile.TemporaryDirectory(prefix="gpu-check-bench-") as tmp:
        free = report.device.get("free GiB", 0) * 2**30
        for stage in stages(sys.executable, free, Path(tmp)):
            left = args.budget - (time.perf_counter() - start)
            if left < 5:
                report.results.append(StageResult(stage.name, "timeout", 0.0, "no time left"))
                continue
            stage.limit_s = min(stage.limit_s, left)
            result = run_stage(stage, env)
            if stage.name == "bench":
                result.figures = _bench_figures(Path(tmp))
            elif stage.name in ("cublas gemm", "cuda graph"):  # their tables
                result.figures = "\n".join(
                    ln for ln in result.output.splitlines() if ln.startswith("|")
                )
            report.results.append(result)
            print(f"gpu-check: {stage.name}: {result.status} ({result.seconds:.0f} s)", flush=True)
    write_report(report, path, args.budget, time.perf_counter() - start)
    verdict = "passed" if report.passed else "FAILED"
    print(f"gpu-check {verdict} on {report.device.get('name')}; report: {path}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
