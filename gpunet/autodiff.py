"""The define-by-run tape: one dispatch point, the reverse sweep, and forward mode.

Every op goes through ``bind(prim, *inputs, **params)``:

- with no forward-mode transform active, the backend computes the
  forward, and if gradients are enabled and an input requires grad, a ``Node`` records the
  primitive, its parents and only what its VJP rule keeps;
- inside ``gpunet.jvp`` a ``ForwardMode`` interpreter sees the op first: it evaluates it one
  level down, then pushes the input tangents through the primitive's JVP rule.

``backprop`` walks the recorded nodes in reverse topological order (newest first, from a heap:
iterative, so graphs of any depth work), calls each VJP rule (chain rule: dL/dx = sum over
uses of the vector-Jacobian product), and releases saved arrays as it goes unless asked to
keep them.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gpunet  # the layer above (gpunet.ops: the sweep sums with it), read at call time only

from .backend import get_backend
from .primitives.card import LINEAR, Primitive
from .tensor import _CAPTURE, IN_BACKWARD, Tensor

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


# bits of _State.flags: grad mode on; detect_anomaly on; a forward-mode interpreter sees the
# next op (level > 0); observers listen; forward-mode interpreters exist (jvp_stack non-empty);
# a reverse sweep is running; and, set by that sweep, nothing will differentiate what its VJP
# rules compute, so they may call fused, non-differentiable kernels; and a step capture is
# recording every backend call (``gpunet.capture``); an autocast policy applies
# (``gpunet.autocast``)
GRAD, ANOMALY, FORWARD, OBSERVE, TANGENTS, BACKWARD, FUSED_VJP = 1, 2, 4, 8, 16, 32, 64
CAPTURE = _CAPTURE  # (defined beside Tensor, whose host reads test it)
WATCHED = ANOMALY | OBSERVE | CAPTURE  # apply's one test for all three (one global, not five)
AUTOCAST = 256
DETOUR = FORWARD | AUTOCAST  # apply's one test for both (off: the same bytecodes as before)
HEARD = OBSERVE | CAPTURE  # call's one test for both


class _State(threading.local):
    """Per-thread autodiff state. ``bind`` reads one word, ``flags``, on every op (a
    thread-local read costs about a microsecond's tenth; three of them showed in profiles)."""

    def __init__(self) -> None:
        self.flags = GRAD
        self._level = 0  # how many forward-mode interpreters ``bind`` sees (jvp_stack[:level])
        self.jvp_stack: list[ForwardMode] = []
        self.backward_node: Node | None = None  # whose VJP rule is running (anomaly messages)
        self.observers: list[Callable[[str, tuple, dict, Any], None]] = []  # see ``observing``
        self.recorder: Any = None  # the capture recording now (``gpunet.capture``), or None
        self.autocast: Any = None  # autocast's low-precision dtype while AUTOCAST is set
        self.autocast_device: str | None = None  # the device type it casts on (None: all)

    def _set(self, bit: int, on: bool) -> None:
        self.flags = (self.flags | bit) if on else (self.flags & ~bit)

    @property
    def level(self) -> int:
        return self._level

    @level.setter
    def level(self, n: int) -> None:
        self._level = n
        self._set(FORWARD, n > 0)


STATE = _State()


class _SavedOutput:
    """Stands in a node's saved values for its own output, so node -> output is no cycle."""

    def __repr__(self) -> str:
        return "SAVED_OUTPUT"


SAVED_OUTPUT = _SavedOutput()


class Node:
    """One recorded primitive application: what backward needs and nothing more.

    ``_record`` is its constructor (it fills the slots directly: a node is made on every
    recorded op, and an ``__init__`` call would be a Python call more each time).
    """

    __slots__ = (
        "_hooks",
        "_out_changed",
        "out_data",
        "params",
        "parents",
        "prim",
        "saved",
        "seq",
        "site",
    )

    prim: Primitive
    parents: tuple  # per input: its Node, the leaf Tensor, or None (no grad)
    saved: tuple | None  # what the VJP rules take; None once released
    params: dict
    out_data: Any  # the output's array, when the rule keeps the output
    seq: int  # creation order: every node is newer than the nodes it was computed from
    site: str | None  # where the user created it (only under detect_anomaly)
    _hooks: list | None

    def __repr__(self) -> str:
        return f"<node {self.prim.name}>"


# ---------------------------------------------------------------------- dispatch
def bind(prim: Primitive, *args: Tensor, **params: Any) -> Tensor:
    """Apply a primitive: the single entry point of every op in gpunet.

    Inside a forward-mode transform the innermost ``ForwardMode`` sees the op first.
    Otherwise the backend computes the forward, and a node is recorded when gradients are on
    and an input requires grad.
    """
    return apply(prim, args, params)


def apply(prim: Primitive, args: tuple[Tensor, ...], params: dict[str, Any]) -> Tensor:
    """``bind`` with its inputs and parameters as one tuple and one dict: the same op, called
    without packing them (the hottest ops call this form). This is the hot path of every op:
    the one- to three-input cases are spelled out (two inputs: about 0.7 us less per recorded
    op than the general loop; three: nn.Linear's card, 84 bytecodes fewer a call, 3% of the
    tiny nn.MLP step) and nothing is looked up twice."""
    flags = STATE.flags
    if flags & DETOUR:
        if flags & FORWARD:
            return STATE.jvp_stack[STATE._level - 1].process(prim, args, params)
        return gpunet.amp.dispatch(prim, args, params)
    x = args[0]
    backend = x._backend
    impl = backend.impls.get(prim.name) or backend.impl(prim.name)
    n = len(args)
    if n == 1:  # (a call without ``**params`` is cheaper when there are none)
        data = impl(x.data, **params) if params else impl(x.data)
    elif n == 2:
        y = args[1]
        dx, dy = x.data.dtype, y.data.dtype
        if y._backend is not backend or (dy is not dx and dy != dx and not prim.nondiff):
            check_compatible(prim, args)
        data = impl(x.data, y.data, **params) if params else impl(x.data, y.data)
    elif n == 3:  # (linear_activation's x, W, b: the loop below runs 84 more bytecodes)
        y, z = args[1], args[2]
        dx = x.data.dtype
        if (
            y._backend is not backend
            or z._backend is not backend
            or y.data.dtype != dx
            or (z.data.dtype != dx and 2 not in prim.nondiff)  # (fused CE's labels)
        ):
            check_compatible(prim, args)
        data = impl(x.data, y.data, z.data, **params)
    else:
        check_compatible(prim, args)
        data = impl(*[a.data for a in args], **params)
    if prim.transfers:
        backend = get_backend(params["device"])
    if type(data) is not backend.array_type:  # NumPy returns scalars from 0-d operations
        data = backend.asarray(data)
    # Tensor._wrap spelled out (its one copy): the call costs about 0.2 us per op (timeit:
    # 0.4-0.6 us inline, 0.77 us through _wrap).
    out = _new_tensor(Tensor)
    out.data, out._backend, out._requires_grad, out._node = data, backend, False, None
    out.grad = None
    if flags & WATCHED:
        if flags & ANOMALY:
            _check_forward(prim, args, out)
        if flags & OBSERVE:
            observe(prim.name, args, params, out)
        if flags & CAPTURE:
            if prim.transfers:
                refuse(
                    prim.name,
                    "moves a tensor between devices",
                    "Pass the step its tensors on the model's device (.to() before the call).",
                )
            STATE.recorder.record(prim.name, impl, [a.data for a in args], params, data)
    if flags & GRAD and prim.differentiable:
        for a in args:
            if a._requires_grad:
                _record(prim, args, params, out, flags)
                break
    return out


_new_tensor = object.__new__


def observe(name: str, inputs: Sequence[Any], params: dict, output: Any) -> None:
    """Tell every observer (``gpunet.profile``) of one backend call: a primitive's forward
    from ``bind``, or a backend call made through ``call``. Callers check
    ``STATE.flags & OBSERVE`` first, so it costs nothing off."""
    for fn in STATE.observers:
        fn(name, tuple(inputs), params, output)


def call(name: str, method: Callable[..., Any], /, *arrays: Any, **params: Any) -> Any:
    """``method(*arrays, **params)``: a backend call made outside ``apply`` (a fused
    backward kernel, a rule writing in place, an optimizer update), and the one place where
    observers (``gpunet.profile``) hear of it as ``name``. A method that returns nothing
    writes its first array: ``*_into`` methods (out, inputs...) report the rest as inputs."""
    flags = STATE.flags
    if flags & HEARD:  # (one test: a call nobody hears is the method and one word read)
        if flags & CAPTURE:
            return _record_call(name, method, arrays, params, flags)
        result = method(*arrays, **params)
        _observe_call(name, method, arrays, params, result)
        return result
    return method(*arrays, **params)


def _observe_call(
    name: str, method: Callable[..., Any], arrays: tuple, params: dict, out: Any
) -> None:
    """Tell the observers of a ``call``: a method that returns nothing wrote its first array
    (``*_into``: out, inputs...), so that array is the output and the rest the inputs."""
    ins = arrays[1:] if out is None and method.__name__.endswith("_into") else arrays
    observe(name, ins, params, arrays[0] if out is None else out)


def _record_call(
    name: str, method: Callable[..., Any], arrays: tuple, params: dict, flags: int
) -> Any:
    """``call`` while a step capture records: the method runs on plain values (a ``Live``
    value is a float subclass, which NumPy would not treat as a Python float; a ``Dynamic``
    gives its ``value``), and the recording keeps them to compute again at each replay."""
    plain = {
        k: float(v) if type(v) is Live else v.value if type(v) is Dynamic else v
        for k, v in params.items()
    }
    result = method(*arrays, **plain)
    if flags & OBSERVE:
        _observe_call(name, method, arrays, plain, result)
    STATE.recorder.record(name, method, arrays, params, result)
    return result


# Bumped when arrays that a captured step may have recorded are replaced (an optimizer packs
# its flat buffers again, a module moves): a capture recorded before records again.
LAYOUT = [0]


def layout_changed() -> None:
    """Say that parameters' or optimizer buffers' arrays were replaced (captures re-record)."""
    LAYOUT[0] += 1


class CaptureError(RuntimeError):
    """A step cannot be captured as written (a host read, a value-dependent branch, a new
    input signature under ``on_new_signature='raise'``): see ``gpunet.capture``. ``result``:
    what the step returned, where it ran to its end eagerly before the error (the two
    recordings differed), else None."""

    result: Any = None


HOST_READ = "takes a value to the host"


def refuse(op: str, why: str = HOST_READ, fix: str = "") -> None:
    """Raise ``CaptureError`` for ``op`` at the user's line (called only while recording),
    with ``fix``, what to do instead (a host read's is to read the returned tensor)."""
    if why == HOST_READ:
        why += ", which a captured step cannot do (a replay runs none of the step's Python)"
        fix = fix or (
            "Return the tensor from the step and read it after the call, or run this step "
            "without capture."
        )
    raise CaptureError(
        f"gpunet.capture: {op} {why}, at {user_site()}. "
        f"{fix or 'Run this step without capture (call the function undecorated).'}"
    )


def segment(
    params_of: Callable[..., Any] | None = None, records: Callable[..., bool] | None = None
) -> Callable[[Callable], Callable]:
    """Mark a function (an optimizer's step, a schedule's, clipping) that a step capture runs
    again as Python at each replay rather than recording its backend calls: what it reads
    (the lr a schedule set, step counts) changes between steps. ``params_of(*args, **kw)``
    names the parameters whose gradients it reads; where ``records(*args, **kw)`` is true,
    its backend calls are recorded instead (their changing values passed as ``Dynamic``)."""

    def wrap(fn: Callable) -> Callable:
        name = fn.__qualname__

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if STATE.flags & CAPTURE and (records is None or not records(*args, **kwargs)):
                params = list(params_of(*args, **kwargs)) if params_of is not None else []
                return STATE.recorder.segment(name, fn, args, kwargs, params)
            return fn(*args, **kwargs)

        return run

    return wrap


@contextlib.contextmanager
def observing(fn: Callable[[str, tuple, dict, Any], None]) -> Iterator[None]:
    """Call ``fn(name, inputs, params, output)`` for every backend call in this thread while
    the context is open (inputs and output are Tensors, or raw arrays for direct kernels)."""
    state = STATE
    state.observers.append(fn)
    state._set(OBSERVE, True)
    try:
        yield
    finally:
        state.observers.remove(fn)
        state._set(OBSERVE, bool(state.observers))


def _record(prim: Primitive, args: Sequence[Tensor], params: dict, out: Tensor, flags: int) -> None:
    """Make ``out``'s node: its parents (a Node, a leaf Tensor, or None per input) and what
    the primitive's VJP rules keep. (Every recorded op runs this: the one- to three-input
    cases are spelled out, as in ``apply``; the generator costs 40 bytecodes more.)"""
    if len(args) == 1:
        parents = (args[0]._node or args[0],)  # (the one input requires grad)
    elif len(args) == 2:
        x, y = args
        parents = (
            (x._node or x) if x._requires_grad else None,
            (y._node or y) if y._requires_grad else None,
        )
    elif len(args) == 3:
        x, y, z = args
        parents = (
            (x._node or x) if x._requires_grad else None,
            (y._node or y) if y._requires_grad else None,
            (z._node or z) if z._requires_grad else None,
        )
    else:
        parents = tuple((a._node or a) if a._requires_grad else None for a in args)
    nondiff = prim.nondiff  # (labels, indices, masks: integers, so hardly ever tracked)
    if nondiff:
        for i in nondiff:
            if args[i]._requires_grad:  # no gradient flows to it all the same
                parents = tuple(None if j in nondiff else p for j, p in enumerate(parents))
                break
    out_data = None
    if prim.save is None:
        saved = tuple(args)
    else:
        saved = prim.save(out, *args, **params)
        # A card saves its output last (a test holds them to it): kept as a bare array, since
        # node -> output would be a cycle (forward mode needs the output object itself).
        if saved and saved[-1] is out and not flags & TANGENTS:
            saved = (*saved[:-1], SAVED_OUTPUT)
            out_data = out.data
    node = _new_node(Node)
    node.prim, node.parents, node.saved, node.params = prim, parents, saved, params
    node.out_data, node._hooks, node.seq = out_data, None, _next_seq()
    node.site = user_site() if flags & ANOMALY else None
    out._node = node
    out._requires_grad = True


_new_node = object.__new__
_next_seq = itertools.count().__next__  # (thread-safe: one C call)


def differentiating(*operands: Tensor) -> bool:
    """Will a transform see the ops run now on ``operands``: a forward-mode interpreter, the
    anomaly check, or the tape (grad mode on and an operand requiring grad)?

    VJP rules ask this to choose a fused, non-differentiable backward kernel (the common
    ``loss.backward()``) over the same formula composed from differentiable ops. Inside a
    sweep that answer was decided once (the ``FUSED_VJP`` bit: ``STATE.flags & FUSED_VJP``
    is the cheap form of ``not differentiating(...)`` there).
    """
    flags = STATE.flags
    if flags & FUSED_VJP:
        return False
    if flags & (FORWARD | ANOMALY):
        return True
    return bool(flags & GRAD) and any(t._requires_grad for t in operands)


def describe(t: Tensor) -> str:
    return f"{t.device} {t.dtype} {t.shape}"


def check_compatible(prim: Primitive, args: Sequence[Tensor]) -> None:
    """Inputs of one op share a device, and a dtype (masks and indices excepted)."""
    first = args[0]
    dtype = None
    for i, a in enumerate(args):
        if a._backend is not first._backend:
            listing = ", ".join(f"input {j}: {describe(b)}" for j, b in enumerate(args))
            raise RuntimeError(
                f"gpunet.{prim.name}: inputs are on different devices ({listing}). Move them "
                f"to one device first, e.g. x.to('{first.device}') or x.to('{a.device}')."
            )
        if i in prim.nondiff:
            continue
        if dtype is None:
            dtype = a.data.dtype
        elif a.data.dtype != dtype:
            listing = ", ".join(f"input {j}: {describe(b)}" for j, b in enumerate(args))
            if dtype.kind not in "fV" and a.data.dtype.kind in "fV":  # (V: bfloat16)
                dtype = a.data.dtype  # (suggest the floating one: an int input to a Linear)
            raise TypeError(
                f"gpunet.{prim.name}: inputs have different dtypes ({listing}); gpunet does "
                f"not promote between tensors. Convert one first, e.g. x.to(gpunet.{dtype})."
            )


# ---------------------------------------------------------------------- grad mode
def is_grad_enabled() -> bool:
    return bool(STATE.flags & GRAD)


class set_grad_enabled(contextlib.ContextDecorator):
    """Turn recording on or off within a block or a decorated function."""

    def __init__(self, mode: bool) -> None:
        self.mode = mode
        self._prev: list[int] = []  # the GRAD bit before each (possibly nested) entry

    # These run around every optimizer step: one read and one write of the thread-local flags.
    def __enter__(self) -> None:
        state = STATE
        flags = state.flags
        self._prev.append(flags & GRAD)
        state.flags = (flags | GRAD) if self.mode else (flags & ~GRAD)

    def __exit__(self, *exc: object) -> None:
        state = STATE
        state.flags = (state.flags & ~GRAD) | self._prev.pop()


class no_grad(set_grad_enabled):
    """Nothing inside is recorded: ``with gpunet.no_grad():`` or ``@gpunet.no_grad()``."""

    def __init__(self) -> None:
        super().__init__(False)


class enable_grad(set_grad_enabled):
    """Recording is on inside, even within ``no_grad``."""

    def __init__(self) -> None:
        super().__init__(True)


# ---------------------------------------------------------------------- anomaly detection
@contextlib.contextmanager
def detect_anomaly() -> Iterator[None]:
    """Raise at the first NaN or infinity a primitive produces, forward or backward, naming
    the primitive, its input shapes and the user's line that created it."""
    prev = STATE.flags & ANOMALY
    STATE._set(ANOMALY, True)
    try:
        yield
    finally:
        STATE._set(ANOMALY, bool(prev))


def user_site() -> str:
    """file:line of the innermost caller outside the gpunet package."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _finite(t: Tensor) -> bool:
    return not gpunet.dtypes.is_floating(t.dtype) or t._backend.all_finite(t.data)


def _check_forward(prim: Primitive, args: Sequence[Tensor], out: Tensor) -> None:
    if _finite(out) or not all(_finite(a) for a in args):
        return
    shapes = ", ".join(str(a.shape) for a in args)
    node = STATE.backward_node
    where = (
        f"in the backward pass of '{node.prim.name}' (created at {node.site})"
        if node is not None
        else f"created at {user_site()}"
    )
    raise FloatingPointError(
        f"detect_anomaly: primitive '{prim.name}' produced NaN or infinity from finite "
        f"inputs of shapes ({shapes}), {where}."
    )


# ---------------------------------------------------------------------- reverse mode
def _reachable(roots: list[Node], stop: set[Node]) -> set[Node]:
    """Every node reachable from ``roots`` without passing through ``stop`` (iterative)."""
    seen = set(roots)
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in stop:
            continue
        for p in node.parents:
            if type(p) is Node and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _run_hooks(hooks: list | None, g: Tensor) -> Tensor:
    for hook in list(hooks or ()):
        replaced = hook(g)
        if replaced is not None:
            g = replaced
    return g


def _as_cotangent(out: Tensor, ct: Any) -> Tensor:
    if ct is None:
        if out.numel() != 1:
            raise RuntimeError(
                f"backward of a non-scalar output (shape {out.shape}) needs a gradient "
                "argument: out.backward(gradient) with the same shape, or reduce it first "
                "(out.sum().backward())."
            )
        if STATE.flags & CAPTURE:
            return gpunet.ops.ones_like(out)  # (a backend call a step capture records)
        return Tensor._wrap(out._backend.ones(out.data.shape, out.dtype), out._backend)
    if not isinstance(ct, Tensor):
        ct = Tensor._wrap(out._backend.asarray(ct, out.dtype), out._backend)
    if ct.shape != out.shape or ct.dtype != out.dtype or ct._backend is not out._backend:
        raise ValueError(
            f"backward: the gradient ({describe(ct)}) must match the output ({describe(out)})"
        )
    return ct


def backprop(
    outputs: Sequence[Tensor],
    cotangents: Sequence[Any],
    inputs: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    create_graph: bool | None = False,
) -> list[Tensor] | None:
    """The reverse sweep from ``outputs`` seeded with ``cotangents``: seed, sweep, store.

    Without ``inputs``, gradients accumulate into the ``.grad`` of every leaf reached (or
    its ``grad_buffer``, or its in-backward step: the ``LeafPlan``). With ``inputs``, their
    gradients are returned (zeros where unreached) and no ``.grad`` changes; the sweep stops
    at them. With ``create_graph`` the sweep is itself recorded, so the result can be
    differentiated again; ``None`` decides: record when the graph depends on something that
    requires grad other than ``inputs`` (an outer transform's variable, or a parameter
    captured by the function), so that ``grad(grad(f))`` and gradient penalties work while a
    plain ``grad(f)(x)`` stays unrecorded.
    """
    global grad_sweeps
    if inputs is None:  # (counted first: a sweep that raises may have written some already)
        grad_sweeps += 1
    stop = set() if inputs is None else {x._node for x in inputs if x._node is not None}
    plan = LeafPlan()
    grads, queue = _seed(outputs, cotangents, inputs is not None, plan)
    if create_graph is None:
        reached = _reachable([n for _, n in queue], stop)
        create_graph = is_grad_enabled() and _depends_on_others(reached, inputs or ())
    if not create_graph and inputs is None:  # rules may write into leaves' arrays
        plan.allow_writes(queue, stop)
    input_grads = _sweep(grads, queue, stop, plan, retain_graph or create_graph, create_graph)
    if inputs is None:
        plan.store(create_graph)
        return None
    result = []
    for x in inputs:
        g = input_grads.get(x._node) if x._node is not None else plan.grads.get(x)
        result.append(gpunet.ops.zeros_like(x) if g is None else g)
    return result


def _seed(
    outputs: Sequence[Tensor], cotangents: Sequence[Any], partial: bool, plan: LeafPlan
) -> tuple[dict[Node, Tensor], list[tuple[int, Node]]]:
    """Each output's cotangent: on its node (queued), or on the plan for a leaf output."""
    grads: dict[Node, Tensor] = {}  # a node's cotangent so far; a node is here while queued
    queue: list[tuple[int, Node]] = []  # a heap of (-seq, node): the newest node runs next
    for out, ct in zip(outputs, cotangents):
        if not out._requires_grad:
            if partial:
                continue
            raise RuntimeError(
                f"backward: the output ({describe(out)}) does not require grad; no input "
                "that requires grad reached it (was it computed under no_grad?)"
            )
        g = _as_cotangent(out, ct)
        plan.held[id(g.data)] = g.data
        node = out._node
        if node is None:
            plan.add(out, g)
        elif node in grads:
            grads[node] = gpunet.ops.add(grads[node], g)
        else:
            grads[node] = g
            heapq.heappush(queue, (-node.seq, node))
    return grads, queue


def _sweep(
    grads: dict[Node, Tensor],
    queue: list[tuple[int, Node]],
    stop: set[Node],
    plan: LeafPlan,
    retain_graph: bool,
    create_graph: bool,
) -> dict[Node, Tensor]:
    """Run every queued node's VJP rules, newest first; leaf edges go to ``plan``. Returns
    the cotangents of the ``stop`` nodes (the inputs of a partial sweep)."""
    state = STATE
    flags = state.flags  # (read once: a thread-local read is not free)
    anomaly = flags & ANOMALY
    prev_flags, prev_node = flags, state.backward_node
    # Decided once per sweep: may rules use fused, non-differentiable kernels (nothing will
    # differentiate what they compute)? Rules read the FUSED_VJP bit.
    fused = not (create_graph or flags & (ANOMALY | FORWARD))
    flags = (flags | GRAD) if create_graph else (flags & ~GRAD)
    state.flags = ((flags | FUSED_VJP) if fused else (flags & ~FUSED_VJP)) | BACKWARD
    changed = _last_inplace  # nodes older than the latest in-place write check their inputs
    pop, push, writes = heapq.heappop, heapq.heappush, plan.writes
    input_grads: dict[Node, Tensor] = {}
    try:
        # Reverse topological order without sorting the graph first: a node is created after
        # every node it was computed from, so when the newest queued node runs, every node
        # that uses it (all newer) has run and its cotangent is complete.
        while queue:
            node = pop(queue)[1]
            g = grads.pop(node)
            if node._hooks:
                g = _run_hooks(node._hooks, g)
            if stop and node in stop:
                input_grads[node] = g
                continue
            saved = node.saved
            if saved is None:
                raise _freed(node)
            if node.seq < changed:
                _check_versions(node)
            if node.out_data is not None:
                saved = saved_values(node, g._backend)
            if anomaly:
                state.backward_node = node
            prim, params = node.prim, node.params
            if prim.vjp_pre is not None:
                g = prim.vjp_pre(g, *saved, **params)
            rules, into = prim.rules, prim.vjp_into if writes else None
            for i, parent in enumerate(node.parents):
                if parent is None:
                    continue
                if type(parent) is Node:
                    gi = rules[i](g, *saved, **params)
                    prev = grads.get(parent)
                    if prev is None:
                        grads[parent] = gi
                        push(queue, (-parent.seq, parent))
                    else:
                        grads[parent] = gpunet.ops.add(prev, gi)
                    continue
                # A leaf: the plan writes its gradient in place (its step, or its buffer),
                # or it takes the rule's result and sums it for .grad.
                if (
                    into is None
                    or into[i] is None
                    or not plan.write(prim, into[i], parent, g, saved, params)
                ):
                    plan.add(parent, rules[i](g, *saved, **params))
            if plan.pending:  # after every rule above has read the leaves' old values
                plan.take_steps(g, saved, params)
            if not retain_graph:
                node.saved = None
                node.out_data = None
    finally:
        state.flags = (state.flags & ~_SWEEP_BITS) | (prev_flags & _SWEEP_BITS)
        state.backward_node = prev_node
    return input_grads


_SWEEP_BITS = GRAD | FUSED_VJP | BACKWARD  # what a sweep sets, and restores after


def _freed(node: Node) -> RuntimeError:
    return RuntimeError(
        f"backward through '{node.prim.name}' a second time: its saved values were freed "
        "after the first backward. Pass retain_graph=True to the first backward() if you "
        "need to go through the graph again."
    )


def saved_values(node: Node, backend: Any) -> tuple:
    """What the node's VJP rules take: its saved values, its output (kept as a bare array,
    to avoid a node -> output cycle) restored as a tensor on the graph."""
    saved = node.saved
    if node.out_data is None or saved is None:
        return saved  # type: ignore[return-value]
    me = Tensor._wrap(node.out_data, backend)
    me._requires_grad, me._node = True, node
    return (*saved[:-1], me)  # (the output is saved last)


def _depends_on_others(nodes: set[Node], inputs: Sequence[Tensor]) -> bool:
    """Does the graph reach a tensor requiring grad other than ``inputs``?"""
    if any(x._node is not None for x in inputs):  # an input tracked by an outer transform
        return True
    own = {id(x) for x in inputs}
    return any(isinstance(p, Tensor) and id(p) not in own for node in nodes for p in node.parents)


# ---------------------------------------------------------------------- version counters
# A tensor changed in place (``x += 1``, ``x[i] = v``) takes the next node sequence number as
# its version, and ``_last_inplace`` is the latest such number: a node recorded before it may
# have saved a tensor changed since. Recording costs nothing; the sweep compares one int per
# node, and looks at a node's saved tensors only when an in-place write came after the node.
_last_inplace = -1
# Called with each tensor written in place: the optimizers' flat buffers mark a parameter's
# low-precision copy stale (``optim.flat``; empty until autocast first asks for a copy).
WRITE_HOOKS: list[Callable[[Tensor], None]] = []
# The reverse sweeps that have written leaves' gradients (``.grad`` or its buffer): a
# data-parallel optimizer's average taken before the latest one is stale.
grad_sweeps = 0


def bump_version(x: Tensor) -> None:
    """Mark ``x`` as changed in place now (after every node recorded so far): the one place
    that every write of a tensor's values outside the graph goes through."""
    global _last_inplace
    x._version = _last_inplace = _next_seq()
    if x._node is not None and x._node.out_data is not None:
        x._node._out_changed = True  # the node kept x's array as its own output
    for hook in WRITE_HOOKS:
        hook(x)


def apply_with(prim: Primitive, args: tuple[Tensor, ...], params: dict, data: Any) -> Tensor:
    """``apply`` whose output's value ``data`` was computed elsewhere (autocast's weight cast,
    read from the optimizer's low-precision copy): the same node and VJP rules, no forward
    run, and nothing recorded by a capture (the step's calls that read ``data`` refer to it
    as an array made outside them, which the recorded update rewrites)."""
    out = Tensor._wrap(data, args[0]._backend)
    flags = STATE.flags
    if flags & GRAD and prim.differentiable and any(a._requires_grad for a in args):
        _record(prim, args, params, out, flags)
    return out


def _check_versions(node: Node) -> None:
    """Raise if a tensor the node saved (or its own output) was changed after it was saved."""
    tensors = [s for s in node.saved or () if isinstance(s, Tensor)]
    changed = [describe(s) for s in tensors if getattr(s, "_version", -1) > node.seq]
    if getattr(node, "_out_changed", False):
        changed.append(f"{node.out_data.dtype} {tuple(node.out_data.shape)} (its output)")
    if changed:
        raise RuntimeError(
            f"backward through '{node.prim.name}': the {changed[0]} tensor it saved for the "
            "gradient was modified by an in-place operation after it was saved (one of the "
            "variables needed for gradient computation has been modified by an inplace "
            "operation). Change a copy instead (x = x + 1, or x.clone()), or make the change "
            "before the op that uses it."
        )


# ---------------------------------------------------------------------- the leaf plan
class LeafPlan:
    """Where the sweep puts each leaf's gradient, decided before it runs from the leaf's uses
    and its optimizer. A leaf edge takes one of three routes:

    - in backward: the leaf's ``in_backward`` step (SGD in backward) applied by the edge's
      in-place rule, leaf <- alpha dL/dleaf + beta leaf, when this edge is its only use;
    - buffer: the in-place rule writes the gradient into the leaf's ``grad_buffer``;
    - accumulate: the rule returns the gradient, summed here and stored at the end (into
      ``.grad``; or, for a leaf with an in-backward step, applied as one step then).

    The first two need a card with ``vjp_into`` rules and a sweep that is not recorded.
    Leaves key the dicts themselves: a tensor hashes by identity, and no two live tensors
    share a hash, so a lookup never calls its elementwise ``==``.
    """

    __slots__ = ("buffers", "grads", "held", "in_backward", "pending", "writes")

    def __init__(self) -> None:
        self.grads: dict[Tensor, Tensor] = {}  # every leaf reached -> its gradient so far
        self.buffers: dict[Tensor, Any] = {}  # leaf -> the grad_buffer its gradient went to
        # Leaves stepped in backward by their one use -> (alpha, beta); empty unless some
        # live leaf has an in-backward step (then one walk over the graph counts uses).
        self.in_backward: dict[Tensor, tuple[float, float]] = {}
        self.pending: list = []  # in-backward steps of the running node, taken at its end
        self.writes = False  # may rules write into leaves' arrays (not recorded, no inputs)
        # Arrays that must not become a leaf's .grad uncopied, by id; held, so that no new
        # array takes the id of one freed during the sweep.
        self.held: dict[int, Any] = {}

    def allow_writes(self, queue: list[tuple[int, Node]], stop: set[Node]) -> None:
        """Turn on the buffer and in-backward routes, counting uses where a leaf has a step."""
        self.writes = True
        if not IN_BACKWARD:  # (no live leaf has one: no walk)
            return
        uses: dict[Tensor, int] = {}
        leaves = list(self.grads)  # (a leaf output counts as a use)
        for n in _reachable([n for _, n in queue], stop):
            leaves += [p for p in n.parents if p is not None and type(p) is not Node]
        for p in leaves:
            if getattr(p, "_in_backward", None) is not None and not p.hooks:
                uses[p] = uses.get(p, 0) + 1
        live = STATE.flags & CAPTURE
        for p in leaves:
            if uses.get(p) != 1:
                coef = None
            else:
                coef = _live(p._in_backward) if live else p._in_backward.alpha_beta()
            if coef is not None:  # its one use: that use's rule writes the update
                self.in_backward[p] = coef

    def write(
        self, prim: Primitive, into: Any, leaf: Tensor, g: Tensor, saved: tuple, params: dict
    ) -> bool:
        """Take the in-backward or the buffer route for a leaf edge whose card has an in-place
        rule ``into``, where the leaf may; False: the accumulate route (the caller adds)."""
        if self.in_backward:
            coef = self.in_backward.get(leaf)
            # One step per node, unless the card's in-place rules read none of the inputs they
            # write (linear: dW reads x, db nothing; matmul: dX reads W and dW reads X, so
            # stepping both would feed one the other's new value); further ones take the
            # accumulate route and are stepped from the whole gradient at the end.
            if coef is not None and (prim.vjp_into_independent or not self.pending):
                self.pending.append((into, leaf.data, coef))
                return True
        entry = getattr(leaf, "_grad_buffer", None)  # (buffer, a tensor over it); None: unset
        if entry is None or leaf in self.grads or getattr(leaf, "_hooks", None):
            return False  # only the first contribution, and none that a hook must see first
        buf, over = entry
        grad = leaf.grad
        if grad is None:
            into(buf, 1.0, 0.0, g, *saved, **params)  # beta 0: the buffer is written
        elif grad.data is buf:
            into(buf, 1.0, 1.0, g, *saved, **params)  # the buffer is .grad: summed into
        else:
            return False  # .grad holds another array: summed there at the end
        self.buffers[leaf] = buf
        # (the tensor over it, unless its array was replaced since: a module moved its grad)
        self.grads[leaf] = over if over.data is buf else Tensor._wrap(buf, g._backend)
        return True

    def take_steps(self, g: Tensor, saved: tuple, params: dict) -> None:
        """Take the running node's in-backward steps, once its rules have read the leaves."""
        for rule, data, (alpha, beta) in self.pending:
            rule(data, alpha, beta, g, *saved, **params)
        self.pending = []

    def add(self, leaf: Tensor, g: Tensor) -> None:
        """Sum one more contribution into the leaf's gradient."""
        prev = self.grads.get(leaf)
        self.grads[leaf] = g if prev is None else gpunet.ops.add(prev, g)

    def store(self, create_graph: bool) -> None:
        """Each reached leaf's gradient to its place: the buffer, an in-backward step from the
        whole gradient, or ``.grad`` (accumulated, never aliasing an array held elsewhere)."""
        grads, held = self.grads, self.held
        if STATE.flags & CAPTURE:  # (a replay sets these .grad as the recording leaves them)
            STATE.recorder.grads_set.update((id(p), p) for p in (*self.buffers, *grads))
        for leaf, buf in self.buffers.items():  # written into the grad_buffer (or summed there)
            g = grads.pop(leaf)
            if g.data is not buf:  # another use of the leaf added to it since
                call("copy", _assign, buf, g.data)
                g = Tensor._wrap(buf, g._backend)
            if leaf.grad is None:
                leaf.grad = g  # (the sweep's own tensor over the buffer)
        live = STATE.flags & CAPTURE
        for leaf, g in grads.items():
            hooks = getattr(leaf, "_hooks", None)
            if hooks:
                g = _run_hooks(hooks, g)
            step = getattr(leaf, "_in_backward", None)
            coef = None if step is None else _live(step) if live else step.alpha_beta()
            if coef is not None:  # the leaf's update in backward, from its whole gradient
                alpha, beta = coef
                call("axpby", leaf._backend.axpby_into, leaf.data, g.data, alpha=alpha, beta=beta)
            elif leaf.grad is None:
                if id(g.data) in held or getattr(g.data, "base", None) is not None:
                    g = gpunet.ops.copy(g)  # never alias an array someone else holds into .grad
                held[id(g.data)] = g.data
                leaf.grad = g if create_graph or not g._requires_grad else g.detach()
            else:
                with set_grad_enabled(create_graph):
                    leaf.grad = gpunet.ops.add(leaf.grad, g)


class Live(float):
    """A float that a step capture reads afresh at each replay, as ``fn()``: the learning
    rate in an in-backward step (a schedule changes it between steps)."""

    def __new__(cls, value: float, fn: Callable[[], float]) -> Live:
        obj = super().__new__(cls, value)
        obj.fn = fn  # type: ignore[attr-defined]
        return obj


class Dynamic:
    """A parameter of a backend call (an optimizer's hyperparameters, Adam's step count)
    that a step capture computes afresh at each replay, as ``fn()``: eager calls get
    ``value``. ``fn`` may advance state (a step count) and runs once per replay."""

    __slots__ = ("fn", "value")

    def __init__(self, value: Any, fn: Callable[[], Any]) -> None:
        self.value, self.fn = value, fn

    def __repr__(self) -> str:
        return f"Dynamic({self.value!r})"


def _live(step: Any) -> tuple[Live, Live] | None:
    """An in-backward step's (alpha, beta) as values a capture's replay reads again."""
    coef = step.alpha_beta()
    if coef is None:
        return None
    return Live(coef[0], lambda: step.alpha_beta()[0]), Live(coef[1], lambda: step.alpha_beta()[1])


def _assign(out: Any, x: Any) -> None:
    """out <- x, in place (a backend call, so a step capture records it)."""
    out[...] = x


# ---------------------------------------------------------------------- forward mode
class ForwardMode:
    """A JVP interpreter: carries a tangent beside each primal it has seen."""

    def __init__(self, index: int) -> None:
        self.index = index  # its place in the stack; it evaluates ops at levels below it
        self.tangents: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (primal kept alive, t)

    def tangent_of(self, x: Tensor) -> Tensor | None:
        entry = self.tangents.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None

    def set_tangent(self, x: Tensor, t: Tensor) -> None:
        self.tangents[id(x)] = (x, t)

    def process(self, prim: Primitive, args: Sequence[Tensor], params: dict) -> Tensor:
        state = STATE
        prev = state.level
        state.level = self.index
        try:
            out = bind(prim, *args, **params)
            if prim.differentiable:
                ts = [None if i in prim.nondiff else self.tangent_of(a) for i, a in enumerate(args)]
                if any(t is not None for t in ts):
                    self.set_tangent(out, _push_tangents(prim, ts, out, args, params))
        finally:
            state.level = prev
        return out


def _push_tangents(
    prim: Primitive, ts: list, out: Tensor, args: Sequence[Tensor], params: dict
) -> Tensor:
    """The output tangent: sum over inputs of (d out / d input) applied to its tangent."""
    if prim.jvp is LINEAR:
        ins = [
            a if i in prim.nondiff else (gpunet.ops.zeros_like(a) if t is None else t)
            for i, (a, t) in enumerate(zip(args, ts))
        ]
        return bind(prim, *ins, **params)
    total = None
    for i, t in enumerate(ts):
        if t is None:
            continue
        if prim.variadic:
            part = prim.jvp(i, t, out, *args, **params)  # type: ignore[operator]
        else:
            part = prim.jvp[i](t, out, *args, **params)  # type: ignore[index]
        total = part if total is None else gpunet.ops.add(total, part)
    return total  # type: ignore[return-value]


@contextlib.contextmanager
def forward_mode() -> Iterator[ForwardMode]:
    """Push a JVP interpreter for the duration of the block."""
    state = STATE
    if state.level != len(state.jvp_stack):
        raise RuntimeError("jvp cannot start inside a differentiation rule")
    mode = ForwardMode(len(state.jvp_stack))
    state.jvp_stack.append(mode)
    state._set(TANGENTS, True)
    state.level += 1
    try:
        yield mode
    finally:
        state.jvp_stack.pop()
        state._set(TANGENTS, bool(state.jvp_stack))
        state.level -= 1
