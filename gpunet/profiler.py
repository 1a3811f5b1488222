"""``gpunet.profile()``: what a step asks of the hardware, and how long a GPU would take.

    with gpunet.profile() as p:
        loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
    print(p.table()); p.summary(); print(p.roofline("H100"))

Every primitive call (through ``bind``) and every fused kernel called directly (an
activation's backward, the optimizer updates) is recorded with its input shapes, dtype,
device, phase (forward, backward, optimizer) and its cost under ``gpunet.costs``: FLOPs, bytes
read and written, kernel launches, and what the same result costs unfused. The counts do not
depend on where the step ran, so a CPU run models a GPU step: ``roofline`` prices them with a
GPU's datasheet peaks (``gpunet.roofline``).

Not seen (made outside the dispatch point): the ones that seed ``backward()``, and a leaf's
gradient copied into its ``grad_buffer`` inside backward. Seen: the copies ``step()`` makes of
gradients into an optimizer's flat gradient array (as ``copy``), and a leaf's gradient summed
into ``.grad`` (an ``add`` through ``bind``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import amp, autodiff, dtypes
from .costs import Cost, Operand, composed_on_cupy, cost_of
from .formatting import seconds
from .formatting import table as text_table
from .roofline import (
    DEFAULT_LAUNCH_OVERHEAD_US,
    GRAPH_NODE_OVERHEAD_US,
    LINKS,
    GPUSpec,
    OpTime,
    data_parallel_step,
    dtype_name,
    gpu,
    op_time,
)
from .tensor import Tensor

OPTIMIZER_OPS = frozenset(
    {"sgd_update", "adam_update", "all_reduce", "amp_inverse_scale", "amp_found_inf"}
    | {"amp_update_scale"}
)
GEMMS = frozenset({"matmul", "linear_activation"})


@dataclass(frozen=True)
class OpRecord:
    """One recorded call: a primitive's forward, or a fused kernel called directly."""

    name: str
    shapes: tuple[tuple[int, ...], ...]  # the inputs' shapes
    out_shape: tuple[int, ...] | None
    dtype: str
    device: str
    phase: str  # "forward", "backward" or "optimizer"
    cost: Cost  # as gpunet runs it (fused kernels fused)
    unfused: Cost  # the same result as one-operation kernels
    params: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def flops(self) -> int:
        return self.cost.flops

    @property
    def bytes_read(self) -> int:
        return self.cost.bytes_read

    @property
    def bytes_written(self) -> int:
        return self.cost.bytes_written

    @property
    def bytes(self) -> int:
        return self.cost.bytes

    @property
    def launches(self) -> int:
        return self.cost.launches

    @property
    def is_view(self) -> bool:
        return self.cost.launches == 0


@dataclass(frozen=True)
class Summary:
    """Totals of a profile: records, kernel launches, FLOPs, bytes; per phase too."""

    records: int
    views: int
    launches: int
    flops: int
    bytes_read: int
    bytes_written: int
    by_phase: dict[str, Cost]
    unfused_launches: int
    unfused_bytes: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.records} calls ({self.views} views), {self.launches} kernel launches",
            f"{_si(self.flops)}FLOP, {_si(self.bytes)}B moved ({_si(self.bytes_read)}B read, "
            f"{_si(self.bytes_written)}B written): {self.intensity:.3g} FLOP/B",
        ]
        for phase, c in self.by_phase.items():
            lines.append(f"  {phase}: {c.launches} launches, {_si(c.flops)}FLOP, {_si(c.bytes)}B")
        lines.append(f"unfused: {self.unfused_launches} launches, {_si(self.unfused_bytes)}B")
        return "\n".join(lines)


@dataclass(frozen=True)
class OpTimes:
    """One record priced on a GPU: fused, as the CuPy backend runs it today, and unfused."""

    record: OpRecord
    fused: OpTime
    cupy_s: float
    cupy_launches: int
    unfused_s: float


@dataclass(frozen=True)
class PrimitiveTime:
    """Modelled time of all calls of one primitive."""

    name: str
    calls: int
    launches: int
    compute_s: float  # sum of FLOPs / peak
    memory_s: float  # sum of bytes / bandwidth
    launch_s: float
    total_s: float  # sum over calls of max(compute, memory) + launches x overhead
    cupy_launches: int
    cupy_total_s: float
    unfused_launches: int
    unfused_total_s: float

    @classmethod
    def of(cls, name: str, ops: Sequence[OpTimes]) -> PrimitiveTime:
        return cls(
            name,
            calls=len(ops),
            launches=sum(o.record.launches for o in ops),
            compute_s=sum(o.fused.compute_s for o in ops),
            memory_s=sum(o.fused.memory_s for o in ops),
            launch_s=sum(o.fused.launch_s for o in ops),
            total_s=sum(o.fused.total_s for o in ops),
            cupy_launches=sum(o.cupy_launches for o in ops),
            cupy_total_s=sum(o.cupy_s for o in ops),
            unfused_launches=sum(o.record.unfused.launches for o in ops),
            unfused_total_s=sum(o.unfused_s for o in ops),
        )

    @property
    def bound(self) -> str:
        """What dominates: "launch", "compute" or "memory" ("-" for free views)."""
        if self.total_s == 0.0:
            return "-"
        if self.launch_s >= self.total_s - self.launch_s:
            return "launch"
        return "compute" if self.compute_s > self.memory_s else "memory"


@dataclass(frozen=True)
class Estimate:
    """A step's modelled time on one GPU, fused (as gpunet runs it) and unfused."""

    device: GPUSpec
    launch_overhead_us: float
    tf32: bool
    launches: int
    compute_s: float  # every op at the compute peak
    memory_s: float  # every op at the memory bandwidth
    launch_s: float  # launches x overhead
    total_s: float  # sum over ops of max(compute, memory) + launch overhead
    cupy_launches: int  # as gpunet's CuPy backend runs the step today (COMPOSED_ON_CUPY unfused)
    cupy_total_s: float
    unfused_launches: int
    unfused_total_s: float
    rows: list[PrimitiveTime]
    graph_node_us: float = GRAPH_NODE_OVERHEAD_US

    @property
    def graph_s(self) -> float:
        """The same kernels replayed as one CUDA graph (a captured step): each launch priced
        as a graph node, ``graph_node_us`` instead of ``launch_overhead_us``."""
        return self.total_s - self.launch_s + self.launches * self.graph_node_us * 1e-6

    @property
    def launch_share(self) -> float:
        """The fraction of the modelled step spent in launch overhead."""
        return self.launch_s / self.total_s if self.total_s else 0.0

    @property
    def fusion_saving_s(self) -> float:
        return self.unfused_total_s - self.total_s

    @property
    def fusion_speedup(self) -> float:
        """Unfused time over fused time."""
        return self.unfused_total_s / self.total_s if self.total_s else 1.0

    def __str__(self) -> str:
        mode = "TF32 GEMMs" if self.tf32 else "FP32 GEMMs"
        lines = [
            f"{self.device.name}, {mode}, {self.launch_overhead_us:g} us per launch: "
            f"{seconds(self.total_s)} per step",
            f"  kernels {seconds(self.total_s - self.launch_s)} (FLOPs at peak "
            f"{seconds(self.compute_s)}, bytes at bandwidth {seconds(self.memory_s)}), launches "
            f"{self.launches} x {self.launch_overhead_us:g} us = {seconds(self.launch_s)} "
            f"({self.launch_share:.0%} of the step)",
            f"  captured, as one CUDA graph ({self.graph_node_us:g} us per node): "
            f"{seconds(self.graph_s)}",
            f"  as gpunet's CuPy backend runs it today: {self.cupy_launches} launches, "
            f"{seconds(self.cupy_total_s)}",
            f"  unfused: {self.unfused_launches} launches, {seconds(self.unfused_total_s)} "
            f"(fusion saves {seconds(self.fusion_saving_s)}, {self.fusion_speedup:.2f}x)",
            "",
            text_table(
                [
                    "primitive",
                    "calls",
                    "launches",
                    "time",
                    "share",
                    "bound",
                    "CuPy today",
                    "unfused",
                ],
                [
                    [
                        r.name,
                        r.calls,
                        r.launches,
                        seconds(r.total_s),
                        f"{r.total_s / self.total_s:.1%}" if self.total_s else "-",
                        r.bound,
                        seconds(r.cupy_total_s),
                        seconds(r.unfused_total_s),
                    ]
                    for r in self.rows
                ],
            ),
        ]
        return "\n".join(lines)


class Profile:
    """The records of one ``gpunet.profile()`` block, and reports on them."""

    def __init__(self) -> None:
        self.records: list[OpRecord] = []

    def __repr__(self) -> str:
        return f"<Profile: {len(self.records)} records>"

    # ------------------------------------------------------------ recording
    def _observe(self, name: str, inputs: Sequence[Any], params: dict, output: Any) -> None:
        arrays = [_array(a) for a in inputs]
        ins = [(a, x) for a, x in zip(inputs, arrays) if x is not None]
        out = _array(output)
        params = dict(params)
        if name == "reshape" and out is not None and ins:
            params["copied"] = not _aliases(ins[0][1], out)
        fused, unfused = cost_of(
            name,
            [Operand.of(x) for _, x in ins],
            None if out is None else Operand.of(out),
            params,
        )
        first = ins[0][0] if ins else output
        self.records.append(
            OpRecord(
                name=name,
                shapes=tuple(tuple(x.shape) for _, x in ins),
                out_shape=None if out is None else tuple(out.shape),
                dtype=_dtype(out, [x for _, x in ins]),
                device=_device(first),
                phase=_phase(name),
                cost=fused,
                unfused=unfused,
                params=params,
            )
        )

    # ------------------------------------------------------------ reports
    def summary(self) -> Summary:
        """Totals: calls, views, kernel launches, FLOPs, bytes, per phase, and unfused."""
        total, unfused = Cost(), Cost()
        by_phase: dict[str, Cost] = {}
        for r in self.records:
            total += r.cost
            unfused += r.unfused
            by_phase[r.phase] = by_phase.get(r.phase, Cost()) + r.cost
        return Summary(
            records=len(self.records),
            views=sum(r.is_view for r in self.records),
            launches=total.launches,
            flops=total.flops,
            bytes_read=total.bytes_read,
            bytes_written=total.bytes_written,
            by_phase=by_phase,
            unfused_launches=unfused.launches,
            unfused_bytes=unfused.bytes,
        )

    def roofline(
        self,
        device: str | GPUSpec = "H100",
        launch_overhead_us: float = DEFAULT_LAUNCH_OVERHEAD_US,
        tf32: bool = False,
    ) -> Estimate:
        """The recorded ops' time on ``device`` ("H100", "A100", "H200" or a GPUSpec): per op
        max(FLOPs / peak, bytes / bandwidth) + launches x overhead; fused (every card's
        kernel), as gpunet's CuPy backend runs it today, and unfused."""
        spec = gpu(device)
        overhead = launch_overhead_us * 1e-6
        groups: dict[str, list[OpTimes]] = {}
        for r in self.records:
            gemm = r.name in GEMMS
            fused = op_time(r.cost, r.dtype, gemm, spec, overhead, tf32)
            unfused = op_time(r.unfused, r.dtype, gemm, spec, overhead, tf32).total_s
            composed = composed_on_cupy(r.name, r.params)
            groups.setdefault(r.name, []).append(
                OpTimes(
                    r,
                    fused,
                    cupy_s=unfused if composed else fused.total_s,
                    cupy_launches=r.unfused.launches if composed else r.launches,
                    unfused_s=unfused,
                )
            )
        rows = sorted(
            (PrimitiveTime.of(name, ops) for name, ops in groups.items()), key=lambda t: -t.total_s
        )
        return Estimate(
            device=spec,
            launch_overhead_us=launch_overhead_us,
            tf32=tf32,
            launches=sum(t.launches for t in rows),
            compute_s=sum(t.compute_s for t in rows),
            memory_s=sum(t.memory_s for t in rows),
            launch_s=sum(t.launch_s for t in rows),
            total_s=sum(t.total_s for t in rows),
            cupy_launches=sum(t.cupy_launches for t in rows),
            cupy_total_s=sum(t.cupy_total_s for t in rows),
            unfused_launches=sum(t.unfused_launches for t in rows),
            unfused_total_s=sum(t.unfused_total_s for t in rows),
            rows=rows,
        )

    def table(
        self,
        device: str | GPUSpec | None = "H100",
        launch_overhead_us: float = DEFAULT_LAUNCH_OVERHEAD_US,
        tf32: bool = False,
    ) -> str:
        """Per primitive, in order of first call: calls, launches, FLOPs, bytes read and
        written, and (unless ``device`` is None) its modelled time on that GPU and share."""
        per: dict[str, list] = {}
        for r in self.records:
            row = per.setdefault(r.name, [0, Cost()])
            row[0] += 1
            row[1] += r.cost
        head = ["primitive", "calls", "launches", "FLOPs", "read", "written", "FLOP/B"]
        times: dict[str, PrimitiveTime] = {}
        total = 0.0
        if device is not None:
            est = self.roofline(device, launch_overhead_us, tf32)
            times = {t.name: t for t in est.rows}
            total = est.total_s
            head += [f"{est.device.name}", "share"]
        body = []
        for name, (calls, c) in per.items():
            line = [name, calls, c.launches, _si(c.flops), _si(c.bytes_read) + "B"]
            line += [_si(c.bytes_written) + "B", f"{c.flops / c.bytes:.2f}" if c.bytes else "-"]
            if device is not None:
                t = times[name].total_s
                line += [seconds(t), f"{t / total:.1%}" if total else "-"]
            body.append(line)
        return text_table(head, body)


@contextlib.contextmanager
def profile() -> Iterator[Profile]:
    """Record every primitive call and fused kernel in this thread while the block runs:
    ``with gpunet.profile() as p: ...``, then ``p.table()``, ``p.summary()``,
    ``p.roofline("H100")``."""
    p = Profile()
    with autodiff.observing(p._observe):
        yield p


# ---------------------------------------------------------------------- MLP step report
@dataclass(frozen=True)
class StepRow:
    """One MLP training step, counted and modelled on a GPU."""

    sizes: tuple[int, ...]
    batch: int
    params: int
    summary: Summary
    estimate: Estimate
    captured: Estimate  # the same step captured (``gpunet.capture``), profiled at a replay

    @property
    def label(self) -> str:
        return "-".join(map(str, self.sizes)) + f", batch {self.batch}"


def training_step(model: Any, opt: Any, x: Any, y: Any, context: Any, scaler: Any) -> None:
    """One cross-entropy training step, forward and loss under ``context`` (autocast or a
    null context), through ``scaler`` (an ``amp.GradScaler``) when it is not None."""
    from .nn import functional as F

    opt.zero_grad()
    with context:
        loss = F.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def profile_mlp_step(
    sizes: Sequence[int],
    batch: int,
    activation: str = "relu",
    optimizer: str = "sgd",
    dtype: Any = None,
    capture: bool = False,
    autocast: Any = None,
    scaler: bool = False,
) -> tuple[Profile, int]:
    """Profile one steady-state training step (forward, cross-entropy, backward, update;
    SGD with momentum 0.9 or Adam) of ``nn.MLP(sizes)``; returns the profile and the
    parameter count. One unprofiled step runs first, so buffers exist as in training; with
    ``capture`` the step is ``gpunet.capture``d and the profile hears a replay's calls.
    ``autocast``: gpunet.bfloat16 or float16 to run forward and loss under autocast;
    ``scaler``: the step through ``amp.GradScaler`` (scale, backward, unscaling step, update)."""
    from . import nn, optim, random
    from .creation import tensor

    random.manual_seed(0)
    model = nn.MLP(list(sizes), activation=activation, dtype=dtype)
    params = list(model.parameters())
    opt = (
        optim.SGD(params, lr=0.01, momentum=0.9)
        if optimizer == "sgd"
        else optim.Adam(params, lr=1e-3)
    )
    x = random.randn(batch, sizes[0], dtype=dtype)
    y = tensor(np.random.default_rng(0).integers(0, sizes[-1], batch))

    precision = amp.autocast(dtype=autocast or dtypes.bfloat16, enabled=autocast is not None)
    scaling = amp.GradScaler() if scaler else None

    def step() -> None:
        training_step(model, opt, x, y, precision, scaling)

    if capture:
        from .capture import capture as record

        step = record(step)
        # (the first two calls record it; under autocast three: the first makes the weights'
        # low-precision copy, which the later ones read)
        while not step.replays and step.calls < 4:
            step()
    step()
    with profile() as p:
        step()
    return p, sum(q.numel() for q in params)


# ``gpunet train --precision``'s names -> how a step runs in each: (autocast dtype, scaler, TF32)
PRECISIONS: dict[str, tuple[Any, bool, bool]] = {
    "fp32": (None, False, False),
    "tf32": (None, False, True),
    "bf16": (dtypes.bfloat16, False, False),
    "fp16": (dtypes.float16, True, False),
}


def _precision(name: str) -> tuple[Any, bool, bool]:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def mlp_step_report(
    configs: Sequence[tuple[Sequence[int], int]] | None = None,
    device: str | GPUSpec = "H100",
    launch_overhead_us: float = DEFAULT_LAUNCH_OVERHEAD_US,
    tf32: bool = False,
    activation: str = "relu",
    optimizer: str = "sgd",
    precision: str = "fp32",
) -> list[StepRow]:
    """For each (sizes, batch): one MLP training step profiled (on whatever device runs it)
    and modelled on ``device``: its time, launch share, and fused against unfused. By
    default the four MLP sizes of the benchmarks (``gpunet.bench.workloads.MLP_SIZES``).
    ``precision`` ('fp32', 'tf32', 'bf16', 'fp16'): the step as ``gpunet train --precision``
    runs it (autocast's casts, fp16's loss scaler), priced at that precision's peaks."""
    low, scaler, on_tensor_cores = _precision(precision)
    tf32 = tf32 or on_tensor_cores
    if configs is None:
        from .bench.workloads import MLP_SIZES  # at call time: import gpunet loads no bench

        configs = list(MLP_SIZES.values())
    rows = []
    for sizes, batch in configs:
        how = {"autocast": low, "scaler": scaler}
        p, n = profile_mlp_step(sizes, batch, activation, optimizer, **how)
        est = p.roofline(device, launch_overhead_us, tf32)
        replay, _ = profile_mlp_step(sizes, batch, activation, optimizer, capture=True, **how)
        captured = replay.roofline(device, launch_overhead_us, tf32)
        rows.append(StepRow(tuple(sizes), batch, n, p.summary(), est, captured))
    return rows


def precision_times(
    sizes: Sequence[int],
    batch: int,
    device: str | GPUSpec = "H100",
    launch_overhead_us: float = DEFAULT_LAUNCH_OVERHEAD_US,
) -> dict[str, float]:
    """One SGD step of ``nn.MLP(sizes)`` modelled on ``device`` in each precision, seconds:
    fp32 and tf32 price one float32 profile (tf32: its float32 GEMMs at the TF32 peak); bf16
    and fp16 profile the step under autocast as it runs (its casts; fp16 with the scaler's
    scale, unscaling step and update), its GEMMs at the half-precision tensor-core peak."""
    out: dict[str, float] = {}
    profiles: dict[tuple[Any, bool], Profile] = {}
    for name, (low, scaler, tf32) in PRECISIONS.items():
        key = (low, scaler)
        if key not in profiles:
            profiles[key] = profile_mlp_step(sizes, batch, autocast=low, scaler=scaler)[0]
        out[name] = profiles[key].roofline(device, launch_overhead_us, tf32).total_s
    return out


def precision_report(
    configs: Sequence[tuple[Sequence[int], int]] | None = None,
    device: str | GPUSpec = "H100",
    launch_overhead_us: float = DEFAULT_LAUNCH_OVERHEAD_US,
) -> str:
    """A Markdown table: one SGD step of each MLP modelled on ``device`` in each precision
    (``precision_times``), fused kernels as in ``mlp_step_report``."""
    from .bench.workloads import MLP_SIZES  # at call time: import gpunet loads no bench

    head = ["MLP, batch", "fp32", "tf32", "bf16 (autocast)", "fp16 (autocast, scaler)"]
    head.append("bf16 / fp32")
    body = []
    for sizes, batch in configs or list(MLP_SIZES.values()):
        t = precision_times(sizes, batch, device, launch_overhead_us)
        label = f"{'-'.join(map(str, sizes))}, batch {batch}"
        body.append([label, *(seconds(v) for v in t.values()), f"{t['bf16'] / t['fp32']:.2f}"])
    return text_table(head, body, markdown=True)


def format_report(rows: Sequence[StepRow]) -> str:
    """The rows of ``mlp_step_report`` as a Markdown table: launches and modelled step time
    fused (every card's kernel), as gpunet's CuPy backend runs it today, and unfused; and the
    step captured, its replay's launches priced as the nodes of one CUDA graph."""
    head = [
        "MLP, batch",
        "GFLOP",
        "MB moved",
        "launches: fused / CuPy today / unfused",
        "modelled step: fused / CuPy today / unfused",
        "captured as a CUDA graph: launches, step",
        "launch share (fused)",
        "fusion saves",
    ]
    body = []
    for r in rows:
        e, s = r.estimate, r.summary
        body.append(
            [
                r.label,
                _num(s.flops / 1e9),
                _num(s.bytes / 1e6),
                f"{e.launches} / {e.cupy_launches} / {e.unfused_launches}",
                f"{seconds(e.total_s)} / {seconds(e.cupy_total_s)} / {seconds(e.unfused_total_s)}",
                f"{r.captured.launches}, {seconds(r.captured.graph_s)}",
                f"{e.launch_share:.1%}",
                f"{seconds(e.fusion_saving_s)} ({e.fusion_speedup:.2f}x)",
            ]
        )
    return text_table(head, body, markdown=True)


def phase_times(
    p: Profile,
    device: str | GPUSpec = "H100",
    launch_overhead_us: float = DEFAULT_LAUNCH_OVERHEAD_US,
    tf32: bool = False,
) -> dict[str, float]:
    """Modelled seconds per phase (forward, backward, optimizer) of a profile on ``device``."""
    spec, overhead = gpu(device), launch_overhead_us * 1e-6
    out = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for r in p.records:
        out[r.phase] += op_time(r.cost, r.dtype, r.name in GEMMS, spec, overhead, tf32).total_s
    return out


def data_parallel_report(
    sizes: Sequence[int] = (2048, 4096, 4096, 4096, 10),
    batch: int = 512,
    ranks: Sequence[int] = (1, 2, 4, 8),
    device: str | GPUSpec = "H100",
    tf32: bool = False,
) -> str:
    """A Markdown table: one step of ``nn.MLP(sizes)`` on ``batch`` rows per GPU (SGD with
    momentum, float32), modelled on 1, 2, 4, 8 GPUs over each link of ``LINKS``: the ring
    all-reduce of the gradients, the step with it after the backward (gpunet today) and the
    bound with it hidden behind the backward (buckets), and whether it hides."""
    p, n = profile_mlp_step(sizes, batch)
    t = phase_times(p, device, tf32=tf32)
    grad_bytes = 4.0 * n
    head = ["GPUs", "link", "all-reduce", "step: after backward", "bound: overlapped", "hidden"]
    body = []
    for k in ranks:
        for link in LINKS.values() if k > 1 else [next(iter(LINKS.values()))]:
            d = data_parallel_step(t["forward"], t["backward"], t["optimizer"], grad_bytes, k, link)
            body.append(
                [
                    str(k),
                    link.name if k > 1 else "-",
                    seconds(d.all_reduce_s) if k > 1 else "-",
                    f"{seconds(d.serial_s)} ({k * batch / d.serial_s:,.0f} samples/s)",
                    seconds(d.overlapped_s),
                    ("yes" if d.hidden else "no") if k > 1 else "-",
                ]
            )
    title = (
        f"{'-'.join(map(str, sizes))}, batch {batch} per GPU, {n:,} parameters "
        f"({grad_bytes / 1e6:,.0f} MB of float32 gradients); one GPU ({gpu(device).name}): "
        f"forward {seconds(t['forward'])}, backward {seconds(t['backward'])}, update "
        f"{seconds(t['optimizer'])}"
    )
    return title + "\n\n" + text_table(head, body, markdown=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Print ``mlp_step_report`` as Markdown:
    ``python -c "from gpunet.profiler import main; main()" [--device A100] [--tf32] ...``"""
    import argparse

    ap = argparse.ArgumentParser(description="Model one MLP training step on a GPU.")
    ap.add_argument("--device", default="H100", help="H100, A100 or H200")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--tf32", action="store_true", help="float32 GEMMs on the tensor cores")
    ap.add_argument("--launch-overhead-us", type=float, default=DEFAULT_LAUNCH_OVERHEAD_US)
    ap.add_argument(
        "--data-parallel",
        action="store_true",
        help="the large MLP on 1, 2, 4, 8 GPUs over NVLink, PCIe and InfiniBand instead",
    )
    ap.add_argument(
        "--precisions", action="store_true", help="each MLP's step in fp32, tf32, bf16, fp16"
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        help="the step as gpunet train --precision runs it, priced at that precision",
    )
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.precisions:
        print(precision_report(device=args.device, launch_overhead_us=args.launch_overhead_us))
        return
    if args.data_parallel:
        print(data_parallel_report(device=args.device, tf32=args.tf32))
        return
    rows = mlp_step_report(
        device=args.device,
        launch_overhead_us=args.launch_overhead_us,
        tf32=args.tf32,
        activation=args.activation,
        optimizer=args.optimizer,
        precision=args.precision,
    )
    print(format_report(rows))


# ---------------------------------------------------------------------- helpers
def _array(a: Any) -> Any:
    """The array behind a Tensor, an array as it is, None for anything else."""
    if isinstance(a, Tensor):
        return a.data
    return a if hasattr(a, "shape") and hasattr(a, "dtype") else None


def _aliases(x: Any, y: Any) -> bool:
    """Does y view x's memory? (NumPy checks; CuPy's views keep their base, as NumPy's.)"""
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        return bool(np.may_share_memory(x, y))
    base = getattr(y, "base", None)
    return base is not None and (base is x or base is getattr(x, "base", None))


def _device(a: Any) -> str:
    if isinstance(a, Tensor):
        return str(a.device)
    return "cuda" if type(a).__module__.startswith("cupy") else "cpu"


def _dtype(out: Any, ins: list[Any]) -> str:
    """The dtype an op computes in: its output's if floating, else its first float input's."""
    for a in [out, *ins]:
        if a is not None and dtypes.is_floating(np.dtype(str(a.dtype))):
            return dtype_name(a.dtype)
    return dtype_name((out if out is not None else ins[0]).dtype)


def _phase(name: str) -> str:
    """The optimizer's kernels by name; the rest by whether a reverse sweep is running."""
    if name in OPTIMIZER_OPS:
        return "optimizer"
    return "backward" if autodiff.STATE.flags & autodiff.BACKWARD else "forward"


def _si(x: float) -> str:
    """1234567 -> '1.23 M' (SI prefixes)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:g} "


def _num(x: float) -> str:
    """Three significant digits, without an exponent."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) >= 0.001 else f"{x:.2e}"
