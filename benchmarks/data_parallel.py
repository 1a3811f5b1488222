"""Data-parallel training speed: the medium MLP (784-1024-1024-10, SGD with momentum, float32)
on ``batch`` rows per rank, under ``mpiexec -n N``; rank 0 prints samples/s over all ranks, the
step time and the gradient all-reduce's share of it. ``--torch`` runs the same step with
PyTorch's DistributedDataParallel over gloo (``pip install torch`` first). Not collected by
pytest (it needs mpiexec); run with one BLAS thread per rank:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \\
        .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/data_parallel.py [--torch]

``--paired`` (under ``-n 2``) measures the speedup inside one job, so that the machine's drift
between two jobs does not enter it: rounds alternate rank 0 stepping alone (a world of one,
rank 1 asleep) and both ranks stepping data-parallel, and rank 0 prints the median and range
of 2 x (alone) / (both) over the rounds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

SIZES, BATCH = (784, 1024, 1024, 10), 256


def gpunet_steps(steps: int, warmup: int) -> tuple[float, float, int, int]:
    """(seconds per step, seconds of all-reduce per step, rank, size)."""
    import gpunet.distributed as dist

    comm = dist.init()
    spent = [0.0]
    reduce = comm.all_reduce

    def timed(array: object, op: str = "sum") -> object:
        start = time.perf_counter()
        out = reduce(array, op)
        spent[0] += time.perf_counter() - start
        return out

    comm.all_reduce = timed  # type: ignore[method-assign]
    run = _medium_step(comm)
    run(warmup)
    comm.barrier()
    start, spent[0] = time.perf_counter(), 0.0
    run(steps)
    comm.barrier()
    return (time.perf_counter() - start) / steps, spent[0] / steps, comm.rank, comm.size


def _medium_step(comm: object) -> Callable[[int], None]:
    """``run(steps)``: that many data-parallel steps of the medium MLP over ``comm``."""
    import gpunet
    import gpunet.distributed as dist
    import gpunet.nn.functional as F
    from gpunet import nn, optim

    gpunet.manual_seed(0)
    model = nn.MLP(list(SIZES))
    opt = dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.01, momentum=0.9), comm)
    rng = np.random.default_rng(dist.rank())
    x = gpunet.tensor(rng.standard_normal((BATCH, SIZES[0])).astype(np.float32))
    y = gpunet.tensor(rng.integers(0, SIZES[-1], BATCH))

    def run(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return run


def paired(steps: int, rounds: int) -> list[float] | None:
    """Per round, 2 x (seconds of ``steps`` steps on rank 0 alone) / (the same on both ranks),
    on rank 0 (None elsewhere)."""
    import gpunet.distributed as dist

    comm = dist.init()
    if comm.size != 2:
        raise SystemExit("--paired compares 1 rank with 2: run it under mpiexec -n 2")
    both = _medium_step(comm)
    alone = _medium_step(dist.LocalComm()) if comm.rank == 0 else None
    both(3)
    if alone is not None:
        alone(3)
    ratios = []
    for _ in range(rounds):
        comm.barrier()
        if alone is not None:
            start = time.perf_counter()
            alone(steps)
            one = time.perf_counter() - start
        request = comm.comm.Ibarrier()  # rank 1 sleeps meanwhile (MPI's Barrier would spin)
        while not request.Test():
            time.sleep(0.0005)
        start = time.perf_counter()
        both(steps)
        comm.barrier()
        if alone is not None:
            ratios.append(2 * one / (time.perf_counter() - start))
    return ratios if comm.rank == 0 else None


def torch_steps(steps: int, warmup: int) -> tuple[float, float, int, int]:
    """The same with torch.distributed (gloo) DDP; the all-reduce is inside backward."""
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    rank, size = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    tdist.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(SIZES):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = DistributedDataParallel(torch.nn.Sequential(*layers[:-1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, SIZES[0], generator=gen)
    y = torch.randint(0, SIZES[-1], (BATCH,), generator=gen)
    for i in range(warmup + steps):
        if i == warmup:
            tdist.barrier()
            start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    tdist.barrier()
    seconds = (time.perf_counter() - start) / steps
    tdist.destroy_process_group()
    return seconds, float("nan"), rank, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="PyTorch DDP (gloo) instead")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--paired", type=int, metavar="ROUNDS", help="alternate 1 and 2 ranks")
    args = ap.parse_args()
    if args.paired:
        ratios = paired(args.steps, args.paired)
        if ratios is not None:
            print(
                f"gpunet (MPI), medium MLP, batch {BATCH}/rank, {args.paired} rounds of "
                f"{args.steps} steps alone then on 2 ranks: speedup median "
                f"{statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})"
            )
        return
    run = torch_steps if args.torch else gpunet_steps
    step, reduce, rank, size = run(args.steps, args.warmup)
    if rank == 0:
        who = "torch DDP (gloo)" if args.torch else "gpunet (MPI)"
        share = ""
        if not args.torch:  # DDP's all-reduce runs inside its backward: not timed apart
            share = f", all-reduce {reduce * 1e3:.2f} ms ({reduce / step:.1%})"
        print(
            f"{who}, {size} rank(s), medium MLP, batch {BATCH}/rank: step {step * 1e3:.1f} ms, "
            f"{size * BATCH / step:,.0f} samples/s{share}"
        )


if __name__ == "__main__":
    main()
