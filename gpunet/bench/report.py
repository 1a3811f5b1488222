"""What ``gpunet bench`` writes: the table, ``results.json``, ``results.md`` and ``bench.png``.

Ratios are computed within one run and one group (same work, same size, same device):
``x floor`` is a row's median over the floor's (the GEMMs alone for MLP steps, the plain
NumPy/CuPy expression for ops); ``gpunet/this`` is gpunet's median over the row's, so a value
below 1 means gpunet is faster than that implementation.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..formatting import seconds
from ..formatting import table as text_table
from ..profiler import PRECISIONS
from .run import MODEL_GPU, Results, Row

FLOORS = {"mlp": "gemm-floor", "ops": "numpy"}
SUITE_TITLES = {"mlp": "MLP training steps", "ops": "Single ops"}
FORCING_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
PACKAGES = ("gpunet", "numpy", "scipy", "cupy-cuda12x", "cupy-cuda13x", "torch", "jax")
PACKAGES += ("jaxlib", "autograd", "threadpoolctl")


# ---------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that decide a BLAS kernel (AVX2, AVX-512, AMX), where listed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if "flags" in ln), [])
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]


def blas() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries loaded now (threadpoolctl): kernel, version, threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl is not installed; the BLAS in use is unknown"}]
    keys = ("user_api", "internal_api", "version", "architecture", "num_threads", "filepath")
    return [{k: lib.get(k) for k in keys if k in lib} for lib in threadpool_info()]


def blas_summary(libs: Iterable[dict[str, Any]]) -> str:
    """One line, an entry per BLAS: "openblas 0.3.31 (numpy's, SkylakeX kernel, 1 thread)"."""
    parts = []
    for lib in libs:
        if lib.get("user_api") != "blas":
            continue
        path = Path(str(lib.get("filepath", "")))
        owner = next((p[: -len(".libs")] for p in path.parts if p.endswith(".libs")), path.name)
        n = lib.get("num_threads")
        parts.append(
            f"{lib.get('internal_api')} {lib.get('version')} ({owner}'s, "
            f"{lib.get('architecture', '?')} kernel, {n} thread{'' if n == 1 else 's'})"
        )
    return "; ".join(dict.fromkeys(parts)) or "unknown BLAS"


def gpus() -> list[str]:
    from ..backend import probe_cuda

    return list(probe_cuda().devices)


def machine() -> dict[str, Any]:
    from ..backend import probe_cuda

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpus(),
        "cuda": probe_cuda().reason,
        "env": {v: os.environ.get(v) for v in FORCING_VARS},
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_line(info: dict[str, Any], libs: list[dict[str, Any]]) -> str:
    gpu = ", ".join(info["gpu"]) or "no GPU"
    flags = f" ({' '.join(info['cpu_flags'])})" if info.get("cpu_flags") else ""
    return f"{info['cpu']}{flags}, {info['cores']} cores; {blas_summary(libs)}; {gpu}"


# ---------------------------------------------------------------------- ratios
def label(row: Row) -> str:
    """The implementation's name in tables: "GEMMs only", "numpy (hand-written)",
    "cupy (plain):cuda", "torch", "gpunet:cuda"."""
    name = row.framework
    if name == "gemm-floor":
        name = "GEMMs only"
    elif name == "numpy":
        xp = "cupy" if row.device == "cuda" else "numpy"
        name = f"{xp} ({'hand-written' if row.suite == 'mlp' else 'plain'})"
    return name if row.device == "cpu" else f"{name}:{row.device}"


def ratios(rows: list[Row]) -> list[dict[str, float | None]]:
    """Per row: ``x_floor`` (median / the floor's) and ``gpunet_over`` (gpunet's median / the
    row's), within its group and device; None where the reference did not run."""
    medians = {(r.workload, r.size, r.device, r.framework): r.timing.median_s for r in rows}
    out = []
    for r in rows:
        key = (r.workload, r.size, r.device)
        floor = medians.get((*key, FLOORS[r.suite]))
        ours = medians.get((*key, "gpunet"))
        m = r.timing.median_s
        out.append(
            {
                "x_floor": m / floor if floor else None,
                "gpunet_over": ours / m if ours and m else None,
            }
        )
    return out


# ---------------------------------------------------------------------- formats
def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


COLUMNS = ("workload", "size", "implementation", "median", "min–max", "x floor", "gpunet/this")
COLUMNS += ("1st call",)
RIGHT = {3, 4, 5, 6, 7, 8, 9}


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def table_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """The header and the cells: one row per implementation and group. "1st call" is the cold
    call (compilation, allocation) timed apart; "pool" (on a GPU) how far the device memory
    pool grew for the workload: its state and its largest transient set; "H100 model" (gpunet
    rows) the roofline time ``gpunet.profiler`` predicts for the same step on that GPU."""
    pool = any(r.timing.peak_bytes is not None for r in results.rows)
    model = any(r.modelled_s is not None for r in results.rows)
    body = []
    for row, rat in zip(results.rows, ratios(results.rows)):
        t = row.timing
        name = label(row) + (" [!]" if row.check else "")
        spread = f"{seconds(t.min_s)}–{seconds(t.max_s)}"
        cells = [row.workload, row.size, name, seconds(t.median_s), spread]
        cells += [_x(rat["x_floor"]), _x(rat["gpunet_over"]), seconds(t.cold_s)]
        cells += [mib(t.peak_bytes)] if pool else []
        body.append(cells + ([seconds(row.modelled_s)] if model else []))
    head = [*COLUMNS, *(["pool"] if pool else []), *([f"{MODEL_GPU} model"] if model else [])]
    return head, body


def format_table(results: Results, markdown: bool = False) -> str:
    """The results as an aligned text table, or a Markdown one."""
    head, body = table_rows(results)
    return text_table(head, body, markdown=markdown, right=RIGHT, group=2)


def summary_table(results: Results, suite: str, device: str = "cpu") -> str:
    """A compact Markdown table of one suite on one device: a row per group, the medians of
    every implementation side by side, then gpunet x floor and gpunet over each other one."""
    rows = [r for r in results.rows if r.suite == suite and r.device == device]
    groups: dict[tuple[str, str], dict[str, float]] = {}
    names: dict[str, str] = {}  # label -> framework, in order of appearance
    for r in rows:
        groups.setdefault((r.workload, r.size), {})[r.framework] = r.timing.median_s
        names.setdefault(r.framework, label(r))
    if not rows:
        return ""
    floor = FLOORS[suite]
    ours = [fw for fw in names if fw.startswith("gpunet")]  # gpunet, then its variants
    others = [fw for fw in names if fw not in (*ours, floor)]
    # (numerator, denominator) per ratio column: every gpunet way over the floor, then over
    # each other implementation (the peers: gpunet's default way only)
    pairs = [(fw, floor) for fw in ours]
    for other in others:
        pairs += [(fw, other) for fw in (ours if other == "numpy" else ours[:1])]
    head = ["workload", "size", *names.values()]
    head += [f"{a} x floor" if b == floor else f"{a}/{names[b].split(' ')[0]}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * (len(head) - 2)]
    for (workload, size), med in groups.items():
        cells = [workload, size, *(seconds(med.get(fw)) for fw in names)]
        for a, b in pairs:
            cells.append(_x(med[a] / med[b] if med.get(a) and med.get(b) else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def precision_table(results: Results, markdown: bool = False) -> str:
    """gpunet's measured MLP steps (float32, on each device run) beside the same step modelled
    on MODEL_GPU in each precision ("" without MLP rows)."""
    if not results.precisions:
        return ""
    devices = results.config.devices
    head = ["workload", "size", *(f"gpunet {d} (measured)" for d in devices)]
    head += [f"{MODEL_GPU} {p} (model)" for p in PRECISIONS]
    measured = {
        (r.workload, r.device): r
        for r in results.rows
        if r.framework == "gpunet" and r.workload in results.precisions
    }
    body = []
    for workload, model in results.precisions.items():
        rows = [measured.get((workload, d)) for d in devices]
        size = next((r.size for r in rows if r is not None), "")
        cells = [workload, size, *(seconds(r.timing.median_s) if r else "-" for r in rows)]
        body.append(cells + [seconds(model[p]) if p in model else "-" for p in PRECISIONS])
    return text_table(head, body, markdown=markdown, right=set(range(2, len(head))), group=2)


def precision_note(results: Results) -> str | None:
    """The one line that says what the precision columns are."""
    if not results.precisions:
        return None
    failed = [f"{w}: {m['error']}" for w, m in results.precisions.items() if "error" in m]
    if failed:
        return f"the precision model failed for {'; '.join(failed)}"
    if "cuda" in results.config.devices:
        return (
            f"the {MODEL_GPU} precision columns are gpunet.profiler's roofline model; the "
            "measured cuda column is float32 (make gpu-check times bf16 and fp16 on the GPU)"
        )
    return (
        f"precision columns are modelled only ({MODEL_GPU} roofline, gpunet.profiler): this "
        "run measured float32 on the CPU; a CUDA device measures them (make gpu-check)"
    )


def notes(results: Results) -> list[str]:
    """Lines under the table: skipped implementations, failed checks, the crossover."""
    out = []
    skipped = {(s["framework"], s["device"]): s["reason"] for s in results.skipped}
    for (fw, dev), reason in skipped.items():
        out.append(f"skipped {fw} on {dev}: {reason}")
    for row in results.rows:
        if row.check:
            out.append(f"[!] {label(row)} on {row.workload} {row.size}: first result {row.check}")
    pools = [lib for lib in results.blas or blas() if (lib.get("num_threads") or 1) > 1]
    if len(pools) > 1 and results.config.threads is None:
        names = ", ".join(os.path.basename(str(lib.get("filepath", "?"))) for lib in pools)
        out.append(
            f"note: {len(pools)} thread pools of several threads each are loaded ({names}); "
            "interleaved, they contend for the cores: --threads 1 gives steadier medians"
        )
    line = precision_note(results)
    if line is not None:
        out.append(line)
    c = results.crossover
    if c is not None:
        where = f"from batch {c['batch']}" if c["batch"] else "at none of the batches measured"
        out.append(f"GPU overtakes CPU for gpunet's {c['model']} step {where} ({c['batches']})")
    return out


def to_dict(results: Results, command: str) -> dict[str, Any]:
    """Everything a run measured, with the machine and versions: the results.json content."""
    libs = results.blas or blas()
    rows = []
    for row, rat in zip(results.rows, ratios(results.rows)):
        t = row.timing
        rows.append(
            {
                "suite": row.suite,
                "workload": row.workload,
                "size": row.size,
                "elements": row.elements,
                "flops": row.flops,
                "framework": row.framework,
                "device": row.device,
                "label": label(row),
                "median_s": t.median_s,
                "min_s": t.min_s,
                "max_s": t.max_s,
                "samples_s": t.samples,
                "loops": t.loops,
                "cold_s": t.cold_s,
                "peak_bytes": t.peak_bytes,
                "gflops": row.flops / t.median_s / 1e9 if row.flops and t.median_s else None,
                "ratios": rat,
                "check": row.check or "ok",
                f"modelled_{MODEL_GPU}_s": row.modelled_s,
            }
        )
    cfg = results.config
    return {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "blas": libs,
        "versions": versions(),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
        "floors": FLOORS,
        "rows": rows,
        "skipped": results.skipped,
        "crossover": results.crossover,
        f"modelled_{MODEL_GPU}_precisions_s": results.precisions,
    }


def markdown(data: dict[str, Any], results: Results) -> str:
    """results.md: the command and the machine, a compact table per suite and device
    (medians side by side, gpunet's ratios), the notes, then every row in full."""
    parts = [f"`{data['command']}` on {machine_line(data['machine'], data['blas'])}", ""]
    for suite in SUITE_TITLES:
        for device in results.config.devices:
            table = summary_table(results, suite, device)
            if table:
                parts += [f"{SUITE_TITLES[suite]}, {device} (medians):", "", table, ""]
    precisions = precision_table(results, markdown=True)
    if precisions:
        parts += [f"MLP steps, measured and modelled on an {MODEL_GPU} by precision:", ""]
        parts += [precisions, ""]
    parts += [*(f"- {n}" for n in notes(results)), "", "All rows:", ""]
    parts.append(format_table(results, markdown=True))
    return "\n".join(parts)


# ---------------------------------------------------------------------- the plot
def plot(results: Results, path: Path) -> None:
    """bench.png: median time against size, one line per implementation, a panel per workload
    (MLP steps against parameters; ops against elements), plus the crossover sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[tuple[int, float, float, float]]]] = {}
    for row in results.rows:
        key = "mlp step" if row.suite == "mlp" else row.workload
        t = row.timing
        panels.setdefault(key, {}).setdefault(label(row), []).append(
            (row.elements, t.median_s, t.min_s, t.max_s)
        )
    extra = 1 if results.crossover else 0
    n = max(1, len(panels) + extra)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, lines) in zip(flat, panels.items()):
        for name, pts in lines.items():
            pts.sort()
            xs, med, lo, hi = zip(*pts)
            (line,) = ax.plot(xs, med, marker="o", label=name)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        xlabel = "parameters" if title == "mlp step" else "elements"
        ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel, ylabel="seconds")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if results.crossover:
        c = results.crossover
        ax = flat[len(panels)]
        ax.plot(c["batches"], c["cpu_median_s"], marker="o", label="gpunet cpu")
        ax.plot(c["batches"], c["cuda_median_s"], marker="o", label="gpunet cuda")
        if c["batch"]:
            ax.axvline(c["batch"], color="gray", linestyle=":", label=f"crossover {c['batch']}")
        ax.set(xscale="log", yscale="log", title=f"step {c['model']}", xlabel="batch")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in flat[len(panels) + extra :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: Results, out: Path, command: str) -> dict[str, Any]:
    """Write results.json, results.md and bench.png under ``out``; return the JSON data."""
    out.mkdir(parents=True, exist_ok=True)
    data = to_dict(results, command)
    (out / "results.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    (out / "results.md").write_text(markdown(data, results) + "\n")
    plot(results, out / "bench.png")
    return data
