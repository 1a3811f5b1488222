"""The replay: the second recording as a launch list. Before it is generated, the
recording's intermediates are planned by liveness: one whose last reader has run gives its
buffer to a later one of the same size and dtype, so a replay holds no more than the eager
step's peak.

On the CPU the replay is a generated straight-line function over the recorded calls (a
launch list). On CuPy it is the same list of launches until the first replay, which captures
it as one CUDA graph, kept only if it matches the list bit for bit on its first two replays
(``backend/cuda_graph.py``); a call whose host scalars change per step, a Python segment or
a random draw keeps it a launch list. The ``repr`` says which and why.
"""

from __future__ import annotations

import collections
import gc
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import autodiff
from ..backend import cuda_graph
from ..tensor import Tensor
from .passes import _fold_sgd
from .recording import _CHANGING, _address, _Entry, _is_array, _Recorder, _xp_of


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
        # (it also writes autocast's copy, or reads the loss scaler's 1/scale and flag)
        or any(e.params.get(k) is not None for k in ("lowp", "grad_scale", "found_inf"))
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
    index: (method, (loss, grad, logits, labels, g) slots)}. Only on NumPy's own float
    dtypes: the two methods compute bfloat16 through float32, which the fused one does not."""
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
            or arrays[e.ins[0][1]].dtype.char not in "efd"
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
