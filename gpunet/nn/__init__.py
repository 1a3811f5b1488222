"""Neural-network building blocks with PyTorch's names: ``Module``, ``Parameter``, layers,
losses, ``init``; ``gpunet.nn.functional`` holds the stateless functions.

One layout differs from PyTorch: ``Linear.weight`` is (in_features, out_features), so the
forward pass is the single GEMM ``x @ W + b``.
"""

from . import functional, init
from .layers import (
    ACTIVATIONS,
    ELU,
    GELU,
    MLP,
    Dropout,
    LayerNorm,
    LeakyReLU,
    Linear,
    ReLU,
    Sequential,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)
from .losses import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .module import Module, Parameter

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "GELU",
    "MLP",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "Dropout",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "MSELoss",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "functional",
    "init",
]
