"""What each primitive costs on a GPU: FLOPs, bytes moved and kernel launches.

The memory-traffic model is the unfused one: a kernel reads each distinct element of each
operand from device memory once and writes its result once (float32 = 4 bytes, float64 = 8,
bool = 1, int64 = 8). A broadcast operand counts its source's bytes (a stride-0 axis is served
by the cache). Views (reshape, broadcast_to, transpose, slice, stop_gradient) launch nothing
and move nothing; a reshape that has to copy counts as one copy.

FLOPs: matmul 2 m n k per product (times the batch); every other operation counts one FLOP
per arithmetic operation, comparison or function evaluation (exp, log, tanh, erf: one each)
per element, as its formula is written below, and a reduction one per input element. Pure
data movement (copy, cast, gather, concatenate, transfers) counts none. Elementwise ops move
8-12 bytes per FLOP or so, far below any GPU's ridge point (H100: 20 FLOP/byte in FP32), so
the FLOP convention for them never decides a modelled time; the bytes do.

Every rule gives two costs: ``fused``, what the primitive's kernel does (for the fused ops,
the kernels of ``kernels/*.cu``, or the one-pass row kernel a card like cross_entropy allows),
and ``unfused``, the same result as a sequence of one-operation kernels, each reading its
operands and writing a temporary (the plain array expression, as CuPy or PyTorch eager would
run it). They differ only for the fused ops; the difference is what fusion saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend.fused import gelu_name
from .backend.updates import AdamHyper


@dataclass(frozen=True)
class Cost:
    """FLOPs, bytes read, bytes written and kernel launches of one op (or a sum of ops)."""

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    launches: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.bytes_read + other.bytes_read,
            self.bytes_written + other.bytes_written,
            self.launches + other.launches,
        )

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


FREE = Cost()  # a view: no launch, no traffic

# Cards whose one-kernel form the fused cost counts (a row kernel), though gpunet's CuPy
# backend still composes them from CuPy array ops (backend/generic.py: the unfused cost).
# ``roofline`` also reports the step as CuPy runs it today, with these unfused (and see
# ``composed_on_cupy`` for linear and a sum into an existing array; a GEMM into one is
# cuBLAS's own alpha/beta GEMM).
COMPOSED_ON_CUPY = frozenset({"logsumexp", "axpby"})


def composed_on_cupy(name: str, params: dict) -> bool:
    """Does gpunet's CuPy backend run this call as its unfused sequence today? (A linear
    with an activation runs as the GEMM and one bias+activation kernel, as counted fused;
    without one, as the GEMM and a broadcast add.)"""
    if name == "linear_activation":
        return params.get("activation") is None
    scaled = _reads_out(params) or params.get("alpha", 1.0) != 1.0
    return name in COMPOSED_ON_CUPY or (name == "sum" and scaled)


def _reads_out(params: dict) -> bool:
    """Does an in-place GEMM or sum read the array it writes (BLAS's beta != 0)?"""
    return bool(params.get("beta", 0.0))


@dataclass(frozen=True)
class Operand:
    """What a cost rule sees of an array: its shape, element size and distinct bytes."""

    shape: tuple[int, ...]
    itemsize: int
    nbytes: int  # bytes of distinct elements (a broadcast axis counted once)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, array: Any) -> Operand:
        """From a NumPy or CuPy array (or any array with ``shape`` and ``dtype``)."""
        shape = tuple(int(n) for n in array.shape)
        itemsize = int(np.dtype(str(array.dtype)).itemsize)
        strides = getattr(array, "strides", None)
        distinct = math.prod(shape)
        if strides is not None and distinct:
            distinct = math.prod(n for n, s in zip(shape, strides) if s != 0)
        return cls(shape, itemsize, distinct * itemsize)


# ---------------------------------------------------------------------- building blocks
def kernel(reads: Iterable[int], written: int, flops: int = 0) -> Cost:
    """One launch that reads arrays of the given byte sizes and writes ``written`` bytes."""
    return Cost(int(flops), int(sum(reads)), int(written), 1)


def chain(n: int, itemsize: int, ops: Sequence[str]) -> Cost:
    """One kernel per elementwise operation over n elements: ``"fb>f"`` reads a float and a
    bool operand and writes a float (``f`` = itemsize bytes, ``b`` = 1 byte); one FLOP each."""
    width = {"f": itemsize, "b": 1}
    total = FREE
    for op in ops:
        ins, out = op.split(">")
        total += kernel([n * width[k] for k in ins], n * width[out], n)
    return total


def one_pass(reads: Iterable[int], written: int, n: int, ops: Sequence[str]) -> Cost:
    """The same operations as ``chain`` fused into one kernel: the real operands read once,
    the result written once, the same FLOPs."""
    return kernel(reads, written, n * len(ops))


# The plain expressions behind the fused activation kernels (kernels/activations.cuh), written
# as the one-operation kernels an unfused framework runs. x the input, y the output, g the
# upstream gradient, a the scalar parameter. Backward: the expressions of
# benchmarks/bench_kernels.py (README, "Fused activation backward").
_U, _B = "f>f", "ff>f"  # a unary op; a binary op on two full arrays
FORWARD: dict[str, tuple[str, ...]] = {
    "relu": (_U,),  # max(x, 0)
    "leaky_relu": ("f>b", _U, "bff>f"),  # where(x > 0, x, a x)
    "elu": ("f>b", _U, _U, "bff>f"),  # where(x > 0, x, a expm1(x))
    "sigmoid": (_U, _U, _U, _U),  # 1 / (1 + exp(-x))
    "softplus": (_U,) * 7 + (_B,),  # log1p(exp(-|a x|)) / a + max(x, 0)
    "silu": (_U,) * 4 + (_B,),  # x * sigmoid(x)
    "gelu": (_U,) * 4 + (_B,),  # x * (1 + erf(x / sqrt 2)) / 2
    "gelu_tanh": (_B, _B, _U, _B, _U, _U, _U, _U, _B),  # x (1 + tanh(k (x + c x^3))) / 2
    "erf": (_U,),
}
BACKWARD: dict[tuple[str, bool], tuple[str, ...]] = {  # (activation, from the output y)
    ("relu", True): ("f>b", "fb>f"),  # g * (y > 0)
    ("leaky_relu", True): ("f>b", "b>f", _B),  # g * maximum(y > 0, a)
    ("leaky_relu", False): ("f>b", "b>f", _B),  # g * maximum(x > 0, a)
    ("elu", True): (_U, _U, _B),  # g * (minimum(y, 0) + 1)
    ("elu", False): ("f>b", _U, _U, "bf>f", _B),  # g * where(x > 0, 1, a exp(x))
    ("sigmoid", True): (_B, _U, _B),  # g * y * (1 - y)
    ("tanh", True): (_B, _U, _B),  # g * (1 - y * y)
    ("softplus", True): (_U, _U, _U, _B),  # g * -expm1(-a y)
    ("softplus", False): (_U,) * 5 + (_B,),  # g * sigmoid(a x)
    ("silu", False): (_U,) * 5 + (_B, _U, _B, _B),  # s = sigmoid(x); g (s (1 + x (1 - s)))
    # g (0.5 (1 + erf(x r)) + x exp(-x x / 2) c)
    ("gelu", False): (_U, _U, _U, _U, _B, _U, _U, _U, _B, _B, _B),
    # PyTorch's tanh-GELU backward: t = tanh(k (x + c x^3)); g (0.5 (1 + t) + 0.5 x (1 - t^2)
    # k (1 + 3 c x^2))
    ("gelu_tanh", False): (_B, _B, _U, _B, _U, _U, _U, _U, _U, _B, _U, _B, _U, _B, _U, _U)
    + (_B, _B, _B),
}


# ---------------------------------------------------------------------- the rules
Ins = Sequence[Operand]
Out = Operand | None
Rule = Callable[[Ins, Out, dict], tuple[Cost, Cost]]  # -> (fused, unfused)
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _same(cost: Cost) -> tuple[Cost, Cost]:
    return cost, cost


def _io(ins: Ins, out: Out) -> tuple[list[int], int]:
    return [a.nbytes for a in ins], 0 if out is None else out.nbytes


@rule("broadcast_to", "transpose", "slice", "stop_gradient")
def _view(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """A view of the input: nothing launched, nothing moved."""
    return _same(FREE)


@rule("reshape")
def _reshape(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """A view, unless the input's layout forced a copy (``params["copied"]``)."""
    return _same(kernel(*_io(ins, out)) if params.get("copied") else FREE)


@rule("neg", "exp", "log", "log1p", "tanh", "sqrt", "abs", "sign", "isfinite")
@rule("add", "sub", "mul", "div", "pow", "maximum", "minimum", "compare", "where")
def _elementwise(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """One kernel, one FLOP per output element."""
    reads, written = _io(ins, out)
    return _same(kernel(reads, written, 0 if out is None else out.size))


@rule("cast", "copy", "device_put", "concatenate", "broadcast")
def _move(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """One copy kernel (a transfer is modelled as a device copy), no FLOPs."""
    return _same(kernel(*_io(ins, out)))


@rule("all_reduce")
def _all_reduce(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """gpunet.distributed's gradient all-reduce, on this device: one pass reading and writing
    the buffer, one add per element (the link's time is ``roofline.ring_all_reduce_s``)."""
    reads, written = _io(ins, out)
    return _same(kernel(reads, written, ins[0].size))


@rule("take")
def _take(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """A gather: reads the indices and the gathered elements only."""
    assert out is not None
    return _same(kernel([out.nbytes, ins[1].nbytes], out.nbytes))


@rule("scatter_add")
def _scatter_add(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """Zeros (a memset), then g added at the indices (one add per element of g)."""
    assert out is not None
    g, idx = ins
    return _same(kernel([], out.nbytes) + kernel([g.nbytes, idx.nbytes], g.nbytes, g.size))


@rule("slice_transpose")
def _slice_transpose(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """Zeros (a memset), then g copied into the slice."""
    assert out is not None
    return _same(kernel([], out.nbytes) + kernel([ins[0].nbytes], ins[0].nbytes))


@rule("sum", "max", "argmax")
def _reduce(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """One reduction kernel, one FLOP per input element (summed into an existing array,
    beta != 0: it also reads that array and adds, one FLOP per output more)."""
    reads, written = _io(ins, out)
    if _reads_out(params) and out is not None:
        return _same(kernel([*reads, out.nbytes], written, ins[0].size + out.size))
    return _same(kernel(reads, written, ins[0].size))


def _gemm(x: Operand, reads: list[int], out: Operand, tx: bool) -> Cost:
    """One GEMM: 2 m n k FLOPs per product, k the contracted length of op(x)."""
    k = x.shape[-2] if tx and len(x.shape) > 1 else x.shape[-1]
    return kernel(reads, out.nbytes, 2 * out.size * k)


@rule("matmul")
def _matmul(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """op(x) @ op(y): one GEMM. Into an existing array (out <- alpha op(x) op(y) + beta out
    with beta != 0: a gradient summed into its buffer, or an SGD step on the weight) one GEMM
    that also reads out; unfused, a GEMM into a temporary and an add."""
    assert out is not None
    x, tx = ins[0], bool(params.get("tx"))
    reads = [a.nbytes for a in ins]
    if not _reads_out(params):
        return _same(_gemm(x, reads, out, tx))
    add = kernel([out.nbytes, out.nbytes], out.nbytes, out.size)
    return _gemm(x, [*reads, out.nbytes], out, tx), _gemm(x, reads, out, tx) + add


@rule("linear_activation")
def _linear(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """f(x W + b): one GEMM with the bias added in its epilogue (reads x, W, b; writes z),
    then, with an activation f, one pass applying it (reads z, writes y); unfused, the GEMM,
    a broadcast add (reads z and b, writes z) and f's one-operation kernels."""
    assert out is not None
    x, w, b = ins
    act = params.get("activation")
    f = () if act is None else FORWARD.get(act, (_U,))  # tanh: one function evaluation
    fused = _gemm(x, [x.nbytes, w.nbytes, b.nbytes], out, False)
    fused += Cost(flops=out.size)
    add = kernel([out.nbytes, b.nbytes], out.nbytes, out.size)
    unfused = _gemm(x, [x.nbytes, w.nbytes], out, False) + add
    if f:
        fused += one_pass([out.nbytes], out.nbytes, out.size, f)
        unfused += chain(out.size, out.itemsize, f)
    return fused, unfused


def _activation_rule(name: str) -> Rule:
    def cost(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
        ops = FORWARD[gelu_name(params["approximate"]) if name == "gelu" else name]
        x = ins[0]
        fused = one_pass([x.nbytes], x.size * x.itemsize, x.size, ops)
        return fused, chain(x.size, x.itemsize, ops)

    cost.__doc__ = f"{name}: one fused pass (read x, write y); unfused, FORWARD[{name!r}]."
    return cost


for _name in ("relu", "leaky_relu", "elu", "sigmoid", "softplus", "silu", "gelu", "erf"):
    RULES[_name] = _activation_rule(_name)


@rule("activation_backward")
def _activation_backward(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """dx = g * f': one kernel reading g and the saved x or y, writing dx (12 bytes per
    float32 element); unfused, the plain expression of BACKWARD."""
    g, saved = ins
    ops = BACKWARD[(params["name"], bool(params["from_output"]))]
    fused = one_pass([g.nbytes, saved.nbytes], g.size * g.itemsize, g.size, ops)
    return fused, chain(g.size, g.itemsize, ops)


# ---------------------------------------------------------------------- row-wise losses
def _lse_unfused(rows: int, cols: int, s: int) -> Cost:
    """logsumexp over the last axis as the generic backend composes it: m = max(z);
    m = where(isfinite(m), m, 0); log(sum(exp(z - m))) + m."""
    full, row = rows * cols, rows
    return (
        kernel([full * s], row * s, full)  # max
        + kernel([row * s], row, row)  # isfinite
        + kernel([], row * s)  # zeros_like
        + kernel([row, row * s, row * s], row * s, row)  # where
        + kernel([full * s, row * s], full * s, full)  # z - m
        + kernel([full * s], full * s, full)  # exp
        + kernel([full * s], row * s, full)  # sum
        + kernel([row * s], row * s, row)  # log
        + kernel([row * s, row * s], row * s, row)  # + m
    )


def _rows(x: Operand, params: dict) -> tuple[int, int]:
    """(rows, reduced length) of a reduction over ``params["axis"]`` (all axes if None)."""
    axis = params.get("axis")
    axes = range(len(x.shape)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    cols = math.prod(x.shape[a] for a in axes)
    return (x.size // cols if cols else 0), cols


@rule("logsumexp")
def _logsumexp(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """Fused: one online pass per row (running max and rescaled sum: max, sub, exp, add per
    element, one log per row); unfused: the generic backend's nine kernels."""
    x = ins[0]
    rows, cols = _rows(x, params)
    fused = kernel([x.nbytes], rows * x.itemsize, 4 * x.size + rows)
    return fused, _lse_unfused(rows, cols, x.itemsize)


@rule("cross_entropy")
def _cross_entropy(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """logsumexp(z) - z[y] per row of logits z (n, c). Fused: one row kernel (an online
    logsumexp and the pick), then one reduction for the mean or sum. Unfused: the generic
    backend's composition (logsumexp, take_along_axis, subtract, sum, divide)."""
    z, y = ins
    n, c = z.shape
    s = z.itemsize
    fused = kernel([z.nbytes, y.nbytes], n * s, 4 * n * c + 2 * n)
    unfused = (
        _lse_unfused(n, c, s)
        + kernel([y.nbytes, n * s], n * s)  # take_along_axis
        + kernel([n * s, n * s], n * s, n)  # lse - picked
    )
    if params["reduction"] != "none":
        fused += kernel([n * s], s, n)
        unfused += kernel([n * s], s, n)  # sum
        if params["reduction"] == "mean":
            unfused += kernel([s], s, 1)  # / n
    return fused, unfused


@rule("cross_entropy_backward")
def _cross_entropy_backward(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """(softmax(z) - onehot(y)) g per row. Fused: one row kernel reading z, y and g, writing
    dz (an online logsumexp, then exp(z - lse) - onehot, times g: 8 FLOPs per element).
    Unfused: the generic backend's composition."""
    g, z, y = ins
    n, c = z.shape
    s, full = z.itemsize, z.shape[0] * z.shape[1]
    fused = kernel([g.nbytes, z.nbytes, y.nbytes], full * s, 8 * full)
    unfused = (
        _lse_unfused(n, c, s)
        + kernel([full * s, n * s], full * s, full)  # z - lse
        + kernel([full * s], full * s, full)  # exp
        + kernel([], c * y.itemsize)  # arange
        + kernel([y.nbytes, c * y.itemsize], full, full)  # labels == arange: onehot
        + kernel([full], full * s)  # cast
        + kernel([full * s, full * s], full * s, full)  # p - onehot
        + kernel([full * s, g.nbytes], full * s, full)  # times g
    )
    if params["reduction"] == "mean":
        unfused += kernel([g.nbytes], g.nbytes, g.size)  # g / n
    return fused, unfused


# ---------------------------------------------------------------------- optimizer updates
def sgd_ops(momentum: float, weight_decay: float, nesterov: bool, first_step: bool) -> list[str]:
    """SGD's update as one-operation kernels (the backend's reference sequence): d = p wd;
    d += g; buf *= m; t = (1 - dampening) d; buf += t (first step: buf = d); Nesterov: t = m
    buf; d = d + t; t = lr d; p -= t."""
    ops: list[str] = []
    if weight_decay != 0.0:
        ops += [_U, _B]
    if momentum != 0.0:
        ops += [_U] if first_step else [_U, _U, _B]
        if nesterov:
            ops += [_U, _B]
    return ops + [_U, _B]


@rule("axpby")
def _axpby(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """p <- alpha g + beta p (a leaf's update in backward): one kernel reading g and p and
    writing p, 2 FLOPs per element; unfused, a scale into a temporary, a scale and an add."""
    g, p = ins[0], out  # (p is written in place: it is the output, read too)
    fused = kernel([g.nbytes, p.nbytes], p.nbytes, 2 * p.size)
    unfused = (
        kernel([g.nbytes], g.nbytes, g.size)
        + kernel([p.nbytes], p.nbytes, p.size)
        + kernel([p.nbytes, g.nbytes], p.nbytes, p.size)
    )
    return fused, unfused


@rule("sgd_update")
def _sgd_update(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """One kernel over the flat buffer: reads p, g (and the momentum buffer after the first
    step), writes p (and the buffer)."""
    p, g = ins[0], ins[1]
    h, first = params["hyper"], params["first_step"]
    momentum = h.momentum != 0.0
    ops = sgd_ops(h.momentum, h.weight_decay, h.nesterov, first)
    reads = [p.nbytes, g.nbytes] + ([p.nbytes] if momentum and not first else [])
    written = p.nbytes * (2 if momentum else 1)
    fused = one_pass(reads, written + _extra_writes(g, params), p.size, ops)
    return fused, chain(p.size, p.itemsize, ops) + _lowp_cast(p, params)


def _lowp_bytes(params: dict) -> int:
    """The bytes of the low-precision weight copy an update writes in its pass (autocast's
    master weights, ``lowp=``), 0 without one."""
    low = params.get("lowp")
    return 0 if low is None else int(low.nbytes)


def _extra_writes(g: Any, params: dict) -> int:
    """What an update writes besides p and its state: the low-precision copy, and with a
    ``grad_scale`` the gradient, left multiplied by it."""
    return _lowp_bytes(params) + (g.nbytes if params.get("grad_scale") is not None else 0)


def _lowp_cast(p: Any, params: dict) -> Cost:
    """Unfused, the copy is a cast kernel of its own after the update."""
    low = _lowp_bytes(params)
    return kernel([p.nbytes], low) if low else FREE


def adam_ops(weight_decay: float, decoupled: bool, lr: float) -> list[str]:
    """Adam's update as one-operation kernels (the backend's reference sequence): [gi = p l2;
    gi += g] [p *= decay]; m *= b1; t = (1 - b1) gi; m += t; t = (1 - b2) gi; t *= gi; v *= b2;
    v += t; d = sqrt(v); d /= bc2; d += eps; t = m / d; t *= step_size; p -= t."""
    hyper = AdamHyper(lr, 0.0, 0.0, weight_decay=weight_decay, decoupled=decoupled)
    l2, decay, _, _ = hyper.scalars(1)
    ops = ([_U, _B] if l2 != 0.0 else []) + ([_U] if decay != 1.0 else [])
    return ops + [_U, _U, _B, _U, _B, _U, _B, _U, _U, _U, _B, _U, _B]


@rule("adam_update")
def _adam_update(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """One kernel over the flat buffer: reads p, g, m, v and writes p, m, v (28 bytes per
    float32 parameter)."""
    p = ins[0]
    h = params["hyper"]
    ops = adam_ops(h.weight_decay, h.decoupled, h.lr)
    written = 3 * p.nbytes + _extra_writes(ins[1], params)
    fused = one_pass([a.nbytes for a in ins], written, p.size, ops)
    return fused, chain(p.size, p.itemsize, ops) + _lowp_cast(p, params)


# ---------------------------------------------------------------------- the loss scaler
@rule("fill", "zeros", "ones", "full")
def _fill(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """out <- a constant: one kernel writing it (the scaler's found-inf flag, a new scale; a
    new array of zeros, ones or a value, as a step capture records them)."""
    return _same(kernel([], out.nbytes if out is not None else ins[0].nbytes))


@rule("amp_inverse_scale", "amp_update_scale")
def _scalar_update(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """The scaler's scalar arithmetic on the device (1/scale; the scale's growth or backoff
    from the found-inf flag): one small kernel, a FLOP or so per element."""
    reads, written = _io(ins, out)
    return _same(kernel(reads, written, out.size if out is not None else 1))


@rule("amp_found_inf")
def _found_inf(ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """found = max(found, any(!isfinite(g))): fused, one reduction reading g; unfused, as the
    backends run it: isfinite (g -> bool), not, any (to one byte), the cast and the max."""
    g, found = ins[0], out
    fused = kernel([g.nbytes, found.nbytes], found.nbytes, g.size)
    unfused = chain(g.size, g.itemsize, ["f>b", "b>b"]) + kernel([g.size], 1, g.size)
    unfused += kernel([1], found.nbytes) + kernel([found.nbytes] * 2, found.nbytes, 1)
    return fused, unfused


def cost_of(name: str, ins: Ins, out: Out, params: dict) -> tuple[Cost, Cost]:
    """(fused, unfused) cost of one call of ``name``; a clear error for an unknown name."""
    rule_ = RULES.get(name)
    if rule_ is None:
        raise KeyError(
            f"gpunet.costs: no cost rule for {name!r}; add one to RULES (known: "
            f"{', '.join(sorted(RULES))})"
        )
    return rule_(ins, out, params)
