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

Master weights: the parameters, their gradients and the optimizer state stay float32. The
first time autocast lowers a parameter that an optimizer holds, the optimizer's flat buffer
makes a low-precision copy of its weights, which every later fused update writes in the same
pass as the parameters (``optim.flat``). From then on a lowered parameter's cast node takes
its forward value from that copy, with no cast run (PyTorch's autocast weight-cast cache and
apex's fused master-weight optimizers are the models); its VJP is the cast's as before. The
copy is used only where it is proved current (the update wrote it and nothing has written the
parameter since); else the weight is cast, so the values are the same bits either way.
"""

from __future__ import annotations

import contextlib
from typing import Any

from . import backend, dtypes
from . import primitives as P
from .autodiff import AUTOCAST, BACKWARD, CAPTURE, STATE, apply, apply_with, call, refuse
from .optim.flat import flat_of
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
# autocast(dtype=None)'s dtype per device type: PyTorch's defaults (torch.get_autocast_dtype)
_DEFAULT_LOW = {"cuda": dtypes.float16, "cpu": dtypes.bfloat16, None: dtypes.bfloat16}


class autocast(contextlib.ContextDecorator):
    """Run ops inside in mixed precision: ``with gpunet.autocast(dtype=gpunet.bfloat16):``,
    or in PyTorch's spelling ``gpunet.autocast("cuda", dtype=gpunet.float16)``.

    ``device_type``: ``"cpu"`` or ``"cuda"``: only ops whose tensors are on that device type
    are cast, the others run as without autocast (as in PyTorch: autocast for "cuda" leaves
    CPU ops alone); ``None`` (gpunet's default) casts on every device. ``dtype``: bfloat16 (no
    loss scaling needed: float32's range) or float16 (use ``GradScaler``); ``None`` is the
    device type's default, PyTorch's: float16 for "cuda", bfloat16 for "cpu" and for None.
    ``enabled=False`` turns an outer autocast off inside. Per thread, as in PyTorch. Run
    ``loss.backward()`` inside or after it: backward follows the forward's dtypes.
    """

    def __init__(
        self, device_type: str | None = None, dtype: Any = None, enabled: bool = True
    ) -> None:
        if device_type not in _DEFAULT_LOW:
            raise ValueError(
                f"gpunet.autocast: device_type must be 'cpu', 'cuda' or None (a device type, "
                f"as torch.autocast's first argument), got {device_type!r}; pass the dtype by "
                "name: autocast(dtype=gpunet.bfloat16)"
            )
        dt = _DEFAULT_LOW[device_type] if dtype is None else dtypes.as_dtype(dtype)
        if dt not in _LOW:
            raise ValueError(
                f"gpunet.autocast: dtype must be gpunet.bfloat16 or gpunet.float16, got {dt} "
                "(float32 GEMMs on tensor cores: gpunet.backends.allow_tf32 = True)"
            )
        self.device_type, self.dtype, self.enabled = device_type, dt, bool(enabled)
        self._saved: list[tuple[Any, Any, int]] = []

    def __enter__(self) -> autocast:
        state = STATE
        self._saved.append((state.autocast, state.autocast_device, state.flags & AUTOCAST))
        state.autocast = self.dtype if self.enabled else None
        state.autocast_device = self.device_type
        state._set(AUTOCAST, self.enabled)
        return self

    def __exit__(self, *exc: object) -> None:
        state = STATE
        state.autocast, state.autocast_device, bit = self._saved.pop()
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
        # (a sweep's rules follow the forward's dtypes; autocast for one device type leaves
        # the other's ops alone)
        on = state.autocast_device
        if not flags & BACKWARD and (on is None or args[0]._backend.device.type == on):
            policy = POLICY.get(prim.name)
            if policy is None:
                raise NotImplementedError(
                    f"gpunet.autocast: primitive {prim.name!r} has no autocast policy; add it "
                    "to gpunet.amp.POLICY"
                )
            if policy is not FOLLOW:
                args = _cast_inputs(policy, prim, args, state.autocast)
            if prim is P.linear_activation and params["activation"] == "softplus":
                # (the one activation on the float32 list: the GEMM and the bias low, the
                # activation apart in float32, as unfused; its alpha is softplus's beta)
                z = apply(prim, args, {**params, "activation": None})
                z = apply(P.cast, (z,), {"dtype": dtypes.float32})
                return apply(P.softplus, (z,), {"beta": params["alpha"]})
        return apply(prim, args, params)
    finally:
        state.flags |= flags & AUTOCAST


def loss_input(x: Tensor) -> Tensor:
    """A loss's input in float32 under autocast (the policy's losses run in float32, PyTorch's
    fp32 list), so that its target is not lowered to the input's dtype; else ``x``."""
    state = STATE
    on = state.autocast_device
    if not state.flags & AUTOCAST or x.dtype not in _LOW:
        return x
    if on is not None and x._backend.device.type != on:
        return x
    return apply(P.cast, (x,), {"dtype": dtypes.float32})


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
    return tuple(_cast(a, want[i]) if i in want else a for i, a in enumerate(args))


def _cast(x: Tensor, dtype: Any) -> Tensor:
    """x as ``dtype``: a float32 parameter lowered takes its optimizer's low-precision copy as
    the cast's value when that copy is current (and asks for one when there is none)."""
    params = {"dtype": dtype}
    if x._node is None and dtype in _LOW and x.dtype == dtypes.float32:
        entry = flat_of(x)
        if entry is not None:
            copy = entry[0].lowp_view(entry[1], dtype)
            if copy is not None:
                return apply_with(P.cast, (x,), params, copy)
    return apply(P.cast, (x,), params)


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


# ---------------------------------------------------------------------- loss scaling
# An optimizer's stage between two GradScaler.update() calls (none yet: PyTorch's READY)
UNSCALED, STEPPED = "unscaled", "stepped"


_IN_BACKWARD = (
    "GradScaler: SGD(in_backward=True) steps inside backward(), on the scaled "
    "gradients and before any inf check; use SGD() (in_backward=False) with a scaler"
)


def _steps_in_backward(root: Tensor) -> bool:
    """Does a leaf of ``root``'s graph take its update inside backward (``in_backward``)? A
    walk of the graph, checked before its backward could step any of them on a scaled loss."""
    stack, seen = [root._node], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for parent in node.parents:
            if isinstance(parent, Tensor):
                if getattr(parent, "_in_backward", None) is not None:
                    return True
            else:
                stack.append(parent)
    return False


class GradScaler:
    """Dynamic loss scaling for float16 (PyTorch's ``torch.amp.GradScaler``, its defaults).

    ``scaler.scale(loss).backward()``, then ``scaler.step(opt)`` (unscale the gradients by
    1/scale, look for inf/NaN, skip the step when found) and ``scaler.update()``: on a found
    inf the scale halves (``backoff_factor``) and the count of clean steps restarts; after
    ``growth_interval`` clean steps in a row it doubles (``growth_factor``).

    The scale, the clean-step count and the found-inf flag are arrays on the loss's device
    (device arrays on CUDA), read and written only by backend calls: ``step`` passes the
    inverse scale and the flag to the optimizer's fused update (PyTorch's fused optimizers'
    ``grad_scale`` and ``found_inf``), which multiplies each gradient by 1/scale and does
    nothing when the flag is set, so a scaled step needs no host sync and can be captured
    (``gpunet.capture``). The update also advances the step counts on the device unless the
    flag is set (a skipped step does not count, as in PyTorch), and Adam's bias corrections
    come from the count there: no optimizer reads the flag on the host.
    bfloat16 has float32's range and needs no scaler.

    ``device`` first, as ``torch.amp.GradScaler("cuda", ...)``: ``"cpu"`` or ``"cuda"`` is
    accepted and kept, but the arrays live on the loss's device whichever is named (as
    PyTorch makes its scale on the outputs' device). Each optimizer moves through PyTorch's
    stages between two ``update()`` calls: ready, unscaled (``unscale_``), stepped
    (``step``); a second ``unscale_`` or ``step``, or ``unscale_`` after ``step``, raises
    before anything changes (a second step would apply the scaled gradients again).
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        if not isinstance(device, str):
            raise TypeError(
                f"GradScaler: the first argument is the device ('cpu' or 'cuda', as in "
                f"torch.amp.GradScaler), got {device!r}; pass init_scale={device!r} by name"
            )
        self.device = str(backend.device(device))
        if not (init_scale > 0 and growth_factor > 1.0 and 0.0 < backoff_factor < 1.0):
            raise ValueError(
                f"GradScaler: need init_scale > 0, growth_factor > 1 and 0 < backoff_factor < "
                f"1, got {init_scale}, {growth_factor}, {backoff_factor}"
            )
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(
                f"GradScaler: growth_interval must be an int >= 1, got {growth_interval!r}"
            )
        self.enabled = enabled
        self._init_scale, self._growth, self._backoff = init_scale, growth_factor, backoff_factor
        self._interval = growth_interval
        self._scale: Any = None  # float32 (): made on the loss's device by the first scale()
        self._tracker: Any = None  # int32 (): clean steps in a row
        # id(optimizer) -> float32 (): 1 when its gradients held inf or NaN since update(); one
        # each, as PyTorch's per-optimizer found_inf, so an overflow in one optimizer's
        # gradients skips its step only (update() backs off on any)
        self._founds: dict[int, Any] = {}
        self._inv: Any = None  # float32 (): 1/scale, for the fused update
        self._backend: Any = None
        self._stages: dict[int, str] = {}  # id(optimizer) -> UNSCALED | STEPPED since update()
        self._tracker_init = 0  # (a loaded state's count, before the arrays exist)

    def _lazy(self, backend: Any) -> None:
        if self._scale is None:
            self._backend = backend
            self._scale = backend.full((), self._init_scale, dtypes.float32)
            self._tracker = backend.full((), self._tracker_init, dtypes.int32)
            self._inv = backend.zeros((), dtypes.float32)

    def scale(self, outputs: Tensor) -> Tensor:
        """outputs * scale (a tensor: differentiable, so backward carries the scale)."""
        if not self.enabled:
            return outputs
        if _steps_in_backward(outputs):
            raise ValueError(_IN_BACKWARD)
        self._lazy(outputs._backend)
        s = Tensor._wrap(self._scale, outputs._backend)  # (read in place: update writes it)
        if outputs.dtype != dtypes.float32:
            s = apply(P.cast, (s,), {"dtype": outputs.dtype})
        return outputs * s

    def unscale_(self, optimizer: Any) -> None:
        """Divide ``optimizer``'s gradients by the scale in place and note any inf/NaN."""
        if not self.enabled:
            return
        if STATE.flags & CAPTURE:  # (it replaces the gradients outside backend calls)
            refuse("GradScaler.unscale_", "is not capturable; scaler.step(opt) alone is")
        self._check(optimizer, "unscale_")
        self._unscale(optimizer)

    def _unscale(self, optimizer: Any) -> None:
        _average_over_ranks(optimizer)
        xp = self._backend.xp
        call("amp_inverse_scale", _reciprocal_into, self._inv, self._scale)
        for p in optimizer._all_params():
            g = p.grad
            if g is None:
                continue
            data = g.data * self._inv.astype(g.dtype)
            call("amp_found_inf", _found_inf_into, self._found(optimizer), data, xp=xp)
            p.grad = Tensor._wrap(data, g._backend)
        self._stages[id(optimizer)] = UNSCALED

    def _found(self, optimizer: Any) -> Any:
        """``optimizer``'s found-inf flag, made (zero) at its first check and kept, so that a
        captured step reads the same array at every replay."""
        found = self._founds.get(id(optimizer))
        if found is None:
            found = self._founds[id(optimizer)] = self._backend.zeros((), dtypes.float32)
        return found

    def _check(self, optimizer: Any, op: str) -> None:
        """Refuse ``op`` where PyTorch does, before anything changes."""
        stage = self._stages.get(id(optimizer))
        if stage is STEPPED:
            raise RuntimeError(
                f"GradScaler.{op}: step() has already been called on this optimizer since the "
                "last update(); call scaler.update() after each scaler.step(opt)"
            )
        if stage is UNSCALED and op == "unscale_":
            raise RuntimeError(
                "GradScaler.unscale_: already called on this optimizer since the last update()"
            )
        if self._scale is None:
            raise RuntimeError(
                f"GradScaler.{op}: no scale yet: call scaler.scale(loss).backward() first "
                "(the gradients must be of the scaled loss)"
            )
        if getattr(optimizer, "defaults", {}).get("in_backward"):
            raise ValueError(_IN_BACKWARD)

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """``optimizer.step()`` on the gradients times 1/scale, skipped (parameters and state
        as they were) when a gradient held inf or NaN: both in the optimizer's fused update
        (after ``unscale_``, the flag only). An optimizer without one is unscaled and skipped
        on the host."""
        if not self.enabled:
            return optimizer.step(*args, **kwargs)
        self._check(optimizer, "step")
        unscaled = self._stages.get(id(optimizer)) is UNSCALED
        if not optimizer._fused_scaling:
            if STATE.flags & CAPTURE:
                refuse("GradScaler.step", f"decides on the host whether {optimizer} steps")
            if not unscaled:
                self._unscale(optimizer)
            skip = float(self._found(optimizer)) != 0.0
            out = None if skip else optimizer.step(*args, **kwargs)
            self._stages[id(optimizer)] = STEPPED  # (as in PyTorch, a skipped step counts)
            return out
        found = self._found(optimizer)
        scaling: dict[str, Any] = {"found_inf": found}
        xp = self._backend.xp
        if not unscaled:
            _average_over_ranks(optimizer)
            call("amp_inverse_scale", _reciprocal_into, self._inv, self._scale)
            for p in optimizer._all_params():
                if p.grad is not None:  # (an inf in g is one in g / scale: PyTorch checks g)
                    call("amp_found_inf", _found_inf_into, found, p.grad.data, xp=xp)
            scaling["grad_scale"] = self._inv
        optimizer._loss_scaling = scaling
        try:
            out = optimizer.step(*args, **kwargs)
        finally:
            optimizer._loss_scaling = None
        self._stages[id(optimizer)] = STEPPED
        return out

    def update(self, new_scale: float | None = None) -> None:
        """The scale for the next step: backoff on a found inf, growth after
        ``growth_interval`` clean steps in a row (PyTorch's ``_amp_update_scale_``), in place."""
        if not self.enabled or self._scale is None:
            return
        # the flags of the optimizers checked since the last update (PyTorch sums them)
        checked = [self._founds[key] for key in self._stages if key in self._founds]
        if new_scale is not None:
            call("fill", _fill, self._scale, value=float(new_scale))
        else:
            call(
                "amp_update_scale",
                _update_scale_into,
                *(self._scale, self._tracker, *checked),
                growth=self._growth,
                backoff=self._backoff,
                interval=self._interval,
                xp=self._backend.xp,
            )
        for found in checked:
            call("fill", _fill, found, value=0.0)
        self._stages.clear()

    def get_scale(self) -> float:
        """The current scale (a host read), or the initial one before the first ``scale``."""
        if not self.enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale)

    def get_growth_tracker(self) -> int:
        return 0 if self._tracker is None else int(self._tracker)

    def is_enabled(self) -> bool:
        return self.enabled

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's keys: scale, growth_factor, backoff_factor, growth_interval,
        _growth_tracker (empty when disabled)."""
        if not self.enabled:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth,
            "backoff_factor": self._backoff,
            "growth_interval": self._interval,
            "_growth_tracker": self.get_growth_tracker(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not state:
            raise RuntimeError("GradScaler.load_state_dict: the state is empty (saved disabled)")
        self._init_scale = float(state["scale"])
        self._growth = float(state["growth_factor"])
        self._backoff = float(state["backoff_factor"])
        self._interval = int(state["growth_interval"])
        self._tracker_init = int(state["_growth_tracker"])
        if self._scale is not None:  # (in place: a capture reads these arrays)
            self._scale[...] = self._init_scale
            self._tracker[...] = self._tracker_init


# The scaler's backend calls (``autodiff.call``: a step capture replays them), each writing
# its first array in place, so the scaler's arrays keep their addresses.
def _reciprocal_into(out: Any, scale: Any) -> None:
    """out = 1/scale, in float64 and rounded once to float32 (as PyTorch's inverse scale)."""
    out[...] = (1.0 / scale.astype(dtypes.float64)).astype(dtypes.float32)


def _found_inf_into(found: Any, g: Any, *, xp: Any) -> None:
    """found = max(found, any(!isfinite(g))): an array maximum, never a host read."""
    bad = xp.any(xp.logical_not(xp.isfinite(g))).astype(dtypes.float32)
    found[...] = xp.maximum(found, bad)


def _update_scale_into(
    scale: Any,
    tracker: Any,
    *found: Any,
    growth: float,
    backoff: float,
    interval: int,
    xp: Any,
) -> None:
    """PyTorch's ``_amp_update_scale_``: on a found inf (in any optimizer's flag) scale *=
    backoff and the count of clean steps restarts; after ``interval`` clean steps scale *=
    growth (if finite), count 0."""
    bad = xp.asarray(False)
    for flag in found:
        bad = xp.logical_or(bad, flag > 0)
    clean = xp.where(bad, 0, tracker + 1).astype(dtypes.int32)
    grown = (scale * growth).astype(dtypes.float32)
    grow = xp.logical_and(clean >= interval, xp.isfinite(grown))
    kept = xp.where(grow, grown, scale)
    new = xp.where(bad, scale * backoff, kept).astype(dtypes.float32)
    tracker[...] = xp.where(grow, 0, clean).astype(dtypes.int32)
    scale[...] = new


def _fill(out: Any, *, value: float) -> None:
    out[...] = value


def _average_over_ranks(optimizer: Any) -> None:
    """A data-parallel optimizer's gradients averaged before the inf/NaN check, so that every
    rank sees the same gradients and skips, or takes, the same step (an inf on one rank is
    one in the sum everywhere)."""
    synchronize = getattr(optimizer, "synchronize", None)
    if synchronize is not None and not getattr(optimizer, "_synced", True):
        synchronize()
