"""The closed set of primitives, one module per family. ``REGISTRY`` maps name -> card."""

from .card import LINEAR, NONDIFF, REGISTRY, Primitive, primitive
from .elementwise import (
    abs,
    add,
    argmax,
    cast,
    compare,
    copy,
    device_put,
    div,
    exp,
    isfinite,
    log,
    log1p,
    maximum,
    minimum,
    mul,
    neg,
    pow,
    sign,
    sqrt,
    stop_gradient,
    sub,
    tanh,
    where,
)
from .linalg import matmul
from .nn import relu, sigmoid
from .reduce import logsumexp, max, sum
from .shape import (
    broadcast_to,
    concatenate,
    reshape,
    scatter_add,
    slice,
    slice_transpose,
    take,
    transpose,
)

__all__ = [
    "LINEAR", "NONDIFF", "REGISTRY", "Primitive", "abs", "add", "argmax", "broadcast_to",
    "cast", "compare", "concatenate", "copy", "device_put", "div", "exp", "isfinite", "log",
    "log1p", "logsumexp", "matmul", "max", "maximum", "minimum", "mul", "neg", "pow",
    "primitive", "relu",
    "reshape", "scatter_add", "sigmoid", "sign", "slice", "slice_transpose", "sqrt",
    "stop_gradient", "sub", "sum", "take", "tanh", "transpose", "where",
]
