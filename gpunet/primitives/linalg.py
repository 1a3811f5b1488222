"""Matrix products: the heart of every layer's forward and backward.

matmul(x, y, tx, ty) = op(x) @ op(y) over the last two axes, where op transposes when its flag
is set (BLAS's transa/transb: a transposed operand is a strided view, never a copy). The flags
let each VJP be a single GEMM: for Y = X W, dX = dY W^T = matmul(dY, W, ty=True) and
dW = X^T dY = matmul(X, dY, tx=True), over the whole batch at once.
"""

from __future__ import annotations

from ..autodiff import bind
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


matmul = primitive(
    "matmul",
    "op(x) @ op(y) (op transposes the last two axes when tx / ty); d/dx: g op(y)^T, "
    "d/dy: op(x)^T g",
    vjp=(_vjp_x, _vjp_y),
    jvp=(
        lambda t, out, x, y, tx, ty: bind(matmul, t, y, tx=tx, ty=ty),
        lambda t, out, x, y, tx, ty: bind(matmul, x, t, tx=tx, ty=ty),
    ),
)
