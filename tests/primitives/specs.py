"""The spec of every primitive card, for the registry-driven suite (``test_cards.py``) and the
profiler's cost rules (``tests/test_profiler.py``).

For each primitive, hypothesis draws shapes (sizes 0 and 1 included, broadcastable pairs for
binary ops) and float64 values away from kinks, then checks that:

- the forward matches a NumPy reference;
- forward mode (J v) and reverse mode (u^T J) match central finite differences along random
  directions, and so do their own derivatives (second order);
- the dot-product test <u, J v> == <J^T u, v> holds to rounding;
- no input and no upstream gradient is mutated.

A primitive in the registry without a spec here, or without a rule, fails the suite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.special
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpunet
from gpunet import ops
from gpunet import primitives as P
from gpunet.autodiff import bind

F64 = np.float64


@dataclass
class Case:
    """One drawn example: a function of the differentiable inputs, those inputs, a reference."""

    fn: Callable[..., gpunet.Tensor]
    args: list[np.ndarray]
    ref: Callable[..., np.ndarray]


Draw = Any
SPECS: dict[str, Callable[[Draw], Case]] = {}


def spec(name: str) -> Callable[[Callable[[Draw], Case]], Callable[[Draw], Case]]:
    def register(f: Callable[[Draw], Case]) -> Callable[[Draw], Case]:
        SPECS[name] = f
        return f

    return register


def shapes(draw: Draw, min_dims: int = 0, min_side: int = 0) -> tuple[int, ...]:
    return draw(hnp.array_shapes(min_dims=min_dims, max_dims=3, min_side=min_side, max_side=4))


def rng(draw: Draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def uniform(r: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    return r.uniform(lo, hi, shape).astype(F64)


def away_from_zero(r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (r.choice([-1.0, 1.0], shape) * r.uniform(0.2, 2.0, shape)).astype(F64)


def broadcastable_pair(draw: Draw) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4))
    return shape.input_shapes


def unary(name: str, fn: Callable, ref: Callable, values: Callable) -> None:
    @spec(name)
    def _(draw: Draw) -> Case:
        r = rng(draw)
        return Case(fn, [values(r, shapes(draw))], ref)


unary("neg", ops.neg, np.negative, lambda r, s: uniform(r, s, -3, 3))
unary("exp", ops.exp, np.exp, lambda r, s: uniform(r, s, -3, 3))
unary("log", ops.log, np.log, lambda r, s: uniform(r, s, 0.5, 3))
unary("log1p", ops.log1p, np.log1p, lambda r, s: uniform(r, s, -0.5, 3))
unary("tanh", ops.tanh, np.tanh, lambda r, s: uniform(r, s, -3, 3))
unary("sqrt", ops.sqrt, np.sqrt, lambda r, s: uniform(r, s, 0.5, 3))
unary("abs", ops.abs, np.abs, away_from_zero)
unary("sigmoid", ops.sigmoid, scipy.special.expit, lambda r, s: uniform(r, s, -5, 5))
unary("relu", ops.relu, lambda x: np.maximum(x, 0), away_from_zero)
unary("copy", ops.copy, np.copy, lambda r, s: uniform(r, s, -3, 3))
unary("sign", ops.sign, np.sign, away_from_zero)
unary("isfinite", ops.isfinite, np.isfinite, lambda r, s: uniform(r, s, -3, 3))
unary("stop_gradient", ops.stop_gradient, lambda x: x, lambda r, s: uniform(r, s, -3, 3))

# ---------------------------------------------------------------------- activations (nn.py)
unary("silu", gpunet.silu, lambda x: x * scipy.special.expit(x), lambda r, s: uniform(r, s, -5, 5))
unary("erf", gpunet.erf, scipy.special.erf, lambda r, s: uniform(r, s, -3, 3))


def activation(name: str, params: list, fn: Callable, ref: Callable, values: Callable) -> None:
    """A spec drawing the activation's parameter too: fn(t, p), ref(x, p)."""

    @spec(name)
    def _(draw: Draw) -> Case:
        r, p = rng(draw), draw(st.sampled_from(params))
        return Case(lambda t: fn(t, p), [values(r, shapes(draw))], lambda x: ref(x, p))


def _gelu_ref(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "none":
        return x * scipy.special.ndtr(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


activation(  # a negative slope keeps x instead of y: both paths
    "leaky_relu",
    [0.01, 0.2, -0.3],
    gpunet.leaky_relu,
    lambda x, a: np.where(x > 0, x, a * x),
    away_from_zero,
)
activation(
    "elu",
    [1.0, 0.5, -0.5],
    gpunet.elu,
    lambda x, a: np.where(x > 0, x, a * np.expm1(x)),
    away_from_zero,
)
activation(
    "softplus",
    [1.0, 0.5, 3.0],
    gpunet.softplus,
    lambda x, b: np.logaddexp(0.0, b * x) / b,
    lambda r, s: uniform(r, s, -5, 5),
)
activation("gelu", ["none", "tanh"], gpunet.gelu, _gelu_ref, lambda r, s: uniform(r, s, -4, 4))


def binary(name: str, fn: Callable, ref: Callable, values: Callable) -> None:
    @spec(name)
    def _(draw: Draw) -> Case:
        r = rng(draw)
        sx, sy = broadcastable_pair(draw)
        x, y = values(r, sx, sy)
        return Case(fn, [x, y], ref)


def plain(r: np.random.Generator, sx: tuple, sy: tuple) -> tuple[np.ndarray, np.ndarray]:
    return uniform(r, sx, -3, 3), uniform(r, sy, -3, 3)


binary("add", ops.add, np.add, plain)
binary("sub", ops.sub, np.subtract, plain)
binary("mul", ops.mul, np.multiply, plain)
binary("div", ops.div, np.divide, lambda r, sx, sy: (uniform(r, sx, -3, 3), away_from_zero(r, sy)))
binary("pow", ops.pow, np.power, lambda r, sx, sy: (uniform(r, sx, 0.5, 2), uniform(r, sy, -2, 2)))


@spec("maximum")
def _maximum(draw: Draw) -> Case:
    r = rng(draw)
    sx, sy = broadcastable_pair(draw)
    x = uniform(r, sx, -3, 3)
    y = np.broadcast_to(x, np.broadcast_shapes(sx, sy)) + away_from_zero(
        r, np.broadcast_shapes(sx, sy)
    )
    return Case(ops.maximum, [x, y], np.maximum)


@spec("minimum")
def _minimum(draw: Draw) -> Case:
    case = _maximum(draw)
    return Case(ops.minimum, case.args, np.minimum)


@spec("compare")
def _compare(draw: Draw) -> Case:
    r = rng(draw)
    op = draw(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"]))
    sx, sy = broadcastable_pair(draw)
    x, y = r.integers(-2, 3, sx).astype(F64), r.integers(-2, 3, sy).astype(F64)
    ref = {
        "lt": np.less,
        "le": np.less_equal,
        "gt": np.greater,
        "ge": np.greater_equal,
        "eq": np.equal,
        "ne": np.not_equal,
    }[op]
    return Case(lambda a, b: ops.compare(a, b, op), [x, y], ref)


@spec("where")
def _where(draw: Draw) -> Case:
    r = rng(draw)
    sx, sy = broadcastable_pair(draw)
    cond = r.random(np.broadcast_shapes(sx, sy)) < 0.5
    c = gpunet.tensor(cond)
    return Case(
        lambda x, y: ops.where(c, x, y),
        [uniform(r, sx, -3, 3), uniform(r, sy, -3, 3)],
        lambda x, y: np.where(cond, x, y),
    )


@spec("cast")
def _cast(draw: Draw) -> Case:
    # float64 -> float64 through the primitive itself (the derivative check needs float64);
    # float32 round trips are checked in test_cast_to_float32 below.
    r = rng(draw)
    return Case(
        lambda x: bind(P.cast, x, dtype=np.dtype(F64)),
        [uniform(r, shapes(draw), -3, 3)],
        lambda x: x,
    )


@spec("device_put")
def _device_put(draw: Draw) -> Case:
    r = rng(draw)
    return Case(
        lambda x: bind(P.device_put, x, device=gpunet.Device("cpu")),
        [uniform(r, shapes(draw), -3, 3)],
        lambda x: x,
    )


def reduction(draw: Draw, distinct: bool) -> tuple[np.ndarray, tuple[int, ...], bool]:
    r = rng(draw)
    shape = shapes(draw, min_dims=1, min_side=1 if distinct else 0)
    axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1)))))
    if distinct:  # a permutation of well-separated values: no ties at the maximum
        x = (r.permutation(math.prod(shape)) * 0.3 - 1.0).reshape(shape).astype(F64)
    else:
        x = uniform(r, shape, -3, 3)
    return x, axes or tuple(range(len(shape))), draw(st.booleans())


@spec("sum")
def _sum(draw: Draw) -> Case:
    x, axes, keep = reduction(draw, distinct=False)
    return Case(lambda t: ops.sum(t, axes, keep), [x], lambda a: np.sum(a, axes, keepdims=keep))


@spec("max")
def _max(draw: Draw) -> Case:
    x, axes, keep = reduction(draw, distinct=True)
    return Case(lambda t: ops.max(t, axes, keep), [x], lambda a: np.max(a, axes, keepdims=keep))


@spec("logsumexp")
def _logsumexp(draw: Draw) -> Case:
    x, axes, keep = reduction(draw, distinct=True)
    return Case(
        lambda t: ops.logsumexp(t, axes, keep),
        [x],
        lambda a: scipy.special.logsumexp(a, axes, keepdims=keep),
    )


@spec("argmax")
def _argmax(draw: Draw) -> Case:
    x, axes, keep = reduction(draw, distinct=True)
    return Case(
        lambda t: ops.argmax(t, axes[0], keep), [x], lambda a: np.argmax(a, axes[0], keepdims=keep)
    )


@spec("broadcast_to")
def _broadcast_to(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw)
    target = tuple(draw(st.lists(st.integers(0, 3), max_size=2))) + tuple(
        draw(st.integers(0, 3)) if n == 1 else n for n in shape
    )
    return Case(
        lambda t: ops.broadcast_to(t, target),
        [uniform(r, shape, -3, 3)],
        lambda a: np.broadcast_to(a, target),
    )


@spec("reshape")
def _reshape(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw)
    target = draw(st.sampled_from([(-1,), tuple(reversed(shape)), (*shape, 1), (1, *shape)]))
    if math.prod(shape) == 0 and target == (-1,):
        target = (0,)
    return Case(
        lambda t: ops.reshape(t, target),
        [uniform(r, shape, -3, 3)],
        lambda a: np.reshape(a, target),
    )


@spec("transpose")
def _transpose(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw, min_dims=2)
    perm = tuple(draw(st.permutations(range(len(shape)))))
    if perm == tuple(range(len(shape))):
        perm = perm[::-1]
    return Case(
        lambda t: ops.permute(t, perm), [uniform(r, shape, -3, 3)], lambda a: np.transpose(a, perm)
    )


def basic_key(draw: Draw, shape: tuple[int, ...]) -> tuple:
    key: list[Any] = []
    for n in shape:
        if n and draw(st.booleans()):
            key.append(draw(st.integers(-n, n - 1)))
        else:
            start = draw(st.none() | st.integers(-n - 1, n + 1))
            stop = draw(st.none() | st.integers(-n - 1, n + 1))
            step = draw(st.sampled_from([None, 1, 2, -1]))
            key.append(slice(start, stop, step))
    if draw(st.booleans()):
        key.insert(draw(st.integers(0, len(key))), None)
    return tuple(key)


@spec("slice")
def _slice(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw, min_dims=1)
    key = basic_key(draw, shape)
    return Case(lambda t: t[key], [uniform(r, shape, -3, 3)], lambda a: a[key])


@spec("slice_transpose")
def _slice_transpose(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw, min_dims=1)
    key = basic_key(draw, shape)
    gshape = np.zeros(shape)[key].shape

    def ref(g: np.ndarray) -> np.ndarray:
        out = np.zeros(shape)
        out[key] = g
        return out

    return Case(lambda g: ops.bind_slice_transpose(g, key, shape), [uniform(r, gshape, -3, 3)], ref)


@spec("take")
def _take(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw, min_dims=1, min_side=1)
    axis = draw(st.integers(0, len(shape) - 1))
    idx = r.integers(-shape[axis], shape[axis], shapes(draw))
    it = gpunet.tensor(idx)
    return Case(
        lambda t: ops.take(t, it, axis), [uniform(r, shape, -3, 3)], lambda a: np.take(a, idx, axis)
    )


@spec("scatter_add")
def _scatter_add(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw, min_dims=1, min_side=1)
    axis = draw(st.integers(0, len(shape) - 1))
    size = shape[axis]
    idx = r.integers(0, size, draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=5)))
    gshape = shape[:axis] + idx.shape + shape[axis + 1 :]
    it = gpunet.tensor(idx)

    def ref(g: np.ndarray) -> np.ndarray:
        out = np.zeros(shape)
        np.add.at(out, (slice(None),) * axis + (idx,), g)
        return out

    return Case(lambda g: ops.scatter_add(g, it, axis, size), [uniform(r, gshape, -3, 3)], ref)


@spec("concatenate")
def _concatenate(draw: Draw) -> Case:
    r = rng(draw)
    shape = shapes(draw, min_dims=1)
    axis = draw(st.integers(0, len(shape) - 1))
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        s = list(shape)
        s[axis] = draw(st.integers(0, 3))
        parts.append(uniform(r, tuple(s), -3, 3))
    return Case(lambda *ts: ops.concatenate(ts, axis), parts, lambda *a: np.concatenate(a, axis))


@spec("matmul")
def _matmul(draw: Draw) -> Case:
    r = rng(draw)
    batch = draw(st.sampled_from([(), (2,), (1,), (2, 3)]))
    n, k, m = (draw(st.integers(0, 4)) for _ in range(3))
    tx, ty = draw(st.booleans()), draw(st.booleans())
    x = uniform(r, (*batch, k, n) if tx else (*batch, n, k), -2, 2)
    y = uniform(r, (*batch, m, k) if ty else (*batch, k, m), -2, 2)

    def ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.matmul(np.swapaxes(a, -1, -2) if tx else a, np.swapaxes(b, -1, -2) if ty else b)

    return Case(lambda a, b: bind(P.matmul, a, b, tx=tx, ty=ty), [x, y], ref)


LINEAR_ACTIVATIONS = {  # name -> (alpha, f(z) in float64)
    None: (0.0, lambda z: z),
    "relu": (0.0, lambda z: np.maximum(z, 0)),
    "leaky_relu": (0.1, lambda z: np.where(z > 0, z, 0.1 * z)),
    "elu": (0.7, lambda z: np.where(z > 0, z, 0.7 * np.expm1(np.minimum(z, 0)))),
    "sigmoid": (0.0, scipy.special.expit),
    "tanh": (0.0, np.tanh),
    "softplus": (2.0, lambda z: np.logaddexp(0, 2.0 * z) / 2.0),
}


@spec("linear_activation")
def _linear(draw: Draw) -> Case:
    r = rng(draw)
    n, k, m = (draw(st.integers(0, 4)) for _ in range(3))
    act = draw(st.sampled_from(list(LINEAR_ACTIVATIONS)))
    alpha, f = LINEAR_ACTIVATIONS[act]
    x, w, b = uniform(r, (n, k), -2, 2), uniform(r, (k, m), -2, 2), uniform(r, (m,), -2, 2)
    if act in ("relu", "leaky_relu", "elu") and n * m:  # z away from the kink at 0
        z = x @ w + b
        b = b + np.where(np.abs(z).min(axis=0) < 0.1, 0.5, 0.0)
        z = x @ w + b
        if (np.abs(z) < 0.05).any():
            act, (alpha, f) = None, LINEAR_ACTIVATIONS[None]
    return Case(
        lambda x, w, b: bind(P.linear_activation, x, w, b, activation=act, alpha=alpha),
        [x, w, b],
        lambda x, w, b: f(x @ w + b),
    )


def _ce_reference(z: np.ndarray, labels: np.ndarray, reduction: str) -> np.ndarray:
    nll = scipy.special.logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]
    return {"none": nll, "sum": nll.sum(), "mean": nll.mean() if len(nll) else np.nan}[reduction]


@spec("cross_entropy")
def _cross_entropy(draw: Draw) -> Case:
    r = rng(draw)
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    labels = r.integers(0, c, n)
    y = gpunet.tensor(labels)
    return Case(
        lambda z: ops.cross_entropy(z, y, reduction),
        [uniform(r, (n, c), -4, 4)],
        lambda z: _ce_reference(z, labels, reduction),
    )


@spec("cross_entropy_backward")
def _cross_entropy_backward(draw: Draw) -> Case:
    r = rng(draw)
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    labels = r.integers(0, c, n)
    y = gpunet.tensor(labels)

    def ref(g: np.ndarray, z: np.ndarray) -> np.ndarray:
        p = scipy.special.softmax(z, axis=1) - np.eye(c)[labels]
        if reduction == "none":
            return p * g[:, None]
        return p * (g / n if reduction == "mean" else g)

    g = uniform(r, (n,) if reduction == "none" else (), -2, 2)
    return Case(
        lambda gt, z: bind(P.cross_entropy_backward, gt, z, y, reduction=reduction),
        [g, uniform(r, (n, c), -4, 4)],
        ref,
    )
