"""Matrix products: the heart of every layer's forward and backward.

matmul(x, y, tx, ty) = op(x) @ op(y) over the last two axes, where op transposes when its flag
is set (BLAS's transa/transb: a transposed operand is a strided view, never a copy). The flags
let each VJP be a single GEMM: for Y = X W, dX = dY W^T = matmul(dY, W, ty=True) and
dW = X^T dY = matmul(X, dY, tx=True), over the whole batch at once.
"""

from __future__ import annotations

from .. import ops
from ..autodiff import OBSERVE, STATE, bind, observe
from ..tensor import Tensor
from .card import primitive


def _vjp_x(g, x, y, tx, ty):  # type: ignore[no-untyped-def]
    """d/dx of op(x) @ op(y): g op(y)^T, transposed back when x entered transposed."""
    if tx:
        return bind(matmul, y, g, tx=ty, ty=True)  # (g op(y)^T)^T = op(y) g^T
    return bind(matmul, g, y, tx=False, ty=not ty)


def _vjp_y(g, x, y, tx, ty):  # type: ignore[no-untyped-def]
    """d/dy of op(x) @ op(y): op(x)^T g, transposed back when y entered transposed."""
    if ty:
        return bind(matmul, g, x, tx=True, ty=tx)  # (op(x)^T g)^T = g^T op(x)
    return bind(matmul, x, g, tx=not tx, ty=False)


def _gemm_into(out, accumulate: bool, a: Tensor, b: Tensor, tx: bool, ty: bool) -> None:  # type: ignore[no-untyped-def]
    """out (+)= op(a) @ op(b) in place: one GEMM writing a leaf's gradient buffer."""
    a._backend.matmul_into(out, a.data, b.data, tx=tx, ty=ty, accumulate=accumulate)
    if STATE.flags & OBSERVE:
        observe("matmul", (a, b), {"tx": tx, "ty": ty, "accumulate": accumulate}, out)


def _vjp_x_into(out, acc, g, x, y, tx, ty):  # type: ignore[no-untyped-def]
    """_vjp_x written into ``out``."""
    if tx:
        _gemm_into(out, acc, y, g, ty, True)
    else:
        _gemm_into(out, acc, g, y, False, not ty)


def _vjp_y_into(out, acc, g, x, y, tx, ty):  # type: ignore[no-untyped-def]
    """_vjp_y written into ``out``: for Y = X W, dW = X^T dY straight into W's buffer."""
    if ty:
        _gemm_into(out, acc, g, x, True, tx)
    else:
        _gemm_into(out, acc, x, g, not tx, False)


matmul = primitive(
    "matmul",
    "op(x) @ op(y) (op transposes the last two axes when tx / ty); d/dx: g op(y)^T, "
    "d/dy: op(x)^T g",
    vjp=(_vjp_x, _vjp_y),
    vjp_into=(_vjp_x_into, _vjp_y_into),
    jvp=(
        lambda t, out, x, y, tx, ty: bind(matmul, t, y, tx=tx, ty=ty),
        lambda t, out, x, y, tx, ty: bind(matmul, x, t, tx=tx, ty=ty),
    ),
)


# ---------------------------------------------------------------------- linear
# y = x W + b for x (n, in), W (in, out), b (out,): one primitive so that the bias is added in
# place on the GEMM's fresh output (no second (n, out) array, no broadcast node) and dW's GEMM
# can write into the weight's gradient buffer. Each VJP is one GEMM or one reduction.
def _linear_vjp_x(g, x, w):  # type: ignore[no-untyped-def]
    return bind(matmul, g, w, tx=False, ty=True)  # dX = dY W^T


def _linear_vjp_w(g, x, w):  # type: ignore[no-untyped-def]
    return bind(matmul, x, g, tx=True, ty=False)  # dW = X^T dY


def _linear_vjp_b(g, x, w):  # type: ignore[no-untyped-def]
    return ops.sum(g, 0)  # db = sum over the batch of dY


def _linear_vjp_w_into(out, acc, g, x, w):  # type: ignore[no-untyped-def]
    _gemm_into(out, acc, x, g, True, False)


def _linear_jvp_b(t, out, x, w, b):  # type: ignore[no-untyped-def]
    return ops.broadcast_to(t, out.shape)


linear = primitive(
    "linear",
    "x @ W + b for x (n, in), W (in, out), b (out,), the bias added in place on the GEMM "
    "output; d/dx: g W^T, d/dW: x^T g, d/db: sum_rows g",
    save=lambda out, x, w, b: (x, w),
    vjp=(_linear_vjp_x, _linear_vjp_w, _linear_vjp_b),
    vjp_into=(None, _linear_vjp_w_into, None),
    jvp=(
        lambda t, out, x, w, b: bind(matmul, t, w, tx=False, ty=False),
        lambda t, out, x, w, b: bind(matmul, x, t, tx=False, ty=False),
        _linear_jvp_b,
    ),
)
