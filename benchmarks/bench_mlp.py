"""Full MLP training steps on the CPU: gpunet vs the same step by hand in NumPy vs its GEMMs,
and vs PyTorch eager, JAX jit and HIPS autograd where installed.

A step is forward (Linear, ReLU, ..., Linear), softmax cross-entropy, backward and an SGD
update. The versions of the same work, each defined once in ``gpunet.bench.workloads`` (which
``gpunet bench`` times too, interleaved, with ratios):

- ``gpunet``: ``nn.MLP`` + ``F.cross_entropy`` + ``optim.SGD`` (flat parameter buffer);
- ``gpunet-in-backward``: the same with ``SGD(in_backward=True)``, each weight's step folded
  into its gradient's GEMM (W <- W - lr X^T dY, BLAS's alpha and beta);
- ``numpy``: the step written by hand (in-place bias adds, relu masks, updates);
- ``gemm-floor``: only the step's GEMMs (forward X W, backward dY W^T and X^T dY per layer),
  on preallocated outputs: what no implementation of this step can beat;
- ``torch``, ``jax``, ``autograd``: the peers (skipped, with the reason, when not installed).

Sizes: tiny 64-32-10 batch 32, small 784-128-10 batch 64, medium 784-1024-1024-10 batch 256,
large 2048-4096-4096-4096-10 batch 512 (float32). ``test_steps_agree`` (not timed) holds
gpunet and NumPy to the same updated weights.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_mlp.py \
--benchmark-only``
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpunet.bench.workloads import MLP_IMPLS, MLP_SIZES, MLP_VARIANTS, Unavailable, mlp_state

SIZES = MLP_SIZES


@pytest.mark.parametrize("impl", ["gpunet", *MLP_VARIANTS])
def test_steps_agree(impl: str) -> None:
    s = mlp_state([20, 16, 16, 5], 8)
    g, n = MLP_IMPLS[impl](s), MLP_IMPLS["numpy"](s)
    for _ in range(3):
        g.step()
        n.step()
    for got, want in zip(g.weights(), n.weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", list(MLP_IMPLS))
def test_step(benchmark: Any, size: str, impl: str) -> None:
    sizes, batch = SIZES[size]
    if benchmark.disabled:  # the smoke run in `make test`: same code, small arrays
        sizes, batch = [s // 16 or 1 for s in sizes[:-1]] + [sizes[-1]], batch // 16
    try:
        fn = MLP_IMPLS[impl](mlp_state(sizes, batch)).step
    except Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"mlp-step {size} {'-'.join(map(str, sizes))} batch {batch}"
    benchmark.pedantic(fn, rounds=5 if size == "large" else 20, warmup_rounds=1)
