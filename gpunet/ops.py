"""The public ops: turn Python values into tensors, broadcast explicitly, bind a primitive.

This is the layer between the user's ``x * 2 + b`` and the primitives. It does the things no
primitive should: Python scalars take the tensor's dtype (no promotion), operands that carry
gradients are broadcast with the ``broadcast_to`` primitive (so one rule un-broadcasts), axes
are normalised, and bad shapes raise an error that names the op. Composite ops (mean, var,
softmax, clip, stack, ...) are written here from primitives.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import dtypes
from . import primitives as P
from .activations import _float_tensor, relu, sigmoid, tanh  # noqa: F401  (re-exported: gpunet.ops.relu)
from .autodiff import (
    AUTOCAST,
    CAPTURE,
    FORWARD,
    GRAD,
    STATE,
    apply,
    bind,
    bump_version,
    call,
    describe,
    refuse,
)
from .backend import Device, device
from .primitives.linalg import (  # noqa: F401  (for nn: layers above reach primitives via ops)
    check_linear_activation,
    linear_fusable,
)
from .tensor import Tensor

Axis = int | Sequence[int] | None
NO_PARAMS: dict[str, Any] = {}  # apply's params for ops without any (shared: never write it)


# ---------------------------------------------------------------------- helpers
def _tracked(t: Tensor) -> bool:
    """Will some transform need this operand's derivative? (then broadcasting is explicit)"""
    flags = STATE.flags
    return bool(flags & FORWARD or (t._requires_grad and flags & GRAD))


_SCALARS: dict[tuple, Tensor] = {}  # (type, value, dtype, backend) -> read-only 0-d constant


def _scalar(value: bool | int | float, like: Tensor) -> Tensor:
    """A Python scalar as a cached 0-d constant with ``like``'s dtype and device."""
    backend = like._backend
    key = (type(value), value, like.data.dtype, backend)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 4096:  # a loop over many distinct scalars must not grow this
            _SCALARS.clear()
        t = _SCALARS[key] = Tensor._wrap(backend.asarray(value, like.dtype), backend)
        if isinstance(t.data, np.ndarray):
            t.data.flags.writeable = False
    return t


def _constant(value: Any, like: Tensor, op: str) -> tuple[Tensor, Tensor]:
    """A Python scalar or array as a tensor on ``like``'s device with ``like``'s dtype.

    Returns (like, constant); ``like`` is cast to the default float dtype when it holds
    integers or booleans and the value is a float (``int_tensor * 0.5`` is float32).
    """
    if type(value) is float:  # the common case: a float tensor, no promotion, cached
        dt = like.data.dtype
        if isinstance(dt, np.dtype) and (dt.kind == "f" or dt == dtypes.bfloat16):
            return like, _scalar(value, like)
    kind = dtypes.kind(like.dtype)
    if isinstance(value, (bool, int, float)):
        vkind = "b" if isinstance(value, bool) else "i" if isinstance(value, int) else "f"
    else:
        value = like._backend.to_numpy(value) if hasattr(value, "__dlpack__") else value
        vkind = dtypes.kind(np.asarray(value).dtype)
        if vkind not in "biuf":  # (None or a string would become NaN or garbage, silently)
            raise TypeError(
                f"gpunet.{op}: expected a Tensor, a number or an array of numbers as the other "
                f"operand of {describe(like)}, got {type(value).__name__} {value!r:.40}"
            )
    if vkind == "f" and kind != "f":
        like = cast(like, dtypes.DEFAULT_FLOAT)
    elif vkind in "iu" and kind == "b":
        like = cast(like, dtypes.DEFAULT_INT)
    if isinstance(value, (bool, int, float)):
        return like, _scalar(value, like)
    backend = like._backend
    return like, Tensor._wrap(backend.asarray(value, like.dtype), backend)


_BROADCAST: dict[tuple, tuple[int, ...]] = {}  # memo: a program broadcasts few shape pairs


def broadcast_shapes(op: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """NumPy's broadcasting rule, with an error that names the op."""
    out = _BROADCAST.get(shapes)
    if out is not None:
        return out
    ndim = builtins.max(len(s) for s in shapes)
    dims = []
    for i in range(-ndim, 0):
        sizes = {s[i] for s in shapes if len(s) >= -i} - {1}
        if len(sizes) > 1:
            raise ValueError(
                f"gpunet.{op}: shapes {', '.join(map(str, shapes))} do not broadcast (axis "
                f"{i} has sizes {sorted(sizes)}). Reshape an input so that each axis matches "
                "or is 1."
            )
        dims.append(sizes.pop() if sizes else 1)
    if len(_BROADCAST) > 4096:
        _BROADCAST.clear()
    out = _BROADCAST[shapes] = tuple(dims)
    return out


def _operands(op: str, x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Two tensors of one dtype, broadcast to one shape where a transform needs it."""
    if isinstance(x, Tensor):
        if isinstance(y, Tensor):
            dx, dy = x.data.dtype, y.data.dtype
            if dx is not dy and dx != dy:  # booleans join the other dtype; nothing else
                if x.dtype == dtypes.bool_:
                    x = cast(x, y.dtype)
                elif y.dtype == dtypes.bool_:
                    y = cast(y, x.dtype)
        else:  # a Python scalar becomes a 0-d constant: it broadcasts natively, no check
            x, y = _constant(y, x, op)
            if not y.data.ndim:
                return x, y
    elif isinstance(y, Tensor):
        y, x = _constant(x, y, op)
        if not x.data.ndim:
            return x, y
    else:
        raise TypeError(
            f"gpunet.{op}: expected a Tensor operand, got {type(x).__name__} and {type(y).__name__}"
        )
    sx, sy = x.data.shape, y.data.shape
    if sx != sy:
        shape = broadcast_shapes(op, sx, sy)
        if sx != shape and _tracked(x):
            x = apply(P.broadcast_to, (x,), {"shape": shape})
        if sy != shape and _tracked(y):
            y = apply(P.broadcast_to, (y,), {"shape": shape})
    return x, y


def normalize_axes(axis: Axis, ndim: int, op: str) -> tuple[int, ...]:
    """``axis`` as a sorted tuple of non-negative ints (``None`` means every axis)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    n = builtins.max(ndim, 1)  # a 0-d tensor's axis 0 (or -1) is the tensor, as in PyTorch
    for a in axes:
        if not -n <= a < n:
            raise ValueError(f"gpunet.{op}: axis {a} is out of range for a {ndim}-d tensor")
        if ndim:
            out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"gpunet.{op}: repeated axis in {axis}")
    return tuple(sorted(out))


def keepdims_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _tensor_arg(x: Any, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"gpunet.{op}: expected a Tensor, got {type(x).__name__}")
    return x


# ---------------------------------------------------------------------- constants
def zeros_like(x: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return _like(x, _made(x, "zeros", x.data.shape, _dtype_or(x, dtype)), requires_grad)


def ones_like(x: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return _like(x, _made(x, "ones", x.data.shape, _dtype_or(x, dtype)), requires_grad)


def _made(x: Tensor, kind: str, shape: tuple, dtype: Any) -> Any:
    """A new array of zeros or ones on x's backend; a backend call a step capture records."""
    method = getattr(x._backend, kind)
    if STATE.flags & CAPTURE:
        return call(kind, method, shape=shape, dtype=dtype)
    return method(shape, dtype)


def full_like(
    x: Tensor, fill_value: float, dtype: Any = None, requires_grad: bool = False
) -> Tensor:
    shape, dt = x.data.shape, _dtype_or(x, dtype)
    if STATE.flags & CAPTURE:  # (a backend call a step capture records)
        data = call("full", x._backend.full, shape=shape, value=fill_value, dtype=dt)
    else:
        data = x._backend.full(shape, fill_value, dt)
    return _like(x, data, requires_grad)


def _dtype_or(x: Tensor, dtype: Any) -> Any:
    return x.dtype if dtype is None else dtypes.as_dtype(dtype)


def _like(x: Tensor, data: Any, requires_grad: bool) -> Tensor:
    """A new tensor on x's device (the one home of gpunet.zeros_like and its kin)."""
    t = Tensor._wrap(data, x._backend)
    if requires_grad:
        t.requires_grad = True
    return t


# ---------------------------------------------------------------------- elementwise
def neg(x: Tensor) -> Tensor:
    return apply(P.neg, (x,), NO_PARAMS)


def exp(x: Tensor) -> Tensor:
    return apply(P.exp, (x,), NO_PARAMS)


def log(x: Tensor) -> Tensor:
    return apply(P.log, (x,), NO_PARAMS)


def log1p(x: Tensor) -> Tensor:
    return apply(P.log1p, (x,), NO_PARAMS)


def sqrt(x: Tensor) -> Tensor:
    return apply(P.sqrt, (x,), NO_PARAMS)


def abs(x: Tensor) -> Tensor:
    return apply(P.abs, (x,), NO_PARAMS)


def sign(x: Tensor) -> Tensor:
    return apply(P.sign, (x,), NO_PARAMS)


def isfinite(x: Tensor) -> Tensor:
    return apply(P.isfinite, (x,), NO_PARAMS)


def add(x: Any, y: Any) -> Tensor:
    return apply(P.add, _operands("add", x, y), NO_PARAMS)


def sub(x: Any, y: Any) -> Tensor:
    return apply(P.sub, _operands("sub", x, y), NO_PARAMS)


def mul(x: Any, y: Any) -> Tensor:
    return apply(P.mul, _operands("mul", x, y), NO_PARAMS)


def div(x: Any, y: Any) -> Tensor:
    x, y = _operands("div", x, y)
    if x.dtype.kind != "f" and x.dtype != dtypes.bfloat16:  # int / int gives floats, as in Python
        x, y = cast(x, dtypes.DEFAULT_FLOAT), cast(y, dtypes.DEFAULT_FLOAT)
    return bind(P.div, x, y)


def pow(x: Any, y: Any) -> Tensor:
    return apply(P.pow, _operands("pow", x, y), NO_PARAMS)


def maximum(x: Any, y: Any) -> Tensor:
    return apply(P.maximum, _operands("maximum", x, y), NO_PARAMS)


def minimum(x: Any, y: Any) -> Tensor:
    return apply(P.minimum, _operands("minimum", x, y), NO_PARAMS)


def compare(x: Any, y: Any, op: str) -> Tensor:
    """x (op) y elementwise for op in lt, le, gt, ge, eq, ne: a boolean tensor, no gradient."""
    x, y = _operands(op, x, y)
    return bind(P.compare, x, y, op=op)


def where(cond: Any, x: Any, y: Any) -> Tensor:
    """cond ? x : y elementwise; x and y may be Python scalars."""
    if not isinstance(cond, Tensor):
        ref = x if isinstance(x, Tensor) else y
        cond = Tensor._wrap(ref._backend.asarray(cond, dtypes.bool_), ref._backend)
    elif cond.dtype != dtypes.bool_:
        cond = compare(cond, 0, "ne")
    if not isinstance(x, Tensor) and not isinstance(y, Tensor):
        x = full_like(cond, x, dtypes.DEFAULT_FLOAT if isinstance(x, float) else None)
    x, y = _operands("where", x, y)
    shape = broadcast_shapes("where", cond.shape, x.shape, y.shape)
    if x.shape != shape and _tracked(x):
        x = broadcast_to(x, shape)
    if y.shape != shape and _tracked(y):
        y = broadcast_to(y, shape)
    return bind(P.where, cond, x, y)


def clip(x: Tensor, min: Any = None, max: Any = None) -> Tensor:
    """min(max(x, lo), hi); the gradient is 1 inside [lo, hi], including its ends."""
    if min is not None:
        x = maximum(x, min)
    if max is not None:
        x = minimum(x, max)
    return x


def cast(x: Tensor, dtype: Any) -> Tensor:
    """x as ``dtype``; casting to a non-float dtype ends differentiation."""
    dt = dtypes.as_dtype(dtype)
    if x.dtype == dt:
        return x
    if (dt.kind != "f" and dt != dtypes.bfloat16) or not dtypes.is_floating(x.dtype):
        x = stop_gradient(x)
    return bind(P.cast, x, dtype=dt)


def copy(x: Tensor) -> Tensor:
    return bind(P.copy, x)


def device_put(x: Tensor, dev: str | Device) -> Tensor:
    d = device(dev)
    return x if x.device == d else bind(P.device_put, x, device=d)


def stop_gradient(x: Tensor) -> Tensor:
    """x as a constant: no gradient flows through it, in any transform."""
    return bind(P.stop_gradient, x)


# ---------------------------------------------------------------------- reductions
def sum(x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    return bind(P.sum, x, axis=normalize_axes(axis, x.ndim, "sum"), keepdims=keepdims)


def max(x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    axes = _no_empty(x, normalize_axes(axis, x.ndim, "max"), "max")
    return bind(P.max, x, axis=axes, keepdims=keepdims)


def _no_empty(x: Tensor, axes: tuple[int, ...], op: str) -> tuple[int, ...]:
    """``axes``, unless one is empty: a reduction with no identity (max) has no value there."""
    if not x.data.size and any(x.shape[a] == 0 for a in axes):
        raise ValueError(
            f"gpunet.{op}: cannot reduce an empty axis (axes {axes} of shape {x.shape}): it has "
            "no identity. Reduce only non-empty axes, or check the size first."
        )
    return axes


def min(x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    axes = _no_empty(x, normalize_axes(axis, x.ndim, "min"), "min")
    return neg(max(neg(x), axes, keepdims))


def mean(x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    """sum(x) / n over the reduced axes."""
    axes = normalize_axes(axis, x.ndim, "mean")
    n = math.prod(x.shape[a] for a in axes)
    total = bind(P.sum, x, axis=axes, keepdims=keepdims)
    return total * (1.0 / n) if n else total / 0.0


def var(x: Tensor, axis: Axis = None, keepdims: bool = False, correction: int = 1) -> Tensor:
    """sum((x - mean)^2) / max(n - correction, 0); correction=1 is PyTorch's default
    (unbiased). With no degrees of freedom left it is NaN, as in NumPy and PyTorch."""
    axes = normalize_axes(axis, _float_tensor(x, "var").ndim, "var")
    n = math.prod(x.shape[a] for a in axes)
    d = x - mean(x, axes, keepdims=True)
    return sum(d * d, axes, keepdims) / float(builtins.max(n - correction, 0))


def logsumexp(x: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x))), computed as m + log(sum(exp(x - m))) with m = max(x): no overflow."""
    axes = normalize_axes(axis, _float_tensor(x, "logsumexp").ndim, "logsumexp")
    _no_empty(x, axes, "logsumexp")
    return bind(P.logsumexp, x, axis=axes, keepdims=keepdims)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """x - logsumexp(x) along ``axis``."""
    return x - logsumexp(_float_tensor(x, "log_softmax"), axis, keepdims=True)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x - logsumexp(x)) along ``axis``: stable for any finite x."""
    return exp(log_softmax(_float_tensor(x, "softmax"), axis))


def argmax(x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor:
    if axis is not None:
        axis = normalize_axes(axis, x.ndim, "argmax")[0] if x.ndim else None
    _no_empty(x, tuple(range(x.ndim)) if axis is None else (axis,), "argmax")
    return bind(P.argmax, x, axis=axis, keepdims=keepdims)


def cross_entropy(logits: Tensor, labels: Any, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of logits (n, c) against integer labels (n,), fused:
    logsumexp(z) - z[y] per row, then "mean", "sum" or "none"."""
    if not isinstance(labels, Tensor):
        labels = Tensor._wrap(logits._backend.asarray(labels, dtypes.DEFAULT_INT), logits._backend)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"gpunet.cross_entropy: reduction must be mean, sum or none, got {reduction!r}"
        )
    shape = _float_tensor(logits, "cross_entropy").data.shape
    if len(shape) != 2 or labels.data.shape != shape[:1] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"gpunet.cross_entropy: expected logits (n, c) and integer labels (n,), got logits "
            f"{describe(logits)} and labels {describe(labels)}"
        )
    return apply(P.cross_entropy, (logits, labels), {"reduction": reduction})


def arange_like(x: Tensor, n: int) -> Tensor:
    """0, 1, ..., n-1 as int64 on x's device."""
    return Tensor._wrap(x._backend.arange(0, n, 1, dtypes.DEFAULT_INT), x._backend)


def take_rows(x: Tensor, cols: Tensor) -> Tensor:
    """x[i, cols[i]] for each row i of a matrix (differentiable in x)."""
    n, c = x.shape
    flat = Tensor._wrap(
        x._backend.add(x._backend.mul(arange_like(x, n).data, c), cols.data), x._backend
    )
    return bind(P.take, reshape(x, (n * c,)), flat, axis=0)


# ---------------------------------------------------------------------- shapes
def broadcast_to(x: Tensor, shape: Sequence[int]) -> Tensor:
    shape = tuple(int(n) for n in shape)
    if broadcast_shapes("broadcast_to", x.data.shape, shape) != shape:
        raise ValueError(f"gpunet.broadcast_to: cannot broadcast {x.shape} to {shape}")
    return x if x.data.shape == shape else bind(P.broadcast_to, x, shape=shape)


def reshape(x: Tensor, shape: int | Sequence[int]) -> Tensor:
    """The same elements in a new shape; one entry may be -1 (inferred)."""
    shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    size = x.numel()
    if shape.count(-1) == 1:
        known = math.prod(n for n in shape if n != -1)
        if known == 0 or size % known:
            raise ValueError(
                f"gpunet.reshape: cannot reshape {x.shape} ({size} elements) to {shape}"
            )
        shape = tuple(size // known if n == -1 else n for n in shape)
    if math.prod(shape) != size or builtins.min(shape, default=0) < 0:
        raise ValueError(f"gpunet.reshape: cannot reshape {x.shape} ({size} elements) to {shape}")
    return x if shape == x.shape else bind(P.reshape, x, shape=shape)


def permute(x: Tensor, axes: Sequence[int]) -> Tensor:
    """Reorder the axes: out.shape[i] = x.shape[axes[i]]."""
    perm = tuple(normalize_axes(a, x.ndim, "permute")[0] for a in axes) if x.ndim else tuple(axes)
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(
            f"gpunet.permute: {tuple(axes)} is not a permutation of the "
            f"{x.ndim} axes of a tensor of shape {x.shape}"
        )
    return x if perm == tuple(range(x.ndim)) else bind(P.transpose, x, perm=perm)


def swapaxes(x: Tensor, axis0: int, axis1: int) -> Tensor:
    perm = list(range(x.ndim))
    axes = [normalize_axes(a, x.ndim, "swapaxes") for a in (axis0, axis1)]
    if x.ndim:
        (i,), (j,) = axes
        perm[i], perm[j] = perm[j], perm[i]
    return permute(x, perm)


def flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    if x.ndim == 0:
        return reshape(x, (1,))
    start, end = (normalize_axes(d, x.ndim, "flatten")[0] for d in (start_dim, end_dim))
    shape = x.shape[:start] + (math.prod(x.shape[start : end + 1]),) + x.shape[end + 1 :]
    return reshape(x, shape)


def squeeze(x: Tensor, axis: Axis = None) -> Tensor:
    if axis is None:
        axes = tuple(i for i, n in enumerate(x.shape) if n == 1)
    else:
        axes = normalize_axes(axis, x.ndim, "squeeze")
        if any(x.shape[a] != 1 for a in axes):
            raise ValueError(f"gpunet.squeeze: axis {axis} of shape {x.shape} is not 1")
    return reshape(x, tuple(n for i, n in enumerate(x.shape) if i not in axes))


def unsqueeze(x: Tensor, axis: int) -> Tensor:
    if not -x.ndim - 1 <= axis <= x.ndim:
        raise ValueError(
            f"gpunet.unsqueeze: axis {axis} is out of range for a {x.ndim}-d tensor "
            f"(a new axis goes at [-{x.ndim + 1}, {x.ndim}])"
        )
    axis = axis % (x.ndim + 1)
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors of one dtype and device along an existing axis."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("gpunet.concatenate: needs at least one tensor")
    first = tensors[0]
    if not first.ndim:
        raise ValueError("gpunet.concatenate: 0-d tensors have no axis to join; use gpunet.stack")
    axis = normalize_axes(axis, first.ndim, "concatenate")[0]
    for t in tensors:
        if t.ndim != first.ndim or any(
            t.shape[i] != first.shape[i] for i in range(first.ndim) if i != axis
        ):
            raise ValueError(
                f"gpunet.concatenate: shapes {[u.shape for u in tensors]} differ off axis {axis}"
            )
    return bind(P.concatenate, *tensors, axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors of one shape along a new axis."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("gpunet.stack: needs at least one tensor")
    if len({t.shape for t in tensors}) != 1:
        raise ValueError(f"gpunet.stack: shapes differ: {[t.shape for t in tensors]}")
    return concatenate([unsqueeze(t, axis) for t in tensors], axis)


# ---------------------------------------------------------------------- indexing
def _is_index_array(k: Any) -> bool:
    return isinstance(k, (Tensor, list, np.ndarray)) or hasattr(k, "__dlpack__")


def _index_tensor(k: Any, like: Tensor) -> Tensor:
    if isinstance(k, Tensor):
        if k.device != like.device:
            raise RuntimeError(
                f"gpunet.getitem: indices on {k.device} for a tensor on "
                f"{like.device}; move them with .to('{like.device}')"
            )
        return k
    if isinstance(k, list) and not k:  # (NumPy reads [] as float64: no indices, not floats)
        k = np.zeros(0, dtypes.DEFAULT_INT)
    arr = like._backend.asarray(
        k
        if isinstance(k, list)
        else like._backend.to_numpy(k)
        if not isinstance(k, np.ndarray)
        else k
    )
    return Tensor._wrap(arr, like._backend)


def bind_slice(x: Tensor, key: tuple) -> Tensor:
    return bind(P.slice, x, key=key)


def bind_slice_transpose(g: Tensor, key: tuple, shape: tuple[int, ...]) -> Tensor:
    return bind(P.slice_transpose, g, key=key, shape=shape)


def take(x: Tensor, indices: Tensor, axis: int) -> Tensor:
    """x gathered at integer indices along ``axis`` (negative indices count from the end)."""
    n = x.shape[axis]
    if indices.dtype.kind not in "iu":
        raise TypeError(f"gpunet.take: indices must be integers, got {indices.dtype}")
    x._backend.check_indices(indices.data, n, "gpunet.take")  # (a GPU records, then raises)
    if indices.dtype.kind == "i":
        indices = where(compare(indices, 0, "lt"), indices + n, indices)
    return bind(P.take, x, indices, axis=axis)


def scatter_add(g: Tensor, indices: Tensor, axis: int, size: int) -> Tensor:
    """zeros with g added at integer indices along ``axis``; repeated indices accumulate."""
    return bind(P.scatter_add, g, indices, axis=axis, size=size)


def getitem(x: Tensor, key: Any) -> Tensor:
    """x[key]: basic keys slice; integer arrays and boolean masks gather with ``take``."""
    key = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, np.integer) for k in key):  # (np.argmax's index: a Python int here)
        key = tuple(int(k) if isinstance(k, np.integer) else k for k in key)
    advanced = [i for i, k in enumerate(key) if _is_index_array(k)]
    if not advanced:
        for k in key:
            if not (k is None or k is Ellipsis or isinstance(k, (int, builtins.slice))):
                raise IndexError(
                    f"gpunet.getitem: unsupported index {k!r} of type {type(k).__name__}"
                )
        try:
            return bind_slice(x, key)
        except IndexError as e:  # (NumPy's own words name neither gpunet nor the shape)
            raise IndexError(f"gpunet.getitem: {e} (key {key!r}, shape {x.shape})") from None
    idx = [_index_tensor(key[i], x) for i in advanced]
    first, count = advanced[0], len(advanced)
    rest = [k for i, k in enumerate(key) if i not in advanced]
    if advanced != list(range(first, first + count)) or any(
        k != builtins.slice(None) for k in rest if not _is_index_array(k)
    ):
        raise IndexError(
            "gpunet.getitem: integer-array or mask indices must be consecutive, with only ':' "
            f"elsewhere (got {key!r}); index in two steps instead"
        )
    if count == 1 and idx[0].dtype == dtypes.bool_:
        mask = idx[0]
        if mask.shape != x.shape[first : first + mask.ndim]:
            raise IndexError(
                f"gpunet.getitem: mask of shape {mask.shape} does not match "
                f"shape {x.shape} at axis {first}"
            )
        if STATE.flags & CAPTURE:
            refuse(
                "gpunet.getitem with a boolean mask",
                "makes a shape from values",
                "Keep the shape: gpunet.where(mask, x, 0) (then sum or mean), or run this step "
                "without capture.",
            )
        flat = Tensor._wrap(x._backend.nonzero_flat(mask.data), x._backend)
        merged = x.shape[:first] + (-1,) + x.shape[first + mask.ndim :]
        return take(reshape(x, merged), flat, first)
    if count == 1:
        return take(x, idx[0], first)
    # several index arrays: one flat index into the merged axes (row-major)
    shape = broadcast_shapes("getitem", *(i.shape for i in idx))
    dims = x.shape[first : first + count]
    flat = None
    for i, n in zip(idx, dims):
        i = where(compare(i, 0, "lt"), i + n, i)
        flat = i if flat is None else flat * n + i
    flat = broadcast_to(flat, shape)
    merged = x.shape[:first] + (math.prod(dims),) + x.shape[first + count :]
    return take(reshape(x, merged), flat, first)


def _inplace_error(x: Tensor, what: str) -> RuntimeError:
    """For a write into a tensor the tape tracks (raise it where ``_tracked(x)``)."""
    return RuntimeError(
        f"gpunet: {what} on a tensor that requires grad (shape {x.shape}) would not be "
        "recorded; do it inside `with gpunet.no_grad():` or on x.detach()."
    )


def setitem_(x: Tensor, key: Any, value: Any) -> None:
    """x[key] = value, in place, outside the graph."""
    if _tracked(x):
        raise _inplace_error(x, "item assignment")
    if STATE.flags & CAPTURE:
        refuse(
            "x[key] = value",
            "writes outside the backend calls a capture records",
            "Make a new tensor instead (gpunet.where, gpunet.concatenate), or run this step "
            "without capture.",
        )
    key = tuple(
        k.data if isinstance(k, Tensor) else k for k in (key if isinstance(key, tuple) else (key,))
    )
    if isinstance(value, Tensor):
        if value.device != x.device:
            raise RuntimeError(f"gpunet.setitem: value on {value.device}, tensor on {x.device}")
        value = value.data
    try:
        x.data[key] = x._backend.asarray(value, x.dtype)
    except IndexError as e:
        raise IndexError(f"gpunet.setitem: {e} (key {key!r}, shape {x.shape})") from None
    bump_version(x)  # a node that saved x before this must not run its rule on the new values


_INPLACE = {
    "add": operator.iadd,
    "sub": operator.isub,
    "mul": operator.imul,
    "div": operator.itruediv,
}


def _inplace_into(out: Any, value: Any, *, op: str) -> None:
    """out (op)= value, in place."""
    _INPLACE[op](out, value)


def _autocast_operand(x: Tensor, other: Tensor) -> Tensor:
    """``other`` for ``x (op)= other`` under autocast: a float16/bfloat16 operand cast up to a
    float32/float64 ``x``, as autocast's ``x (op) other`` promotes (a low ``x`` still refuses
    a wider operand: the result would not fit it)."""
    on = STATE.autocast_device
    if other.dtype not in (dtypes.float16, dtypes.bfloat16) or x.dtype not in (
        dtypes.float32,
        dtypes.float64,
    ):
        return other
    if on is not None and x._backend.device.type != on:
        return other
    return apply(P.cast, (other,), {"dtype": x.dtype})


def inplace_(x: Tensor, other: Any, op: str) -> Tensor:
    """x (op)= other, writing into x's array (optimizer updates under no_grad)."""
    if _tracked(x):
        raise _inplace_error(x, f"in-place {op}")
    if x.data.dtype.kind != "f" and not dtypes.is_floating(x.dtype):
        other_dtype = other.dtype if hasattr(other, "dtype") else np.asarray(other).dtype
        if op == "div" or dtypes.is_floating(other_dtype):  # (NumPy would truncate, or raise)
            raise TypeError(
                f"gpunet: in-place {op} of {other_dtype} into {describe(x)} would truncate to "
                "integers; write x = x / y (a new float tensor) or convert x first with "
                "x.to(gpunet.float32)"
            )
    if isinstance(other, Tensor):
        if other._backend is not x._backend or other.data.dtype != x.data.dtype:
            if STATE.flags & AUTOCAST:  # (x (op)= y promotes as x (op) y does under autocast)
                other = _autocast_operand(x, other)
            if other._backend is not x._backend or other.data.dtype != x.data.dtype:
                raise TypeError(
                    f"gpunet: in-place {op} of {describe(other)} into {describe(x)}; "
                    "convert with .to(...) first"
                )
        value = other.data
    elif STATE.flags & CAPTURE and isinstance(other, (bool, int, float)):
        value = _scalar(other, x).data  # (cached: the same array at every recording)
    else:
        value = x._backend.asarray(other, x.dtype)
    try:
        if STATE.flags & CAPTURE:  # recorded, and x's array kept: the replay writes the same one
            call(f"inplace_{op}", _inplace_into, x.data, value, op=op)
        else:
            x.data = _INPLACE[op](x.data, value)
    except ValueError as e:  # (checked here, not before: the common case pays nothing)
        shape, target = value.shape, x.data.shape
        if len(shape) > len(target) or any(
            n not in (1, t) for n, t in zip(shape[::-1], target[::-1])
        ):  # (the array library refused before writing anything)
            raise ValueError(
                f"gpunet: in-place {op} of shape {shape} into {describe(x)}: the value must "
                "broadcast to the tensor's shape (an in-place op cannot change it)"
            ) from e
        raise
    bump_version(x)  # a node that saved x before this must not run its rule on the new values
    return x


# ---------------------------------------------------------------------- linear algebra
def matmul(x: Tensor, y: Tensor) -> Tensor:
    """x @ y with NumPy's rules: 1-d operands are vectors, leading axes broadcast."""
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        x, y = _tensor_arg(x, "matmul"), _tensor_arg(y, "matmul")  # raises, naming the type
    sx, sy = x.data.shape, y.data.shape
    if len(sx) == 2 == len(sy) and sx[1] == sy[0]:  # the common case, checked
        return apply(P.matmul, (x, y), {"tx": False, "ty": False})
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError("gpunet.matmul: operands must be at least 1-d; use * for scalars")
    k_y = y.shape[0] if y.ndim == 1 else y.shape[-2]
    if x.shape[-1] != k_y:
        raise ValueError(
            f"gpunet.matmul: shapes {x.shape} and {y.shape} do not align: x has "
            f"{x.shape[-1]} columns but y has {k_y} rows. Transpose an operand (x.T) or "
            "reshape it."
        )
    vec_x, vec_y = x.ndim == 1, y.ndim == 1
    if vec_x:
        x = reshape(x, (1, x.shape[0]))
    if vec_y:
        y = reshape(y, (y.shape[0], 1))
    if x.ndim > 2 and y.ndim == 2:  # fold the batch into rows: one GEMM, not a batch of them
        lead = x.shape[:-1]
        out = reshape(
            bind(P.matmul, reshape(x, (-1, x.shape[-1])), y, tx=False, ty=False),
            (*lead, y.shape[-1]),
        )
    else:
        if x.ndim > 2 or y.ndim > 2:
            batch = broadcast_shapes("matmul", x.shape[:-2], y.shape[:-2])
            x = broadcast_to(x, batch + x.shape[-2:])
            y = broadcast_to(y, batch + y.shape[-2:])
        out = bind(P.matmul, x, y, tx=False, ty=False)
    if vec_x:
        out = squeeze(out, -2)
    if vec_y:
        out = squeeze(out, -1)
    return out


def _radd(x: Tensor, other: Any) -> Tensor:
    """other + x (``2 + x``)."""
    return apply(P.add, _operands("add", other, x), NO_PARAMS)


def _rmul(x: Tensor, other: Any) -> Tensor:
    """other * x (``lr * p.grad``)."""
    return apply(P.mul, _operands("mul", other, x), NO_PARAMS)


# The hottest operators are the functions above (their signature is (self, other)): one
# Python frame less on every ``x + y`` or ``lr * g``. The other reflected operators and the
# unary ones stay methods of Tensor.
Tensor.__add__ = add  # type: ignore[method-assign]
Tensor.__sub__ = sub  # type: ignore[method-assign]
Tensor.__mul__ = mul  # type: ignore[method-assign]
Tensor.__truediv__ = div  # type: ignore[method-assign]
Tensor.__pow__ = pow  # type: ignore[method-assign]
Tensor.__matmul__ = matmul  # type: ignore[method-assign]
Tensor.__radd__ = _radd  # type: ignore[method-assign]
Tensor.__rmul__ = _rmul  # type: ignore[method-assign]
