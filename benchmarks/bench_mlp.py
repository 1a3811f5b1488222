"""Full MLP training steps on the CPU: gpunet vs the same step by hand in NumPy vs its GEMMs.

A step is forward (Linear, ReLU, ..., Linear), softmax cross-entropy, backward and an SGD
update. Three versions of the same work, in one run:

- ``gpunet``: ``nn.MLP`` + ``F.cross_entropy`` + ``optim.SGD`` (flat parameter buffer);
- ``numpy``: the step written by hand (in-place bias adds, relu masks, updates);
- ``gemm-floor``: only the step's GEMMs (forward X W, backward dY W^T and X^T dY per layer),
  on preallocated outputs: what no implementation of this step can beat.

Sizes: 784-1024-1024-10 at batch 256, and 2048-4096-4096-4096-10 at batch 512 (float32).
``test_steps_agree`` (not timed) holds gpunet and NumPy to the same updated weights.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_mlp.py \
--benchmark-only``
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet import nn, optim

SIZES = {
    "medium": ([784, 1024, 1024, 10], 256),
    "large": ([2048, 4096, 4096, 4096, 10], 512),
}
LR = 0.01


def _state(sizes: list[int], batch: int, seed: int = 0) -> dict[str, Any]:
    r = np.random.default_rng(seed)
    ws = [
        (r.standard_normal((a, b)) * a**-0.5).astype(np.float32)
        for a, b in itertools.pairwise(sizes)
    ]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    x = r.standard_normal((batch, sizes[0])).astype(np.float32)
    y = r.integers(0, sizes[-1], batch)
    return {"w": ws, "b": bs, "x": x, "y": y}


def gpunet_step(s: dict[str, Any]) -> tuple[Callable[[], Any], nn.MLP]:
    sizes = [s["w"][0].shape[0]] + [w.shape[1] for w in s["w"]]
    model = nn.MLP(sizes, device="cpu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with gpunet.no_grad():
        for lin, w, b in zip(linears, s["w"], s["b"]):
            lin.weight.data[...] = w
            lin.bias.data[...] = b
    opt = optim.SGD(model.parameters(), lr=LR)
    x, y = gpunet.tensor(s["x"]), gpunet.tensor(s["y"])

    def step() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step, model


def numpy_step(s: dict[str, Any]) -> tuple[Callable[[], Any], list[np.ndarray]]:
    ws = [w.copy() for w in s["w"]]
    bs = [b.copy() for b in s["b"]]
    x, y = s["x"], s["y"]
    rows = np.arange(len(y))

    def step() -> Any:
        acts = [x]
        for i, (w, b) in enumerate(zip(ws, bs)):
            z = acts[-1] @ w
            z += b
            if i < len(ws) - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
        logits = acts[-1]
        p = logits - logits.max(axis=1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=1, keepdims=True)
        p[rows, y] -= 1.0
        p /= len(y)
        g = p
        for i in range(len(ws) - 1, -1, -1):
            dw = acts[i].T @ g
            db = g.sum(axis=0)
            if i:
                g = g @ ws[i].T
                g *= acts[i] > 0
            dw *= LR
            ws[i] -= dw
            db *= LR
            bs[i] -= db

    return step, ws


def gemm_floor(s: dict[str, Any]) -> Callable[[], Any]:
    ws, x = s["w"], s["x"]
    batch = len(x)
    acts = [x] + [np.empty((batch, w.shape[1]), np.float32) for w in ws]
    gs = [x] + [np.ones((batch, w.shape[1]), np.float32) for w in ws]  # gs[i]: dL/d acts[i]
    grads = [np.empty_like(w) for w in ws]

    def step() -> None:
        for i, w in enumerate(ws):
            np.matmul(acts[i], w, out=acts[i + 1])  # forward: A W
        for i in range(len(ws) - 1, -1, -1):
            np.matmul(acts[i].T, gs[i + 1], out=grads[i])  # dW = A^T G
            if i:
                np.matmul(gs[i + 1], ws[i].T, out=gs[i])  # dA = G W^T

    return step


def test_steps_agree() -> None:
    s = _state([20, 16, 16, 5], 8)
    g, model = gpunet_step(s)
    n, ws = numpy_step(s)
    for _ in range(3):
        g()
        n()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lin, w in zip(linears, ws):
        np.testing.assert_allclose(lin.weight.numpy(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", ["gpunet", "numpy", "gemm-floor"])
def test_step(benchmark: Any, size: str, impl: str) -> None:
    sizes, batch = SIZES[size]
    if benchmark.disabled:  # the smoke run in `make test`: same code, small arrays
        sizes, batch = [s // 16 or 1 for s in sizes[:-1]] + [sizes[-1]], batch // 16
    s = _state(sizes, batch)
    fn = {
        "gpunet": lambda: gpunet_step(s)[0],
        "numpy": lambda: numpy_step(s)[0],
        "gemm-floor": lambda: gemm_floor(s),
    }[impl]()
    benchmark.group = f"mlp-step {size} {'-'.join(map(str, sizes))} batch {batch}"
    benchmark.pedantic(fn, rounds=5 if size == "large" else 20, warmup_rounds=1)
