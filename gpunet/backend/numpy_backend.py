"""The NumPy backend: the reference implementation and the CPU fast path.

It inherits every method from the generic array-API backend and overrides only where NumPy
can do the same math with fewer passes over memory (``out=``, in place on fresh temporaries)
or has a dedicated routine (``np.add.at`` for scatter-add). Inputs are never written to.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import blas
from .faults import check_labels
from .generic import GRID, Array, ArrayBackend, Axes, Shape
from .numpy_fused import BF16, NumpyFusedOps, through_float32


class NumpyBackend(NumpyFusedOps, ArrayBackend):
    name = "numpy"

    def __init__(self, device: object) -> None:
        super().__init__(np, device, np.ndarray)
        self._arange: dict[int, Array] = {}

    def as_dtype(self, dtype: np.dtype) -> np.dtype:
        return np.dtype(dtype)

    def ones(self, shape: Shape, dtype: np.dtype) -> Array:
        out = np.empty(shape, dtype)  # np.ones is a Python wrapper: empty, then copyto
        out.fill(1)
        return out

    def random(self, generator: Any, kind: str, shape: Shape, dtype: np.dtype) -> Array:
        rng = generator.host_rng
        dt = np.dtype(dtype)
        if dt in GRID:
            return self.random_through_float32(generator, kind, shape, dt)
        if kind == "normal":
            return rng.standard_normal(shape, dtype=dt)
        return rng.random(shape, dtype=dt)

    def logsumexp(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        """The generic formula with one temporary, updated in place."""
        if x.dtype is BF16:
            return through_float32(self.logsumexp, x, axis=axis, keepdims=keepdims)
        if not x.ndim:  # (a 0-d reduction gives a NumPy scalar: no in-place steps on it)
            return super().logsumexp(x, axis=axis, keepdims=keepdims)
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

    def broadcast_to(self, x: Array, *, shape: Shape) -> Array:
        """A read-only strided view, built directly for C-contiguous x (np.broadcast_to's
        Python wrapper costs several microseconds)."""
        if not x.flags.c_contiguous or x.size == 0:
            return np.broadcast_to(x, shape)
        lead = len(shape) - x.ndim
        strides = x.strides  # x's own axes keep theirs, but for the stretched (1 -> m) ones
        if x.shape != shape[lead:]:
            strides = tuple(
                0 if n == 1 and m != 1 else s for n, m, s in zip(x.shape, shape[lead:], strides)
            )
        out = np.ndarray(shape, x.dtype, x, 0, (0,) * lead + strides)
        out.flags.writeable = False
        return out

    def matmul(self, x: Array, y: Array, *, tx: bool, ty: bool) -> Array:
        if x.dtype.char in "eE":  # bfloat16, float16: through float32 BLAS
            return through_float32(self.matmul, x, y, tx=tx, ty=ty)
        return np.matmul(x.swapaxes(-1, -2) if tx else x, y.swapaxes(-1, -2) if ty else y)

    def linear_activation(
        self, x: Array, w: Array, b: Array, *, activation: str | None, alpha: float
    ) -> Array:
        if x.dtype.char in "eE":
            return through_float32(
                self.linear_activation, x, w, b, activation=activation, alpha=alpha
            )
        out = np.matmul(x, w)
        out += b  # in place on the GEMM's fresh output: one array
        if activation is None:
            return out
        if activation == "relu":
            return np.maximum(out, 0, out=out)  # in place too
        return self.activation(out, name=activation, alpha=alpha)

    def sum_into(
        self, out: Array, x: Array, *, axis: tuple[int, ...], alpha: float = 1.0, beta: float = 0.0
    ) -> None:
        if out.dtype is BF16:  # (the gradient buffer: its inputs share its dtype)
            return through_float32(self.sum_into, out, x, axis=axis, alpha=alpha, beta=beta)
        if alpha == 1.0 and beta == 0.0:
            np.add.reduce(x, axis=axis, out=out)  # no temporary
        else:
            super().sum_into(out, x, axis=axis, alpha=alpha, beta=beta)

    def _matmul_out(self, out: Array, x: Array, y: Array, tx: bool, ty: bool) -> None:
        if out.dtype.char in "eE":  # (the gradient buffer: its inputs share its dtype)
            return through_float32(self._matmul_out, out, x, y, tx, ty)
        np.matmul(x.swapaxes(-1, -2) if tx else x, y.swapaxes(-1, -2) if ty else y, out=out)

    def _gemm(
        self, out: Array, x: Array, y: Array, tx: bool, ty: bool, alpha: float, beta: float
    ) -> bool:
        """The GEMM with alpha and beta of NumPy's own OpenBLAS (``blas.py``): no temporary
        and no second pass over out. False where that BLAS is not found."""
        return blas.gemm(out, x, y, tx, ty, alpha, beta)

    def sum(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        if x.dtype is BF16:
            return through_float32(self.sum, x, axis=axis, keepdims=keepdims)
        return np.add.reduce(x, axis=axis, keepdims=keepdims)  # np.sum's wrapper costs 3 us

    def max(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        return np.maximum.reduce(x, axis=axis, keepdims=keepdims)

    def _rows(self, n: int) -> Array:
        """0..n-1, cached: the row index of every (row, label) gather."""
        rows = self._arange.get(n)
        if rows is None:
            rows = self._arange[n] = np.arange(n)
            rows.flags.writeable = False
        return rows

    def cross_entropy(self, logits: Array, labels: Array, *, reduction: str) -> Array:
        """logsumexp(z) - z[y] per row with one (n, c) temporary, updated in place. (An
        infinite logit gives inf or NaN either way, so the max needs no finiteness guard.)"""
        if logits.dtype is BF16:
            return through_float32(self.cross_entropy, logits, labels, reduction=reduction)
        check_labels(labels, logits.shape[1], "cross_entropy")
        n = logits.shape[0]
        m = np.maximum.reduce(logits, axis=1, keepdims=True)
        t = np.subtract(logits, m)
        np.exp(t, out=t)
        nll = np.add.reduce(t, axis=1)
        np.log(nll, out=nll)
        nll += m[:, 0]
        nll -= logits[self._rows(n), labels]
        if reduction == "none":
            return nll
        total = np.add.reduce(nll)
        return total / n if reduction == "mean" else total

    def cross_entropy_backward(
        self, g: Array, logits: Array, labels: Array, *, reduction: str
    ) -> Array:
        """softmax(z) * scale - scale at the label: one (n, c) temporary, in place. (A mean's
        or sum's scale is a Python float: g / n rounds to the same float either way.)"""
        if logits.dtype is BF16:
            return through_float32(
                self.cross_entropy_backward, g, logits, labels, reduction=reduction
            )
        n = logits.shape[0]
        p = np.subtract(logits, np.maximum.reduce(logits, axis=1, keepdims=True))
        np.exp(p, out=p)
        total = np.add.reduce(p, axis=1, keepdims=True)
        if reduction == "none":
            scale = g.reshape(n, 1)
            p *= np.divide(scale, total, out=total)
            p[self._rows(n), labels] -= scale[:, 0]
        else:
            s = float(g) / max(n, 1) if reduction == "mean" else float(g)  # (n = 0: no rows)
            p *= np.divide(s, total, out=total)
            p[self._rows(n), labels] -= s  # (faster than np.subtract.at: one label a row)
        return p

    def _cross_entropy_with_grad(
        self, loss: Array, grad: Array, logits: Array, labels: Array, g: Array, *, reduction: str
    ) -> None:
        """``cross_entropy`` into ``loss`` and ``cross_entropy_backward`` (cotangent g) into
        ``grad``, sharing the softmax's max, exponentials and row sums: the same operations on
        the same values as the two methods, so the same bits (a step capture replays the pair
        as this; tests/test_capture.py holds it to them). Reductions 'mean' and 'sum'."""
        check_labels(labels, logits.shape[1], "cross_entropy")
        n = logits.shape[0]
        rows = self._rows(n)
        m = np.maximum.reduce(logits, axis=1, keepdims=True)
        p = np.subtract(logits, m, out=grad)
        np.exp(p, out=p)
        total = np.add.reduce(p, axis=1, keepdims=True)
        nll = np.log(total[:, 0])
        nll += m[:, 0]
        nll -= logits[rows, labels]
        value = np.add.reduce(nll)
        loss[...] = value / n if reduction == "mean" else value
        s = float(g) / max(n, 1) if reduction == "mean" else float(g)
        p *= np.divide(s, total, out=total)
        p[rows, labels] -= s

    def scatter_add(self, g: Array, indices: Array, *, axis: int, size: int) -> Array:
        out = np.zeros(g.shape[:axis] + (size,) + g.shape[axis + indices.ndim :], g.dtype)
        key = (slice(None),) * axis + (indices,)
        np.add.at(out, key, g)
        return out

    def concatenate(self, *xs: Array, axis: int) -> Array:
        return np.concatenate(xs, axis=axis)

    def copy(self, x: Array) -> Array:
        return x.copy()


def _checked(method: Any) -> Any:
    """``method`` with the bfloat16 test in front (the methods no training step calls)."""

    @functools.wraps(method)
    def run(self: NumpyBackend, first: Any, *rest: Any, **params: Any) -> Any:
        if first.dtype is BF16 or (rest and getattr(rest[0], "dtype", None) is BF16):
            return through_float32(functools.partial(method, self), first, *rest, **params)
        return method(self, first, *rest, **params)

    return run


# Every method whose arithmetic is more than one ufunc (or a BLAS call, or a reduction) goes
# through float32 for bfloat16: the hot ones test the dtype in their first line (a wrapper
# would add 25 bytecodes a call to every float32 step), these few through ``_checked``.
# One-ufunc elementwise methods and data movement run in ml_dtypes' loops, which compute
# each element in float32 and round once already.
for _name in ("erf", "pow", "scatter_add", "axpby_into"):
    setattr(NumpyBackend, _name, _checked(getattr(NumpyBackend, _name)))
