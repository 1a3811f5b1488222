"""An Adam step over an MLP's parameters (784-512-512-10, 670k float32) on NumPy.

- ``flat step``: ``gpunet.optim.Adam.step()`` with fresh gradients from backward (separate
  arrays): the copy into the flat gradient array, then one fused ``adam_update`` pass.
- ``flat step, grads in place``: the same step when the gradients already live in the flat
  array (what accumulation into it would give): the update alone.
- ``per-parameter``: ``adam_update`` once per parameter over unpacked arrays, as an optimizer
  without flat buffers runs it.
- ``torch.optim.Adam``: the reference (CPU, default for-loop implementation), when installed.

Run: ``pytest benchmarks/bench_optim.py --benchmark-only``.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpunet as gn
from gpunet import optim
from gpunet.backend.numpy_backend import NumpyBackend
from gpunet.backend.updates import AdamHyper

SHAPES = [(784, 512), (512,), (512, 512), (512,), (512, 10), (10,)]
RNG = np.random.default_rng(0)
INIT = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES]
GRADS = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES]
HYPER = AdamHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _fresh_grads(params):
    for p, g in zip(params, GRADS):
        p.grad = gn.Tensor(g)  # a separate array, as backward makes


def test_flat_step(benchmark):
    params = [gn.tensor(a, requires_grad=True) for a in INIT]
    opt = optim.Adam(params)

    def step():
        _fresh_grads(params)
        opt.step()

    benchmark(step)


def test_flat_step_grads_in_place(benchmark):
    params = [gn.tensor(a, requires_grad=True) for a in INIT]
    opt = optim.Adam(params)
    _fresh_grads(params)
    opt.step()  # p.grad now views the flat array: no copy on later steps
    benchmark(opt.step)


def test_per_parameter(benchmark):
    backend = NumpyBackend(None)
    params = [a.copy() for a in INIT]
    ms = [np.zeros_like(a) for a in INIT]
    vs = [np.zeros_like(a) for a in INIT]
    counts = [np.zeros(1, np.int64) for _ in INIT]  # (each update advances its own)

    def step():
        for p, g, m, v, t in zip(params, GRADS, ms, vs, counts):
            backend.adam_update(p, g, m, v, HYPER, step=t)

    benchmark(step)


def test_torch_adam(benchmark):
    torch = pytest.importorskip("torch")
    params = [torch.tensor(a, requires_grad=True) for a in INIT]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p, g in zip(params, GRADS):
        p.grad = torch.tensor(g)
    benchmark(opt.step)
