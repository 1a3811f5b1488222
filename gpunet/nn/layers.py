"""Layers: Linear, Sequential, Dropout, LayerNorm, the activations, and MLP.

Linear stores its weight as (in_features, out_features), the transpose of PyTorch's
(out_features, in_features): the forward pass is then one GEMM, y = x @ W + b, with no
transposed operand, and its backward is dW = x^T dy, dx = dy W^T, db = sum(dy).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .. import dtypes
from ..activations import elu, gelu, leaky_relu, relu, sigmoid, silu, softplus, tanh
from ..backend import Device, default_device, get_backend
from ..ops import linear_fusable
from ..tensor import Tensor
from . import functional as F
from . import init
from .module import Module, Parameter


def _empty(shape: tuple[int, ...], dtype: Any, device: str | Device | None) -> Tensor:
    backend = get_backend(default_device() if device is None else device)
    dt = dtypes.DEFAULT_FLOAT if dtype is None else dtypes.as_dtype(dtype)
    return Tensor._wrap(backend.zeros(shape, dt), backend)


def _sizes(values: Any, error: str) -> list[int]:
    """``values`` (one or an iterable) as sizes, integers >= 0: 2.5 is refused, not
    truncated to 2, and -1 is named by its layer rather than by NumPy."""
    items = list(values) if isinstance(values, Iterable) else [values]
    try:
        sizes = [operator.index(v) for v in items]
    except TypeError:
        sizes = [-1]
    if min(sizes, default=0) < 0:
        raise ValueError(f"{error} >= 0, got {values}")
    return sizes


class Linear(Module):
    """y = x @ W + b with W of shape (in_features, out_features) (PyTorch: (out, in)).

    Initialised as PyTorch does: W ~ kaiming_uniform(a=sqrt(5)), which is
    U(-1/sqrt(in), 1/sqrt(in)), and b ~ U(-1/sqrt(in), 1/sqrt(in)). To load PyTorch weights,
    transpose them: ``linear.weight[...] = torch_weight.T`` (under ``no_grad``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: str | Device | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        (self.in_features,) = _sizes(in_features, "Linear: in_features must be an integer")
        (self.out_features,) = _sizes(out_features, "Linear: out_features must be an integer")
        self.weight = Parameter(_empty((self.in_features, self.out_features), dtype, device))
        if bias:
            self.bias = Parameter(_empty((self.out_features,), dtype, device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... and indexable.

    A Linear (with a bias) followed by a fusable activation (relu, leaky_relu, elu, sigmoid,
    tanh, softplus) on a 2-d input runs as one ``F.linear_activation``: the same values, with
    the bias and the activation applied in place on the GEMM output and one dZ in backward.
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            self.add_module(str(i), m)

    def forward(self, input: Any) -> Any:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            m = layers[i]
            act = fusable_activation(layers[i + 1]) if i + 1 < len(layers) else None
            if (
                act is not None
                and type(m) is Linear
                and m.bias is not None
                and isinstance(input, Tensor)
                and input.data.ndim == 2
            ):
                input = F.linear_activation(input, m.weight, m.bias, *act)
                i += 2
            else:
                input = m(input)
                i += 1
        return input

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self._modules)), module)
        return self

    def __getitem__(self, index: int | slice) -> Any:
        mods = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(*mods[index])
        index = operator.index(index)
        if not -len(mods) <= index < len(mods):  # (not the list's bare "index out of range")
            raise IndexError(
                f"{type(self).__name__}: index {index} is out of range for {len(mods)} modules"
            )
        return mods[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class Dropout(Module):
    """Zeroes each element with probability p in training mode, scaling the rest by
    1 / (1 - p); the identity in eval mode. Draws from the default generator."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm(Module):
    """Normalise over the trailing ``normalized_shape`` axes (biased variance), then scale
    by ``weight`` (ones) and shift by ``bias`` (zeros) when ``elementwise_affine``."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: str | Device | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        error = "LayerNorm: normalized_shape must be integers"
        self.normalized_shape = tuple(_sizes(normalized_shape, error))
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(_empty(self.normalized_shape, dtype, device))
            init.ones_(self.weight)
            if bias:
                self.bias = Parameter(_empty(self.normalized_shape, dtype, device))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


# ---------------------------------------------------------------------- activations
class ReLU(Module):
    def forward(self, input: Tensor) -> Tensor:
        return relu(input)


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor) -> Tensor:
        return leaky_relu(input, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class ELU(Module):
    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, input: Tensor) -> Tensor:
        return elu(input, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Sigmoid(Module):
    def forward(self, input: Tensor) -> Tensor:
        return sigmoid(input)


class Tanh(Module):
    def forward(self, input: Tensor) -> Tensor:
        return tanh(input)


class Softplus(Module):
    """log(1 + exp(beta x)) / beta in its stable form (no ``threshold`` switch is needed)."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, input: Tensor) -> Tensor:
        return softplus(input, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class SiLU(Module):
    def forward(self, input: Tensor) -> Tensor:
        return silu(input)


class GELU(Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input: Tensor) -> Tensor:
        return gelu(input, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def fusable_activation(m: Module) -> tuple[str, float] | None:
    """(name, parameter) when ``m`` is an activation ``F.linear_activation`` can fuse into
    the Linear before it (``linear_fusable``), else None. Exact types only: a subclass may
    compute something else."""
    name = _ACTIVATION_NAMES.get(type(m))
    if name is None:
        return None
    alpha = getattr(m, _PARAMETER[name]) if name in _PARAMETER else 0.0
    return (name, alpha) if linear_fusable(name, alpha) else None


ACTIVATIONS: dict[str, type[Module]] = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "elu": ELU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softplus": Softplus,
    "silu": SiLU,
    "gelu": GELU,
}
_ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}
_PARAMETER = {"leaky_relu": "negative_slope", "elu": "alpha", "softplus": "beta"}  # the kernel's a


def _activation_layer(make: Callable[[], Module]) -> Module:
    """``make()``, which must be a Module: an instance (nn.GELU()) or a function (gpunet.relu)
    given as MLP's activation failed in its own call, naming no MLP."""
    what = f"MLP: activation must be a name ({', '.join(sorted(ACTIVATIONS))}) or a callable "
    what += f"returning a Module (a class such as nn.GELU), not {make!r}"
    if isinstance(make, Module):
        raise TypeError(f"{what}: pass its class, or a function making one (lambda: {make!r})")
    try:
        layer = make()
    except TypeError as e:
        raise TypeError(f"{what}: calling it with no arguments failed ({e})") from e
    if not isinstance(layer, Module):
        raise TypeError(f"{what}: it returned {type(layer).__name__}")
    return layer


class MLP(Sequential):
    """Linear layers of the given ``sizes`` (input, hidden..., output); after every hidden
    Linear: [LayerNorm], activation, [Dropout]. The last Linear has nothing after it.

    ``activation`` is a name from ``ACTIVATIONS`` or a callable returning a Module (a class
    such as ``nn.GELU``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Callable[[], Module] = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
        bias: bool = True,
        device: str | Device | None = None,
        dtype: Any = None,
    ) -> None:
        sizes = _sizes(sizes, "MLP: sizes must be integers")
        if len(sizes) < 2:
            raise ValueError(f"MLP: sizes needs an input and an output size, got {sizes}")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(
                    f"MLP: unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}"
                )
            activation = ACTIVATIONS[activation]
        if not 0.0 <= dropout <= 1.0:  # (Dropout's range; a negative or NaN rate was ignored)
            raise ValueError(f"MLP: dropout must be in [0, 1], got {dropout}")
        if norm not in (None, "layernorm"):
            raise ValueError(f"MLP: norm must be None or 'layernorm', got {norm!r}")
        layers: list[Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(Linear(n_in, n_out, bias, device, dtype))
            if i == len(sizes) - 2:
                break
            if norm == "layernorm":
                layers.append(LayerNorm(n_out, device=device, dtype=dtype))
            layers.append(_activation_layer(activation))
            if dropout > 0.0:
                layers.append(Dropout(dropout))
        super().__init__(*layers)
        self.sizes = tuple(sizes)
