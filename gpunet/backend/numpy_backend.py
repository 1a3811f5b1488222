"""The NumPy backend: the reference implementation and the CPU fast path.

It inherits every method from the generic array-API backend and overrides only where NumPy
can do the same math with fewer passes over memory (``out=``, in place on fresh temporaries)
or has a dedicated routine (``np.add.at`` for scatter-add). Inputs are never written to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .generic import Array, ArrayBackend, Axes, Shape


class NumpyBackend(ArrayBackend):
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

    def sigmoid(self, x: Array) -> Array:
        """sigmoid(x) through z = exp(-|x|): x >= 0 -> 1/(1+z), else z/(1+z); two temporaries."""
        z = np.abs(x, out=np.empty_like(x))  # out= keeps 0-d results arrays
        np.negative(z, out=z)
        np.exp(z, out=z)
        den = np.add(z, 1.0, out=np.empty_like(z))
        np.copyto(z, 1.0, where=x >= 0)  # z is now the numerator
        return np.divide(z, den, out=den)

    def relu(self, x: Array) -> Array:
        return np.maximum(x, np.zeros((), x.dtype))

    def logsumexp(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        """The generic formula with one temporary, updated in place."""
        m = np.max(x, axis=axis, keepdims=True)
        m[~np.isfinite(m)] = 0
        t = np.subtract(x, m)
        np.exp(t, out=t)
        out = np.sum(t, axis=axis, keepdims=True)
        np.log(out, out=out)
        out += m
        return (
            out
            if keepdims
            else out.reshape(tuple(n for i, n in enumerate(out.shape) if i not in axis))
        )

    def scatter_add(self, g: Array, indices: Array, *, axis: int, size: int) -> Array:
        out = np.zeros(g.shape[:axis] + (size,) + g.shape[axis + indices.ndim :], g.dtype)
        key = (slice(None),) * axis + (indices,)
        np.add.at(out, key, g)
        return out

    def concatenate(self, *xs: Array, axis: int) -> Array:
        return np.concatenate(xs, axis=axis)

    def copy(self, x: Array) -> Array:
        return x.copy()
