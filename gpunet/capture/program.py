"""Step capture and replay: ``gpunet.capture(step)`` records the backend calls a training step
makes and replays them, with no tape, Node or Tensor per op, on buffers the capture owns.

The contract (JAX's ``jit`` and PyTorch's CUDA graphs are the models):

- The first two calls with a new input signature (shapes, dtypes, devices of the tensor
  arguments, the other arguments' values, autocast's state at the call, and the ``training``
  mode of each module a recording read) run the step eagerly and record every backend call it
  makes: the forward through ``autodiff.apply``, the sweep's rules and leaf writes,
  everything else through ``autodiff.call``. The two recordings must agree (the same calls on
  the same shapes with the same parameters, reading the same persistent arrays), or
  ``CaptureError`` names the first difference: Python control flow that depends on values is
  never frozen silently.
- Later calls replay the second recording. Tensor arguments are copied into the capture's
  input buffers (the step never sees the caller's arrays, so nothing of the caller's is
  written); every array the step made lives on in the capture and is rewritten in place, so
  it keeps its address. Tensors the step returns are the capture's own and are valid until
  the next replay: copy them (``t.clone()``) to keep a value; they are detached. Python side
  effects of the step (appending to a list, printing) happen only on the recorded calls.
  ``module.training`` read while recording is a guard, as under torch.compile: a replay
  checks it (a mode the step set itself is not one), and a change records again or raises,
  as a new signature does. Other Python state the step reads (a flag, a global) is frozen
  at the recording. A signature that comes once and never again (a Python number that
  changes every call) makes the step record at every call: past ``max_captures`` such, one
  warning names the argument (pass it as a tensor). NumPy arrays and scalars as arguments
  are refused, naming them (pass tensors, Python numbers).
- The optimizers' updates (SGD, Adam, AdamW) are recorded with what changes between steps
  passed as ``autodiff.Dynamic`` (the group's lr and hyperparameters), an in-backward step's
  lr as ``autodiff.Live``: computed afresh at each replay, never frozen. Step counts (Adam's,
  momentum SGD's) are device arrays that the recorded update advances itself. Schedules,
  gradient clipping and another optimizer's step are *segments* (``autodiff.segment``): they
  run again as Python at each replay, with the gradients they saw put back. Dropout's draws
  are backend calls replayed from the same generator: fresh masks every replay, the same
  ones eager would draw.
- Replacing the arrays a capture recorded (an optimizer packing its buffers again,
  ``Module.to``) makes the next call record again; replacing ``p.data`` by hand between
  replays is not seen (write into it instead). Tensor arguments must not require grad.
- While recording, anything that takes a value to the host (``.item()``, ``.numpy()``,
  ``bool``, ``float``, ``int``, ``tolist``, printing a tensor) or makes a shape from values
  (boolean-mask indexing) raises ``CaptureError`` naming the op and the user's line.

Before it is generated, the recording's intermediates are planned by liveness: one whose
last reader has run gives its buffer to a later one of the same size and dtype, so a replay
holds no more than the eager step's peak; a fill the step writes over before anything reads
it (``zero_grad(set_to_none=False)``) is dropped, the GEMMs and sums that added into its zeros
overwriting instead where that gives the same bits. ``capture(step, fold_sgd=True)`` folds plain
SGD's update into the GEMMs and sums that make its gradient (``SGD(in_backward=True)``'s
arithmetic; ``p.grad`` of those parameters then reads NaN).

On the CPU the replay is a generated straight-line function over the recorded calls (a
launch list). On CuPy it is the same list of launches until the first replay, which captures
it as one CUDA graph, kept only if it matches the list bit for bit on its first two replays
(``backend/cuda_graph.py``); a call whose host scalars change per step, a Python segment or
a random draw keeps it a launch list. The ``repr`` says which and why.
"""

from __future__ import annotations

import collections
import functools
import gc
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import autodiff
from ..autodiff import CAPTURE, STATE, CaptureError, refuse, user_site
from ..backend import cuda_graph, replay_mode
from ..tensor import Tensor

__all__ = ["CaptureError", "CapturedStep", "capture", "graph_support", "refuse"]


def _is_array(x: Any) -> bool:
    return hasattr(x, "__array_interface__") or hasattr(x, "__cuda_array_interface__")


def _address(a: Any) -> int:
    face = getattr(a, "__array_interface__", None) or a.__cuda_array_interface__
    return face["data"][0]


def _describe(a: Any) -> tuple:
    """Where an array lives and how it is laid out: two views of the same memory match."""
    return (_address(a), tuple(a.shape), tuple(a.strides), str(a.dtype))


_CHANGING = (autodiff.Live, autodiff.Dynamic)  # parameters computed afresh at each replay


def _same_param(x: Any, y: Any) -> bool:
    """Do two recordings pass the same value? Arrays and tensors: the same object."""
    if x is y:
        return True
    if isinstance(x, _CHANGING):  # (they may differ between steps: that is their point)
        return type(x) is type(y)
    if _is_array(x) or _is_array(y) or isinstance(x, Tensor) or isinstance(y, Tensor):
        return False
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_same_param(a, b) for a, b in zip(x, y))
    try:
        return bool(x == y) and type(x) is type(y)
    except Exception:  # (an object without a plain ==: the same object only)
        return x is y


# ---------------------------------------------------------------------- the recording
class _Entry:
    """One recorded call. ``kind``: 'made' (a new array, rewritten in place at replay),
    'view' (a view of an input: the recorded view stays valid, nothing runs), 'into' (writes
    its first array, returns nothing), 'same' (returned an input: run, result dropped),
    'segment' (Python run again at replay), 'const' (zeros, ones or a fill nothing writes:
    made once, at the recording)."""

    __slots__ = ("fn", "ins", "kind", "name", "out", "params", "seg", "site")

    def __init__(self, kind: str, name: str, fn: Any, ins: list, params: dict, out: Any) -> None:
        self.kind, self.name, self.fn = kind, name, fn
        self.ins, self.params, self.out = ins, params, out
        self.site = ""
        self.seg: Any = None


class _Recorder:
    """Collects the backend calls of one eager run of the step."""

    def __init__(self, inputs: list[Any]) -> None:
        self.arrays: list[Any] = []  # every array met, held (so no id is reused)
        self.slot: dict[int, int] = {}  # id(array) -> index in arrays
        self.origin: list[Any] = []  # per array: 'input', 'made', 'view', or an external key
        self.rank: dict[int, int] = {}  # slot -> its place among the step's own arrays
        self.entries: list[_Entry] = []
        self.depth = 0  # inside a segment: its own calls are not recorded
        self.dropped = (0, 0)  # (fills dropped, accumulations made overwrites): _drop_fills
        # id(module) -> (module, ``training`` read): modes the step read before setting them
        self.training: dict[int, tuple[Any, bool]] = {}
        self.set_training: set[int] = set()  # modules whose mode the step set itself
        for a in inputs:
            self._add(a, "input")

    def _add(self, a: Any, origin: Any) -> int:
        k = len(self.arrays)
        self.arrays.append(a)
        self.slot[id(a)] = k
        self.origin.append(origin)
        if not isinstance(origin, tuple):  # (numbered apart from external arrays, so that
            self.rank[k] = len(self.rank)  # a call reading one more of those shifts nothing)
        return k

    def read_training(self, module: Any, value: bool) -> None:
        """``module.training`` read (``Module.training`` tells): the replay guards on it."""
        if id(module) not in self.set_training:
            self.training.setdefault(id(module), (module, value))

    def wrote_training(self, module: Any) -> None:
        self.set_training.add(id(module))

    def ref(self, x: Any) -> Any:
        """An input of a call: ('a', slot) for an array, ('c', value) for anything else."""
        if x is None or isinstance(x, np.generic) or not _is_array(x):
            return ("c", x)
        k = self.slot.get(id(x))
        if k is None:  # made before the step, or outside any call the capture sees
            k = self._add(x, ("external", _describe(x)))
        return ("a", k)

    def record(self, name: str, fn: Any, arrays: tuple | list, params: dict, out: Any) -> None:
        if self.depth:
            return
        ins = [self.ref(x) for x in arrays]
        if out is None:
            kind, oref = "into", None
        elif id(out) in self.slot:
            kind, oref = "same", None
        else:
            xp = _xp_of(out)
            shares = any(r[0] == "a" and xp.may_share_memory(out, self.arrays[r[1]]) for r in ins)
            kind = "view" if shares else "made"
            oref = ("a", self._add(out, kind))
        entry = _Entry(kind, name, fn, ins, params, oref)
        entry.site = user_site()
        self.entries.append(entry)

    def segment(self, name: str, fn: Callable, args: tuple, kwargs: dict, params: list) -> Any:
        """Run ``fn`` now, unrecorded, and record it to run again at each replay with the
        gradients its parameters had on entry (the sweep that set them does not run then)."""
        grads = [(p, p.grad) for p in params]
        self.depth += 1
        prev = STATE.flags
        STATE.flags = prev & ~CAPTURE  # (host reads are allowed: a segment is plain Python)
        try:
            result = fn(*args, **kwargs)
        finally:
            STATE.flags = prev
            self.depth -= 1
        entry = _Entry("segment", name, fn, [("c", a) for a in args], kwargs, None)
        entry.seg, entry.site = grads, user_site()
        if isinstance(result, Tensor):
            entry.out = ("a", self._add(result.data, "made"))
        self.entries.append(entry)
        return result

    def signature(self, i: int) -> tuple:
        """What must agree between two recordings for entry ``i``."""
        e = self.entries[i]

        def key(r: Any) -> Any:
            if r is None or r[0] == "c":
                return r
            origin = self.origin[r[1]]
            a = self.arrays[r[1]]
            if isinstance(origin, tuple):
                return ("external", origin[1])
            return (origin, self.rank[r[1]], tuple(a.shape), str(a.dtype))

        return (e.kind, e.name, [key(r) for r in e.ins], key(e.out))


def _xp_of(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np
    import cupy  # (only a CuPy array gets here)

    return cupy


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


def _compare(r1: _Recorder, r2: _Recorder, step_name: str) -> None:
    """Raise ``CaptureError`` at the first call where the two recordings differ."""
    n = max(len(r1.entries), len(r2.entries))
    for i in range(n):
        if i >= len(r1.entries) or i >= len(r2.entries):
            _refuse_accumulation(r1, r2, i, step_name)
            longer = r1 if i < len(r1.entries) else r2
            e = longer.entries[i]
            raise CaptureError(
                f"gpunet.capture({step_name}): the first two calls made different backend "
                f"calls: call {1 if longer is r1 else 2} goes on with '{e.name}' (call {i + 1}, "
                f"at {e.site}) where the other ended after {i} calls. Python control flow in "
                "the step depends on values (an if on a tensor's value, a counter); move it "
                "out of the step, or run the step without capture."
            )
        e1, e2 = r1.entries[i], r2.entries[i]
        s1, s2 = r1.signature(i), r2.signature(i)
        same_params = e1.params.keys() == e2.params.keys() and all(
            _same_param(e1.params[k], e2.params[k]) for k in e1.params
        )
        if e1.kind == "segment" and s1[:2] == s2[:2]:  # its arguments: the same values
            same_params = same_params and all(_same_param(a, b) for a, b in zip(e1.ins, e2.ins))
            s1 = s2
        if s1 != s2 or not same_params:
            _refuse_accumulation(r1, r2, i, step_name)
            what = _difference(s1, s2, e1, e2)
            raise CaptureError(
                f"gpunet.capture({step_name}): the first two calls differ at backend call "
                f"{i + 1}: {what} (call 2 at {e2.site}). The step's Python depends on values "
                "(a branch on a tensor or a counter), or an array the step reads is made "
                "outside the calls the capture sees; a replay would freeze one of them. "
                "Move that out of the step, or run it without capture."
            )


def _refuse_accumulation(r1: _Recorder, r2: _Recorder, i: int, step_name: str) -> None:
    """Raise ``CaptureError`` saying so where the recordings differ at call ``i`` because
    the gradients accumulated from the step's first call into its second."""
    carried = _accumulated(r1, r2, i)
    if carried:
        raise CaptureError(
            f"gpunet.capture({step_name}): the gradients accumulated across calls: {carried}. "
            "A replay would freeze one of the two. Zero the gradients inside the step "
            "(opt.zero_grad() at its start), or capture the whole accumulation (every "
            "micro-batch's backward, then opt.step()) as one step."
        )


def _accumulated(r1: _Recorder, r2: _Recorder, i: int) -> str:
    """How call ``i`` of the two recordings shows gradients carried from one call of the
    step to the next, if it does: a GEMM or sum writing a gradient fresh (beta 0) in one and
    adding into it (beta 1) in the other (a gradient buffer), or only the second adding into
    an array the first one made (a ``.grad`` of its own); else ''."""
    e1 = r1.entries[i] if i < len(r1.entries) else None
    e2 = r2.entries[i] if i < len(r2.entries) else None
    if e2 is None:
        return ""
    if e1 is not None and e1.name == e2.name and e1.kind == e2.kind == "into":
        betas = (e1.params.get("beta"), e2.params.get("beta"))
        if e2.name in ("matmul", "sum") and betas in ((0.0, 1.0), (1.0, 0.0)):
            fresh, added = ("first", "second") if betas[0] == 0.0 else ("second", "first")
            return (
                f"'{e2.name}' (backend call {i + 1}, at {e2.site}) wrote a gradient fresh "
                f"(beta=0) on the step's {fresh} call and added into the one the call before "
                f"had left (beta=1) on its {added}"
            )
    if (e1 is not None and e1.name == e2.name) or e2.name != "add":
        return ""
    for r in e2.ins:
        k = r1.slot.get(id(r2.arrays[r[1]])) if r[0] == "a" else None
        if k is not None and r1.origin[k] in ("made", "view"):
            return (
                f"'add' (backend call {i + 1}, at {e2.site}) added, on the step's second call, "
                "into a gradient its first call made (the first had none to add to)"
            )
    return ""


def _difference(s1: tuple, s2: tuple, e1: _Entry, e2: _Entry) -> str:
    if s1[:2] != s2[:2]:
        return f"'{e1.name}' ({e1.kind}) then, '{e2.name}' ({e2.kind}) now"
    for j, (a, b) in enumerate(zip(s1[2], s2[2])):
        if a != b:
            if a[0] == "external" and b[0] == "external":
                return (
                    f"'{e2.name}' reads, as input {j}, a different array from outside the "
                    "recorded calls each time (made by an operation the capture does not see)"
                )
            return f"'{e2.name}' input {j} is {_show(a)} then, {_show(b)} now"
    if s1[3] != s2[3]:
        return f"'{e2.name}' makes {_show(s1[3])} then, {_show(s2[3])} now"
    for k in e1.params:
        if not _same_param(e1.params[k], e2.params.get(k)):
            return f"'{e2.name}' has {k}={e1.params[k]!r} then, {k}={e2.params.get(k)!r} now"
    return f"'{e2.name}' differs"


def _show(key: Any) -> str:
    if key is None:
        return "nothing"
    if key[0] == "c":
        return repr(key[1])
    if key[0] == "external":
        return f"an array from outside the step of shape {key[1][1]}"
    return f"a {key[3]} array of shape {key[2]}"


# ---------------------------------------------------------------------- the replay program
class _Program:
    """The second recording as one generated Python function: a launch list."""

    def __init__(
        self,
        rec: _Recorder,
        n_inputs: int,
        outputs: Any,
        backend: Any,
        keep: Sequence[int] = (),
        fold_sgd: bool = False,
    ) -> None:
        self.rec = rec
        self.backend = backend
        self.n_inputs = n_inputs
        self.inputs = rec.arrays[:n_inputs]
        self.outputs = outputs
        self.dropped, self.overwritten = rec.dropped  # (the fills went before the comparison)
        written = {e.ins[0][1] for e in rec.entries if e.kind == "into" and e.ins[0][0] == "a"}
        for e in rec.entries:
            if e.name in _PURE and e.out[1] not in written and all(r[0] == "c" for r in e.ins):
                e.kind = "const"  # zeros, ones, a fill that nothing writes: made once
        self.fused = _fuse_cross_entropy(rec.entries, rec.arrays)
        self.counts = collections.Counter(e.kind for e in rec.entries)
        self.on_gpu = any(not isinstance(a, np.ndarray) for a in rec.arrays)
        # (the step's outputs outlive a replay: never shared)
        self.reused, self.spare = _reuse_buffers(rec, self.fused, set(keep))
        self.replay, self.source = self._generate(rec.entries)
        folds, self.hypers = _fold_sgd(rec, set(keep)) if fold_sgd else ({}, [])
        self.folded = sum(e.kind == "into" for e in folds.values())  # GEMMs and sums folded
        self.folded_entries = [folds.get(i, e) for i, e in enumerate(rec.entries)]
        if folds:
            plain = self.replay
            folded, self.source = self._generate(self.folded_entries)

            def replay(xs: list[Any]) -> None:
                (folded if self.may_fold() else plain)(xs)

            self.replay = replay
        self.graph = cuda_graph.attach(self, _CHANGING)  # (on CuPy)

    def may_fold(self) -> bool:
        """Is every folded SGD group still plain (no momentum, no weight decay set since)?
        If not, a replay runs the recorded update, unfolded."""
        for h in self.hypers:
            now = h.fn()
            if now.momentum != 0.0 or now.weight_decay != 0.0:
                return False
        return bool(self.hypers)

    def _generate(self, entries: list[_Entry]) -> tuple[Callable[..., None], str]:
        """The replay function of ``entries`` and its source."""
        rec = self.rec
        env: dict[str, Any] = {}
        lines = ["def replay(xs):"]
        for k in range(self.n_inputs):
            env[f"a{k}"] = rec.arrays[k]
            env[f"copy{k}"] = _xp_of(rec.arrays[k]).copyto
            lines.append(f"    copy{k}(a{k}, xs[{k}])")

        def arg(r: Any, i: int, j: int) -> str:
            if r[0] == "a":
                env[f"a{r[1]}"] = rec.arrays[r[1]]
                return f"a{r[1]}"
            env[f"c{i}_{j}"] = r[1]
            return f"c{i}_{j}"

        fused = self.fused
        for i, e in enumerate(entries):
            if i in fused:
                first, out = fused[i]
                if first is None:
                    continue  # (its loss is made by the fused call at its backward's place)
                names = []
                for k, a in enumerate(out):
                    env[f"ce{i}_{k}"] = rec.arrays[a]
                    names.append(f"ce{i}_{k}")
                env[f"cef{i}"], env[f"cer{i}"] = first, entries[i].params["reduction"]
                lines.append(f"    cef{i}({', '.join(names)}, reduction=cer{i})")
                continue
            if e.kind in ("view", "const", "folded"):
                continue  # a view of a buffer that never moves; a constant; a folded update
            if e.kind == "segment":
                env[f"s{i}"] = _segment_runner(e, rec)
                lines.append(f"    s{i}()")
                continue
            fast = _numpy_in_place(e, rec.arrays, env, i, self.spare)
            if fast is not None:  # the same NumPy calls, writing the capture's buffer
                lines += [f"    {line}" for line in fast]
                continue
            env[f"f{i}"] = e.fn
            args = [arg(r, i, j) for j, r in enumerate(e.ins)]
            for name, value in e.params.items():
                env[f"p{i}_{name}"] = value
                # a Live or Dynamic value (an lr, a step count) is computed at every replay
                read = ".fn()" if isinstance(value, _CHANGING) else ""
                args.append(f"{name}=p{i}_{name}{read}")
            call = f"f{i}({', '.join(args)})"
            if e.kind == "made":
                out = e.out[1]
                env[f"a{out}"] = rec.arrays[out]
                env[f"copy_{i}"] = _xp_of(rec.arrays[out]).copyto
                lines.append(f"    copy_{i}(a{out}, {call})")
            else:
                lines.append(f"    {call}")
        if len(lines) == 1:
            lines.append("    pass")
        exec(compile("\n".join(lines), "<gpunet.capture replay>", "exec"), env)
        return env["replay"], "\n".join(lines)

    def graph_blockers(self) -> list[str]:
        """What keeps this recording from replaying as one CUDA graph."""
        return cuda_graph.blockers(self, _CHANGING)

    def run_observed(self, xs: list[Any]) -> None:
        """The replay, one entry at a time, telling observers (``gpunet.profile``) of each
        call it makes (a view's too, as eager does; a segment's own calls tell them)."""
        arrays = self.rec.arrays
        for k in range(self.n_inputs):
            _xp_of(arrays[k]).copyto(arrays[k], xs[k])
        for e in self.folded_entries if self.may_fold() else self.rec.entries:
            if e.kind == "folded":
                continue
            if e.kind == "segment":
                _segment_runner(e, self.rec)()
                continue
            ins = [arrays[r[1]] if r[0] == "a" else r[1] for r in e.ins]
            params = {k: v.fn() if isinstance(v, _CHANGING) else v for k, v in e.params.items()}
            if e.kind in ("made", "same", "into"):
                result = e.fn(*ins, **params)
                if e.kind == "made":
                    _xp_of(arrays[e.out[1]]).copyto(arrays[e.out[1]], result)
            if e.kind == "const":
                continue
            out = arrays[e.out[1]] if e.out is not None else ins[0]
            writes = e.kind == "into" and e.fn.__name__.endswith("_into")  # (as ``call`` says)
            autodiff.observe(e.name, ins[1:] if writes else ins, params, out)


def _numpy_in_place(
    e: _Entry, arrays: list[Any], env: dict[str, Any], i: int, spare: Sequence[tuple] = ()
) -> list[str] | None:
    """Lines that make the NumPy calls the backend method ``e.fn`` makes, writing straight
    into the recorded output (no temporary, no copy, no Python frame of the backend's), for
    the hot methods of a training step; None for any other call. Inputs are the capture's
    own arrays, so a transposed operand is a view made here, once."""
    from ..backend.numpy_backend import NumpyBackend

    if not isinstance(getattr(e.fn, "__self__", None), NumpyBackend) or e.kind not in (
        "made",
        "into",
    ):
        return None
    p = e.params
    # float16 and bfloat16 compute through float32 in the backend: its own method, not these
    # lines (NumPy's float16 loops would round each GEMM and sum differently from eager)
    first = arrays[e.ins[0][1]] if e.ins and e.ins[0][0] == "a" else None
    if getattr(first, "dtype", None) is None or first.dtype.char not in "fd":
        return None
    if e.fn.__name__ == "sgd_update":
        return _plain_sgd(e, arrays, env, i, spare)
    if any(isinstance(v, _CHANGING) for v in p.values()) or any(r[0] != "a" for r in e.ins):
        return None
    ins = [arrays[r[1]] for r in e.ins]
    if e.kind == "made":
        out = arrays[e.out[1]]
    else:
        out, ins = ins[0], ins[1:]
    if not isinstance(out, np.ndarray) or out.dtype.char not in "fd":
        return None
    method = e.fn.__name__

    def name(value: Any, tag: str) -> str:
        env[f"n{i}_{tag}"] = value
        return f"n{i}_{tag}"

    o = name(out, "out")
    if method in ("matmul", "matmul_into"):
        if method == "matmul_into" and (p.get("alpha", 1.0) != 1.0 or p.get("beta", 0.0) != 0.0):
            return None  # (a scaling GEMM: the backend's own BLAS call)
        x, y = ins
        x = x.swapaxes(-1, -2) if p["tx"] else x
        y = y.swapaxes(-1, -2) if p["ty"] else y
        return [f"{name(np.matmul, 'mm')}({name(x, 'x')}, {name(y, 'y')}, out={o})"]
    if method == "sum_into" and p.get("alpha", 1.0) == 1.0 and p.get("beta", 0.0) == 0.0:
        reduce = name(np.add.reduce, "sum")
        return [f"{reduce}({name(ins[0], 'x')}, axis={name(p['axis'], 'axis')}, out={o})"]
    if method == "linear_activation" and p["activation"] in (None, "relu"):
        x, w, b = (name(a, t) for a, t in zip(ins, "xwb"))
        lines = [
            f"{name(np.matmul, 'mm')}({x}, {w}, out={o})",
            f"{name(np.add, 'add')}({o}, {b}, out={o})",
        ]
        if p["activation"] == "relu":
            lines.append(f"{name(np.maximum, 'max')}({o}, 0, out={o})")
        return lines
    if method == "activation_backward" and "out" not in p:
        if p["name"] == "relu" and not np.may_share_memory(out, ins[0]):
            # f' = (s > 0) written into out (which may be s itself), then g multiplied in:
            # the backend's expression, with no f'-sized temporary (1.6x at 256 x 1024)
            gt, mul = name(np.greater, "gt"), name(np.multiply, "mul")
            g, saved = name(ins[0], "g"), name(ins[1], "s")
            return [f"{mul}({gt}({saved}, 0, out={o}), {g}, out={o})"]
        env[f"f{i}"] = e.fn
        keywords = "".join(f", {k}={name(v, k)}" for k, v in p.items())
        return [f"f{i}({name(ins[0], 'g')}, {name(ins[1], 's')}{keywords}, out={o})"]
    return None


def _plain_sgd(
    e: _Entry, arrays: list[Any], env: dict[str, Any], i: int, spare: Sequence[tuple] = ()
) -> list[str] | None:
    """NumPy's ``sgd_update`` with no momentum and no weight decay, p -= lr g, as its two
    ufunc calls (the backend's: g * lr in the state's precision into a scratch row, then
    subtracted) for the lr of the moment; the backend's method when the group has momentum
    or decay by then. Only for a float32/float64 flat range without a momentum buffer. Its
    scratch row is the largest intermediate's buffer free by then (``spare``: (last reader,
    buffer) pairs), else a new one."""
    hyper, first = e.params.get("hyper"), e.params.get("first_step", False)
    if (
        len(e.ins) != 3
        or e.ins[2] != ("c", None)
        or any(r[0] != "a" for r in e.ins[:2])
        or not isinstance(hyper, autodiff.Dynamic)
        or e.params.get("lowp") is not None  # (it writes autocast's copy too)
        or (first is not False and not isinstance(first, autodiff.Dynamic))
    ):
        return None
    param, grad = arrays[e.ins[0][1]], arrays[e.ins[1][1]]
    if (
        param.dtype.char not in "fd"
        or grad.dtype != param.dtype
        or grad.shape != param.shape
        or not isinstance(param, np.ndarray)
    ):
        return None
    from ..backend.numpy_fused import CHUNK

    # the backend's pieces: cache-sized rows of a long flat buffer through one scratch row
    # (a parameter-sized scratch would hold as much again as the parameters)
    free = [b for last, b in spare if last < i and b.dtype == param.dtype and b.size >= 4096]
    row = max(free, key=lambda b: b.size).reshape(-1)[:CHUNK] if free else None
    contiguous = param.flags.c_contiguous and grad.flags.c_contiguous
    if not contiguous or (param.size < 2 * CHUNK and (row is None or row.size < param.size)):
        pieces = [(param, grad, np.empty_like(param))]
    else:
        row = np.empty(CHUNK, param.dtype) if row is None else row
        p, g, n = param.reshape(-1), grad.reshape(-1), row.size
        pieces = [
            (p[k : k + n], g[k : k + n], row[: min(n, p.size - k)]) for k in range(0, p.size, n)
        ]
    env.update(
        {
            f"sg{i}_h": hyper,
            f"sg{i}_pieces": pieces,
            f"sg{i}_dt": param.dtype.type,
            f"sg{i}_mul": np.multiply,
            f"sg{i}_sub": np.subtract,
            f"sg{i}_f": e.fn,
            f"sg{i}_p": param,
            f"sg{i}_g": grad,
        }
    )
    return [
        f"h{i} = sg{i}_h.fn()",
        f"if h{i}.momentum == 0.0 and h{i}.weight_decay == 0.0:",
        f"    lr{i} = sg{i}_dt(h{i}.lr)",
        f"    for p, g, t in sg{i}_pieces:",
        f"        sg{i}_sub(p, sg{i}_mul(g, lr{i}, out=t), out=p)",
        "else:",
        f"    sg{i}_f(sg{i}_p, sg{i}_g, None, h{i}, first_step=False)",
    ]


def _fuse_cross_entropy(entries: list[_Entry], arrays: list[Any]) -> dict[int, tuple]:
    """NumPy's ``cross_entropy`` and, later, its ``cross_entropy_backward`` on the same
    logits and labels, with nothing between that reads the loss or writes them, as one
    ``_cross_entropy_with_grad`` at the backward's place: {forward index: (None, ()), backward
    index: (method, (loss, grad, logits, labels, g) slots)}."""
    from ..backend.numpy_backend import NumpyBackend

    out: dict[int, tuple] = {}
    for i, e in enumerate(entries):
        backend = getattr(e.fn, "__self__", None)
        if (
            e.name != "cross_entropy"
            or e.kind != "made"
            or not isinstance(backend, NumpyBackend)
            or e.params.get("reduction") not in ("mean", "sum")
            or any(r[0] != "a" for r in e.ins)
        ):
            continue
        logits, labels, loss = e.ins[0][1], e.ins[1][1], e.out[1]
        for j in range(i + 1, len(entries)):
            b = entries[j]
            slots = {r[1] for r in b.ins if r[0] == "a"}
            if (
                b.name == "cross_entropy_backward"
                and b.kind == "made"
                and b.params == e.params
                and [r[1] for r in b.ins[1:]] == [logits, labels]
                and b.ins[0][0] == "a"
                and isinstance(arrays[b.out[1]], np.ndarray)
            ):
                method = backend._cross_entropy_with_grad
                out[i] = (None, ())
                out[j] = (method, (loss, b.out[1], logits, labels, b.ins[0][1]))
                break
            writes = b.kind in ("into", "same") and b.ins and b.ins[0][0] == "a"
            if b.kind == "segment" or loss in slots or (writes and b.ins[0][1] in (logits, labels)):
                break
    return out


_PURE = frozenset({"zeros", "ones", "full"})  # calls whose result depends on their params only


def _reuse_buffers(
    rec: _Recorder, fused: dict[int, tuple], keep: set[int]
) -> tuple[int, list[tuple[int, Any]]]:
    """Plan the step's intermediates by liveness, in place in ``rec.arrays``: an array the
    replay makes (with its views) takes the buffer of an earlier one of the same size and
    dtype whose last reader has run, as the eager step's allocator would. Inputs, outputs
    (``keep``), constants, external arrays, a segment's result and arrays passed as keyword
    parameters keep their own. Returns the bytes saved and, for each buffer, the position of
    its last reader with the buffer (a scratch row for a later call)."""
    arrays, origin = rec.arrays, rec.origin
    root, first, last, pinned = _liveness(rec, fused, keep)
    members: dict[int, list[int]] = collections.defaultdict(list)
    for k in range(len(arrays)):
        if origin[k] in ("made", "view"):
            members[root[k]].append(k)
    free: dict[tuple, list[Any]] = collections.defaultdict(list)
    ending: list[tuple[int, Any, tuple]] = []  # (last use, buffer, key), of groups using one
    buffer_of: dict[int, Any] = {}
    saved = 0
    for k in sorted(first, key=first.__getitem__):
        a = arrays[k]
        if k in pinned or origin[k] != "made" or not a.flags.c_contiguous:
            continue
        # (an elementwise call may write over an input it is that input's last reader)
        same_call = _in_place_ok(rec.entries[first[k]], first[k], fused, arrays)
        for end in [x for x in ending if x[0] < first[k] or (same_call and x[0] == first[k])]:
            ending.remove(end)
            free[end[2]].append(end[1])
        key = (type(a), a.dtype, a.size)
        e = rec.entries[first[k]]
        if _relu_backward(e) and e.ins[1][0] == "a":  # (its fast form writes f' over s, not g)
            prefer = buffer_of.get(root[e.ins[1][1]])
            if any(b is prefer for b in free[key]):
                free[key] = [b for b in free[key] if b is not prefer] + [prefer]
        if free[key]:
            buffer = free[key].pop()
            start = _address(a)
            for m in members[k]:  # the group's arrays, at their offsets in the reused buffer
                arrays[m] = _view_at(buffer, arrays[m], _address(arrays[m]) - start)
            saved += a.nbytes
        else:
            buffer = a
        buffer_of[k] = buffer
        ending.append((last[k], buffer, key))
    spare = [(last, buffer) for last, buffer, _ in ending]  # (free after their last reader)
    spare += [(-1, buffer) for buffers in free.values() for buffer in buffers]
    return saved, spare


def _liveness(
    rec: _Recorder, fused: dict[int, tuple], keep: set[int]
) -> tuple[list[int], dict[int, int], dict[int, int], set[int]]:
    """For the arrays the replay makes: each one's root (the made array whose memory a view
    shares), each root's first and last use (positions in the recording), and the roots
    that must keep their own buffer (outputs, constants, segment results, keyword
    parameters, views of something not made here, and anything held outside the recording)."""
    arrays, origin = rec.arrays, rec.origin
    root = list(range(len(arrays)))
    pinned = set(keep)
    first: dict[int, int] = {}
    last: dict[int, int] = {}

    def find(k: int) -> int:
        while root[k] != k:
            k = root[k]
        return k

    def use(k: int, at: int) -> None:
        k = find(k)
        first.setdefault(k, at)
        last[k] = at

    for at, e in enumerate(rec.entries):
        if e.kind == "view":  # (grouped with the input whose memory it shares)
            xp = _xp_of(arrays[e.out[1]])
            base = next(
                (
                    r[1]
                    for r in e.ins
                    if r[0] == "a" and xp.may_share_memory(arrays[r[1]], arrays[e.out[1]])
                ),
                None,
            )
            if base is None or not isinstance(origin[base], str):
                pinned.add(e.out[1])
            root[e.out[1]] = find(base) if base is not None else e.out[1]
        for v in e.params.values():  # (an array in a parameter is bound as it is: keep it)
            v = getattr(v, "data", v) if isinstance(v, Tensor) else v
            if _is_array(v) and id(v) in rec.slot:
                pinned.add(find(rec.slot[id(v)]))
        if e.kind in ("const", "segment") and e.out is not None:
            pinned.add(find(e.out[1]))
        if at in fused:
            _, slots = fused[at]
            for k in slots:
                if origin[k] in ("made", "view"):
                    use(k, at)
            continue
        if e.kind == "segment":  # (its Python may read any array made so far)
            for k in list(first):
                last[k] = at
            continue
        for r in [*e.ins, e.out]:
            if r is not None and r[0] == "a" and origin[r[1]] in ("made", "view"):
                use(r[1], at)
    for k in keep:
        pinned.add(find(k))
    # an array something outside the recording still holds (``p.grad`` of a parameter with
    # no flat buffer, a module's cache) is read after the replay: keep it too
    gc.collect()  # (the recording's graph, if a cycle still holds it)
    bases = collections.Counter(id(b.base) for b in arrays if getattr(b, "base", None) is not None)
    for k in range(len(arrays)):
        if origin[k] in ("made", "view") and sys.getrefcount(arrays[k]) > 2 + bases[id(arrays[k])]:
            pinned.add(find(k))  # (2: the list, the argument)
    return [find(k) for k in range(len(arrays))], first, last, pinned


def _in_place_ok(e: _Entry, at: int, fused: dict[int, tuple], arrays: list[Any]) -> bool:
    """May this call's result take the buffer of an input it reads last? Yes for an
    activation's backward (elementwise, its f' made apart) and for any call the replay runs
    as the backend's method and copies in; not for the NumPy calls writing with ``out=``."""
    if at in fused or e.kind != "made":
        return False
    return e.name == "activation_backward" or _numpy_in_place(e, arrays, {}, at) is None


# ---------------------------------------------------------------------- fills written over
def _plus_zero(out: Any) -> None:
    """out <- out + 0, in place: -0.0 becomes +0.0, every other value (NaN too) stays."""
    _xp_of(out).add(out, 0.0, out=out)


def _drop_fills(rec: _Recorder) -> tuple[int, int]:
    """Drop each fill of a buffer whose every element the step writes over before anything
    reads it (``zero_grad(set_to_none=False)`` then the sweep's gradient writes), in place in
    ``rec.entries``. A GEMM or sum that accumulated into the zeros (beta = 1) then overwrites
    (beta = 0) where that writes the same bits: 0 + x is x exactly but for x = -0.0 (eager
    writes +0.0), so each is first run both ways on its recorded operands with signed zeros
    in them (``_overwriting``). Returns (fills dropped, accumulations made overwrites)."""
    entries, arrays = rec.entries, rec.arrays
    plan: dict[int, list[_Entry]] = {}
    for f, e in enumerate(entries):
        target = _filled(e, arrays)
        writes = None if target is None else _writes_over(entries, arrays, f, target)
        if writes is None or any(j in plan for j, _ in writes):
            continue
        if any(acc for _, acc in writes) and not _writes_zeros(e, target):
            continue  # (adding to a fill of another value is not an overwrite)
        steps = {j: _overwriting(entries[j], arrays) for j, acc in writes if acc}
        if any(s is None for s in steps.values()):
            continue  # (a GEMM whose overwrite is not bit for bit its accumulation here)
        plan[f] = []
        plan.update(steps)  # type: ignore[arg-type]
    rec.entries = [x for i, e in enumerate(entries) for x in plan.get(i, [e])]
    rec.dropped = (sum(not v for v in plan.values()), sum(bool(v) for v in plan.values()))
    return rec.dropped


def _filled(e: _Entry, arrays: list[Any]) -> Any:
    """The contiguous buffer a recorded fill writes (zero_grad's 'fill'), else None."""
    if (
        e.kind != "into"
        or e.name != "fill"
        or len(e.ins) != 1
        or e.ins[0][0] != "a"
        or any(isinstance(v, _CHANGING) or _is_array(v) for v in e.params.values())
    ):
        return None
    target = arrays[e.ins[0][1]]
    return target if target.flags.c_contiguous and target.size else None


def _writes_zeros(e: _Entry, target: Any) -> bool:
    """Does the fill write +0.0 (every bit clear)? Run once on a NaN-filled twin."""
    probe = _xp_of(target).full(target.shape, np.nan, target.dtype)
    e.fn(probe, **e.params)
    return not probe.view(np.uint8).any()


def _bounds(a: Any) -> tuple[int, int]:
    """[first byte, past the last byte) that ``a`` may touch."""
    lo = hi = _address(a)
    for n, s in zip(a.shape, a.strides):
        lo, hi = lo + min(0, s * (n - 1)), hi + max(0, s * (n - 1))
    return lo, hi + a.itemsize


def _writes_over(
    entries: list[_Entry], arrays: list[Any], f: int, target: Any
) -> list[tuple[int, bool]] | None:
    """[(entry index, accumulates?)] of the GEMMs and sums after the fill at ``f`` that write
    every byte of ``target`` once, each a contiguous range nothing has touched since the
    fill, with no call between reading a range not yet written; None if there are none such
    (a segment, a reader, any other writer of the unwritten part)."""
    lo, hi = _bounds(target)
    todo = [(lo, hi)]  # the unwritten ranges
    writes: list[tuple[int, bool]] = []

    def unwritten(a: Any) -> bool:
        alo, ahi = _bounds(a)
        return any(alo < b and c < ahi for c, b in todo)

    for j in range(f + 1, len(entries)):
        w = entries[j]
        if w.kind in ("view", "const"):
            continue  # (nothing runs: a view's later readers are seen where they read)
        if w.kind == "segment":
            return None
        reads = [arrays[r[1]] for r in w.ins if r[0] == "a"]
        reads += [v.data if isinstance(v, Tensor) else v for v in w.params.values()]
        reads = [a for a in reads if _is_array(a)]
        if w.kind == "into" and w.ins and w.ins[0][0] == "a" and unwritten(reads[0]):
            out, reads = reads[0], reads[1:]
            olo, ohi = _bounds(out)
            accumulates = _accumulates(w, out)
            inside = next((k for k, (c, b) in enumerate(todo) if c <= olo and ohi <= b), None)
            if accumulates is None or inside is None or any(unwritten(a) for a in reads):
                return None
            c, b = todo.pop(inside)
            todo[inside:inside] = [r for r in ((c, olo), (ohi, b)) if r[0] < r[1]]
            writes.append((j, accumulates))
            if not todo:
                return writes
            continue
        if any(unwritten(a) for a in reads):
            return None
    return None


def _accumulates(w: _Entry, out: Any) -> bool | None:
    """For a GEMM or sum writing the contiguous ``out``: False if it overwrites (alpha 1,
    beta 0), True if it adds to it (alpha 1, beta 1, a NumPy float32/float64 buffer), else
    None."""
    p = w.params
    if (
        w.fn.__name__ not in ("matmul_into", "sum_into")
        or not out.flags.c_contiguous
        or any(isinstance(v, _CHANGING) for v in p.values())
        or p.get("alpha", 1.0) != 1.0
    ):
        return None
    beta = p.get("beta", 0.0)
    if beta == 0.0:
        return False
    floats = isinstance(out, np.ndarray) and out.dtype.char in "fd"
    return True if beta == 1.0 and floats else None


def _overwriting(w: _Entry, arrays: list[Any]) -> list[_Entry] | None:
    """The entries that overwrite where ``w`` accumulated into zeros: itself with beta 0, if
    both forms write the same bits on the recorded operands with a third of their columns
    -0.0 (every product or term there -0.0, where 0 + (-0.0) and -0.0 part), else a sum
    with +0 after it (equal to 0 + x, addition commuting); None if neither is."""
    if any(r[0] != "a" for r in w.ins):
        return None
    over = _Entry("into", w.name, w.fn, w.ins, {**w.params, "beta": 0.0}, None)
    plus = _Entry("into", "add", _plus_zero, w.ins[:1], {}, None)  # (priced as an add)
    over.site = plus.site = w.site
    out = arrays[w.ins[0][1]]
    ops = [np.array(arrays[r[1]], order="K") for r in w.ins[1:]]
    np.abs(ops[0], out=ops[0])  # (|x| times -0.0 is -0.0, for every x)
    last = ops[-1].swapaxes(-1, -2) if w.params.get("ty") else ops[-1]
    if last.ndim:
        last[..., ::3] = -0.0
    eager, now = np.zeros_like(out), np.full_like(out, np.nan)
    w.fn(eager, *ops, **w.params)
    w.fn(now, *ops, **over.params)
    if np.array_equal(eager.view(np.uint8), now.view(np.uint8)):
        return [over]
    if w.fn.__name__ != "sum_into":
        return None
    _plus_zero(now)
    return [over, plus] if np.array_equal(eager.view(np.uint8), now.view(np.uint8)) else None


def _fold_sgd(rec: _Recorder, keep: set[int]) -> tuple[dict[int, _Entry], list[Any]]:
    """Plain SGD folded into the GEMMs and sums that write its gradient: each one that writes
    a range of the flat gradient G (alpha 1, beta 0) writes instead the parameter's range of
    the flat P, W <- W - lr op(X) op(Y) (BLAS's alpha = -lr, beta = 1), at its place in the
    sweep, as ``SGD(in_backward=True)`` does eagerly; the update itself goes. Only where
    nothing else reads G (no segment before the update, no output over it), the writes cover
    G once, and nothing reads a parameter's range between its write and the update. Returns
    {entry index: its replacement} and the hyperparameters of the groups folded."""
    arrays, entries = rec.arrays, rec.entries
    folds: dict[int, _Entry] = {}
    hypers = []
    for at, e in enumerate(entries):
        flats = _sgd_flats(e, arrays)
        if flats is None:
            continue
        flat_p, flat_g = flats
        writes = _gradient_writes(entries, arrays, at, flat_g)
        segment_before = any(x.kind == "segment" for x in entries[:at])
        outputs = any(_xp_of(flat_g).may_share_memory(arrays[k], flat_g) for k in keep)
        if writes is None or segment_before or outputs:
            continue
        hyper = e.params["hyper"]
        replaced = _steps_in_place(rec, writes, at, flat_p, hyper)
        if not replaced:
            continue
        folds.update(replaced)
        for j, x in enumerate(entries):
            if x.fn is _plus_zero and _xp_of(flat_g).may_share_memory(arrays[x.ins[0][1]], flat_g):
                folds[j] = _Entry("folded", x.name, x.fn, x.ins, x.params, None)
        folds[at] = _Entry("folded", e.name, e.fn, e.ins, e.params, None)
        hypers.append(hyper)
        flat_g[...] = np.nan  # (``p.grad`` is not written by a folded replay: loud if read)
    return folds, hypers


def _sgd_flats(e: _Entry, arrays: list[Any]) -> tuple[Any, Any] | None:
    """(flat P, flat G) of a recorded plain-SGD update (no momentum buffer, hyperparameters
    read at each replay) over contiguous float buffers; None for any other entry."""
    if (
        e.name != "sgd_update"
        or e.kind != "into"
        or len(e.ins) != 3
        or e.ins[2] != ("c", None)
        or any(r[0] != "a" for r in e.ins[:2])
        or not isinstance(e.params.get("hyper"), autodiff.Dynamic)
        or e.params.get("lowp") is not None  # (it writes autocast's copy too: not a GEMM's job)
    ):
        return None
    flat_p, flat_g = arrays[e.ins[0][1]], arrays[e.ins[1][1]]
    if (
        flat_p.flags.c_contiguous
        and flat_g.flags.c_contiguous
        and flat_p.shape == flat_g.shape
        and flat_p.dtype == flat_g.dtype
        and flat_p.dtype.char in "fd"
    ):
        return flat_p, flat_g
    return None


def _gradient_writes(
    entries: list[_Entry], arrays: list[Any], at: int, flat_g: Any
) -> dict[int, tuple[int, int]] | None:
    """{offset in G: (entry index, size)} of the plain GEMMs and sums (alpha 1, beta 0) that
    write G before the update at ``at``, when they are all that touch G and cover it once;
    else None."""
    xp = _xp_of(flat_g)

    def reads(r: tuple) -> bool:
        return r[0] == "a" and xp.may_share_memory(arrays[r[1]], flat_g)

    writes = {}
    for j, w in enumerate(entries):
        if j == at or w.fn is _plus_zero or not any(reads(r) for r in w.ins):
            continue  # (a +0 after a sum into G: G goes unwritten when folded)
        target = arrays[w.ins[0][1]] if w.ins[0][0] == "a" else None
        if (
            j > at
            or w.kind != "into"
            or w.name not in ("matmul", "sum")
            or any(reads(r) for r in w.ins[1:])
            or target is None
            or not target.flags.c_contiguous
            or isinstance(w.params.get("alpha"), _CHANGING)
            or isinstance(w.params.get("beta"), _CHANGING)
            or w.params.get("alpha", 1.0) != 1.0
            or w.params.get("beta", 0.0) != 0.0
        ):
            return None
        writes[(_address(target) - _address(flat_g)) // flat_g.itemsize] = (j, target.size)
    covered = 0
    for offset in sorted(writes):
        covered = covered + writes[offset][1] if offset == covered else -1
    return writes if writes and covered == flat_g.size else None


def _steps_in_place(
    rec: _Recorder, writes: dict[int, tuple[int, int]], at: int, flat_p: Any, hyper: Any
) -> dict[int, _Entry] | None:
    """Each gradient write of ``writes`` turned into the step of its parameter's range of P
    (alpha = -lr, read at each replay; beta = 1); None if something reads or writes a
    parameter between its write and the update (it would see the new value)."""
    arrays, entries = rec.arrays, rec.entries
    xp = _xp_of(flat_p)
    p_flat = flat_p.reshape(-1)
    alpha = autodiff.Live(-float(hyper.fn().lr), lambda h=hyper: -float(h.fn().lr))
    replaced = {}
    for offset, (j, size) in writes.items():
        w = entries[j]
        param = p_flat[offset : offset + size].reshape(arrays[w.ins[0][1]].shape)
        if any(
            r[0] == "a" and xp.may_share_memory(arrays[r[1]], param)
            for x in entries[j + 1 : at]
            for r in x.ins
        ):
            return None
        slot = rec._add(param, ("external", _describe(param)))
        step = _Entry("into", w.name, w.fn, [("a", slot), *w.ins[1:]], dict(w.params), None)
        step.params.update(alpha=alpha, beta=1.0)
        step.site = w.site
        replaced[j] = step
    return replaced


def _relu_backward(e: _Entry) -> bool:
    return e.name == "activation_backward" and e.params.get("name") == "relu" and e.kind == "made"


def _view_at(buffer: Any, like: Any, offset: int) -> Any:
    """An array laid out as ``like`` at byte ``offset`` into ``buffer`` (a contiguous array)."""
    if isinstance(buffer, np.ndarray):
        return np.ndarray(like.shape, like.dtype, buffer, offset, like.strides)
    import cupy

    return cupy.ndarray(like.shape, like.dtype, buffer.data + offset, like.strides)


def _segment_runner(e: _Entry, rec: _Recorder) -> Callable[[], None]:
    """A segment at replay: the gradients it saw on entry put back, its Python run, and a
    tensor result copied into the recorded one (so what the step returned stays valid)."""
    fn, args, kwargs, grads = e.fn, [r[1] for r in e.ins], e.params, e.seg
    target = rec.arrays[e.out[1]] if e.out is not None else None

    def run() -> None:
        for p, g in grads:
            p.grad = g
        result = fn(*args, **kwargs)
        if target is not None:
            _xp_of(target).copyto(target, result.data)

    return run


# ---------------------------------------------------------------------- the wrapper
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

    def __init__(self, program: _Program, out_spec: Any, out_tensors: list[Tensor]) -> None:
        self.layout = autodiff.LAYOUT[0]  # (replaced arrays since: record again)
        self.program = program
        self.out_spec = out_spec
        self.out_tensors = out_tensors


class CapturedStep:
    """A step function recorded once per input signature and replayed after; see the module
    docstring for the contract. ``calls`` counts calls, ``replays`` those replayed."""

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
            _compare(pending[0], rec, self.name)
            _compare_returns(_flatten(pending[4], []), out_spec, self.name)
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
        self._captures[key] = _Capture(program, out_spec, owned)
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
