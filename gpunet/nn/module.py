"""Module and Parameter, with PyTorch's names and behaviour.

A ``Module`` registers what is assigned to it: a ``Parameter`` becomes one of its parameters, a
``Module`` one of its children, in assignment order, so ``named_parameters()`` yields
``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ... as PyTorch does. Registered values also stay
in the instance ``__dict__``, so reading ``self.weight`` in ``forward`` is a plain attribute
lookup.

``Parameter(data)`` is a leaf ``Tensor`` subclass with ``requires_grad=True``, as in PyTorch;
ops on it return plain tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import dtypes, ops
from ..autodiff import CAPTURE, STATE, bump_version, call, layout_changed
from ..backend import Device, get_backend
from ..creation import tensor as _new_tensor
from ..tensor import Tensor


class Parameter(Tensor):
    """``Parameter(data, requires_grad=True)``: a leaf tensor a Module registers as learnable.

    ``data`` may be a Tensor (its array is shared, not copied), a NumPy/CuPy array or nested
    lists (copied, as ``gpunet.tensor`` does).
    """

    __slots__ = ()

    def __new__(cls, data: Any = None, requires_grad: bool = True) -> Parameter:
        if data is None:
            data = np.zeros((0,), dtypes.DEFAULT_FLOAT)
        src = data if isinstance(data, Tensor) else _new_tensor(data)
        p = object.__new__(cls)
        p.data, p._backend, p._requires_grad, p._node = src.data, src._backend, False, None
        p.grad = None
        p.requires_grad = requires_grad
        return p

    def __init__(self, data: Any = None, requires_grad: bool = True) -> None:
        pass  # __new__ did the work; Tensor.__init__ must not run again

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    def __reduce__(self) -> tuple:
        return (_rebuild_parameter, (self.numpy(), str(self.device), self._requires_grad))


def _rebuild_parameter(values: np.ndarray, device: str, requires_grad: bool) -> Parameter:
    return Parameter(_new_tensor(values, device=device), requires_grad)


class _IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class _Training:
    """``Module.training``, kept in the instance ``__dict__``; a read while a capture records
    is told to the recording (``gpunet.capture`` guards its replays on the value read), as
    is a write (a mode the step sets itself is not a guard)."""

    def __get__(self, m: Module | None, owner: type | None = None) -> Any:
        if m is None:
            return self
        try:
            value = m.__dict__["training"]
        except KeyError:  # (Module.__init__ not called: as a plain attribute would say)
            raise AttributeError(
                f"'{type(m).__name__}' object has no attribute 'training'"
            ) from None
        if STATE.flags & CAPTURE:
            STATE.recorder.read_training(m, value)
        return value

    def __set__(self, m: Module, value: bool) -> None:
        if STATE.flags & CAPTURE:
            STATE.recorder.wrote_training(m)
        m.__dict__["training"] = value


class Module:
    """Base class of every layer: subclasses set parameters and children in ``__init__`` and
    compute in ``forward``; ``module(x)`` calls ``forward(x)``."""

    training = _Training()

    def __init__(self) -> None:
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ registration
    def _registries(self) -> tuple[dict, dict, dict]:
        try:
            return self._parameters, self._buffers, self._modules
        except AttributeError:
            raise AttributeError(
                f"cannot assign to {type(self).__name__} before Module.__init__() is called; "
                "call super().__init__() first in __init__"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        params, buffers, modules = self._registries()
        if value is not None and (
            (name in params and not isinstance(value, Parameter))
            or (name in modules and not isinstance(value, Module))
        ):  # (PyTorch's rule: it would leave parameters() and state_dict() without a word)
            what = "parameter" if name in params else "child"
            hint = (
                f"wrap it, nn.Parameter(value), or copy into it under gpunet.no_grad(): "
                f"{name}[...] = value"
                if what == "parameter"
                else "assign a Module or None, or del the child first"
            )
            raise TypeError(
                f"{type(self).__name__}: cannot assign "
                f"{'a Tensor' if isinstance(value, Tensor) else type(value).__name__} as "
                f"{what} {name!r}; {hint}"
            )
        if isinstance(value, Parameter):
            kind: dict | None = params
        elif isinstance(value, Module):
            kind = modules
        elif name in buffers and (value is None or isinstance(value, Tensor)):
            kind = buffers
        elif value is None and (name in params or name in modules):
            kind = params if name in params else modules  # declared, empty (PyTorch's rule)
        else:
            kind = None
        for registry in (params, buffers, modules):
            if registry is not kind:
                registry.pop(name, None)
        if kind is not None:
            kind[name] = value  # a reassigned name keeps its place in the order
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for registry in self._registries():
            registry.pop(name, None)
        object.__delattr__(self, name)

    def _check_name(self, kind: str, name: str, registry: dict) -> None:
        """A name that would break the module later is refused now (PyTorch's rules): a
        dotted one (state_dict's keys are dotted paths) or one taken by another attribute."""
        where = type(self).__name__
        if not isinstance(name, str) or "." in name or not name:
            raise KeyError(f"{where}: a {kind}'s name cannot contain '.' or be empty, got {name!r}")
        if name not in registry and hasattr(self, name):
            raise KeyError(
                f"{where}: {name!r} is already an attribute; give the {kind} another name"
            )

    def register_parameter(self, name: str, param: Tensor | None) -> None:
        """Register ``param`` (or ``None``, a declared but absent parameter such as a bias)."""
        self._check_name("parameter", name, self._registries()[0])
        if param is not None and not isinstance(param, Parameter):
            param = Parameter(param)
        object.__setattr__(self, name, param)
        if param is None:
            self._parameters.pop(name, None)
        else:
            self._parameters[name] = param

    def register_buffer(self, name: str, value: Tensor | None) -> None:
        """A tensor that is part of the state (``state_dict``, ``to``) but not learnable."""
        self._check_name("buffer", name, self._registries()[1])
        if value is not None and not isinstance(value, Tensor):  # (state_dict would fail on it)
            raise TypeError(
                f"{type(self).__name__}: buffer {name!r} must be a Tensor or None, got "
                f"{type(value).__name__}; wrap it, e.g. gpunet.tensor(value)"
            )
        object.__setattr__(self, name, value)
        self._buffers[name] = value

    def add_module(self, name: str, module: Module | None) -> None:
        """Register ``module`` (or ``None``, a declared but absent child) as child ``name``."""
        where = f"{type(self).__name__}: "
        if module is not None and not isinstance(module, Module):  # (else it fails in forward)
            raise TypeError(
                f"{where}child {name} is of type {type(module).__name__!r}, not a Module; wrap "
                "a function in a Module subclass whose forward calls it"
            )
        self._check_name("child", name, self._registries()[2])
        object.__setattr__(self, name, module)
        self._modules[name] = module

    # ------------------------------------------------------------------ traversal
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(
        self, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Module]]:
        """This module and every descendant, depth first, each once (``remove_duplicate``)
        or under each of its names."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if remove_duplicate and id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            kids = [(f"{name}.{n}" if name else n, c) for n, c in m.named_children()]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """(dotted name, parameter) in registration order; a shared parameter appears once
        (``remove_duplicate``) or under each of its names (as ``state_dict`` holds it)."""
        seen: set[int] = set()
        mods = self.named_modules(prefix, remove_duplicate) if recurse else iter([(prefix, self)])
        for mod_name, m in mods:
            for name, p in m._parameters.items():
                if p is None or (remove_duplicate and id(p) in seen):
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(
        self, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        for mod_name, m in self.named_modules(prefix, remove_duplicate):
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    def buffers(self) -> Iterator[Tensor]:
        for _, b in self.named_buffers():
            yield b

    def apply(self, fn: Any) -> Module:
        """Call ``fn(module)`` on every descendant, then on this module (PyTorch's order):
        ``model.apply(init_weights)``."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Module:
        """Training mode (Dropout drops) or, with ``mode=False``, evaluation mode."""
        if not isinstance(mode, (bool, np.bool_)):  # ("False" is truthy: PyTorch refuses it)
            raise ValueError(
                f"{type(self).__name__}.train: mode must be True or False, got {mode!r}"
            )
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        if not isinstance(requires_grad, (bool, np.bool_)):  # ("no" is truthy)
            raise ValueError(
                f"{type(self).__name__}.requires_grad_: requires_grad must be True or False, "
                f"got {requires_grad!r}"
            )
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget accumulated gradients: set them to None, or fill them with zeros in place."""
        for p in self.parameters():
            g = p.grad
            if g is None:
                continue
            if set_to_none:
                if STATE.flags & CAPTURE:  # (a replay sets this .grad as the recording leaves it)
                    STATE.recorder.grads_set[id(p)] = p
                p.grad = None
            elif STATE.flags & CAPTURE:  # (a backend call, so a step capture replays it)
                call("fill", _zero, g.data)
            else:
                g.data[...] = 0

    # ------------------------------------------------------------------ devices and dtypes
    def to(self, *specs: Any, dtype: Any = None, device: Any = None) -> Module:
        """Move every parameter and buffer, in place (the same Tensor objects, so an optimizer
        made before keeps working): ``to("cuda")``, ``to(gpunet.float64)``. Returns self.
        Only floating tensors change dtype."""
        for spec in specs:
            is_device = spec is not None and isinstance(spec, (str, Device))
            given = device if is_device else dtype
            if spec is not None and given is not None:  # (one would silently win)
                show = repr if is_device else lambda v: str(dtypes.as_dtype(v))
                raise TypeError(
                    f"{type(self).__name__}.to: two {'devices' if is_device else 'dtypes'} given "
                    f"({show(spec)} and {show(given)}); give one"
                )
            if is_device:
                device = spec
            elif spec is not None:
                dtype = spec
        dt = None if dtype is None else dtypes.as_dtype(dtype)
        if dt is not None and not dtypes.is_floating(dt):  # (PyTorch's rule; it was a no-op)
            raise TypeError(
                f"{type(self).__name__}.to: parameters are floating point, so the dtype must be "
                f"too (float32, float64, bfloat16, float16), got {dt}"
            )
        backend = None if device is None else get_backend(device)
        for t in [*self.parameters(), *self.buffers()]:
            _move_(t, dt, backend)
            if t.grad is not None:
                _move_(t.grad, dt, backend)
        return self

    def cpu(self) -> Module:
        return self.to("cpu")

    def cuda(self, index: int = 0) -> Module:
        return self.to(f"cuda:{index}")

    def float(self) -> Module:
        return self.to(dtypes.float32)

    def double(self) -> Module:
        return self.to(dtypes.float64)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Every parameter and buffer by dotted name, detached (sharing memory); a shared
        one under each of its names, as PyTorch's."""
        out = {name: p.detach() for name, p in self.named_parameters(remove_duplicate=False)}
        out.update((name, b.detach()) for name, b in self.named_buffers(remove_duplicate=False))
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
        """Copy values into the parameters and buffers in place (converted to each one's dtype
        and device). Every problem is found first and reported together, and nothing changes
        when there is one: missing or unexpected keys (with ``strict``), shape mismatches
        (always)."""
        if not isinstance(state, Mapping):  # (else its items read as unexpected keys)
            raise TypeError(
                f"{type(self).__name__}.load_state_dict: expected a mapping of names to "
                f"tensors (a state_dict()), got {type(state).__name__}"
            )
        own = dict(self.named_parameters(remove_duplicate=False))  # (state_dict's names)
        own.update(self.named_buffers(remove_duplicate=False))
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        values = {}
        problems = []
        for k, t in own.items():
            if k not in state:
                continue
            v = state[k]
            if isinstance(v, Tensor):  # its array when on t's device, else a host copy
                v = v.data if v._backend is t._backend else v.numpy()
            elif not hasattr(v, "shape"):
                v = np.asarray(v)
            if tuple(v.shape) != t.shape:
                problems.append(
                    f"size mismatch for {k}: copying a value of shape {tuple(v.shape)}, "
                    f"the parameter in the current model has shape {t.shape}"
                )
            elif type(v) is not t._backend.array_type or v.dtype != t.dtype:
                # converted now (NumPy, CuPy via .get(), torch, ...): a value that cannot be
                # must fail before any is written
                own_type = type(v) is t._backend.array_type
                host = v if own_type else np.asarray(v.get() if hasattr(v, "get") else v)
                try:
                    v = t._backend.asarray(host, t.dtype)
                except (TypeError, ValueError) as e:
                    what = getattr(v, "dtype", type(v).__name__)
                    problems.append(f"cannot convert {k} ({what}) to {t.dtype}: {e}")
            values[k] = v
        if strict:
            if unexpected:
                keys = ", ".join(repr(k) for k in unexpected)
                problems.insert(0, f"Unexpected key(s) in state_dict: {keys}")
            if missing:
                keys = ", ".join(repr(k) for k in missing)
                problems.insert(0, f"Missing key(s) in state_dict: {keys}")
        if problems:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                + "\n\t".join(problems)
            )
        for k, v in values.items():
            t = own[k]
            t.data[...] = v  # in place: views of the data (an optimizer's flat buffer) see it
            bump_version(t)  # (written: autocast's low-precision copy of it is stale)
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ copying
    def __deepcopy__(self, memo: dict[int, Any]) -> Module:
        """``copy.deepcopy(model)``: new arrays for every tensor attribute of every module
        (parameters stay Parameters, gradients are copied), shared structure kept shared.
        Tensors are copied here because a Tensor itself cannot be deep-copied (its backend
        holds the array module)."""
        for m in self.modules():
            for value in m.__dict__.values():
                if isinstance(value, Tensor) and id(value) not in memo:
                    memo[id(value)] = _copy_tensor(value)
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            object.__setattr__(new, name, copy.deepcopy(value, memo))
        return new

    # ------------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        """The text inside the parentheses of this module's own line."""
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        body = "\n  ".join(([extra] if extra else []) + lines)
        return f"{type(self).__name__}(\n  {body}\n)"


def _move_(t: Tensor, dt: np.dtype | None, backend: Any) -> None:
    """Change a tensor's dtype and device in place (the object stays; its array is replaced)."""
    layout_changed()
    if dt is not None and t.dtype != dt and dtypes.is_floating(t.dtype):
        t.data = ops.cast(t.detach(), dt).data
    if backend is not None and backend is not t._backend:
        moved = t.detach().to(backend.device)
        t.data, t._backend = moved.data, moved._backend


def _copy_tensor(t: Tensor) -> Tensor:
    """A leaf with a copy of t's array (and of its gradient), a Parameter if t is one."""
    out = ops.copy(t.detach())
    if isinstance(t, Parameter):
        out = Parameter(out, t.requires_grad)
    else:
        out.requires_grad = t.requires_grad
    if t.grad is not None:
        out.grad = ops.copy(t.grad.detach())
    return out


def _zero(out: Any) -> None:
    """out <- 0, in place."""
    out[...] = 0
