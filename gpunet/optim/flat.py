"""Flat parameters: the parameters of one (device, dtype) as views into one contiguous array,
their gradients in a second, and each optimizer buffer (momentum, Adam's moments) in a third,
fourth..., all with the same layout. An optimizer step is then one fused pass over the flat
arrays (one kernel on a GPU) instead of one small launch per parameter.

A parameter's ``data`` becomes its view of ``FlatBuffer.data``, and its ``grad_buffer`` its
view of ``FlatBuffer.grad``: backward writes the gradient there (a weight's dW = X^T dY GEMM
writes it directly). A gradient made elsewhere (by a primitive with no in-place rule, or set
by hand) is copied in by ``gather_grads``, which points ``p.grad`` at the view, so a second
gather (clipping, then stepping) is free. The gradient array is made when first needed: for
an optimizer that steps inside backward (``grad_buffers=False``), never.

Step counts (Adam's, momentum SGD's) live on the device too, one int64 per parameter in
``counts``, and the fused update advances them (unless a loss scaler skips the step), so the
host never reads them in a step. Which parameters share a count the host knows without
reading them: each has a cohort key, and the parameters that take part in a step get a new
key made from their old one, so equal keys mean equal histories, hence equal counts.

Under autocast a FlatBuffer also keeps a low-precision copy of ``data`` (``lowp``: bfloat16 or
float16, made when autocast first asks, so float32 training pays nothing), which the fused
update writes in the same pass as the parameters: autocast's GEMMs read a parameter's slice of
it instead of casting the weight. A slice is used only when it is proved current: the update
wrote it at the parameter's present version (``Tensor._version``) and ``p.data`` is still its
view. Every write of a parameter's values outside the update goes through
``autodiff.bump_version`` (in-place ops do; ``Module.load_state_dict``, ``gpunet.load`` and
the data-parallel broadcasts call it), which also marks the copy stale here
(``_param_written``) and makes a capture that read it record again; re-adopting a replaced
``p.data`` (``sync_params``) marks it stale itself.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any

from .. import autodiff, dtypes
from ..autodiff import call, layout_changed
from ..backend.updates import state_dtype
from ..tensor import Tensor

Array = Any

_COHORTS = itertools.count(1)  # fresh cohort keys (a count known on the host is ("n", count))

# id(param) -> (weakref to param, weakref to its FlatBuffer, its index there): lets
# clip_grad_norm_, which is handed only parameters, find their flat gradient array.
_OWNER: dict[int, tuple[weakref.ref, weakref.ref, int]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    """Drop a dead parameter's entry (its id may be reused)."""
    entry = _OWNER.get(key)
    if entry is not None and entry[0] is ref:
        del _OWNER[key]


def flat_of(p: Tensor) -> tuple[FlatBuffer, int] | None:
    """The FlatBuffer holding ``p`` and p's index in it, if an optimizer packed it."""
    entry = _OWNER.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    flat = entry[1]()
    if flat is None or flat.params[entry[2]] is not p:
        return None
    return flat, entry[2]


class FlatBuffer:
    """Parameters of one device and dtype packed, in order, into one 1-d array."""

    def __init__(self, params: list[Tensor], grad_buffers: bool = True) -> None:
        self.params = params
        self.backend = params[0]._backend
        self.dtype = params[0].dtype
        self.shapes = [p.shape for p in params]
        self.offsets: list[int] = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.offsets.append(total)
        self.size = total
        layout_changed()  # (the parameters' arrays are about to become views of new ones)
        self.data = self.backend.zeros((total,), self.dtype)
        self.views = [self.view(self.data, i) for i in range(len(params))]
        self._grad: Array | None = None
        self._grad_views: list[Array] = []
        self.buffers: dict[str, Array] = {}
        self._counts: Array | None = None
        self._count_views: list[Array] = []
        self._count_slices: dict[tuple[int, int], Array] = {}
        self.cohorts: list[Any] = [("n", 0)] * len(params)
        self.lowp: Array | None = None  # autocast's low-precision copy of ``data``, made lazily
        self._lowp_at: list[int | None] = []  # each one's version when the update wrote it
        self._lowp_views: list[Array] = []
        self._lowp_spans: dict[tuple[int, int], Array] = {}
        for i, p in enumerate(params):
            self.views[i][...] = p.data
            p.data = self.views[i]
            p.grad_buffer = self.grad_views[i] if grad_buffers else None
            _OWNER[id(p)] = (
                weakref.ref(p, functools.partial(_forget, id(p))),
                weakref.ref(self),
                i,
            )

    @property
    def grad(self) -> Array:
        """The flat gradient array, made when first needed (an optimizer stepping inside
        backward never needs it, and saves its memory)."""
        if self._grad is None:
            self._grad = self.backend.zeros((self.size,), self.dtype)
            self._grad_views = [self.view(self._grad, i) for i in range(len(self.params))]
        return self._grad

    @property
    def grad_views(self) -> list[Array]:
        """Each parameter's view of ``grad``, in the parameter's shape."""
        self.grad  # noqa: B018 (made on first use)
        return self._grad_views

    def view(self, flat: Array, i: int) -> Array:
        """Parameter i's slice of a flat array, in the parameter's shape."""
        return self.backend.xp.reshape(flat[self.offsets[i] : self.offsets[i + 1]], self.shapes[i])

    def buffer(self, name: str) -> Array:
        """The flat optimizer buffer ``name`` (zeros when first asked for), in ``state_dtype``:
        float32 for float16 parameters."""
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = self.backend.zeros((self.size,), state_dtype(self.dtype))
        return buf

    @property
    def counts(self) -> Array:
        """The parameters' step counts, int64, one each, made (zeros) when first needed."""
        if self._counts is None:
            self._counts = self.backend.zeros((len(self.params),), dtypes.int64)
            self._count_views = [
                self.backend.xp.reshape(self._counts[i : i + 1], ())
                for i in range(len(self.params))
            ]
        return self._counts

    def count_view(self, i: int) -> Array:
        """Parameter i's step count, a 0-d view of ``counts`` (its ``state["step"]``)."""
        self.counts  # noqa: B018 (made on first use)
        return self._count_views[i]

    def set_count(self, i: int, count: int) -> None:
        """Parameter i's step count from the host (a loaded state), with the key of its value."""
        self.count_view(i)[...] = count
        self.cohorts[i] = ("n", count)

    def step_spans(self, indices: list[int]) -> list[tuple[int, int, Array]]:
        """The contiguous flat ranges (start, stop, counts) of ascending parameter ``indices``
        that share a step count, for a step they all take: ``counts`` is their slice of
        ``counts`` (the same array object each time, so a capture sees one parameter), which
        the update advances. Each parameter's cohort key moves on with the step."""
        counts, keys = self.counts, self.cohorts
        n = len(keys)
        if len(indices) == n and keys.count(keys[0]) == n:  # (the usual step: one span)
            self.cohorts = [next(_COHORTS)] * n
            return [(0, self.size, self._count_slice(counts, 0, n - 1))]
        fresh: dict[Any, int] = {}
        parts = len(set(keys))
        for i in indices:
            keys[i] = fresh.setdefault(keys[i], next(_COHORTS))
        if len(set(keys)) != parts:  # a cohort parted: a captured update over all of it would
            layout_changed()  # give some the others' count, so captures record again
        runs: list[list[Any]] = []  # [first, last, key]: parameters sharing one count
        for i in indices:
            if runs and runs[-1][1] == i - 1 and runs[-1][2] == keys[i]:
                runs[-1][1] = i
            else:
                runs.append([i, i, keys[i]])
        return [
            (self.offsets[first], self.offsets[last + 1], self._count_slice(counts, first, last))
            for first, last, _ in runs
        ]

    def _count_slice(self, counts: Array, first: int, last: int) -> Array:
        """counts[first : last + 1], the same object each time it is asked for."""
        view = self._count_slices.get((first, last))
        if view is None:
            view = self._count_slices[first, last] = counts[first : last + 1]
        return view

    # ------------------------------------------------------------ the low-precision copy
    def lowp_view(self, i: int, dtype: Any) -> Array | None:
        """Parameter i's copy in ``dtype`` when it is current (the update wrote it at the
        parameter's present version, and ``p.data`` is still the flat view), else None. The
        first ask for a dtype makes the copy (stale until the next update writes it). A
        parameter that backward may update itself (``in_backward``) never reads it."""
        lowp = self.lowp
        if lowp is None or lowp.dtype != dtype:
            self._make_lowp(dtype)
            return None
        at, p = self._lowp_at[i], self.params[i]
        if at is None or at != getattr(p, "_version", -1) or p.data is not self.views[i]:
            return None
        return None if p.in_backward is not None else self._lowp_views[i]

    def _make_lowp(self, dtype: Any) -> None:
        """A fresh, stale copy in ``dtype`` (a second dtype replaces the first)."""
        layout_changed()  # (a captured update writes one more array now: record again)
        self.lowp = self.backend.zeros((self.size,), dtype)
        self._lowp_views = [self.view(self.lowp, i) for i in range(len(self.params))]
        self._lowp_at = [None] * len(self.params)
        self._lowp_spans = {}
        if _param_written not in autodiff.WRITE_HOOKS:
            autodiff.WRITE_HOOKS.append(_param_written)

    def lowp_span(self, start: int, stop: int) -> Array:
        """lowp[start:stop] for an update to write, the same object each time (a capture
        compares the update's keyword arrays by identity)."""
        span = self._lowp_spans.get((start, stop))
        if span is None:
            span = self._lowp_spans[start, stop] = self.lowp[start:stop]  # type: ignore[index]
        return span

    def lowp_written(self, indices: list[int]) -> None:
        """The update wrote the copies of parameters ``indices``: current at their versions."""
        at, params, fresh = self._lowp_at, self.params, False
        for i in indices:
            fresh = fresh or at[i] is None
            at[i] = getattr(params[i], "_version", -1)
        if fresh:  # (a capture that cast these weights records again, reading the copy)
            layout_changed()

    def lowp_stale(self, i: int) -> None:
        """Parameter i was written outside the update: its copy is stale until the next one."""
        if self._lowp_at and self._lowp_at[i] is not None:
            self._lowp_at[i] = None
            layout_changed()  # (a capture reading the copy must cast again: record again)

    def sync_params(self) -> None:
        """Re-adopt parameters whose ``data`` was replaced (``p.data = ...``) since packing:
        their new values are copied into the flat array and ``p.data`` is its view again."""
        for i, p in enumerate(self.params):
            if p.data is not self.views[i]:
                if (
                    p.shape != self.shapes[i]
                    or p.dtype != self.dtype
                    or p._backend is not self.backend
                ):
                    raise ValueError(
                        f"a parameter changed from {self.backend.device} {self.dtype} "
                        f"{self.shapes[i]} to {p.device} {p.dtype} {p.shape} after it was given "
                        "to the optimizer; make the optimizer after moving the model"
                    )
                self.views[i][...] = p.data
                p.data = self.views[i]
                self.lowp_stale(i)  # (new values, and p.data is the view again)

    def gather_grads(self, indices: list[int]) -> None:
        """Copy the gradients of parameters ``indices`` into the flat gradient array and make
        each ``p.grad`` its view (a gradient already there is not copied again)."""
        for i in indices:
            p = self.params[i]
            g = p.grad
            if g.data is not self.grad_views[i]:
                call("copy", _copy_into, self.grad_views[i], g.data)
                p.grad = Tensor._wrap(self.grad_views[i], self.backend)

    def spans(self, indices: list[int], keys: list[Any]) -> list[tuple[int, int, Any]]:
        """Merge ascending parameter ``indices`` into contiguous flat ranges (start, stop, key)
        of neighbours sharing a key: with every parameter present and one key, one range."""
        out: list[tuple[int, int, Any]] = []
        prev = None
        for i, key in zip(indices, keys):
            if out and prev == i - 1 and out[-1][2] == key:
                out[-1] = (out[-1][0], self.offsets[i + 1], key)
            else:
                out.append((self.offsets[i], self.offsets[i + 1], key))
            prev = i
        return out


def _param_written(x: Tensor) -> None:
    """``autodiff.bump_version``'s hook: a packed parameter's low-precision copy is stale."""
    entry = flat_of(x)
    if entry is not None:
        entry[0].lowp_stale(entry[1])


def _copy_into(out: Array, x: Array) -> None:
    """out <- x, in place (a gradient into the flat gradient array)."""
    out[...] = x
