"""Every activation function, with PyTorch's names and defaults, each one primitive
(``gpunet.primitives.activations``): one fused kernel forward and one fused backward pass on
CUDA. The formulas, in their stable forms, are in ``kernels/activations.cuh``. ``gpunet.ops``
and the ``Tensor`` methods (``x.relu()``) re-export relu, sigmoid and tanh from here."""

from __future__ import annotations

from typing import Any

from . import dtypes
from . import primitives as P
from .autodiff import apply, bind
from .backend.fused import gelu_name
from .tensor import Tensor

_NO_PARAMS: dict[str, Any] = {}  # apply's params for relu, sigmoid, tanh (never written)


# relu, sigmoid and tanh take any tensor (integers too, as NumPy does) through ``apply``, the
# unpacked form of ``bind``: they are the hottest activations.
def relu(x: Tensor) -> Tensor:
    """relu(x) = max(x, 0); NaN propagates."""
    return apply(P.relu, (x,), _NO_PARAMS)


def sigmoid(x: Tensor) -> Tensor:
    """sigmoid(x) = 1 / (1 + exp(-x)), computed with no positive exponent."""
    return apply(P.sigmoid, (x,), _NO_PARAMS)


def tanh(x: Tensor) -> Tensor:
    """tanh(x)."""
    return apply(P.tanh, (x,), _NO_PARAMS)


def _float_tensor(x: Any, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"gpunet.{op}: expected a Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f" and x.dtype != dtypes.bfloat16:  # (inline: every activation)
        raise TypeError(f"gpunet.{op}: expected a floating tensor, got {x.dtype}")
    return x


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """x for x > 0, else negative_slope * x."""
    return bind(P.leaky_relu, _float_tensor(x, "leaky_relu"), negative_slope=float(negative_slope))


def elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    """x for x > 0, else alpha * (exp(x) - 1) (through expm1)."""
    return bind(P.elu, _float_tensor(x, "elu"), alpha=float(alpha))


def softplus(x: Tensor, beta: float = 1.0) -> Tensor:
    """log(1 + exp(beta x)) / beta, computed as (max(beta x, 0) + log1p(exp(-|beta x|))) /
    beta: finite for every x, with no switch to the identity (PyTorch's ``threshold``)."""
    if not beta > 0:
        raise ValueError(f"gpunet.softplus: beta must be positive, got {beta}")
    return bind(P.softplus, _float_tensor(x, "softplus"), beta=float(beta))


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x) (swish)."""
    return bind(P.silu, _float_tensor(x, "silu"))


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x), Phi the standard normal CDF (exact, through erfc), or with
    ``approximate="tanh"`` x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2."""
    gelu_name(approximate)  # validates
    return bind(P.gelu, _float_tensor(x, "gelu"), approximate=approximate)


def erf(x: Tensor) -> Tensor:
    """The error function, 2/sqrt(pi) * integral_0^x exp(-t^2) dt."""
    return bind(P.erf, _float_tensor(x, "erf"))
