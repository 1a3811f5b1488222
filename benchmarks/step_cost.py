"""What one MLP training step costs in Python, two ways that hold on a noisy machine.

    python benchmarks/step_cost.py bytecodes tensors    # sys.settrace opcode events, one step
    python benchmarks/step_cost.py ratio tensors --rounds 15

``bytecodes`` counts the Python bytecodes one step runs (deterministic: the same code gives
the same count) and lists the functions that run the most. ``ratio`` times the gpunet step
and the hand-written NumPy step in turn in one process, ``--rounds`` times, and prints the
median of gpunet / NumPy (both feel the same load, so the ratio drifts less than either).
``tensors`` is ``bench_overhead.py``'s raw-tensor step, ``mlp`` the ``nn.MLP`` + ``optim.SGD``
one, ``captured`` that one under ``gpunet.capture`` (a replay's cost). For timings unset the
variables that force a slow GEMM kernel:
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 python ...``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from gpunet.bench import workloads as W

STEPS = {
    "tensors": W.gpunet_tensors_step,
    "mlp": W.gpunet_step,
    "captured": W.gpunet_step_captured,  # (the mlp step recorded once, replayed after)
}


def count_bytecodes(step: Callable[[], Any]) -> collections.Counter:
    """(file, function) -> bytecodes run by one call of ``step``."""
    counts: collections.Counter = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename.rsplit("/gpunet/", 1)[-1], code.co_name)] += 1
        return trace

    sys.settrace(trace)
    try:
        step()
    finally:
        sys.settrace(None)
    return counts


def per_call(fn: Callable[[], Any], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["bytecodes", "ratio"])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--size", choices=sorted(W.MLP_SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    state = W.mlp_state(*W.MLP_SIZES[args.size])
    step = STEPS[args.step](state).step
    for _ in range(20):  # warm the caches (constants, broadcast memo, flat buffers)
        step()
    if args.what == "bytecodes":
        counts = count_bytecodes(step)
        print(f"{sum(counts.values())} bytecodes in one {args.step} step ({args.size})")
        for (where, name), n in counts.most_common(args.top):
            print(f"{n:6d}  {where} {name}")
        return
    numpy_step = W.numpy_step(state).step
    reps = max(1, int(0.02 / per_call(numpy_step, 3)))  # about 20 ms a measurement
    ratios, ours, theirs = [], [], []
    for _ in range(args.rounds):
        a, b = per_call(step, reps), per_call(numpy_step, reps)
        ours.append(a)
        theirs.append(b)
        ratios.append(a / b)
    print(
        f"{args.step} step ({args.size}): gpunet {statistics.median(ours) * 1e6:.1f} us, "
        f"NumPy {statistics.median(theirs) * 1e6:.1f} us, gpunet / NumPy "
        f"{statistics.median(ratios):.3f} (median of {args.rounds} rounds of {reps} steps)"
    )


if __name__ == "__main__":
    main()
