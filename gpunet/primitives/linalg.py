"""Matrix products: the heart of every layer's forward and backward.

matmul(x, y, tx, ty) = op(x) @ op(y) over the last two axes, where op transposes when its flag
is set (BLAS's transa/transb: a transposed operand is a strided view, never a copy). The flags
let each VJP be a single GEMM: for Y = X W, dX = dY W^T = matmul(dY, W, ty=True) and
dW = X^T dY = matmul(X, dY, tx=True), over the whole batch at once.
"""

from __future__ import annotations

from .. import ops
from ..autodiff import OBSERVE, STATE, bind, observe
from ..backend.fused import FROM_OUTPUT
from ..tensor import Tensor
from .card import primitive
from .nn import fused_grad


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
# y = f(x W + b) for x (n, in), W (in, out), b (out,), f an activation whose derivative has a
# form in its output (or none): one primitive, so that the bias and f are applied in place on
# the GEMM's fresh output (one kernel on CUDA; no second (n, out) array, no broadcast node) and
# dW's GEMM can write into the weight's gradient buffer. The VJP first maps g to dZ = g f'(y)
# (``vjp_pre``, once per node), then each input's rule is one GEMM or one reduction.
def _dz(g, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    """dL/dz for z = x W + b: g, or g f'(z) from the saved output y = f(z)."""
    return g if activation is None else fused_grad(activation, g, y[0], alpha, True)


def _linear_vjp_x(dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    return bind(matmul, dz, w, tx=False, ty=True)  # dX = dZ W^T


def _linear_vjp_w(dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    return bind(matmul, x, dz, tx=True, ty=False)  # dW = X^T dZ


def _linear_vjp_b(dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    return ops.sum(dz, 0)  # db = sum over the batch of dZ


def _linear_vjp_w_into(out, acc, dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    _gemm_into(out, acc, x, dz, True, False)


def _linear_vjp_b_into(out, acc, dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    """db = sum_rows dZ, reduced straight into the bias's gradient buffer."""
    dz._backend.sum_into(out, dz.data, axis=(0,), accumulate=acc)
    if STATE.flags & OBSERVE:
        observe("sum", (dz,), {"axis": (0,), "keepdims": False, "accumulate": acc}, out)


def _linear_jvp(which: int):  # type: ignore[no-untyped-def]
    """The tangent of y from input ``which``'s tangent t: f'(z) times that of z."""

    def rule(t, y, x, w, b, *, activation, alpha):  # type: ignore[no-untyped-def]
        if which == 0:
            tz = bind(matmul, t, w, tx=False, ty=False)
        elif which == 1:
            tz = bind(matmul, x, t, tx=False, ty=False)
        else:
            tz = ops.broadcast_to(t, y.shape)
        return tz if activation is None else fused_grad(activation, tz, y, alpha, True)

    return rule


def check_linear_activation(activation: str | None, alpha: float) -> None:
    """``linear`` fuses activations whose derivative it can take from its output alone."""
    if activation is None:
        return
    if activation not in FROM_OUTPUT or (activation in ("leaky_relu", "elu") and alpha < 0):
        raise ValueError(
            f"linear: cannot fuse activation {activation!r} (alpha {alpha}): fused are those "
            f"with a derivative from the output: {', '.join(sorted(FROM_OUTPUT))} (leaky_relu "
            "and elu with a parameter >= 0); apply the activation after linear instead"
        )


linear = primitive(
    "linear",
    "f(x @ W + b) for x (n, in), W (in, out), b (out,) and f an activation (or none), bias "
    "and f applied in place on the GEMM output; with dZ = g f'(y): d/dx: dZ W^T, "
    "d/dW: x^T dZ, d/db: sum_rows dZ",
    save=lambda out, x, w, b, *, activation, alpha: (x, w) if activation is None else (x, w, out),
    vjp_pre=_dz,
    vjp=(_linear_vjp_x, _linear_vjp_w, _linear_vjp_b),
    vjp_into=(None, _linear_vjp_w_into, _linear_vjp_b_into),
    jvp=(_linear_jvp(0), _linear_jvp(1), _linear_jvp(2)),
)
