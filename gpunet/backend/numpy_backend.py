"""The NumPy backend: the reference implementation and the CPU fast path.

It inherits every method from the generic array-API backend and overrides only where NumPy
can do the same math with fewer passes over memory (``out=``, in place on fresh temporaries)
or has a dedicated routine (``np.add.at`` for scatter-add). Inputs are never written to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .generic import Array, ArrayBackend, Axes, Shape
from .numpy_fused import NumpyFusedOps


class NumpyBackend(NumpyFusedOps, ArrayBackend):
    name = "numpy"

    def __init__(self, device: object) -> None:
        super().__init__(np, device, np.ndarray)

    def as_dtype(self, dtype: np.dtype) -> np.dtype:
        return np.dtype(dtype)

    def random(self, generator: Any, kind: str, shape: Shape, dtype: np.dtype) -> Array:
        rng = generator.host_rng
        if kind == "normal":
            return rng.standard_normal(shape, dtype=np.dtype(dtype))
        return rng.random(shape, dtype=np.dtype(dtype))

    def logsumexp(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        """The generic formula with one temporary, updated in place."""
        m = np.maximum.reduce(x, axis=axis, keepdims=True)
        m[~np.isfinite(m)] = 0
        t = np.subtract(x, m)
        np.exp(t, out=t)
        out = np.add.reduce(t, axis=axis, keepdims=True)
        np.log(out, out=out)
        out += m
        return (
            out
            if keepdims
            else out.reshape(tuple(n for i, n in enumerate(out.shape) if i not in axis))
        )

    def sum(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        return np.add.reduce(x, axis=axis, keepdims=keepdims)  # np.sum's wrapper costs 3 us

    def max(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        return np.maximum.reduce(x, axis=axis, keepdims=keepdims)

    def cross_entropy(self, logits: Array, labels: Array, *, reduction: str) -> Array:
        """The generic formula, with one (n, c) temporary updated in place."""
        n = logits.shape[0]
        m = np.maximum.reduce(logits, axis=1, keepdims=True)
        m[~np.isfinite(m)] = 0
        t = np.subtract(logits, m)
        np.exp(t, out=t)
        lse = np.add.reduce(t, axis=1)
        np.log(lse, out=lse)
        lse += m[:, 0]
        lse -= logits[np.arange(n), labels]
        if reduction == "none":
            return lse
        total = np.add.reduce(lse)
        return total / n if reduction == "mean" else total

    def cross_entropy_backward(
        self, g: Array, logits: Array, labels: Array, *, reduction: str
    ) -> Array:
        """softmax(z) * scale - scale at the label: one (n, c) temporary, in place."""
        n = logits.shape[0]
        p = np.subtract(logits, np.maximum.reduce(logits, axis=1, keepdims=True))
        np.exp(p, out=p)
        scale = g.reshape(n, 1) if reduction == "none" else (g / n if reduction == "mean" else g)
        p *= scale / np.add.reduce(p, axis=1, keepdims=True)
        p[np.arange(n), labels] -= scale.reshape(-1) if reduction == "none" else scale
        return p

    def scatter_add(self, g: Array, indices: Array, *, axis: int, size: int) -> Array:
        out = np.zeros(g.shape[:axis] + (size,) + g.shape[axis + indices.ndim :], g.dtype)
        key = (slice(None),) * axis + (indices,)
        np.add.at(out, key, g)
        return out

    def concatenate(self, *xs: Array, axis: int) -> Array:
        return np.concatenate(xs, axis=axis)

    def copy(self, x: Array) -> Array:
        return x.copy()
