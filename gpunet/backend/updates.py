"""The optimizer updates' contract, shared by the optimizers and every backend: their
hyperparameters (one frozen dataclass per update, so each signature is written once), the
scalars Adam derives from them per step, and the precision of the state buffers.

float16 parameters keep their optimizer state in float32 and are updated in float32, then
rounded once to float16: in float16 Adam's ``eps = 1e-8`` is 0 (the smallest float16 is
6e-8) and ``v = g^2`` underflows for |g| < 2.4e-4, so p -= m / (sqrt(v) + eps) divides by
zero; bfloat16 parameters are updated the same way. The CUDA kernels compute in float32 for
float32 and float16 storage alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

Array = Any


@dataclass(frozen=True, slots=True)
class SGDHyper:
    """d = g + wd p; with momentum, buf = d on the first step, else momentum buf +
    (1 - dampening) d, and d = d + momentum buf (Nesterov) or buf; p -= lr d."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass(frozen=True, slots=True)
class AdamHyper:
    """m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps); Adam adds wd p to g
    first, AdamW (``decoupled``) scales p by 1 - lr wd."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def scalars(self, step: int) -> tuple[float, float, float, float]:
        """(l2, decay, step_size, bc2_sqrt) for step ``step`` (from 1), in double precision:
        the L2 term added to the gradient (Adam), the factor p is scaled by first (AdamW:
        1 - lr wd), lr / (1 - beta1^t), and sqrt(1 - beta2^t)."""
        if step < 1:
            raise ValueError(f"adam_update: step counts from 1, got {step}")
        wd, lr = self.weight_decay, self.lr
        l2 = 0.0 if self.decoupled else wd
        decay = 1.0 - lr * wd if self.decoupled else 1.0
        return l2, decay, lr / (1.0 - self.beta1**step), math.sqrt(1.0 - self.beta2**step)


_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def state_dtype(dtype: Any) -> np.dtype:
    """The dtype of an optimizer's state (momentum, Adam's moments) and of its arithmetic for
    parameters of ``dtype``: float32 for float16 and bfloat16 (array-api-strict has
    neither), else the parameters' own."""
    half = isinstance(dtype, np.dtype) and dtype in _HALF
    return np.dtype(np.float32) if half else dtype


def check_flat(op: str, param: Array, grad: Array, *state: Array | None) -> None:
    """Optimizer buffers, updated in place: the gradient has the parameter's shape and dtype,
    each state buffer its shape and ``state_dtype``."""
    if grad.shape != param.shape or grad.dtype != param.dtype:
        _mismatch(op, param, grad, "gradient", param.dtype)
    want = state_dtype(param.dtype)
    for s in state:
        if s is not None and (s.shape != param.shape or s.dtype != want):
            _mismatch(op, param, s, "state", want)


def check_scaling(op: str, param: Array, grad_scale: Array | None, found_inf: Array | None) -> None:
    """A loss scaler's arrays for a fused update: float32 with one element each, on the
    parameter's device (the kernel reads them; the host never does)."""
    if grad_scale is None and found_inf is None:  # (every unscaled step: no loop to build)
        return
    for what, a in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if a is None:
            continue
        dtype = str(getattr(a, "dtype", "")).rpartition(".")[2]  # (array-api-strict's too)
        if dtype != "float32" or getattr(a, "size", 0) != 1:
            raise ValueError(
                f"{op}: {what} must be a float32 array of one element (0-d or (1,)), got "
                f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            )
        if type(a) is not type(param):
            raise ValueError(
                f"{op}: {what} must live with the parameters ({type(param).__name__}), got a "
                f"{type(a).__name__}; make it with the parameters' backend"
            )


def _mismatch(op: str, param: Array, buf: Array, what: str, dtype: Any) -> None:
    raise ValueError(
        f"{op}: every {what} buffer must match the parameter ({param.dtype} {param.shape}): "
        f"{dtype} {param.shape} expected, got {buf.dtype} {buf.shape}"
    )
