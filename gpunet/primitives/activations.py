"""Activation primitives: one fused forward, one fused backward pass.

relu, leaky_relu, elu, sigmoid, tanh, softplus, silu and gelu, one card each. Each card's
forward is the backend method of the same name (``kernels/activations.cuh`` holds the
formulas). Its VJP and JVP are both ``g * f'`` (the Jacobian is diagonal), computed by
``fused_grad``: the backend's fused ``activation_backward`` (one kernel on CUDA, one
allocation on NumPy) when nothing will differentiate the result (a plain ``loss.backward()``),
else the same formula composed from gpunet ops, so that ``create_graph``, ``hvp`` and
forward-over-reverse see a differentiable expression. Cards keep the output where f' has a
form in it (relu, sigmoid, tanh, softplus; leaky_relu and elu when their parameter is >= 0)
and the input otherwise. ``erf`` is here too: exact GELU's composed derivative needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), called by rules at call time

from ..backend.fused import GELU_C, INV_SQRT_2PI, THREE_C, TWO_K, gelu_name
from .card import primitive

if TYPE_CHECKING:
    from ..tensor import Tensor

SQRT1_2 = 0.70710678118654752440


def fused_grad(name: str, g: Tensor, saved: Tensor, alpha: float, from_output: bool) -> Tensor:
    """g * f'(x) for the activation ``name`` (f' from the output y = saved when
    ``from_output``): the one place that chooses between the fused op and the composed one.

    Fused when no transform sees the result: no forward-mode interpreter (level 0), no tape
    recording (grad mode off, or neither operand tracked), and no anomaly check (which
    inspects every primitive's output).
    """
    if not gpunet.autodiff.differentiating(g, saved):  # (the sweep's FUSED_VJP bit first)
        backend = g._backend
        dx = gpunet.autodiff.call(
            "activation_backward",
            backend.activation_backward,
            g.data,
            saved.data,
            name=name,
            alpha=alpha,
            from_output=from_output,
        )
        return gpunet.Tensor._wrap(dx, backend)
    return _COMPOSED[name](g, saved, alpha, from_output)


# ---------------------------------------------------------------------- composed g * f'
# The formulas of activations.cuh with gpunet ops: differentiable, and equal to the fused
# result to rounding (the tests compare the two). ``s`` is what the card saved: y where the
# derivative has a form in the output (relu, sigmoid, tanh, softplus; leaky_relu and elu for
# a >= 0), else x.
def _relu(g: Tensor, y: Tensor, a: float, from_y: bool) -> Tensor:
    return gpunet.ops.where(y > 0.0, g, g * 0.0)


def _leaky_relu(g: Tensor, s: Tensor, a: float, from_y: bool) -> Tensor:
    return gpunet.ops.where(s > 0.0, g, g * a)


def _elu(g: Tensor, s: Tensor, a: float, from_y: bool) -> Tensor:
    # from y: a exp(x) = y + a; from x through exp(min(x, 0)), as the kernel does
    slope = s + a if from_y else gpunet.ops.exp(gpunet.ops.minimum(s, 0.0)) * a
    return gpunet.ops.where(s > 0.0, g, g * slope)


def _sigmoid(g: Tensor, y: Tensor, a: float, from_y: bool) -> Tensor:
    return g * (y * (1.0 - y))


def _tanh(g: Tensor, y: Tensor, a: float, from_y: bool) -> Tensor:
    return g * (1.0 - y * y)


def _softplus(g: Tensor, s: Tensor, a: float, from_y: bool) -> Tensor:
    # from y: sigmoid(a x) = 1 - exp(-a y) (the kernel's -expm1, to eps absolutely)
    return g * (1.0 - gpunet.ops.exp(s * -a)) if from_y else g * gpunet.ops.sigmoid(s * a)


def _silu(g: Tensor, x: Tensor, a: float, from_y: bool) -> Tensor:
    s = gpunet.ops.sigmoid(x)
    return g * (s + x * (s * gpunet.ops.sigmoid(-x)))


def _gelu(g: Tensor, x: Tensor, a: float, from_y: bool) -> Tensor:
    # Phi = (1 + erf) / 2: accurate to eps absolutely (the kernel's erfc form, relatively too)
    cdf = (1.0 + gpunet.autodiff.bind(erf, x * SQRT1_2)) * 0.5
    return g * (cdf + x * (gpunet.ops.exp(x * x * -0.5) * INV_SQRT_2PI))


def _gelu_tanh(g: Tensor, x: Tensor, a: float, from_y: bool) -> Tensor:
    u2 = (x + x * GELU_C * x * x) * TWO_K
    du2 = (x * THREE_C * x + 1.0) * TWO_K
    s = gpunet.ops.sigmoid(u2)
    return g * (s + x * (s * gpunet.ops.sigmoid(-u2)) * du2)


_COMPOSED: dict[str, Callable[[Tensor, Tensor, float, bool], Tensor]] = {
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
    "softplus": _softplus,
    "silu": _silu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
}


# ---------------------------------------------------------------------- the cards
relu = primitive(
    "relu",
    "relu(x) = max(x, 0); d/dx = 1 where y > 0, else 0 (from the output y)",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: fused_grad("relu", g, y, 0.0, True),),
    jvp=(lambda t, y, x: fused_grad("relu", t, y, 0.0, True),),
)

leaky_relu = primitive(
    "leaky_relu",
    "x for x > 0, else negative_slope x; d/dx = 1 or negative_slope",
    save=lambda out, x, *, negative_slope: (out,) if negative_slope >= 0 else (x,),
    vjp=(
        lambda g, s, *, negative_slope: fused_grad(
            "leaky_relu", g, s, negative_slope, negative_slope >= 0
        ),
    ),
    jvp=(lambda t, y, x, *, negative_slope: fused_grad("leaky_relu", t, x, negative_slope, False),),
)

elu = primitive(
    "elu",
    "x for x > 0, else alpha (exp(x) - 1); d/dx = 1 or alpha exp(x) = y + alpha",
    save=lambda out, x, *, alpha: (out,) if alpha >= 0 else (x,),
    vjp=(lambda g, s, *, alpha: fused_grad("elu", g, s, alpha, alpha >= 0),),
    jvp=(lambda t, y, x, *, alpha: fused_grad("elu", t, x, alpha, False),),
)

sigmoid = primitive(
    "sigmoid",
    "sigmoid(x) = 1 / (1 + exp(-x)); d/dx = y (1 - y)",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: fused_grad("sigmoid", g, y, 0.0, True),),
    jvp=(lambda t, y, x: fused_grad("sigmoid", t, y, 0.0, True),),
)

tanh = primitive(
    "tanh",
    "tanh(x); d/dx = 1 - y^2 from the output y",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: fused_grad("tanh", g, y, 0.0, True),),
    jvp=(lambda t, y, x: fused_grad("tanh", t, y, 0.0, True),),
)

softplus = primitive(
    "softplus",
    "log(1 + exp(beta x)) / beta, stable for any x; d/dx = sigmoid(beta x) = 1 - exp(-beta y)",
    save=lambda out, x, *, beta: (out,),
    vjp=(lambda g, y, *, beta: fused_grad("softplus", g, y, beta, True),),
    jvp=(lambda t, y, x, *, beta: fused_grad("softplus", t, y, beta, True),),
)

silu = primitive(
    "silu",
    "x sigmoid(x) (swish); d/dx = s (1 + x (1 - s)), s = sigmoid(x)",
    vjp=(lambda g, x: fused_grad("silu", g, x, 0.0, False),),
    jvp=(lambda t, y, x: fused_grad("silu", t, x, 0.0, False),),
)

gelu = primitive(
    "gelu",
    "x Phi(x) (approximate='none', Phi the normal CDF) or x (1 + tanh(sqrt(2/pi) (x + "
    "0.044715 x^3))) / 2 (approximate='tanh'); d/dx from x",
    vjp=(lambda g, x, *, approximate: fused_grad(gelu_name(approximate), g, x, 0.0, False),),
    jvp=(lambda t, y, x, *, approximate: fused_grad(gelu_name(approximate), t, x, 0.0, False),),
)

erf = primitive(
    "erf",
    "erf(x) = 2/sqrt(pi) int_0^x exp(-t^2) dt; d/dx = 2/sqrt(pi) exp(-x^2)",
    vjp=(lambda g, x: g * (gpunet.ops.exp(-(x * x)) * 1.1283791670955126),),
    jvp=(lambda t, y, x: t * (gpunet.ops.exp(-(x * x)) * 1.1283791670955126),),
)
