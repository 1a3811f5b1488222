"""Optimizer: PyTorch's interface (``param_groups``, ``state``, ``zero_grad``, ``step``,
``state_dict``) over flat parameters (``flat.py``).

The optimizer packs its parameters into one FlatBuffer per (device, dtype), groups in order,
so each group's parameters are one contiguous range there. A step copies the new gradients in
and hands each range to the backend's fused update (``sgd_update``, ``adam_update``): one pass
over the whole model when every parameter has a gradient and they share one step count.
Parameters whose ``grad`` is None are skipped and their state left alone, as in PyTorch.

A subclass may instead have backward apply its update (``_in_backward``: each parameter's
``in_backward`` step), with no gradient array at all (``_grad_buffers``): SGD(in_backward=True).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from .. import dtypes
from ..autodiff import CAPTURE, STATE, call, enable_grad, layout_changed, segment
from ..tensor import Tensor
from .flat import FlatBuffer

Array = Any


class Optimizer:
    """The base: subclasses give ``defaults`` and ``_update(group, flat, indices)``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any]):
        self.defaults = defaults
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[Tensor, dict[str, Any]] = {}
        self._flats: list[FlatBuffer] = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self._add_group(group)
        self._pack()

    def __repr__(self) -> str:
        lines = [type(self).__name__ + " ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join([*lines, ")"])

    # ---------------------------------------------------------------- groups and packing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (its own hyperparameters, defaults for the rest); repacks the buffers."""
        self._add_group(param_group)
        self._pack()

    def _add_group(self, group: dict[str, Any]) -> None:
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"cannot optimize a non-leaf tensor (made by {p.grad_fn})")
            if id(p) in seen:
                raise ValueError("a parameter appears more than once among the param groups")
            seen.add(id(p))
        self.param_groups.append(_Group({**self.defaults, **group, "params": params}))

    def _pack(self) -> None:
        """(Re)build one FlatBuffer per (device, dtype), groups in order; state moves along."""
        by_key: dict[tuple, list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                by_key.setdefault((p.device, p.dtype), []).append(p)
        self._flats = [FlatBuffer(ps, self._grad_buffers()) for ps in by_key.values()]
        # Each group's parameters per buffer: (flat, ascending indices there).
        self._members: list[list[tuple[FlatBuffer, list[int]]]] = []
        where = {id(p): (f, i) for f in self._flats for i, p in enumerate(f.params)}
        for group in self.param_groups:
            members: dict[int, tuple[FlatBuffer, list[int]]] = {}
            for p in group["params"]:
                f, i = where[id(p)]
                members.setdefault(id(f), (f, []))[1].append(i)
            self._members.append(list(members.values()))
        for i, group in enumerate(self.param_groups):
            step = self._in_backward(i)
            for p in group["params"]:
                p.in_backward = step  # None (the default): gradients go to .grad
        for p, st in self.state.items():  # buffers from an earlier packing: copy them over
            f, i = where[id(p)]
            for name, value in st.items():
                if name == "step":  # (a host read of an old count: packing is not a step)
                    f.set_count(i, int(value))
                    st[name] = f.count_view(i)
                elif not isinstance(value, (int, float)) and value is not None:
                    view = f.view(f.buffer(name), i)
                    view[...] = _on(f, value)
                    st[name] = view
        self._lr_arrays: dict[tuple[int, int], list[Any]] = {}

    def group_problems(self, groups: list[dict[str, Any]], source: str) -> list[str]:
        """What in saved ``param_groups`` (from ``source``, for the message) this optimizer
        cannot take, beyond their counts and shapes: checked by ``load_state_dict`` and by
        ``gpunet.load`` before anything changes. None here."""
        return []

    def _grad_buffers(self) -> bool:
        """Should backward write gradients into the flat gradient array (``grad_buffer``)?"""
        return True

    def _in_backward(self, index: int) -> Any:
        """The ``in_backward`` step of group ``index``'s parameters: an update backward
        applies in place of storing the gradient (SGD(in_backward=True)), or None."""
        return None

    # ---------------------------------------------------------------- the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: ``grad = None`` (default), or zeros in the flat array."""
        for flat in self._flats:
            if not set_to_none:
                if STATE.flags & CAPTURE:  # (a backend call, so a step capture replays it)
                    call("fill", _zero, flat.grad)
                else:
                    flat.grad[...] = 0
            if STATE.flags & CAPTURE:  # (a replay sets these .grad as the recording leaves them)
                STATE.recorder.grads_set.update((id(p), p) for p in flat.params)
            for i, p in enumerate(flat.params):
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad = Tensor._wrap(flat.grad_views[i], flat.backend)

    # A capture records the step's update calls where the subclass passes what changes
    # between steps as ``Dynamic`` (``_capturable``); otherwise it runs the step again as
    # Python at each replay.
    _capturable = False
    # The ``grad_scale`` and ``found_inf`` arrays of the fused updates, set around ``step()``
    # by ``GradScaler.step`` (1/scale, the overflow flag) where the subclass passes them to its
    # update (``_fused_scaling``).
    _fused_scaling = False
    _loss_scaling: dict[str, Any] | None = None

    def _fused_args(self, flat: FlatBuffer, start: int, stop: int) -> dict[str, Any]:
        """The keywords of this step's fused update of ``flat[start:stop]``: the loss
        scaler's ``grad_scale`` and ``found_inf``, and ``lowp``, the span of the flat's
        low-precision copy for the update to write, once autocast has asked for one."""
        scaling = self._loss_scaling or {}
        if flat.lowp is None:
            return scaling
        return {**scaling, "lowp": flat.lowp_span(start, stop)}

    def _lr(self, group: dict[str, Any], flat: FlatBuffer) -> float | Array:
        """The lr the group's update reads on ``flat``'s device: ``group["lr"]`` itself, or
        with ``capturable`` its one-element float64 array there, written from the host when
        the group's lr has changed since (by a schedule or by hand): one small write per
        change, none per step, and nothing for a replay to read on the host."""
        lr = group["lr"]
        if not group.get("capturable"):
            return lr
        entry = self._lr_arrays.get((id(group), id(flat)))
        if entry is None:
            array = flat.backend.zeros((), dtypes.float64)
            entry = self._lr_arrays[id(group), id(flat)] = [array, None]
        if isinstance(lr, Tensor):  # (PyTorch's tensor lr: its value now, copied on the device)
            _check_tensor_lr(lr, flat)
            entry[0][...] = lr.data
            entry[1] = None
        elif entry[1] is None or entry[1] != lr:
            entry[0][...] = float(lr)
            entry[1] = lr
        return entry[0]

    # (A closure is recorded with the update: its forward and backward are backend calls.)
    @segment(
        lambda self, closure=None: self._all_params(),
        records=lambda self, closure=None: self._capturable,
    )
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        for group, members in zip(self.param_groups, self._members):
            for flat, indices in members:
                live = [i for i in indices if flat.params[i].grad is not None]
                if live:
                    flat.sync_params()
                    flat.gather_grads(live)
                    self._update(group, flat, live)
        return loss

    def _update(self, group: dict[str, Any], flat: FlatBuffer, indices: list[int]) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {name: value}}, "param_groups": [...]}`` as in PyTorch, where a
        parameter's index counts through the groups in order. Buffers are copies."""
        index = {id(p): i for i, p in enumerate(self._all_params())}
        state = {}
        for p, st in self.state.items():
            state[index[id(p)]] = {
                k: int(v)  # (a step count: a host read, as saving is)
                if k == "step"
                else v
                if v is None or isinstance(v, (int, float))
                else p._backend.copy(v)
                for k, v in st.items()
            }
        groups = []
        for group in self.param_groups:
            g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            g["params"] = [index[id(p)] for p in group["params"]]
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters, step counts and buffers saved by ``state_dict``; buffers
        (NumPy, CuPy or Tensors) are copied onto each parameter's device and dtype. Checks
        everything before changing anything."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state has {len(groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"param group {i}: loaded state has {len(saved['params'])} parameters, "
                    f"this optimizer {len(mine['params'])}"
                )
        problems = self.group_problems(groups, "the loaded state")
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        # Saved indices map to ours position by position.
        params = {
            s: p
            for g, m in zip(groups, self.param_groups)
            for s, p in zip(g["params"], m["params"])
        }
        problems = []
        for key, st in state_dict["state"].items():
            p = params.get(int(key))
            if p is None:
                problems.append(f"state for parameter {key}, which no group holds")
                continue
            for name, value in st.items():
                shape = getattr(value, "shape", None)
                if name != "step" and shape is not None and tuple(shape) != p.shape:
                    problems.append(
                        f"parameter {key}: {name} has shape {tuple(shape)}, not {p.shape}"
                    )
        if problems:
            raise ValueError("cannot load optimizer state:\n  " + "\n  ".join(problems))
        for saved, mine in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k == "params":
                    continue
                if isinstance(mine.get(k), Tensor):  # (a Tensor lr: the user's tensor keeps it)
                    mine[k].data[...] = float(v.item() if isinstance(v, Tensor) else v)
                else:
                    mine[k] = copy.deepcopy(v)
        self.state = {}
        for key, st in state_dict["state"].items():
            self.state[params[int(key)]] = new = {}
            for name, value in st.items():
                if name == "step":  # an int, a float, or a 0-d array (torch keeps a tensor)
                    new[name] = int(float(value))
                elif getattr(value, "shape", None) is None:
                    new[name] = value
                else:
                    new[name] = value.data if isinstance(value, Tensor) else value
        self._pack()  # copies the loaded buffers into flat ones (``_pack`` moves state)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]


class _Group(dict):
    """A param group: a dict, whose hyperparameters that decide which calls an update makes
    (SGD's momentum, from 0 or to it; ``in_backward``) make step captures record again when
    set, as a replay reads the others afresh but keeps its calls."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _STRUCTURAL and key in self and self[key] != value:
            layout_changed()
        super().__setitem__(key, value)


_STRUCTURAL = frozenset({"momentum", "in_backward"})


def check_lr(lr: Any, capturable: bool) -> None:
    """An optimizer's ``lr`` when it is made: non-negative, and a Tensor only with
    ``capturable`` (the update reads a tensor's value on the device, as PyTorch's does)."""
    if isinstance(lr, Tensor):
        if not capturable:
            raise ValueError(
                "a Tensor lr needs capturable=True (as in PyTorch); pass a float, or "
                "capturable=True to have each step read the tensor's value on the device"
            )
        if lr.numel() != 1 or not dtypes.is_floating(lr.dtype):
            raise ValueError(f"a Tensor lr must be one floating value, got {lr.dtype} {lr.shape}")
        lr = float(lr.item())
    if lr < 0.0:
        raise ValueError(f"invalid learning rate: {lr}")


def _check_tensor_lr(lr: Tensor, flat: FlatBuffer) -> None:
    """A group's Tensor lr can be read by the update of ``flat``: one value, on its device."""
    if lr.numel() != 1 or lr._backend is not flat.backend:
        raise ValueError(
            f"a Tensor lr must be one value on the parameters' device ({flat.backend.device}), "
            f"got {lr.dtype} {lr.shape} on {lr.device}"
        )


def _zero(out: Array) -> None:
    """out <- 0, in place."""
    out[...] = 0


def _on(flat: FlatBuffer, value: Any) -> Array:
    """``value`` (NumPy, CuPy or a Tensor) as an array that ``flat``'s arrays accept."""
    if isinstance(value, Tensor):
        value = value.data
    if flat.backend.device.type == "cpu" and hasattr(value, "get"):  # CuPy to host
        value = value.get()
    return flat.backend.asarray(value)
