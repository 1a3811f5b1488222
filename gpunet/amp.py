"""Automatic mixed precision: ``autocast`` (a dtype policy per primitive, applied at the
dispatch point) and ``GradScaler`` (dynamic loss scaling for float16).

Under ``autocast(dtype=gpunet.bfloat16)`` (or ``gpunet.float16``) each op's floating inputs
are cast by its primitive's policy in ``POLICY`` before it runs, as PyTorch's autocast does
(``aten/src/ATen/autocast_mode.h``'s lists are the reference):

- ``LOWER``: GEMMs (``matmul``, ``linear_activation``) run in the low precision;
- ``FLOAT32``: reductions, ``exp``/``log``, ``logsumexp`` (so softmax), ``pow``, the losses
  (and LayerNorm's statistics, which are sums) run in float32;
- ``PROMOTE``: ops of several floating inputs run in the widest of their dtypes (a
  bfloat16 GEMM's output plus a float32 tensor is float32);
- ``FOLLOW``: the rest run in their input's dtype.

The casts are ``cast`` primitives, so backward follows the forward's dtypes: each cast's VJP
casts the gradient back, and parameters (float32) get float32 gradients. Inside a backward
sweep no policy applies. float64 inputs are never lowered (as in PyTorch).
"""

from __future__ import annotations

import contextlib
from typing import Any

from . import dtypes
from . import primitives as P
from .autodiff import AUTOCAST, BACKWARD, STATE, apply
from .primitives import Primitive
from .tensor import Tensor

LOWER, FLOAT32, PROMOTE, FOLLOW = "lower", "float32", "promote", "follow"

# The one table: every primitive in ``gpunet.primitives.REGISTRY`` has a policy here (a test
# walks the registry, so a new primitive without one fails).
POLICY: dict[str, str] = {
    # GEMMs: PyTorch's lower_precision_fp list (mm, matmul, linear, addmm)
    "matmul": LOWER,
    "linear_activation": LOWER,
    # PyTorch's fp32 list: exp, log, log1p, pow, sum, softmax/log_softmax, softplus, the losses
    "exp": FLOAT32,
    "log": FLOAT32,
    "log1p": FLOAT32,
    "pow": FLOAT32,
    "sum": FLOAT32,
    "logsumexp": FLOAT32,
    "softplus": FLOAT32,
    "cross_entropy": FLOAT32,
    "cross_entropy_backward": FLOAT32,
    # several floating inputs: the widest dtype (PyTorch's promote list: cat, stack, index_put)
    "add": PROMOTE,
    "sub": PROMOTE,
    "mul": PROMOTE,
    "div": PROMOTE,
    "maximum": PROMOTE,
    "minimum": PROMOTE,
    "where": PROMOTE,
    "compare": PROMOTE,
    "concatenate": PROMOTE,
    "scatter_add": PROMOTE,
    # the input's dtype
    "neg": FOLLOW,
    "sqrt": FOLLOW,
    "abs": FOLLOW,
    "sign": FOLLOW,
    "relu": FOLLOW,
    "leaky_relu": FOLLOW,
    "elu": FOLLOW,
    "sigmoid": FOLLOW,
    "tanh": FOLLOW,
    "silu": FOLLOW,
    "gelu": FOLLOW,
    "erf": FOLLOW,
    "max": FOLLOW,
    "isfinite": FOLLOW,
    "argmax": FOLLOW,
    "cast": FOLLOW,
    "copy": FOLLOW,
    "device_put": FOLLOW,
    "stop_gradient": FOLLOW,
    "broadcast_to": FOLLOW,
    "reshape": FOLLOW,
    "transpose": FOLLOW,
    "slice": FOLLOW,
    "slice_transpose": FOLLOW,
    "take": FOLLOW,
}

_LOW = (dtypes.float16, dtypes.bfloat16)


class autocast(contextlib.ContextDecorator):
    """Run ops inside in mixed precision: ``with gpunet.autocast(dtype=gpunet.bfloat16):``.

    ``dtype``: bfloat16 (no loss scaling needed: float32's range) or float16 (use
    ``GradScaler``). ``enabled=False`` turns an outer autocast off inside. Per thread, as in
    PyTorch. Run ``loss.backward()`` inside or after it: backward follows the forward's dtypes.
    """

    def __init__(self, dtype: Any = dtypes.bfloat16, enabled: bool = True) -> None:
        dt = dtypes.as_dtype(dtype)
        if dt not in _LOW:
            raise ValueError(
                f"gpunet.autocast: dtype must be gpunet.bfloat16 or gpunet.float16, got {dt} "
                "(float32 GEMMs on tensor cores: gpunet.backends.allow_tf32 = True)"
            )
        self.dtype, self.enabled = dt, bool(enabled)
        self._saved: list[tuple[Any, int]] = []

    def __enter__(self) -> autocast:
        state = STATE
        self._saved.append((state.autocast, state.flags & AUTOCAST))
        state.autocast = self.dtype if self.enabled else None
        state._set(AUTOCAST, self.enabled)
        return self

    def __exit__(self, *exc: object) -> None:
        state = STATE
        state.autocast, bit = self._saved.pop()
        state._set(AUTOCAST, bool(bit))


def is_autocast_enabled() -> bool:
    return bool(STATE.flags & AUTOCAST)


def dispatch(prim: Primitive, args: tuple[Tensor, ...], params: dict[str, Any]) -> Tensor:
    """``apply`` under autocast: cast the inputs by ``prim``'s policy, then run the op (and
    the casts) with the policy off, so they take the ordinary path."""
    state = STATE
    flags = state.flags
    state.flags = flags & ~AUTOCAST
    try:
        if not flags & BACKWARD:  # (a sweep's rules follow the forward's dtypes)
            policy = POLICY.get(prim.name)
            if policy is None:
                raise NotImplementedError(
                    f"gpunet.autocast: primitive {prim.name!r} has no autocast policy; add it "
                    "to gpunet.amp.POLICY"
                )
            if policy is not FOLLOW:
                args = _cast_inputs(policy, prim, args, state.autocast)
        return apply(prim, args, params)
    finally:
        state.flags |= flags & AUTOCAST


def _cast_inputs(policy: str, prim: Primitive, args: tuple[Tensor, ...], low: Any) -> tuple:
    """The inputs cast by ``policy`` (non-differentiable inputs, masks and indices, stay)."""
    skip = prim.nondiff
    if policy is LOWER:
        want = {i: low for i, a in enumerate(args) if a.dtype != low and _lowerable(a.dtype)}
    elif policy is FLOAT32:
        want = {i: dtypes.float32 for i, a in enumerate(args) if a.dtype in _LOW}
    else:  # PROMOTE
        floats = {a.dtype for i, a in enumerate(args) if i not in skip and _floating(a.dtype)}
        if len(floats) < 2:
            return args
        wide = _widest(floats)
        want = {i: wide for i, a in enumerate(args) if a.dtype in floats and a.dtype != wide}
    want = {i: dt for i, dt in want.items() if i not in skip}
    if not want:
        return args
    return tuple(
        apply(P.cast, (a,), {"dtype": want[i]}) if i in want else a for i, a in enumerate(args)
    )


def _floating(dt: Any) -> bool:
    return dtypes.is_floating(dt)


def _lowerable(dt: Any) -> bool:
    """float32 and the other low precision are lowered; float64 never (as in PyTorch)."""
    return dt == dtypes.float32 or dt in _LOW


def _widest(floats: set) -> Any:
    """float64 > float32 > the low precisions; float16 with bfloat16 meet at float32."""
    if dtypes.float64 in floats:
        return dtypes.float64
    if dtypes.float32 in floats or len(floats) > 1:
        return dtypes.float32
    return next(iter(floats))
