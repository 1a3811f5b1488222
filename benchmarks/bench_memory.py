"""Peak host memory of a full MLP training step, against what the step must hold.

What a step needs: parameters P and gradients G (one flat buffer each, P = G bytes), the
batch, and the activations kept for backward (batch x the layer widths). With
``SGD(in_backward=True)`` ("gpunet-in-backward") there is no G: each weight's step is its
gradient's GEMM, so the step holds P and the batch alone. What it should not
make: a weight-sized temporary (a fresh dW each step, as the hand-written NumPy step does),
which also costs fresh pages on every step. Measured with tracemalloc, which sees NumPy's
data allocations: "held" is what stays allocated between steps, "transient" the peak above it
during one step.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_memory.py \
--benchmark-only -s`` (prints the figures); under ``--benchmark-disable`` the same checks run
on a small MLP.
"""

from __future__ import annotations

import itertools
import tracemalloc
from typing import Any

import numpy as np
import pytest

from gpunet.bench.workloads import MLP_IMPLS, MLP_SIZES, mlp_state, parameter_count

MiB = 2**20


def step_memory(impl: str, sizes: list[int], batch: int) -> tuple[Any, int, int]:
    """(the workload, bytes held after a warm step, transient peak bytes of the next step)."""
    MLP_IMPLS[impl](mlp_state(sizes, batch)).step()  # imports and caches, not measured
    tracemalloc.start()
    try:
        work = MLP_IMPLS[impl](mlp_state(sizes, batch))
        work.step()  # the first step makes the flat buffers
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        work.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return work, held, peak - held


@pytest.mark.parametrize("impl", ["gpunet", "gpunet-in-backward"])
@pytest.mark.parametrize("size", ["medium", "large"])
def test_step_memory(benchmark: Any, size: str, impl: str) -> None:
    sizes, batch = MLP_SIZES[size]
    if benchmark.disabled:
        sizes, batch = [s // 16 or 1 for s in sizes[:-1]] + [sizes[-1]], batch // 16
    work, held, transient = step_memory(impl, sizes, batch)
    params = parameter_count(sizes) * 4
    grads = params if impl == "gpunet" else 0
    batch_bytes = batch * sizes[0] * 4 + batch * 8
    activations = batch * sum(sizes[1:]) * 4
    _, numpy_held, numpy_transient = step_memory("numpy", sizes, batch)
    figures = {
        "params_MiB": params / MiB,
        "grads_MiB": grads / MiB,
        "activations_MiB": activations / MiB,
        "held_MiB": held / MiB,
        "transient_MiB": transient / MiB,
        "peak_MiB": (held + transient) / MiB,
        "numpy_peak_MiB": (numpy_held + numpy_transient) / MiB,
    }
    benchmark.extra_info.update(figures)
    print(
        f"\n{impl} {size} {'-'.join(map(str, sizes))} batch {batch}: "
        + ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
    )
    slack = 1 << 20  # Python objects: nodes, tensors, the step's small arrays
    # between steps: the parameters, their flat gradients (if any) and the batch, no more
    assert held <= params + grads + batch_bytes + slack
    # during a step: the saved activations and, at the backward's widest point, a few
    # activation-sized temporaries (upstream g, dZ = g f'(y), dX); never a weight
    widest = batch * max(sizes[1:]) * 4
    assert transient <= activations + 4 * widest + slack
    largest_weight = max(a * b for a, b in itertools.pairwise(sizes)) * 4
    if largest_weight > activations + 4 * widest + slack:  # (true of the large size)
        assert transient < largest_weight
    benchmark.pedantic(work.step, rounds=3, warmup_rounds=0)
    assert np.isfinite(float(work.step()))
