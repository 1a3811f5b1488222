"""Stateless neural-network functions with PyTorch's names: ``import gpunet.nn.functional as F``."""

from ..ops import cross_entropy, log_softmax, relu, sigmoid, softmax, tanh

__all__ = ["cross_entropy", "log_softmax", "relu", "sigmoid", "softmax", "tanh"]
