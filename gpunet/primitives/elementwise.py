"""Elementwise primitives: unary math, binary arithmetic, comparisons, selection, casts.

Inputs of a binary primitive arrive with one shape (``gpunet.ops`` inserts ``broadcast_to``),
so no rule here ever un-broadcasts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), called by rules at call time

from .card import LINEAR, NONDIFF, primitive

if TYPE_CHECKING:
    from ..tensor import Tensor

# ---------------------------------------------------------------------- unary
neg = primitive(
    "neg",
    "neg(x) = -x",
    save=lambda out, x: (),
    vjp=(lambda g: -g,),
    jvp=LINEAR,
)

exp = primitive(
    "exp",
    "exp(x); d/dx = exp(x), so it keeps its output",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: g * y,),
    jvp=(lambda t, y, x: t * y,),
)

log = primitive(
    "log",
    "log(x); d/dx = 1 / x",
    vjp=(lambda g, x: g / x,),
    jvp=(lambda t, y, x: t / x,),
)

log1p = primitive(
    "log1p",
    "log(1 + x), accurate near 0; d/dx = 1 / (1 + x)",
    vjp=(lambda g, x: g / (x + 1.0),),
    jvp=(lambda t, y, x: t / (x + 1.0),),
)

sqrt = primitive(
    "sqrt",
    "sqrt(x); d/dx = 1 / (2 y) from the output y",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: g * 0.5 / y,),
    jvp=(lambda t, y, x: t * 0.5 / y,),
)

abs = primitive(
    "abs",
    "|x|; d/dx = sign(x) (0 at 0)",
    save=lambda out, x: (gpunet.ops.sign(x),),
    vjp=(lambda g, s: g * s,),
    jvp=(lambda t, y, x: t * gpunet.ops.sign(x),),
)

# ---------------------------------------------------------------------- binary
add = primitive(
    "add",
    "x + y",
    save=lambda out, x, y: (),
    vjp=(lambda g: g, lambda g: g),
    jvp=LINEAR,
)

sub = primitive(
    "sub",
    "x - y",
    save=lambda out, x, y: (),
    vjp=(lambda g: g, lambda g: -g),
    jvp=LINEAR,
)

mul = primitive(
    "mul",
    "x * y; d/dx = y, d/dy = x",
    vjp=(lambda g, x, y: g * y, lambda g, x, y: g * x),
    jvp=(lambda t, out, x, y: t * y, lambda t, out, x, y: x * t),
)

div = primitive(
    "div",
    "x / y; d/dx = 1 / y, d/dy = -out / y",
    save=lambda out, x, y: (y, out),
    vjp=(lambda g, y, out: g / y, lambda g, y, out: -g * out / y),
    jvp=(lambda t, out, x, y: t / y, lambda t, out, x, y: -t * out / y),
)


def _pow_dx(t: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """t y x^(y-1), and 0 where y = 0 (x^0 is constant; at x = 0 it was 0 * inf, as PyTorch's).
    x is 1 there inside too, so that no derivative of this one meets 0^-2 either."""
    const = y == 0.0
    return gpunet.ops.where(const, 0.0, t * y * gpunet.ops.where(const, 1.0, x) ** (y - 1.0))


def _pow_dy(t: Tensor, out: Tensor, x: Tensor) -> Tensor:
    """t out log(x), with log taken as 0 where x = 0: d/dy 0^y = 0 for y > 0 (not 0 * -inf)."""
    return t * out * gpunet.ops.log(gpunet.ops.where(x == 0.0, 1.0, x))


pow = primitive(
    "pow",
    "x ** y; d/dx = y x^(y-1), d/dy = out log(x)",
    save=lambda out, x, y: (x, y, out),
    vjp=(
        lambda g, x, y, out: _pow_dx(g, x, y),
        lambda g, x, y, out: _pow_dy(g, out, x),
    ),
    jvp=(
        lambda t, out, x, y: _pow_dx(t, x, y),
        lambda t, out, x, y: _pow_dy(t, out, x),
    ),
)

maximum = primitive(
    "maximum",
    "max(x, y) elementwise; the gradient goes to x on ties",
    save=lambda out, x, y: (x >= y,),
    vjp=(lambda g, m: gpunet.ops.where(m, g, 0.0), lambda g, m: gpunet.ops.where(m, 0.0, g)),
    jvp=(
        lambda t, out, x, y: gpunet.ops.where(x >= y, t, 0.0),
        lambda t, out, x, y: gpunet.ops.where(x >= y, 0.0, t),
    ),
)

minimum = primitive(
    "minimum",
    "min(x, y) elementwise; the gradient goes to x on ties",
    save=lambda out, x, y: (x <= y,),
    vjp=(lambda g, m: gpunet.ops.where(m, g, 0.0), lambda g, m: gpunet.ops.where(m, 0.0, g)),
    jvp=(
        lambda t, out, x, y: gpunet.ops.where(x <= y, t, 0.0),
        lambda t, out, x, y: gpunet.ops.where(x <= y, 0.0, t),
    ),
)

where = primitive(
    "where",
    "cond ? x : y; the mask carries no gradient",
    save=lambda out, cond, x, y: (cond,),
    vjp=(
        NONDIFF,
        lambda g, c: gpunet.ops.where(c, g, 0.0),
        lambda g, c: gpunet.ops.where(c, 0.0, g),
    ),
    jvp=LINEAR,
)


# ---------------------------------------------------------------------- casts and copies
def _cast_vjp_into(out, alpha: float, beta: float, g, src, dtype) -> None:  # type: ignore[no-untyped-def]
    """out <- alpha cast(g, src) + beta out: autocast's float32 weight's gradient written into
    its optimizer buffer as it is cast back (one pass; no gradient array to copy in after)."""
    call = gpunet.autodiff.call
    if alpha == 1.0 and beta == 0.0:
        call("cast", _cast_into, out, g.data)  # (assignment casts: one pass)
    else:  # (the cast a call too, so a step capture records the array it makes)
        g32 = call("cast", _cast_to, g.data, dtype=out.dtype)
        call("axpby", g._backend.axpby_into, out, g32, alpha=alpha, beta=beta)


def _cast_into(out, x) -> None:  # type: ignore[no-untyped-def]
    """out <- x in out's dtype, in place (a backend call, so a step capture records it)."""
    out[...] = x


def _cast_to(x, dtype):  # type: ignore[no-untyped-def]
    """x as a new array of ``dtype``."""
    return x.astype(dtype)


cast = primitive(
    "cast",
    "x converted to another floating dtype; the gradient is cast back",
    save=lambda out, x, dtype: (x.dtype,),
    vjp=(lambda g, src, dtype: gpunet.ops.cast(g, src),),
    vjp_into=(_cast_vjp_into,),
    jvp=LINEAR,
)

copy = primitive(
    "copy",
    "a fresh copy of x (PyTorch's clone)",
    save=lambda out, x: (),
    vjp=(lambda g: g,),
    jvp=LINEAR,
)

device_put = primitive(
    "device_put",
    "x moved to another device; the gradient moves back",
    save=lambda out, x, device: (x.device,),
    vjp=(lambda g, src, device: gpunet.ops.device_put(g, src),),
    jvp=LINEAR,
    transfers=True,
)

# ---------------------------------------------------------------------- no derivative
stop_gradient = primitive(
    "stop_gradient", "x, treated as a constant by every transform", differentiable=False
)
compare = primitive(
    "compare",
    "x (op) y for op in lt, le, gt, ge, eq, ne: a boolean mask",
    differentiable=False,
)
sign = primitive(
    "sign", "sign(x) in {-1, 0, 1}: zero derivative almost everywhere", differentiable=False
)
isfinite = primitive("isfinite", "x is neither infinite nor NaN", differentiable=False)
argmax = primitive("argmax", "index of the largest element along an axis", differentiable=False)
