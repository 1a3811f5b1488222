"""Matrix products: the heart of every layer's forward and backward.

matmul(x, y, tx, ty) = op(x) @ op(y) over the last two axes, where op transposes when its flag
is set (BLAS's transa/transb: a transposed operand is a strided view, never a copy). The flags
let each VJP be a single GEMM: for Y = X W, dX = dY W^T = matmul(dY, W, ty=True) and
dW = X^T dY = matmul(X, dY, tx=True), over the whole batch at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), called by rules at call time

from ..backend.fused import FROM_OUTPUT
from .activations import fused_grad
from .card import primitive

if TYPE_CHECKING:
    from ..tensor import Tensor

Gemm = tuple["Tensor", "Tensor", bool, bool]  # (a, b, ta, tb): the product op(a) @ op(b)


def _dx_gemm(g: Tensor, x: Tensor, y: Tensor, tx: bool, ty: bool) -> Gemm:
    """d/dx of op(x) @ op(y) as one GEMM: g op(y)^T, transposed back when x entered
    transposed ((g op(y)^T)^T = op(y) g^T)."""
    return (y, g, ty, True) if tx else (g, y, False, not ty)


def _dy_gemm(g: Tensor, x: Tensor, y: Tensor, tx: bool, ty: bool) -> Gemm:
    """d/dy of op(x) @ op(y) as one GEMM: op(x)^T g, transposed back when y entered
    transposed ((op(x)^T g)^T = g^T op(x))."""
    return (g, x, True, tx) if ty else (x, g, not tx, False)


def _gemm(a: Tensor, b: Tensor, ta: bool, tb: bool) -> Tensor:
    return gpunet.autodiff.apply(matmul, (a, b), {"tx": ta, "ty": tb})


def _gemm_into(out, alpha: float, beta: float, a: Tensor, b: Tensor, ta: bool, tb: bool) -> None:  # type: ignore[no-untyped-def]
    """out <- alpha op(a) @ op(b) + beta out in place: one GEMM writing a leaf's gradient
    buffer, or stepping the leaf itself (SGD in backward)."""
    gpunet.autodiff.call(
        "matmul", a._backend.matmul_into, out, a.data, b.data, tx=ta, ty=tb, alpha=alpha, beta=beta
    )


matmul = primitive(
    "matmul",
    "op(x) @ op(y) (op transposes the last two axes when tx / ty); d/dx: g op(y)^T, "
    "d/dy: op(x)^T g",
    vjp=(
        lambda g, x, y, tx, ty: _gemm(*_dx_gemm(g, x, y, tx, ty)),
        lambda g, x, y, tx, ty: _gemm(*_dy_gemm(g, x, y, tx, ty)),
    ),
    vjp_into=(
        lambda out, a, b, g, x, y, tx, ty: _gemm_into(out, a, b, *_dx_gemm(g, x, y, tx, ty)),
        lambda out, a, b, g, x, y, tx, ty: _gemm_into(out, a, b, *_dy_gemm(g, x, y, tx, ty)),
    ),
    jvp=(
        lambda t, out, x, y, tx, ty: gpunet.autodiff.bind(matmul, t, y, tx=tx, ty=ty),
        lambda t, out, x, y, tx, ty: gpunet.autodiff.bind(matmul, x, t, tx=tx, ty=ty),
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


# dX = dZ W^T and dW = X^T dZ: matmul's rules for z = x @ W (neither operand transposed)
def _linear_vjp_x(dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    return _gemm(dz, w, False, True)


def _linear_vjp_w(dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    return _gemm(x, dz, True, False)


def _linear_vjp_b(dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    return gpunet.ops.sum(dz, 0)  # db = sum over the batch of dZ


def _linear_vjp_w_into(out, a, b, dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    _gemm_into(out, a, b, x, dz, True, False)


def _linear_vjp_b_into(out, a, b, dz, x, w, *y, activation, alpha):  # type: ignore[no-untyped-def]
    """out <- a db + b out with db = sum_rows dZ: reduced straight into the bias's gradient
    buffer, or into the bias itself (SGD in backward)."""
    gpunet.autodiff.call("sum", dz._backend.sum_into, out, dz.data, axis=(0,), alpha=a, beta=b)


def _linear_jvp(which: int):  # type: ignore[no-untyped-def]
    """The tangent of y from input ``which``'s tangent t: f'(z) times that of z."""

    def rule(t, y, x, w, b, *, activation, alpha):  # type: ignore[no-untyped-def]
        if which == 0:
            tz = gpunet.autodiff.bind(matmul, t, w, tx=False, ty=False)
        elif which == 1:
            tz = gpunet.autodiff.bind(matmul, x, t, tx=False, ty=False)
        else:
            tz = gpunet.ops.broadcast_to(t, y.shape)
        return tz if activation is None else fused_grad(activation, tz, y, alpha, True)

    return rule


def linear_fusable(activation: str, alpha: float) -> bool:
    """Can ``linear_activation`` fuse this activation: is its derivative a function of its
    output alone? (leaky_relu and elu only with a parameter >= 0: with a negative one the sign
    of x is lost.)"""
    return activation in FROM_OUTPUT and not (activation in ("leaky_relu", "elu") and alpha < 0)


def check_linear_activation(activation: str | None, alpha: float) -> None:
    """``linear_activation`` fuses activations whose derivative it can take from its output."""
    if activation is not None and not linear_fusable(activation, alpha):
        raise ValueError(
            f"linear: cannot fuse activation {activation!r} (alpha {alpha}): fused are those "
            f"with a derivative from the output: {', '.join(sorted(FROM_OUTPUT))} (leaky_relu "
            "and elu with a parameter >= 0); apply the activation after linear instead"
        )


linear_activation = primitive(
    "linear_activation",
    "f(x @ W + b) for x (n, in), W (in, out), b (out,) and f an activation (or none), bias "
    "and f applied in place on the GEMM output; with dZ = g f'(y): d/dx: dZ W^T, "
    "d/dW: x^T dZ, d/db: sum_rows dZ",
    save=lambda out, x, w, b, *, activation, alpha: (x, w) if activation is None else (x, w, out),
    vjp_pre=_dz,
    vjp=(_linear_vjp_x, _linear_vjp_w, _linear_vjp_b),
    vjp_into=(None, _linear_vjp_w_into, _linear_vjp_b_into),
    vjp_into_independent=True,  # dW reads x and dZ, db reads dZ: neither reads W or b
    jvp=(_linear_jvp(0), _linear_jvp(1), _linear_jvp(2)),
)
