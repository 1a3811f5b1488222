"""What a capture hears and how two recordings are compared: each backend call of one eager
run of the step becomes an ``_Entry`` (``_Recorder``, handed the calls by ``autodiff.apply``
and ``autodiff.call``), and a signature's two recordings must agree call by call or
``CaptureError`` names the first difference (Python control flow that depends on values is
never frozen silently)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import autodiff
from ..autodiff import CAPTURE, STATE, CaptureError, user_site
from ..tensor import Tensor


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
        self.first = True  # a signature's first recording: a third may replace it (RecordAgain)
        # id(leaf) -> leaf, for each whose ``.grad`` the step set (the sweep, zero_grad): a
        # replay sets them as this recording left them (it runs no Python that would)
        self.grads_set: dict[int, Any] = {}
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


class RecordAgain(Exception):
    """The two recordings differ where one touches gradients the step zero-fills: at the
    first call they were None (``zero_grad(set_to_none=False)`` fills the flat buffer but keeps
    None; ``Module.zero_grad`` fills only those that exist) or arrays the optimizer has
    replaced since (``load_state_dict``), and backward made or added them otherwise. A third
    recording, the gradients as the second left them, is compared with the second."""


def _record_again(r1: _Recorder, r2: _Recorder, i: int, again: bool) -> None:
    """Raise ``RecordAgain`` where ``again`` and call ``i`` of either recording is a fill or
    touches what a fill before it wrote."""
    if again and (_touches_filled(r1, i) or _touches_filled(r2, i)):
        raise RecordAgain


def _touches_filled(rec: _Recorder, i: int) -> bool:
    """Does call ``i`` of ``rec`` touch memory a fill of the step writes (itself; one before
    it; one after it, which the call before left: ``zero_grad`` as the step's last line)?
    (``Module.zero_grad`` fills only the gradients that exist: none at a first call.)"""
    if i >= len(rec.entries):
        return False
    mine = [rec.arrays[r[1]] for r in rec.entries[i].ins if r[0] == "a"]
    filled = [
        rec.arrays[e.ins[0][1]]
        for e in rec.entries
        if e.name == "fill" and e.kind == "into" and e.ins and e.ins[0][0] == "a"
    ]
    return any(_xp_of(a).may_share_memory(a, f) for a in mine for f in filled)


def _compare(r1: _Recorder, r2: _Recorder, step_name: str, again: bool = False) -> None:
    """Raise ``CaptureError`` at the first call where the two recordings differ (``again``:
    ``RecordAgain`` where the second touches gradients it zero-filled there)."""
    n = max(len(r1.entries), len(r2.entries))
    for i in range(n):
        if i >= len(r1.entries) or i >= len(r2.entries):
            _record_again(r1, r2, i, again)
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
            _record_again(r1, r2, i, again)
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
