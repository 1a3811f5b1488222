"""A roofline model of a GPU: how long a sequence of kernels would take there.

Per op: t = max(FLOPs / peak, bytes / bandwidth) + launches x overhead, summed over the ops of
a step. The peak is the one the op's kernel would run at: GEMMs on the matrix units where
cuBLAS uses them by default (FP64 and FP16 tensor cores; float32 GEMMs on the FP32 units
unless ``tf32=True``: CuPy asks cuBLAS for TF32 only when ``CUPY_TF32=1``, PyTorch only with
``allow_tf32``), everything else on the vector units. The launch overhead is added, not
overlapped: an eager framework issues one kernel at a time, and a kernel shorter than the
launch latency leaves the GPU idle until the next one arrives (where kernels are long this
overstates the step by at most launches x overhead). Peaks and bandwidth are the datasheet's;
real kernels reach perhaps 70-90% of them, so the model is a lower bound on the kernel time
and an estimate of the launch share, not a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .costs import Cost

# Host-side cost of one kernel launch through the CUDA runtime, measured at about 4-6 us
# ("pegainfer (3): From Launch Overhead to CUDA Graph", susun-blog.com, RTX 5070 Ti, CUDA 13;
# NVIDIA's "Getting Started with CUDA Graphs" blog shows the same order on V100). 5 us is the
# middle of that range; pass launch_overhead_us to change it (CUDA Graphs bring it near 1 us).
DEFAULT_LAUNCH_OVERHEAD_US = 5.0
# One kernel node of a CUDA graph replayed with cudaGraphLaunch: the host launches the graph
# once and the GPU walks its nodes, at about 1 us a node (NVIDIA's "Getting Started with CUDA
# Graphs" blog; PyTorch's CUDA-graph notes give the same order): what a captured step pays per
# kernel once it replays as a graph (``gpunet.capture``).
GRAPH_NODE_OVERHEAD_US = 1.0


@dataclass(frozen=True)
class GPUSpec:
    """Peak rates of a GPU, in TFLOPS (dense, no sparsity) and TB/s.

    Only ``fp32_tflops`` and ``bandwidth_tbs`` are required; a missing peak falls back to
    ``fp32_tflops`` (so a custom spec of a GPU without tensor cores needs nothing else).
    """

    name: str
    fp32_tflops: float  # FP32 on the vector (CUDA) cores: elementwise ops, FP32 GEMMs
    bandwidth_tbs: float  # device memory bandwidth
    tf32_tflops: float | None = None  # float32 GEMMs on tensor cores (tf32=True)
    fp16_tflops: float | None = None  # float16 GEMMs on tensor cores
    fp64_tflops: float | None = None  # float64 GEMMs (FP64 tensor cores where they exist)
    source: str = ""

    def peak_flops(self, dtype: str, gemm: bool, tf32: bool = False) -> float:
        """FLOP/s of a kernel on ``dtype`` data: a GEMM's on the matrix units, else FP32's."""
        tflops = self.fp32_tflops
        if gemm:
            # (bfloat16 GEMMs run at float16's tensor-core peak on A100/H100/H200)
            pick = {
                "float16": self.fp16_tflops,
                "bfloat16": self.fp16_tflops,
                "float64": self.fp64_tflops,
            }.get(dtype)
            if dtype == "float32" and tf32:
                pick = self.tf32_tflops
            tflops = pick or tflops
        return tflops * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.bandwidth_tbs * 1e12


# Datasheet figures, dense (the datasheets' starred tensor-core numbers are with 2:4 sparsity,
# twice these).
GPUS: dict[str, GPUSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67 TFLOPS, TF32 Tensor Core
    # 989 TFLOPS (with sparsity: 494.7 dense), FP16 Tensor Core 1,979 (989.4 dense), FP64
    # Tensor Core 67 TFLOPS, GPU memory bandwidth 3.35 TB/s (HBM3).
    "H100": GPUSpec(
        "H100 SXM",
        fp32_tflops=67.0,
        bandwidth_tbs=3.35,
        tf32_tflops=494.7,
        fp16_tflops=989.4,
        fp64_tflops=67.0,
        source="NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)",
    ),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: FP32 19.5 TFLOPS, TF32
    # Tensor Core 156 TFLOPS (312 with sparsity), FP16 Tensor Core 312 TFLOPS, FP64 Tensor
    # Core 19.5 TFLOPS, GPU memory bandwidth 2,039 GB/s (HBM2e).
    "A100": GPUSpec(
        "A100 80GB SXM",
        fp32_tflops=19.5,
        bandwidth_tbs=2.039,
        tf32_tflops=156.0,
        fp16_tflops=312.0,
        fp64_tflops=19.5,
        source="NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM)",
    ),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the H100's compute (FP32 67
    # TFLOPS, TF32 989 / FP16 1,979 TFLOPS with sparsity, FP64 Tensor Core 67) with 141 GB of
    # HBM3e at 4.8 TB/s.
    "H200": GPUSpec(
        "H200 SXM",
        fp32_tflops=67.0,
        bandwidth_tbs=4.8,
        tf32_tflops=494.7,
        fp16_tflops=989.4,
        fp64_tflops=67.0,
        source="NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)",
    ),
}


def gpu(device: str | GPUSpec) -> GPUSpec:
    """A spec by name ("H100", "A100", "H200", any case) or a GPUSpec as it is."""
    if isinstance(device, GPUSpec):
        return device
    spec = GPUS.get(str(device).upper())
    if spec is None:
        raise ValueError(
            f"unknown GPU {device!r}: known are {', '.join(GPUS)}; or pass "
            "gpunet.GPUSpec(name, fp32_tflops=..., bandwidth_tbs=...) for another one"
        )
    return spec


@dataclass(frozen=True)
class OpTime:
    """Modelled seconds of one op: its compute and memory times and the launch overhead."""

    compute_s: float
    memory_s: float
    launch_s: float

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.launch_s

    @property
    def bound(self) -> str:
        """What dominates: "launch", "compute" or "memory" ("-" for a free view)."""
        if self.total_s == 0.0:
            return "-"
        if self.launch_s >= max(self.compute_s, self.memory_s):
            return "launch"
        return "compute" if self.compute_s > self.memory_s else "memory"


def op_time(
    cost: Cost, dtype: str, gemm: bool, spec: GPUSpec, overhead_s: float, tf32: bool = False
) -> OpTime:
    """t = max(FLOPs / peak, bytes / bandwidth) + launches x overhead, as its three parts."""
    return OpTime(
        cost.flops / spec.peak_flops(dtype, gemm, tf32),
        cost.bytes / spec.bandwidth,
        cost.launches * overhead_s,
    )


def dtype_name(dtype: object) -> str:
    return np.dtype(str(dtype)).name


# ---------------------------------------------------------------------- data parallelism
@dataclass(frozen=True)
class Link:
    """What carries a ring all-reduce between GPUs: its bandwidth per GPU and direction."""

    name: str
    bandwidth_gbs: float  # GB/s each GPU sends (and receives) at once
    source: str = ""

    @property
    def bandwidth(self) -> float:
        """Bytes per second, one direction."""
        return self.bandwidth_gbs * 1e9


LINKS: dict[str, Link] = {
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM) and H200 datasheet (H200 SXM): "NVIDIA
    # NVLink: 900GB/s", both directions together: 450 GB/s each way, GPUs of one HGX board.
    "nvlink": Link("NVLink 4 (H100/H200 SXM)", 450.0, "NVIDIA H100 / H200 datasheets"),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column): "PCIe Gen5: 128GB/s", both
    # directions together: 64 GB/s each way.
    "pcie": Link("PCIe Gen5 x16", 64.0, "NVIDIA H100 datasheet (H100 PCIe)"),
    # NVIDIA ConnectX-7 datasheet: InfiniBand NDR, 400 Gb/s per port: 50 GB/s each way, one
    # port per GPU between nodes.
    "infiniband": Link("InfiniBand NDR 400 Gb/s", 50.0, "NVIDIA ConnectX-7 datasheet"),
}


def ring_all_reduce_s(nbytes: float, ranks: int, link: Link) -> float:
    """t = 2 (n - 1) / n x bytes / bandwidth: a ring all-reduce sends each rank's share of the
    buffer round the ring twice (reduce-scatter, then all-gather); 0 for one rank. The per-hop
    latency (a few us, 2 (n - 1) hops) is left out: it matters only for small buffers."""
    if ranks < 1:
        raise ValueError(f"ring_all_reduce_s: ranks must be >= 1, got {ranks}")
    return 2.0 * (ranks - 1) / ranks * nbytes / link.bandwidth


@dataclass(frozen=True)
class DataParallelStep:
    """One data-parallel step modelled from its phases and its gradient all-reduce."""

    ranks: int
    link: Link
    forward_s: float
    backward_s: float
    update_s: float
    all_reduce_s: float

    @property
    def serial_s(self) -> float:
        """One all-reduce after the backward, before the update (gpunet today)."""
        return self.forward_s + self.backward_s + self.all_reduce_s + self.update_s

    @property
    def overlapped_s(self) -> float:
        """The bound for buckets all-reduced while the backward runs (PyTorch DDP's)."""
        return self.forward_s + max(self.backward_s, self.all_reduce_s) + self.update_s

    @property
    def hidden(self) -> bool:
        """Would the all-reduce fit behind the backward?"""
        return self.all_reduce_s <= self.backward_s


def data_parallel_step(
    forward_s: float, backward_s: float, update_s: float, grad_bytes: float, ranks: int, link: Link
) -> DataParallelStep:
    """A step of ``ranks`` GPUs, each on its own batch (the single GPU's phases), plus a ring
    all-reduce of ``grad_bytes`` over ``link``."""
    t = ring_all_reduce_s(grad_bytes, ranks, link)
    return DataParallelStep(ranks, link, forward_s, backward_s, update_s, t)
