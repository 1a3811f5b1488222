"""The optimizer updates' contract, shared by the optimizers and every backend: their
hyperparameters (one frozen dataclass per update, so each signature is written once), the
scalars Adam derives from them per step, and the precision of the state buffers.

What changes from step to step can live on the device, so that a step replays with no host
scalar (a CUDA graph): the step counts are always arrays (``step=``: int64, one count per
parameter of the span, the steps each has taken), which the update advances itself, by one
unless the loss scaler's ``found_inf`` is set, before it reads them: Adam's bias corrections
and SGD's first momentum step come from the advanced count, on the device. The lr may be a
float or a one-element float64 array on the parameters' device (``lr_value`` reads it on
the host, for the CPU).

With ``lowp=`` (a bfloat16 or float16 array of a float32 parameter's shape) an update also
writes round(p_new) there, rounded to nearest even, in the same pass: the low-precision copy
of the master weights that autocast's GEMMs read (apex's fused "master weights" optimizers are
the model), so a step under autocast casts no weight. A skipped step (``found_inf``) writes
the cast of the old p, so the copy is the cast of the parameter after every update.

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

    lr: float | Array
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    @property
    def device_pure(self) -> bool:
        """Does every per-step scalar of this update live on the device (the step counts
        always do; the lr when it is an array, ``capturable=True``), so that a CUDA graph
        replay of it freezes no host value that changes between steps?"""
        return not isinstance(self.lr, (int, float))


@dataclass(frozen=True, slots=True)
class AdamHyper:
    """m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps); Adam adds wd p to g
    first, AdamW (``decoupled``) scales p by 1 - lr wd."""

    lr: float | Array
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    @property
    def device_pure(self) -> bool:
        """Does every per-step scalar of this update live on the device (the step counts
        always do; the lr when it is an array, ``capturable=True``), so that a CUDA graph
        replay of it freezes no host value that changes between steps?"""
        return not isinstance(self.lr, (int, float))

    def scalars(self, step: int) -> tuple[float, float, float, float]:
        """(l2, decay, step_size, bc2_sqrt) for step ``step`` (from 1), in double precision:
        the L2 term added to the gradient (Adam), the factor p is scaled by first (AdamW:
        1 - lr wd), lr / (1 - beta1^t), and sqrt(1 - beta2^t). The CUDA kernel computes the
        same doubles from its count (``pow``, IEEE division and sqrt, no contraction)."""
        if step < 1:
            raise ValueError(f"adam_update: step counts from 1, got {step}")
        wd, lr = self.weight_decay, lr_value(self.lr)
        l2 = 0.0 if self.decoupled else wd
        decay = 1.0 - lr * wd if self.decoupled else 1.0
        return l2, decay, lr / (1.0 - self.beta1**step), math.sqrt(1.0 - self.beta2**step)


def lr_value(lr: float | Array) -> float:
    """The lr as a host float: a float itself, or a host read of its one-element array (free
    on the CPU; the CUDA kernels read the array themselves)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    return float(lr.reshape(-1)[0])


_INT64 = np.dtype(np.int64)
_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


# (a dict lookup: 0.03 us against 0.17 us for the isinstance-and-tuple test, and each
# optimizer step asks 3-4 times; array-api-strict's dtypes hash unequal to NumPy's and miss)
_STATE_DTYPES = dict.fromkeys(_HALF, np.dtype(np.float32))


def state_dtype(dtype: Any) -> np.dtype:
    """The dtype of an optimizer's state (momentum, Adam's moments) and of its arithmetic for
    parameters of ``dtype``: float32 for float16 and bfloat16 (array-api-strict has
    neither), else the parameters' own."""
    return _STATE_DTYPES.get(dtype, dtype)


def check_sgd_update(
    param: Array,
    grad: Array,
    momentum_buf: Array | None,
    hyper: SGDHyper,
    step: Array | None,
    grad_scale: Array | None,
    found_inf: Array | None,
    lowp: Array | None,
) -> None:
    """Every argument of an ``sgd_update``, checked before anything is written (the one
    preamble of each backend's update)."""
    check_flat("sgd_update", param, grad, momentum_buf)
    check_scaling("sgd_update", param, grad_scale, found_inf)
    if lowp is not None:  # (most updates have none: a call saved on the small-model path)
        check_lowp("sgd_update", param, lowp)
    check_step("sgd_update", param, step, hyper.lr)
    if hyper.momentum != 0.0 and momentum_buf is None:
        raise ValueError("sgd_update: momentum needs a momentum buffer")


def check_adam_update(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    hyper: AdamHyper,
    step: Array,
    grad_scale: Array | None,
    found_inf: Array | None,
    lowp: Array | None,
) -> None:
    """Every argument of an ``adam_update``, checked before anything is written."""
    check_flat("adam_update", param, grad, m, v)
    check_scaling("adam_update", param, grad_scale, found_inf)
    if lowp is not None:  # (most updates have none: a call saved on the small-model path)
        check_lowp("adam_update", param, lowp)
    check_step("adam_update", param, step, hyper.lr, required=True)


def check_flat(op: str, param: Array, grad: Array, *state: Array | None) -> None:
    """Optimizer buffers, updated in place: the gradient has the parameter's shape and dtype,
    each state buffer its shape and ``state_dtype``."""
    if grad.shape != param.shape or grad.dtype != param.dtype:
        _mismatch(op, param, grad, "gradient", param.dtype)
    want = state_dtype(param.dtype)
    for s in state:
        if s is not None and (s.shape != param.shape or s.dtype != want):
            _mismatch(op, param, s, "state", want)


def check_lowp(op: str, param: Array, lowp: Array | None) -> None:
    """The low-precision copy an update writes: bfloat16 or float16, the shape and array type
    (device) of a float32 parameter (the master weights)."""
    if lowp is None:
        return
    if param.dtype != np.float32 or lowp.dtype not in _HALF or lowp.shape != param.shape:
        raise ValueError(
            f"{op}: lowp must be a bfloat16 or float16 array of a float32 parameter's shape, "
            f"got {lowp.dtype} {lowp.shape} for a {param.dtype} {param.shape} parameter"
        )
    _check_device(op, "lowp", param, lowp)


def check_scaling(op: str, param: Array, grad_scale: Array | None, found_inf: Array | None) -> None:
    """A loss scaler's arrays for a fused update: float32 with one element each, on the
    parameter's device (the kernel reads them; the host never does)."""
    if grad_scale is None and found_inf is None:  # (every unscaled step: no loop to build)
        return
    for what, a in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if a is None:
            continue
        want = "a float32 array of one element (0-d or (1,))"
        _check_device_array(op, what, param, a, "float32", want)
        if a.size != 1:
            raise ValueError(f"{op}: {what} must be {want}, got {a.dtype} {a.shape}")


def check_step(
    op: str, param: Array, step: Array | None, lr: float | Array, required: bool = False
) -> None:
    """The span's step counts (int64, one or more elements, on the parameter's device; the
    update advances them) and, when it is an array, the lr (float64, one element, there too)."""
    if step is None:
        if required:
            raise ValueError(
                f"{op}: step must be an int64 array of the span's step counts, got None"
            )
    elif type(step) is not type(param) or step.dtype is not _INT64 or not step.size:
        # (the usual arrays pass the line above; the rest, array-api-strict's too, come here)
        _check_device_array(op, "step", param, step, "int64", "an int64 array of step counts")
        if getattr(step, "size", 0) < 1:
            raise ValueError(f"{op}: step must hold the span's step counts, got an empty array")
    if type(lr) is not float and not isinstance(lr, (int, float)):
        if not hasattr(lr, "__array_namespace__") and not hasattr(lr, "__cuda_array_interface__"):
            raise ValueError(  # (a group's lr set by hand: a Tensor, a NumPy float32)
                f"{op}: lr must be a Python float or a float64 array, got a "
                f"{type(lr).__name__}; a Tensor lr needs capturable=True (as in PyTorch), "
                "any other number float(lr)"
            )
        _check_device_array(op, "lr", param, lr, "float64", "a float or a float64 array")
        if getattr(lr, "size", 0) != 1:
            raise ValueError(f"{op}: an lr array must have one element, got shape {lr.shape}")


def _check_device_array(op: str, what: str, param: Array, a: Any, dtype: str, want: str) -> None:
    """``a`` is an array of ``dtype`` of the parameter's array type (its device)."""
    got = str(getattr(a, "dtype", "")).rpartition(".")[2]  # (array-api-strict's too)
    if got != dtype:
        raise ValueError(
            f"{op}: {what} must be {want}, got {getattr(a, 'dtype', type(a).__name__)} "
            f"{getattr(a, 'shape', '')}"
        )
    _check_device(op, what, param, a)


def _check_device(op: str, what: str, param: Array, a: Any) -> None:
    """``a`` is of the parameter's array type (its device)."""
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
