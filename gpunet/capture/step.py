"""The wrapper: ``capture(step)`` makes a ``CapturedStep``, which keys each call by its input
signature, records a new one twice (the two recordings and what they returned must agree)
and replays it after; the arguments flattened to tensors and a structure, the ones a capture
refuses, and what changed when a signature recurs too often."""

from __future__ import annotations

import collections
import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import autodiff
from ..autodiff import CAPTURE, STATE, CaptureError
from ..backend import cuda_graph, replay_mode
from ..tensor import Tensor
from .passes import _drop_fills
from .program import _Program
from .recording import RecordAgain, _compare, _is_array, _Recorder, _same_param, _xp_of


def _compare_returns(first: Any, second: Any, step_name: str) -> None:
    """Raise ``CaptureError`` when the two recordings returned different Python values (a
    replay would return the second's forever: an lr read from param_groups, a counter)."""
    old, new = _leaves(first), _leaves(second)
    if len(old) == len(new) and all(_same_leaf(a, b) for a, b in zip(old, new)):
        return
    changed = next(((a[1], b[1]) for a, b in zip(old, new) if not _same_leaf(a, b)), (old, new))
    raise CaptureError(
        f"gpunet.capture({step_name}): the step returned {changed[0]!r} at its first call and "
        f"{changed[1]!r} at its second; a replay returns only tensors afresh, so a Python "
        "value would be frozen. Return it as a tensor, or compute it outside the step."
    )


def _same_leaf(a: tuple, b: tuple) -> bool:
    """Two returned leaves alike: the same tensor position, or equal Python numbers, strings
    or None (NaN equal to NaN); any other object, the same object."""
    if a[0] != b[0] or a[0] == "T":
        return a == b
    x, y = a[1], b[1]
    if x is y:
        return True
    if type(x) is not type(y) or not isinstance(x, (bool, int, float, complex, str)):
        return False
    return x == y or (x != x and y != y)


def _flatten(obj: Any, out: list[Tensor]) -> Any:
    """The structure of ``obj`` with each Tensor replaced by its index in ``out``."""
    if isinstance(obj, Tensor):
        out.append(obj)
        return ("T", len(out) - 1)
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, [_flatten(o, out) for o in obj])
    if isinstance(obj, dict):
        return ("dict", [(k, _flatten(v, out)) for k, v in obj.items()])
    return ("V", obj)


def _unflatten(spec: Any, leaves: list[Any]) -> Any:
    tag, body = spec
    if tag == "T":
        return leaves[body]
    if tag == "V":
        return body
    if tag == "dict":
        return {k: _unflatten(v, leaves) for k, v in body}
    items = [_unflatten(s, leaves) for s in body]
    return tuple(items) if tag == "tuple" else items


class _Capture:
    """One input signature's capture: its program and the arrays it owns."""

    def __init__(
        self, program: _Program, out_spec: Any, out_tensors: list[Tensor], grads: list
    ) -> None:
        self.layout = autodiff.LAYOUT[0]  # (replaced arrays since: record again)
        self.program = program
        self.out_spec = out_spec
        self.out_tensors = out_tensors
        self.grads = grads  # [(leaf, its .grad as the recording left it)]


class CapturedStep:
    """A step function recorded once per input signature and replayed after (the contract:
    the docstring of ``gpunet/capture/__init__.py``). ``calls`` counts calls, ``replays``
    those replayed."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        on_new_signature: str = "recapture",
        max_captures: int = 8,
        fold_sgd: bool = False,
    ) -> None:
        if on_new_signature not in ("recapture", "raise"):
            raise ValueError(
                f"gpunet.capture: on_new_signature must be 'recapture' or 'raise', got "
                f"{on_new_signature!r}"
            )
        if max_captures < 1:
            raise ValueError(f"gpunet.capture: max_captures must be >= 1, got {max_captures}")
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.on_new_signature = on_new_signature
        self.max_captures = max_captures
        self.fold_sgd = fold_sgd
        self._captures: collections.OrderedDict[tuple, _Capture] = collections.OrderedDict()
        # first recordings: (recording, input buffers, layout, argument structure)
        self._pending: dict[tuple, tuple[_Recorder, list[Any], int, Any, Any]] = {}
        self._watched: tuple[Any, ...] = ()  # modules whose ``training`` a recording read
        self._churn_told = False  # (the warning that signatures never recur: once)
        self.calls = 0
        self.replays = 0

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        # the state outside the arguments that a recording depends on (torch.compile's guards):
        # autocast's dtype (None: off; with its device type when it casts on one only), and
        # the mode of each module whose ``training`` one read
        context = (
            (STATE.autocast if STATE.autocast_device is None else _autocast_key())
            if not self._watched
            else self._context()
        )
        if not kwargs and all(type(a) is Tensor for a in args):  # the common call: no flatten
            key = (None, tuple((a.data.shape, a.data.dtype, a._backend) for a in args), context)
            cap = self._captures.get(key)
            if cap is not None and cap.layout == autodiff.LAYOUT[0]:
                return self._replay(cap, args)  # type: ignore[arg-type]
            tensors: list[Tensor] = list(args)
            spec = _flatten((args, kwargs), [])
        else:
            tensors = []
            spec = _flatten((args, kwargs), tensors)
            shapes = tuple((t.data.shape, t.data.dtype, t._backend) for t in tensors)
            key = (repr(spec), shapes, context)
            cap = self._captures.get(key)
            if cap is not None and cap.layout == autodiff.LAYOUT[0]:
                return self._replay(cap, tensors)
            _refuse_arrays(spec, self.fn, self.name)
        if self._captures and self.on_new_signature == "raise" and key not in self._pending:
            known = next(iter(self._captures))
            raise CaptureError(
                f"gpunet.capture({self.name}): called with a new input signature "
                f"{self._show_key(key)}; it was captured for {self._show_key(known)}, and "
                "on_new_signature='raise'. Pass inputs of the captured shapes (pad or drop "
                "the last batch), or capture with on_new_signature='recapture'."
            )
        if cap is not None:  # parameters or optimizer buffers were replaced since
            del self._captures[key]
        return self._record(key, spec, tensors)

    def _context(self) -> tuple:
        """Autocast's dtype and the watched modules' modes, now (read where
        ``Module.training`` keeps them: no descriptor call per module)."""
        ac = STATE.autocast if STATE.autocast_device is None else _autocast_key()
        return (ac, *[m.__dict__["training"] for m in self._watched])

    def _watch(self, key: tuple, rec: _Recorder) -> tuple:
        """The key of a recording that read the mode of modules not watched before: they are
        watched from now on, and the key gains their modes at entry (the values read: the
        step had not set them). Entries under shorter keys are dropped (none would match)."""
        new = [(m, v) for m, v in rec.training.values() if all(m is not w for w in self._watched)]
        if not new:
            return key
        before = key[2] if self._watched else (key[2],)
        self._watched += tuple(m for m, _ in new)
        self._captures.clear()
        self._pending.clear()
        return (*key[:2], (*before, *[v for _, v in new]))

    def _show_key(self, key: tuple) -> str:
        """A signature as a user reads it: devices, dtypes and shapes, then the context."""
        shapes = ", ".join(f"{b.device} {dt} {tuple(s)}" for s, dt, b in key[1])
        context = key[2] if self._watched else (key[2],)
        said = [f"autocast {context[0]}"] if context[0] is not None else []
        said += [f"{type(m).__name__}.training={v}" for m, v in zip(self._watched, context[1:])]
        return f"({shapes})" + (f" [{', '.join(said)}]" if said else "")

    def _tell_churn(self, key: tuple, spec: Any) -> None:
        """Warn, once, that the oldest first recording goes unreplayed as a new signature
        comes: the step records at every call. Says what changed between the two.

        (A Python number is not made a 0-d input tensor, as jax.jit traces it: the step may
        use it as a number, an lr put into ``param_groups``, a branch, a count, where a
        tensor would fail or, float64 against a float32 loss, round differently. The user
        who can pass a tensor is told to.)"""
        if self._churn_told:
            return
        self._churn_told = True
        old = next(iter(self._pending))
        what, fix = _what_changed(self.fn, (old, self._pending[old][3]), (key, spec))
        warnings.warn(
            f"gpunet.capture({self.name}): {self.max_captures} input signatures were recorded "
            "once and never came again, and a new one came: the step runs eagerly and records "
            f"at every call, never replaying. {what}. {fix}",
            RuntimeWarning,
            stacklevel=4,  # (the user's call: here, _record, __call__, the caller)
        )

    def _replay(self, cap: _Capture, tensors: Sequence[Tensor]) -> Any:
        prog = cap.program
        if STATE.flags & CAPTURE:
            raise CaptureError(f"gpunet.capture({self.name}): called inside another capture")
        if STATE.flags & autodiff.OBSERVE:
            prog.run_observed([t.data for t in tensors])
        else:
            prog.replay([t.data for t in tensors])
        for leaf, grad in cap.grads:  # (another signature's recording may have set them since)
            leaf.grad = grad
        self.replays += 1
        return _unflatten(cap.out_spec, cap.out_tensors)

    def _record(self, key: tuple, spec: Any, tensors: list[Tensor]) -> Any:
        if STATE.flags & CAPTURE:
            raise CaptureError(f"gpunet.capture({self.name}): called inside another capture")
        for k, t in enumerate(tensors):
            if t._requires_grad:
                raise CaptureError(
                    f"gpunet.capture({self.name}): tensor argument {k} ({t.device} {t.dtype} "
                    f"{t.shape}) requires grad; a captured step copies its tensor arguments, "
                    "so their gradients would not reach them. Pass data as arguments and "
                    "reach parameters through the model (a closure)."
                )
            if t._backend.name not in ("numpy", "cupy"):
                raise CaptureError(
                    f"gpunet.capture({self.name}): tensor argument {k} is on the "
                    f"'{t._backend.name}' backend; captures replay NumPy and CuPy arrays only"
                )
        pending = self._pending.get(key)
        if pending is not None and pending[2] != autodiff.LAYOUT[0]:
            pending = None  # (arrays replaced since the first recording: start again)
        if pending is None:  # the capture's own input buffers, used by both recordings
            buffers = [t._backend.copy(t.data) for t in tensors]
        else:
            buffers = pending[1]
            for b, t in zip(buffers, tensors):
                _xp_of(b).copyto(b, t.data)
        own = [Tensor._wrap(b, t._backend) for b, t in zip(buffers, tensors)]
        args, kwargs = _unflatten(spec, own)
        rec = _Recorder(buffers)
        layout = autodiff.LAYOUT[0]  # (arrays replaced while recording: record again)
        prev_rec = STATE.recorder
        STATE.recorder = rec
        STATE.flags |= CAPTURE
        try:
            result = self.fn(*args, **kwargs)
        finally:
            STATE.flags &= ~CAPTURE
            STATE.recorder = prev_rec
        rekeyed = self._watch(key, rec)
        if rekeyed is not key:  # (it read new modes: a first recording, under its new key)
            key, pending = rekeyed, None
        if pending is None or autodiff.LAYOUT[0] != layout:  # (a first recording, or again)
            if len(self._pending) >= self.max_captures:  # (signatures that never came again)
                self._tell_churn(key, spec)
                del self._pending[next(iter(self._pending))]
            self._pending[key] = (rec, buffers, layout, spec, result)
            return result
        del self._pending[key]
        # both without the fills they write over (on the recorded values, which the overwrites
        # are checked against): gradients still None at the first call are written there
        # (zero_grad(set_to_none=False) fills the flat buffer) and added to at the second
        _drop_fills(pending[0])
        _drop_fills(rec)
        out_tensors: list[Tensor] = []
        out_spec = _flatten(result, out_tensors)
        try:
            _compare(pending[0], rec, self.name, again=pending[0].first)
            _compare_returns(_flatten(pending[4], []), out_spec, self.name)
        except RecordAgain:  # (gradients None at the first call: the third call compares)
            rec.first = False
            self._pending[key] = (rec, buffers, layout, spec, result)
            return result
        except CaptureError as e:
            e.result = result  # (the step ran eagerly to its end: its caller may use this)
            raise
        owned = []
        for t in out_tensors:  # the capture's own tensors over the recorded arrays
            if id(t.data) not in rec.slot:
                rec._add(t.data, "made")
            owned.append(Tensor._wrap(t.data, t._backend))
        backend = tensors[0]._backend if tensors else None
        keep = [rec.slot[id(t.data)] for t in out_tensors]
        program = _Program(rec, len(buffers), out_spec, backend, keep, self.fold_sgd)
        if len(self._captures) >= self.max_captures:
            self._captures.popitem(last=False)  # the oldest signature goes (as jit's cache)
        grads = [(leaf, leaf.grad) for leaf in rec.grads_set.values()]
        self._captures[key] = _Capture(program, out_spec, owned, grads)
        return _unflatten(out_spec, owned)

    def __repr__(self) -> str:
        parts = []
        for key, cap in self._captures.items():
            prog = cap.program
            c = prog.counts
            calls = sum(c.values()) - c["view"] - c["const"]
            if prog.on_gpu or prog.graph is not None:
                how = cuda_graph.describe(prog)
            else:
                how = f"a launch list ({graph_support(None)[1]})"
            if prog.folded:
                how += f", plain SGD folded into {prog.folded} GEMMs and sums"
            parts.append(f"{self._show_key(key)}: {calls} calls{_dropped(prog)}, replayed as {how}")
        body = "; ".join(parts) if parts else "not captured yet (the first two calls record)"
        return f"<captured step {self.name}: {body}>"


def _autocast_key() -> tuple:
    """Autocast's part of a signature when it casts on one device type only (``autocast(
    "cuda", ...)``): the same dtype casts other ops than under ``autocast(dtype=...)``."""
    return (STATE.autocast, STATE.autocast_device)


def _dropped(prog: _Program) -> str:
    """What the optimiser pass took out of the recording, for the repr."""
    if not prog.dropped:
        return ""
    fills = f"{prog.dropped} fill{'s' * (prog.dropped > 1)}"
    return f" ({fills} written over dropped, {prog.overwritten} accumulations into zeros now write)"


def _arguments(fn: Callable, spec: Any) -> list[tuple[str, Any]]:
    """(how a user names it, its structure) for each argument in a ``_flatten``ed call:
    'argument 2 ('weight')', 'argument 'lr''."""
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):  # (a builtin or a callable without a signature)
        names = []
    (_, args), (_, kwargs) = spec[1]
    said = [
        (f"argument {i}" + (f" ('{names[i]}')" if i < len(names) else ""), s)
        for i, s in enumerate(args)
    ]
    return said + [(f"argument '{k}'", s) for k, s in kwargs]


def _leaves(spec: Any) -> list[tuple[str, Any]]:
    """The leaves of a ``_flatten``ed structure: ('T', tensor index) or ('V', value)."""
    tag, body = spec
    if tag in ("T", "V"):
        return [spec]
    items = [v for _, v in body] if tag == "dict" else body
    return [leaf for item in items for leaf in _leaves(item)]


def _refuse_arrays(spec: Any, fn: Callable, name: str) -> None:
    """Raise ``CaptureError`` naming the first argument that holds a NumPy or CuPy array or
    a NumPy scalar: a replay would not read a new one (the step makes it an array outside
    the recorded calls, a new one each call, which the second recording finds changed)."""
    for where, s in _arguments(fn, spec):
        for tag, a in _leaves(s):
            if tag == "V" and isinstance(a, np.generic):
                raise CaptureError(
                    f"gpunet.capture({name}): {where} is a NumPy scalar (numpy."
                    f"{type(a).__name__} {a!r}); a captured step takes numbers as Python "
                    "numbers and arrays as gpunet tensors. Pass float(value) or int(value), "
                    "or gpunet.tensor(value) for a value that changes at each call."
                )
            if tag == "V" and _is_array(a):
                kind = f"{type(a).__module__.split('.')[0]}.{type(a).__name__}"
                raise CaptureError(
                    f"gpunet.capture({name}): {where} is a {kind} ({a.dtype}, shape "
                    f"{tuple(a.shape)}); a captured step takes arrays as gpunet tensors, copied "
                    "into its own input buffers at each call (an array the step makes into a "
                    "tensor is read at the recording, and a replay would not see a new one). "
                    "Pass gpunet.tensor(array) and use that tensor in the step."
                )


def _what_changed(fn: Callable, old: tuple, new: tuple) -> tuple[str, str]:
    """(what differs between two signatures, each (key, argument structure), and what to do)."""
    (old_key, old_spec), (key, spec) = old, new
    for (where, a), (_, b) in zip(_arguments(fn, old_spec), _arguments(fn, spec)):
        for (tag, x), (_, y) in zip(_leaves(a), _leaves(b)):
            if tag == "V" and not _same_param(x, y):
                return (
                    f"Its {where} is a Python {type(y).__name__} that changes ({x!r} in the "
                    f"oldest, {y!r} now)",
                    "Pass it as a tensor (gpunet.tensor(value), copied into the capture's input "
                    "buffer at each call: one recording serves every value), or keep it constant",
                )
            if tag == "T" and old_key[1][x][0] != key[1][y][0]:
                return (
                    f"The shape of its {where} changes ({tuple(old_key[1][x][0])} in the oldest, "
                    f"{tuple(key[1][y][0])} now)",
                    "Give it a few shapes at most (pad the batch, or drop the last one), or "
                    "raise max_captures if a few shapes recur",
                )
    return (
        "Its arguments' structure, dtypes, autocast or a module's training mode change",
        "Call it the same way each time, or capture one step per variant",
    )


def graph_support(backend: Any) -> tuple[str, str]:
    """('a CUDA graph' or 'a launch list', why) for replays on ``backend`` (None: the CPU)."""
    return replay_mode(None if backend is None else backend.device)


def capture(
    fn: Callable[..., Any] | None = None,
    *,
    on_new_signature: str = "recapture",
    max_captures: int = 8,
    fold_sgd: bool = False,
) -> Any:
    """Record ``fn`` (a training step) on its first two calls per input signature, replay it
    after: ``step = gpunet.capture(step)`` or ``@gpunet.capture``. ``on_new_signature``:
    'recapture' (record again, keeping up to ``max_captures`` signatures) or 'raise'.
    ``fold_sgd``: plain SGD's update folded into the GEMMs and sums that make its gradient,
    W <- W - lr X^T G as one GEMM (the rounding of ``SGD(in_backward=True)``, not of
    ``step()``); ``p.grad`` of those parameters is then not written (it reads NaN)."""
    options = dict(on_new_signature=on_new_signature, max_captures=max_captures, fold_sgd=fold_sgd)
    if fn is None:
        return functools.partial(capture, **options)
    return CapturedStep(fn, **options)
