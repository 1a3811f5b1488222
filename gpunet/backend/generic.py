"""The array backend written once against the Python array API standard.

Every primitive's forward is a method here of the same name, computed through ``self.xp``.
NumPy, CuPy and ``array_api_strict`` all run this class unchanged; the NumPy and CuPy
subclasses override only what they accelerate. Nothing here may call a NumPy-only function:
the array-api-strict tests prove it.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from . import faults
from .fused import FusedOps

Array = Any
Shape = tuple[int, ...]
Axes = tuple[int, ...]

# 2**digits of the 2-byte floats, whose uniform draws are k / 2**digits, k < 2**digits (as
# PyTorch draws them), so that none rounds up to 1.0
GRID = {np.dtype(np.float16): 2.0**11, np.dtype(ml_dtypes.bfloat16): 2.0**8}

_COMPARE = {
    "lt": "less",
    "le": "less_equal",
    "gt": "greater",
    "ge": "greater_equal",
    "eq": "equal",
    "ne": "not_equal",
}


def _full_key(key: tuple) -> tuple:
    """``key`` with a trailing ``...`` when it has none: the array API, unlike NumPy, does not
    fill in the axes a basic index leaves out (``x[0]`` of a matrix is ``x[0, ...]``)."""
    return key if any(k is Ellipsis for k in key) else (*key, Ellipsis)


def _write(out: Array, value: Array, alpha: float, beta: float) -> None:
    """out <- alpha value + beta out, in place, scaling the fresh ``value`` in place (BLAS's
    convention: with beta = 0, out is written without being read)."""
    if alpha != 1.0:
        value *= alpha
    if beta == 0.0:
        out[...] = value
        return
    if beta != 1.0:
        out *= beta
    out += value


class ArrayBackend(FusedOps):
    """Raw-array operations for one device, through an array-API namespace ``xp``; the fused
    activations and optimizer updates come from ``FusedOps`` (fused.py)."""

    name = "generic"

    def __init__(self, xp: Any, device: Any, array_type: type) -> None:
        self.xp = xp
        self.device = device
        self.array_type = array_type
        self.impls: dict[str, Any] = {}  # primitive name -> bound method, filled on first use

    def impl(self, name: str) -> Any:
        """The bound method computing primitive ``name`` (cached: ``bind`` asks on every op)."""
        method = self.impls[name] = getattr(self, name)
        return method

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device}>"

    # ---------------------------------------------------------------- creation and dtypes
    def as_dtype(self, dtype: np.dtype) -> Any:
        """The namespace's dtype object for a NumPy dtype."""
        return getattr(self.xp, np.dtype(dtype).name)

    def asarray(self, data: Any, dtype: np.dtype | None = None) -> Array:
        return self.xp.asarray(data, dtype=None if dtype is None else self.as_dtype(dtype))

    def zeros(self, shape: Shape, dtype: np.dtype) -> Array:
        return self.xp.zeros(shape, dtype=self.as_dtype(dtype))

    def ones(self, shape: Shape, dtype: np.dtype) -> Array:
        return self.xp.ones(shape, dtype=self.as_dtype(dtype))

    def full(self, shape: Shape, value: float, dtype: np.dtype) -> Array:
        return self.xp.full(shape, value, dtype=self.as_dtype(dtype))

    def arange(self, start: float, stop: float, step: float, dtype: np.dtype) -> Array:
        return self.xp.arange(start, stop, step, dtype=self.as_dtype(dtype))

    def to_numpy(self, x: Array) -> np.ndarray:
        """A host copy (or view, on the CPU) of ``x`` as a NumPy array."""
        return np.asarray(x)

    def check_indices(self, indices: Array, size: int, op: str) -> None:
        """Refuse an index outside [-size, size) (NumPy's range), before the gather."""
        faults.check_indices(self.to_numpy(indices), size, op)

    def raise_pending_faults(self) -> None:
        """Raise a fault a device kernel recorded (a bad label; see faults.py); the CPU
        raises at once, so it has none pending."""

    def random(self, generator: Any, kind: str, shape: Shape, dtype: np.dtype) -> Array:
        """Normal (kind='normal') or uniform [0, 1) samples, drawn on the host by default."""
        rng = generator.host_rng
        host = rng.standard_normal(shape) if kind == "normal" else rng.random(shape)
        return self.asarray(host.astype(dtype, copy=False))

    def random_through_float32(
        self, generator: Any, kind: str, shape: Shape, dtype: np.dtype
    ) -> Array:
        """A float16/bfloat16 draw made in float32 (NumPy's and cuRAND's generators draw
        float32 or float64 only): uniform floor(u 2**d) / 2**d, normal rounded to nearest."""
        x = self.random(generator, kind, shape, np.dtype(np.float32))
        if kind == "uniform":  # (exact: scaling by a power of two, then flooring)
            x *= GRID[dtype]
            x = self.xp.floor(x)
            x *= 1.0 / GRID[dtype]
        return x.astype(dtype)

    def all_finite(self, x: Array) -> bool:
        return bool(self.xp.all(self.xp.isfinite(x)))

    def nonzero_flat(self, mask: Array) -> Array:
        """Flat positions where a boolean mask is true (used by boolean indexing)."""
        return self.xp.nonzero(self.xp.reshape(mask, (-1,)))[0]

    # ---------------------------------------------------------------- unary elementwise
    def neg(self, x: Array) -> Array:
        return -x

    def exp(self, x: Array) -> Array:
        return self.xp.exp(x)

    def log(self, x: Array) -> Array:
        return self.xp.log(x)

    def log1p(self, x: Array) -> Array:
        return self.xp.log1p(x)

    def tanh(self, x: Array) -> Array:
        return self.xp.tanh(x)

    def sqrt(self, x: Array) -> Array:
        return self.xp.sqrt(x)

    def abs(self, x: Array) -> Array:
        return self.xp.abs(x)

    def sign(self, x: Array) -> Array:
        return self.xp.sign(x)

    # ---------------------------------------------------------------- binary elementwise
    def add(self, x: Array, y: Array) -> Array:
        return x + y

    def sub(self, x: Array, y: Array) -> Array:
        return x - y

    def mul(self, x: Array, y: Array) -> Array:
        return x * y

    def div(self, x: Array, y: Array) -> Array:
        return x / y

    def pow(self, x: Array, y: Array) -> Array:
        return self.xp.pow(x, y)

    def maximum(self, x: Array, y: Array) -> Array:
        return self.xp.maximum(x, y)

    def minimum(self, x: Array, y: Array) -> Array:
        return self.xp.minimum(x, y)

    def compare(self, x: Array, y: Array, *, op: str) -> Array:
        return getattr(self.xp, _COMPARE[op])(x, y)

    def where(self, cond: Array, x: Array, y: Array) -> Array:
        return self.xp.where(cond, x, y)

    def cast(self, x: Array, *, dtype: np.dtype) -> Array:
        return self.xp.astype(x, self.as_dtype(dtype))

    def copy(self, x: Array) -> Array:
        return self.xp.asarray(x, copy=True)

    def stop_gradient(self, x: Array) -> Array:
        return x

    def isfinite(self, x: Array) -> Array:
        return self.xp.isfinite(x)

    def argmax(self, x: Array, *, axis: int | None, keepdims: bool) -> Array:
        return self.xp.argmax(x, axis=axis, keepdims=keepdims)

    def device_put(self, x: Array, *, device: Any) -> Array:
        """x copied to another device (through the host between different backends)."""
        from . import get_backend

        target = get_backend(device)
        return x if target is self else target.asarray(self.to_numpy(x))

    # ---------------------------------------------------------------- reductions
    def sum(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        return self.xp.max(x, axis=axis, keepdims=keepdims)

    def logsumexp(self, x: Array, *, axis: Axes, keepdims: bool) -> Array:
        """m + log(sum(exp(x - m))) with m = max(x) (0 where m is infinite): no overflow."""
        xp = self.xp
        m = xp.max(x, axis=axis, keepdims=True)
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
        out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
        return (
            out
            if keepdims
            else xp.reshape(out, tuple(n for i, n in enumerate(out.shape) if i not in axis))
        )

    # ---------------------------------------------------------------- fused losses
    def cross_entropy(self, logits: Array, labels: Array, *, reduction: str) -> Array:
        """logsumexp(z) - z[y] per row of logits z (n, c), then mean, sum or none."""
        xp = self.xp
        lse = self.logsumexp(logits, axis=(1,), keepdims=False)
        picked = xp.take_along_axis(logits, xp.reshape(labels, (-1, 1)), axis=1)
        nll = lse - xp.reshape(picked, (-1,))
        if reduction == "none":
            return nll
        total = xp.sum(nll)
        return total / logits.shape[0] if reduction == "mean" else total

    def cross_entropy_backward(
        self, g: Array, logits: Array, labels: Array, *, reduction: str
    ) -> Array:
        """(softmax(z) - onehot(y)) times the upstream gradient of each row."""
        xp = self.xp
        n, c = logits.shape
        p = xp.exp(logits - self.logsumexp(logits, axis=(1,), keepdims=True))
        onehot = xp.reshape(labels, (-1, 1)) == xp.arange(c, dtype=labels.dtype)
        p = p - xp.astype(onehot, p.dtype)
        if reduction == "none":
            return p * xp.reshape(g, (n, 1))
        return p * (g / n if reduction == "mean" else g)

    # ---------------------------------------------------------------- shapes and indexing
    def broadcast_to(self, x: Array, *, shape: Shape) -> Array:
        return self.xp.broadcast_to(x, shape)

    def reshape(self, x: Array, *, shape: Shape) -> Array:
        return self.xp.reshape(x, shape)

    def transpose(self, x: Array, *, perm: Axes) -> Array:
        return self.xp.permute_dims(x, perm)

    def slice(self, x: Array, *, key: tuple) -> Array:
        return x[_full_key(key)]

    def slice_transpose(self, g: Array, *, key: tuple, shape: Shape) -> Array:
        out = self.xp.zeros(shape, dtype=g.dtype)
        # the array API takes no None (new axis) in a setitem key: drop those size-1 axes of g
        kept = _full_key(tuple(k for k in key if k is not None))
        out[kept] = self.xp.reshape(g, out[kept].shape)
        return out

    def take(self, x: Array, indices: Array, *, axis: int) -> Array:
        flat = self.xp.reshape(indices, (-1,))
        out = self.xp.take(x, flat, axis=axis)
        return self.xp.reshape(out, x.shape[:axis] + indices.shape + x.shape[axis + 1 :])

    def scatter_add(self, g: Array, indices: Array, *, axis: int, size: int) -> Array:
        """out[..., indices[j], ...] += g[..., j, ...] along ``axis`` (repeats accumulate).

        The generic form multiplies by a one-hot matrix: one GEMM, no Python loop.
        """
        xp = self.xp
        n = math.prod(indices.shape)
        pre, post = g.shape[:axis], g.shape[axis + indices.ndim :]
        g3 = xp.reshape(g, (math.prod(pre), n, math.prod(post)))
        flat = xp.reshape(indices, (n, 1))
        onehot = xp.astype(flat == xp.arange(size, dtype=flat.dtype), g.dtype)  # (n, size)
        out = xp.matmul(xp.permute_dims(g3, (0, 2, 1)), onehot)  # (pre, post, size)
        return xp.reshape(xp.permute_dims(out, (0, 2, 1)), (*pre, size, *post))

    def concatenate(self, *xs: Array, axis: int) -> Array:
        return self.xp.concat(xs, axis=axis)

    # ---------------------------------------------------------------- linear algebra
    def matmul(self, x: Array, y: Array, *, tx: bool, ty: bool) -> Array:
        """op(x) @ op(y), op = transpose of the last two axes when its flag is set."""
        xp = self.xp
        return xp.matmul(xp.matrix_transpose(x) if tx else x, xp.matrix_transpose(y) if ty else y)

    def linear_activation(
        self, x: Array, w: Array, b: Array, *, activation: str | None, alpha: float
    ) -> Array:
        """f(x @ w + b), f the named activation (``alpha`` its parameter), or x @ w + b."""
        z = self.xp.matmul(x, w) + b
        return z if activation is None else self.activation(z, name=activation, alpha=alpha)

    def sum_into(
        self, out: Array, x: Array, *, axis: tuple[int, ...], alpha: float = 1.0, beta: float = 0.0
    ) -> None:
        """out <- alpha sum_axis(x) + beta out, in place: a bias gradient written (beta = 0) or
        summed (beta = 1) into its buffer, or an SGD step on the bias itself (alpha = -lr).
        (Generic: through a temporary.)"""
        _write(out, self.sum(x, axis=axis, keepdims=False), alpha, beta)

    def matmul_into(
        self,
        out: Array,
        x: Array,
        y: Array,
        *,
        tx: bool,
        ty: bool,
        alpha: float = 1.0,
        beta: float = 0.0,
    ) -> None:
        """out <- alpha op(x) @ op(y) + beta out, in place (BLAS's GEMM): a weight gradient
        written (beta = 0) or summed (beta = 1) into its buffer, or an SGD step on the weight
        itself (alpha = -lr). The one dispatch: the plain product written straight into out
        (``_matmul_out``), else the backend's own scaling GEMM (``_gemm``), else through a
        temporary."""
        if alpha == 1.0 and beta == 0.0:
            self._matmul_out(out, x, y, tx, ty)
        elif not self._gemm(out, x, y, tx, ty, alpha, beta):
            _write(out, self.matmul(x, y, tx=tx, ty=ty), alpha, beta)

    def _matmul_out(self, out: Array, x: Array, y: Array, tx: bool, ty: bool) -> None:
        """out <- op(x) @ op(y) (generic: through a temporary)."""
        out[...] = self.matmul(x, y, tx=tx, ty=ty)

    def _gemm(
        self, out: Array, x: Array, y: Array, tx: bool, ty: bool, alpha: float, beta: float
    ) -> bool:
        """out <- alpha op(x) @ op(y) + beta out by a GEMM that scales and accumulates as it
        writes; False (nothing done) where the backend has none for these operands."""
        return False

    def axpby_into(self, out: Array, x: Array, *, alpha: float, beta: float) -> None:
        """out <- alpha x + beta out, in place (x is not written)."""
        _write(out, alpha * x, 1.0, beta)
