"""Rewrites of a recording before its program is generated. A fill the step writes over
before anything reads it (``zero_grad(set_to_none=False)``) is dropped, the GEMMs and sums
that added into its zeros overwriting instead where that gives the same bits.
``capture(step, fold_sgd=True)`` folds plain SGD's update into the GEMMs and sums that make
its gradient (``SGD(in_backward=True)``'s arithmetic; ``p.grad`` of those parameters then
reads NaN)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import autodiff
from ..tensor import Tensor
from .recording import _CHANGING, _address, _describe, _Entry, _is_array, _Recorder, _xp_of


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
        # (it also writes autocast's copy, or reads the loss scaler's 1/scale and flag)
        or any(e.params.get(k) is not None for k in ("lowp", "grad_scale", "found_inf"))
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
