"""gpunet: a define-by-run autodiff framework for MLPs on NumPy (CPU) and CuPy (GPU).

The public API, re-exported: tensors and their creation, the ops, autodiff (``backward``,
``no_grad``) and JAX-style transforms (``grad``, ``value_and_grad``, ``vjp``, ``jvp``, ``hvp``),
devices and random numbers.
"""

__version__ = "0.1.0"

from . import primitives
from .autodiff import (
    detect_anomaly,
    enable_grad,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)
from .backend import Device, default_device, device, get_backend, info, use_device
from .creation import (
    arange,
    as_tensor,
    eye,
    from_dlpack,
    full,
    full_like,
    ones,
    ones_like,
    tensor,
    zeros,
    zeros_like,
)
from .dtypes import bool_, float16, float32, float64, int32, int64
from .ops import (
    abs,
    argmax,
    broadcast_to,
    clip,
    concatenate,
    exp,
    flatten,
    log,
    log1p,
    log_softmax,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    permute,
    relu,
    reshape,
    sigmoid,
    softmax,
    sqrt,
    squeeze,
    stack,
    stop_gradient,
    sum,
    swapaxes,
    tanh,
    unsqueeze,
    var,
    where,
)
from .random import Generator, manual_seed, rand, randn
from .tensor import Tensor
from .testing import check_grads, gradcheck
from .transforms import grad, hessian_vector_product, hvp, jvp, value_and_grad, vjp

__all__ = [
    "Device", "Generator", "Tensor", "abs", "arange", "argmax", "as_tensor", "bool_",
    "broadcast_to", "check_grads", "clip", "concatenate", "default_device", "detect_anomaly",
    "device", "enable_grad", "exp", "eye", "flatten", "float16", "float32", "float64",
    "from_dlpack", "full", "full_like", "get_backend", "grad", "gradcheck",
    "hessian_vector_product", "hvp", "info", "int32", "int64", "is_grad_enabled", "jvp", "log",
    "log1p", "log_softmax", "logsumexp", "manual_seed", "matmul", "max", "maximum", "mean",
    "min", "minimum", "no_grad", "ones", "ones_like", "permute", "primitives", "rand", "randn",
    "relu", "reshape", "set_grad_enabled", "sigmoid", "softmax", "sqrt", "squeeze", "stack",
    "stop_gradient", "sum", "swapaxes", "tanh", "tensor", "unsqueeze", "use_device",
    "value_and_grad", "var", "vjp", "where", "zeros", "zeros_like",
]
