"""Stateless neural-network functions with PyTorch's names: ``import gpunet.nn.functional as F``.

Losses take ``reduction="mean" | "sum" | "none"``. Each is written in its numerically stable
form (noted in its docstring) from gpunet ops, so every loss is differentiable to any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import amp, ops
from .. import primitives as P
from ..activations import elu, gelu, leaky_relu, relu, sigmoid, silu, softplus, tanh
from ..autodiff import bind
from ..creation import tensor
from ..ops import check_linear_activation, log_softmax, softmax
from ..random import Generator, rand
from ..tensor import Tensor


def _reduce(loss: Tensor, reduction: str, op: str) -> Tensor:
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _same_shape(input: Tensor, target: Any, op: str) -> Tensor:
    """The target as a tensor of the input's shape and dtype (labels may arrive as ints)."""
    if not isinstance(target, Tensor):
        target = tensor(target, dtype=input.dtype, device=input.device)
    if target.shape != input.shape:
        raise ValueError(
            f"{op}: target shape {target.shape} differs from the input shape {input.shape}"
        )
    return target if target.dtype == input.dtype else ops.cast(target, input.dtype)


# ---------------------------------------------------------------------- layers
def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """input @ weight + bias, one GEMM. NB: ``weight`` is (in_features, out_features), the
    transpose of PyTorch's layout (PyTorch computes input @ weight.T)."""
    if bias is not None and input.data.ndim == 2 and weight.data.ndim == 2 and bias.data.ndim == 1:
        return linear_activation(input, weight, bias, None)
    out = input @ weight
    return out if bias is None else out + bias


def linear_activation(
    input: Tensor, weight: Tensor, bias: Tensor, activation: str | None, alpha: float = 0.0
) -> Tensor:
    """activation(input @ weight + bias) as one primitive: the bias and the activation are
    applied in place on the GEMM's output (one fused kernel on CUDA), and backward takes
    dZ = g f'(y) once. For input (n, in), weight (in, out), bias (out,); ``activation`` is
    None or one whose derivative has a form in its output (relu, leaky_relu, elu, sigmoid,
    tanh, softplus; ``alpha`` its parameter: negative slope, alpha, beta)."""
    xs, ws, bs = input.data.shape, weight.data.shape, bias.data.shape  # (not the properties)
    if len(xs) != 2 or len(ws) != 2 or len(bs) != 1:
        raise ValueError(
            f"linear: input {input.shape}, weight {weight.shape}, bias {bias.shape}: need "
            "input (n, in), weight (in, out), bias (out,)"
        )
    if xs[1] != ws[0] or bs[0] != ws[1]:
        raise ValueError(
            f"linear: input {input.shape} @ weight {weight.shape} + bias {bias.shape} do "
            "not fit: need input (n, in), weight (in, out), bias (out,)"
        )
    check_linear_activation(activation, alpha)
    return bind(P.linear_activation, input, weight, bias, activation=activation, alpha=float(alpha))


def dropout(
    input: Tensor, p: float = 0.5, training: bool = True, generator: Generator | None = None
) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (inverted
    dropout, so evaluation is the identity); the identity when not ``training`` or p == 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0.0
    u = rand(input.shape, dtype=input.dtype, device=input.device, generator=generator)
    keep = ops.cast(ops.compare(u, p, "ge"), input.dtype) * (1.0 / (1.0 - p))
    return input * keep


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing ``normalized_shape``
    axes; var is the biased (population) variance, as in PyTorch."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if input.shape[input.ndim - len(shape) :] != shape:
        raise ValueError(
            f"layer_norm: normalized_shape {shape} does not match the trailing axes of an "
            f"input of shape {input.shape}"
        )
    axes = tuple(range(input.ndim - len(shape), input.ndim))
    d = input - ops.mean(input, axes, keepdims=True)
    out = d / ops.sqrt(ops.mean(d * d, axes, keepdims=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# ---------------------------------------------------------------------- losses
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """(input - target)^2, reduced."""
    input = amp.loss_input(input)
    d = input - _same_shape(input, target, "mse_loss")
    return _reduce(d * d, reduction, "mse_loss")


def cross_entropy(
    input: Tensor, target: Any, reduction: str = "mean", label_smoothing: float = 0.0
) -> Tensor:
    """Softmax cross-entropy of logits (n, c) against integer class labels (n,).

    Without smoothing it is the fused primitive (logsumexp(z) - z[y] per row). With
    ``label_smoothing`` eps the target is (1 - eps) onehot(y) + eps / c, so the loss per row
    is (1 - eps) (logsumexp(z) - z[y]) + eps mean_c(-log_softmax(z)), as in PyTorch.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    ce = ops.cross_entropy(input, target, reduction)
    if label_smoothing == 0.0:
        return ce
    smooth = ops.neg(ops.mean(log_softmax(input, -1), 1))
    return ce * (1.0 - label_smoothing) + _reduce(smooth, reduction, "cross_entropy") * float(
        label_smoothing
    )


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """-(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))) = max(z, 0) - z y + log1p(exp(-|z|)),
    finite and accurate for any z (softplus is the fused, stable log1p(exp(.)); the gradient
    is sigmoid(z) - y). With ``pos_weight`` p, as in PyTorch:
    (1 - y) z + (1 + (p - 1) y) softplus(-z)."""
    input = amp.loss_input(input)
    y = _same_shape(input, target, "binary_cross_entropy_with_logits")
    if pos_weight is None:
        # z (1 - y) + softplus(-z) for z > 0, softplus(z) - z y otherwise: the same value, with
        # both terms of each branch non-negative, so nothing cancels (softplus(z) - z y alone
        # loses the tiny loss of a confident right answer, z = 30 and y = 1, to rounding)
        z = input
        loss = ops.where(
            ops.compare(z, 0.0, "gt"), z * (1.0 - y) + softplus(-z), softplus(z) - z * y
        )
    else:
        loss = (1.0 - y) * input + ((pos_weight - 1.0) * y + 1.0) * softplus(-input)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


def _clamped_log(p: Tensor) -> Tensor:
    """max(log p, -100), PyTorch's clamp, with a zero (not NaN) gradient where p == 0."""
    positive = ops.compare(p, 0.0, "gt")
    safe = ops.where(positive, p, 1.0)  # keeps log's backward (g / p) away from 0 / 0
    return ops.where(positive, ops.maximum(ops.log(safe), -100.0), -100.0)


def _check_probabilities(t: Tensor, what: str, op: str) -> None:
    """Raise, as PyTorch does, unless every element of t is in [0, 1] (NaN is not): one min
    and one max over t (on a GPU they read two scalars back, a synchronisation)."""
    if t.numel() == 0:
        return
    xp = t._backend.xp
    if float(xp.min(t.data)) >= 0.0 and float(xp.max(t.data)) <= 1.0:
        return
    values = t._backend.to_numpy(t.data)
    bad = np.unravel_index(int(np.flatnonzero(~((values >= 0) & (values <= 1)))[0]), t.shape)
    hint = (
        "pass probabilities (sigmoid of the logits), or use binary_cross_entropy_with_logits"
        if what == "input"
        else "targets are probabilities of the positive class (0 or 1 for hard labels)"
    )
    raise ValueError(
        f"{op}: all elements of {what} should be between 0 and 1, but {what}"
        f"[{', '.join(map(str, bad))}] = {float(values[bad]):.6g} (shape {t.shape}): {hint}"
    )


def binary_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """-(y log p + (1 - y) log(1 - p)) for probabilities p, each log clamped at -100 as in
    PyTorch (so p = 0 or 1 gives a finite loss). Prefer the ``_with_logits`` form. Like
    PyTorch, refuses an input or target outside [0, 1], where the loss means nothing (it
    can be negative)."""
    input = amp.loss_input(input)
    y = _same_shape(input, target, "binary_cross_entropy")
    _check_probabilities(input, "input", "binary_cross_entropy")
    _check_probabilities(y, "target", "binary_cross_entropy")
    loss = ops.neg(y * _clamped_log(input) + (1.0 - y) * _clamped_log(1.0 - input))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy")


__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "dropout",
    "elu",
    "gelu",
    "layer_norm",
    "leaky_relu",
    "linear",
    "log_softmax",
    "mse_loss",
    "relu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
]
