"""A floor for dispatch: the tiny MLP step on the smallest tape that runs it (not gpunet).

``bench_overhead.py`` times this beside gpunet's step, so that the cost of what gpunet does
per op above this shows as a ratio. It records the same graph (matmul, an explicit broadcast
of the bias, add, relu, matmul, broadcast, add, cross-entropy: 8 nodes) and makes the same
NumPy calls: its cross-entropy backward recomputes the softmax as gpunet's NumPy backend does.
Its backward takes nodes newest-first from a heap, as gpunet's sweep does. The update
works on bare arrays.

It leaves out everything else a framework does per op: dtype, device and shape checks,
Python scalars as constants, hooks, grad mode, anomaly and forward mode, observers, grad
buffers, in-place guards, releasing saved values, and leaf-gradient aliasing rules. The
ratio of gpunet's step to this one is what those cost. No Python tape can be much cheaper
than this.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import numpy as np

_seq = itertools.count().__next__


class Var:
    """A value: its array, and the node that made it (None for a leaf)."""

    __slots__ = ("data", "grad", "needs_grad", "node")

    def __init__(self, data: np.ndarray, needs_grad: bool = False, node: Any = None) -> None:
        self.data, self.needs_grad, self.node, self.grad = data, needs_grad, node, None


def _op1(data: np.ndarray, vjp: Any, saved: tuple, x: Var) -> Var:
    """A new value from one input; recorded as (-seq, vjp, parents, saved) if it needs one."""
    if not x.needs_grad:
        return Var(data)
    return Var(data, True, (-_seq(), vjp, (x.node or x,), saved))


def _op2(data: np.ndarray, vjp: Any, saved: tuple, x: Var, y: Var) -> Var:
    """A new value from two inputs, recorded if either needs a gradient."""
    if not (x.needs_grad or y.needs_grad):
        return Var(data)
    px = (x.node or x) if x.needs_grad else None
    py = (y.node or y) if y.needs_grad else None
    return Var(data, True, (-_seq(), vjp, (px, py), saved))


def matmul(x: Var, w: Var) -> Var:
    return _op2(x.data @ w.data, _matmul_vjp, (x.data, w.data), x, w)


def _matmul_vjp(g: np.ndarray, saved: tuple, i: int) -> np.ndarray:
    x, w = saved
    return g @ w.T if i == 0 else x.T @ g


def broadcast(b: Var, shape: tuple) -> Var:
    return _op1(np.broadcast_to(b.data, shape), _broadcast_vjp, (), b)


def _broadcast_vjp(g: np.ndarray, saved: tuple, i: int) -> np.ndarray:
    return np.add.reduce(g, axis=0)


def add(x: Var, y: Var) -> Var:
    return _op2(x.data + y.data, _add_vjp, (), x, y)


def _add_vjp(g: np.ndarray, saved: tuple, i: int) -> np.ndarray:
    return g


def relu(x: Var) -> Var:
    y = np.maximum(x.data, 0)
    return _op1(y, _relu_vjp, (y,), x)


def _relu_vjp(g: np.ndarray, saved: tuple, i: int) -> np.ndarray:
    return g * (saved[0] > 0)


def cross_entropy(z: Var, labels: np.ndarray) -> Var:
    """mean(logsumexp(z) - z[y]), as gpunet's NumPy backend computes it."""
    rows = np.arange(len(labels))
    m = np.maximum.reduce(z.data, axis=1, keepdims=True)
    t = np.exp(z.data - m)
    nll = np.log(np.add.reduce(t, axis=1)) + m[:, 0] - z.data[rows, labels]
    return _op1(np.add.reduce(nll) / len(labels), _ce_vjp, (z.data, labels, rows), z)


def _ce_vjp(g: np.ndarray, saved: tuple, i: int) -> np.ndarray:
    z, labels, rows = saved
    p = np.exp(z - np.maximum.reduce(z, axis=1, keepdims=True))
    total = np.add.reduce(p, axis=1, keepdims=True)
    s = float(g) / len(labels)
    p *= np.divide(s, total, out=total)
    p[rows, labels] -= s
    return p


def backward(out: Var) -> None:
    """The chain rule from a scalar: each node after all its users (newest first)."""
    grads = {id(out.node): np.ones((), out.data.dtype)}
    queue = [out.node]
    while queue:
        node = heapq.heappop(queue)
        _, vjp, parents, saved = node
        g = grads.pop(id(node))
        for i, p in enumerate(parents):
            if p is None:
                continue
            gi = vjp(g, saved, i)
            if type(p) is tuple:
                prev = grads.get(id(p))
                if prev is None:
                    grads[id(p)] = gi
                    heapq.heappush(queue, p)
                else:
                    grads[id(p)] = prev + gi
            else:
                p.grad = gi if p.grad is None else p.grad + gi


def step_fn(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, lr: float) -> Any:
    """The tiny MLP's SGD step on this tape (the weights are updated in place)."""
    params = [Var(w, True) for w in weights]
    xv = Var(x)
    last = len(params) // 2 - 1

    def step() -> np.ndarray:
        h = xv
        for i in range(last + 1):
            z = matmul(h, params[2 * i])
            h = add(z, broadcast(params[2 * i + 1], z.data.shape))
            if i < last:
                h = relu(h)
        loss = cross_entropy(h, y)
        backward(loss)
        for p in params:
            p.data -= lr * p.grad
            p.grad = None
        return loss.data

    return step
