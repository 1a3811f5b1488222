"""Tensor: an array on a device (NumPy on the CPU, CuPy on a GPU) plus its place on the tape.

``data`` is the raw array. A tensor that needs gradients is either a *leaf* (made by the user,
``_node is None``; ``.grad`` accumulates on it) or the output of a recorded primitive
(``_node`` is that record). Operators and methods call the functions in ``gpunet.ops``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), read at call time only

from . import dtypes
from .backend import ArrayBackend, Device, backend_of

_CAPTURE = 128  # autodiff.CAPTURE: a step capture is recording (host reads raise)

# id -> every live leaf with an ``in_backward`` step (weak: a leaf that is gone leaves it; by
# id, since a WeakSet would compare tensors with ``==``, which is elementwise).
IN_BACKWARD: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def _host_read(what: str) -> None:
    """Refuse ``what``, a read of values to the host, while a step capture records."""
    if gpunet.autodiff.STATE.flags & _CAPTURE:
        gpunet.autodiff.refuse(what)


class RemovableHandle:
    """Returned by ``register_hook``; ``handle.remove()`` unregisters the hook."""

    def __init__(self, hooks: list, hook: Callable) -> None:
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


class Tensor:
    __slots__ = (
        "__weakref__",
        "_backend",
        "_grad_buffer",
        "_hooks",
        "_in_backward",
        "_node",
        "_requires_grad",
        "_version",
        "data",
        "grad",
    )
    __array_ufunc__ = None  # ndarray (op) Tensor defers to Tensor's reflected operator

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        """Wrap a raw NumPy or CuPy array without copying (``gpunet.tensor`` copies)."""
        self._backend: ArrayBackend = backend_of(data)
        self.data = data
        self._requires_grad = False
        self._node = None
        self.grad: Tensor | None = None  # a leaf's accumulated gradient after backward()
        if requires_grad:
            self.requires_grad = True

    @classmethod
    def _wrap(cls, data: Any, backend: ArrayBackend) -> Tensor:
        """The fast constructor used by every primitive: no checks, no copies."""
        t = object.__new__(cls)
        t.data = data
        t._backend = backend
        t._requires_grad = False
        t._node = None
        t.grad = None
        return t

    # ``_hooks`` and ``_version`` (set by an in-place change) are rarely set, so a new tensor
    # leaves their slots empty (one attribute store less per op) and reads fall back.
    # ``grad`` is a plain attribute, always set: it is read on every leaf of every step, where
    # a property costs a Python call.

    @property
    def grad_buffer(self) -> Any:
        """An array of this leaf's shape that backward writes its gradient into, instead of a
        new array, when ``grad`` is None or already that array (then it accumulates in place).

        The optimizers set it to the parameter's view of their flat gradient array, so the
        weight gradient's GEMM writes there and the step needs no copy (nor the page faults
        of a fresh allocation each step). None (the default): a new array each backward.
        """
        entry = getattr(self, "_grad_buffer", None)  # unset on most tensors
        return None if entry is None else entry[0]

    @grad_buffer.setter
    def grad_buffer(self, array: Any) -> None:
        if array is not None and (
            tuple(array.shape) != self.shape or array.dtype != self.data.dtype
        ):
            raise ValueError(
                f"grad_buffer: a {self.dtype} {self.shape} leaf needs a buffer of its dtype and "
                f"shape, got {array.dtype} {tuple(array.shape)}"
            )
        # Kept with a tensor over it, made once: backward hands that tensor to .grad rather
        # than wrapping the buffer anew (25 bytecodes a parameter a step).
        self._grad_buffer = None if array is None else (array, Tensor._wrap(array, self._backend))

    @property
    def in_backward(self) -> Any:
        """This leaf's update taken inside backward in place of storing its gradient g:
        ``data <- alpha g + beta data`` with ``(alpha, beta) = in_backward.alpha_beta()``
        (None from it: inactive, g goes to ``grad`` as usual). ``grad`` stays None.

        ``optim.SGD(..., in_backward=True)`` sets it, giving (-lr, 1 - lr wd): the step
        happens inside backward, and where the leaf's one use is a weight in a GEMM, the step
        is that GEMM (W <- W - lr X^T dY, BLAS's alpha and beta): no gradient array, no
        update pass. None (the default): no update in backward.
        """
        return getattr(self, "_in_backward", None)  # unset on most tensors

    @in_backward.setter
    def in_backward(self, step: Any) -> None:
        if step is not None and self._node is not None:
            raise ValueError("in_backward: only a leaf tensor can take its update in backward")
        self._in_backward = step
        # The live leaves with a step: while there are none, backward counts no uses.
        if step is None:
            IN_BACKWARD.pop(id(self), None)
        else:
            IN_BACKWARD[id(self)] = self

    @property
    def hooks(self) -> list | None:
        return getattr(self, "_hooks", None)  # unset on most tensors

    # ------------------------------------------------------------------ attributes
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        dt = self.data.dtype
        # always a NumPy dtype: array-API namespaces (array_api_strict) have their own objects
        return dt if isinstance(dt, np.dtype) else dtypes.as_dtype(dt)

    @property
    def device(self) -> Device:
        return self._backend.device

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def size(self, dim: int | None = None) -> tuple[int, ...] | int:
        """The shape (PyTorch's ``size()``), or one dimension of it."""
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        n = 1
        for d in self.data.shape:
            n *= d
        return n

    @property
    def T(self) -> Tensor:
        return gpunet.ops.permute(self, tuple(range(self.ndim - 1, -1, -1)))

    @property
    def mT(self) -> Tensor:
        return gpunet.ops.swapaxes(self, -1, -2)

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def grad_fn(self) -> str | None:
        """The name of the primitive that made this tensor, when it was recorded."""
        return None if self._node is None else self._node.prim.name

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if self._node is not None and not value:
            raise RuntimeError(
                "requires_grad can only be turned off on a leaf tensor; this one was made by "
                f"'{self._node.prim.name}'. Use .detach() for a copy outside the graph."
            )
        if value and not dtypes.is_floating(self.dtype):
            raise TypeError(
                f"only floating-point tensors can require gradients, got dtype {self.dtype} "
                f"(shape {self.shape}). Convert first: x.to(gpunet.float32)."
            )
        value = bool(value)
        if value != self._requires_grad and not gpunet.autodiff.STATE.flags & _CAPTURE:
            gpunet.autodiff.layout_changed()  # (a leaf (un)frozen: step captures record again)
        self._requires_grad = value

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        self.requires_grad = requires_grad
        return self

    # ------------------------------------------------------------------ conversion
    def numpy(self) -> np.ndarray:
        """The values as a NumPy array: shares memory on the CPU, copies from a GPU."""
        _host_read("Tensor.numpy()")
        return self._backend.to_numpy(self.data)

    def item(self) -> float | int | bool:
        _host_read("Tensor.item()")
        if self.numel() != 1:
            raise ValueError(
                f"item() needs a tensor with one element, this one has shape {self.shape}"
            )
        return self.numpy().reshape(()).item()

    def tolist(self) -> Any:
        _host_read("Tensor.tolist()")
        return self.numpy().tolist()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        _host_read("np.asarray(tensor)")
        if self.device.type != "cpu":
            raise TypeError(
                f"a tensor on {self.device} cannot become a NumPy array implicitly; "
                "call .numpy() (copies to the host) or .cpu() first"
            )
        arr = np.asarray(self.data)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        return arr.copy() if copy else arr

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.data.__dlpack_device__()

    def to(self, *specs: Any, dtype: Any = None, device: Any = None) -> Tensor:
        """``to("cuda")``, ``to(gpunet.float64)``, ``to("cpu", gpunet.float32)``; differentiable."""
        for spec in specs:
            if isinstance(spec, (str, Device)):
                device = spec
            else:
                dtype = spec
        out = self
        if dtype is not None:
            out = gpunet.ops.cast(out, dtype)
        if device is not None:
            out = gpunet.ops.device_put(out, device)
        return out

    def astype(self, dtype: Any) -> Tensor:
        return gpunet.ops.cast(self, dtype)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self, index: int = 0) -> Tensor:
        return self.to(f"cuda:{index}")

    def float(self) -> Tensor:
        return gpunet.ops.cast(self, dtypes.float32)

    def double(self) -> Tensor:
        return gpunet.ops.cast(self, dtypes.float64)

    def detach(self) -> Tensor:
        """The same data, outside the graph (shares memory)."""
        return Tensor._wrap(self.data, self._backend)

    def clone(self) -> Tensor:
        """A copy of the data; differentiable, like PyTorch's clone."""
        return gpunet.ops.copy(self)

    # ------------------------------------------------------------------ autodiff
    def backward(
        self, gradient: Any = None, retain_graph: bool = False, create_graph: bool = False
    ) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` (chain rule, reverse order)."""
        gpunet.autodiff.backprop(
            [self], [gradient], retain_graph=retain_graph, create_graph=create_graph
        )

    def zero_grad(self) -> None:
        self.grad = None

    def register_hook(self, hook: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
        """Call ``hook(grad)`` when this tensor's gradient is computed; a returned tensor
        replaces the gradient."""
        if not self._requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        owner = self._node if self._node is not None else self
        if getattr(owner, "_hooks", None) is None:
            owner._hooks = []
        owner._hooks.append(hook)
        return RemovableHandle(owner._hooks, hook)

    # ------------------------------------------------------------------ Python protocol
    def __repr__(self) -> str:
        _host_read("printing a tensor")
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(", threshold=200)
        extras = []
        if self.device.type != "cpu":
            extras.append(f"device='{self.device}'")
        if self.dtype != dtypes.float32:
            extras.append(f"dtype={self.dtype}")
        if self._node is not None:
            extras.append(f"grad_fn=<{self._node.prim.name}>")
        elif self._requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + ", ".join([body, *extras]) + ")"

    def __format__(self, spec: str) -> str:
        """f"{loss:.4f}" formats a 0-d tensor's value (PyTorch's rule); "{}" is the repr."""
        if not spec:
            return repr(self)
        if self.ndim == 0:
            return format(self.item(), spec)
        raise TypeError(
            f"format spec {spec!r} given for a tensor of shape {self.shape}: only a 0-d tensor "
            "formats as a number (pick one element, or .item() of a scalar, first)"
        )

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __bool__(self) -> bool:
        _host_read("bool(tensor)")
        return bool(self.item())

    def __float__(self) -> float:
        _host_read("float(tensor)")
        return float(self.item())

    def __int__(self) -> int:
        _host_read("int(tensor)")
        return int(self.item())

    __hash__ = object.__hash__

    def __reduce__(self) -> tuple:
        """Pickle and ``copy.deepcopy`` as (host values, device, requires_grad): a copy is a
        new leaf. (Checkpoints do not use this: they are safetensors, never pickles.)"""
        return (_rebuild, (self.numpy(), str(self.device), self._requires_grad))

    # ------------------------------------------------------------------ operators
    # x + y, x - y, x * y, x / y, x ** y, x @ y, 2 + x and 2 * x are the ops functions
    # themselves, installed at the end of gpunet/ops.py (one Python frame less on the hottest
    # path).
    def __rsub__(self, other: Any) -> Tensor:
        return gpunet.ops.sub(other, self)

    def __rtruediv__(self, other: Any) -> Tensor:
        return gpunet.ops.div(other, self)

    def __rpow__(self, other: Any) -> Tensor:
        return gpunet.ops.pow(other, self)

    def __rmatmul__(self, other: Any) -> Tensor:
        return gpunet.ops.matmul(other, self)

    def __neg__(self) -> Tensor:
        return gpunet.ops.neg(self)

    def __pos__(self) -> Tensor:
        return self

    def __abs__(self) -> Tensor:
        return gpunet.ops.abs(self)

    def __lt__(self, other: Any) -> Tensor:
        return gpunet.ops.compare(self, other, "lt")

    def __le__(self, other: Any) -> Tensor:
        return gpunet.ops.compare(self, other, "le")

    def __gt__(self, other: Any) -> Tensor:
        return gpunet.ops.compare(self, other, "gt")

    def __ge__(self, other: Any) -> Tensor:
        return gpunet.ops.compare(self, other, "ge")

    def __eq__(self, other: Any) -> Tensor:  # type: ignore[override]
        return gpunet.ops.compare(self, other, "eq")

    def __ne__(self, other: Any) -> Tensor:  # type: ignore[override]
        return gpunet.ops.compare(self, other, "ne")

    def __getitem__(self, key: Any) -> Tensor:
        return gpunet.ops.getitem(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        gpunet.ops.setitem_(self, key, value)

    def __iadd__(self, other: Any) -> Tensor:
        return gpunet.ops.inplace_(self, other, "add")

    def __isub__(self, other: Any) -> Tensor:
        return gpunet.ops.inplace_(self, other, "sub")

    def __imul__(self, other: Any) -> Tensor:
        return gpunet.ops.inplace_(self, other, "mul")

    def __itruediv__(self, other: Any) -> Tensor:
        return gpunet.ops.inplace_(self, other, "div")

    # ------------------------------------------------------------------ methods
    def reshape(self, *shape: Any) -> Tensor:
        return gpunet.ops.reshape(self, shape[0] if len(shape) == 1 else shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        return gpunet.ops.flatten(self, start_dim, end_dim)

    def squeeze(self, axis: int | tuple[int, ...] | None = None) -> Tensor:
        return gpunet.ops.squeeze(self, axis)

    def unsqueeze(self, axis: int) -> Tensor:
        return gpunet.ops.unsqueeze(self, axis)

    def transpose(self, dim0: int = -2, dim1: int = -1) -> Tensor:
        """Swap two dimensions (PyTorch's meaning); ``permute`` reorders all of them."""
        return gpunet.ops.swapaxes(self, dim0, dim1)

    def permute(self, *dims: Any) -> Tensor:
        return gpunet.ops.permute(self, dims[0] if len(dims) == 1 else dims)

    def broadcast_to(self, shape: tuple[int, ...]) -> Tensor:
        return gpunet.ops.broadcast_to(self, shape)

    expand = broadcast_to

    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return gpunet.ops.sum(self, axis, keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return gpunet.ops.mean(self, axis, keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return gpunet.ops.max(self, axis, keepdims)

    def min(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return gpunet.ops.min(self, axis, keepdims)

    def var(self, axis: Any = None, keepdims: bool = False, correction: int = 1) -> Tensor:
        return gpunet.ops.var(self, axis, keepdims, correction)

    def std(self, axis: Any = None, keepdims: bool = False, correction: int = 1) -> Tensor:
        return gpunet.ops.sqrt(gpunet.ops.var(self, axis, keepdims, correction))

    def argmax(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        return gpunet.ops.argmax(self, axis, keepdims)

    def exp(self) -> Tensor:
        return gpunet.ops.exp(self)

    def log(self) -> Tensor:
        return gpunet.ops.log(self)

    def log1p(self) -> Tensor:
        return gpunet.ops.log1p(self)

    def sqrt(self) -> Tensor:
        return gpunet.ops.sqrt(self)

    def abs(self) -> Tensor:
        return gpunet.ops.abs(self)

    def tanh(self) -> Tensor:
        return gpunet.ops.tanh(self)

    def sigmoid(self) -> Tensor:
        return gpunet.ops.sigmoid(self)

    def relu(self) -> Tensor:
        return gpunet.ops.relu(self)

    def clip(self, min: Any = None, max: Any = None) -> Tensor:
        return gpunet.ops.clip(self, min, max)

    clamp = clip

    def maximum(self, other: Any) -> Tensor:
        return gpunet.ops.maximum(self, other)

    def minimum(self, other: Any) -> Tensor:
        return gpunet.ops.minimum(self, other)

    def softmax(self, axis: int = -1) -> Tensor:
        return gpunet.ops.softmax(self, axis)

    def log_softmax(self, axis: int = -1) -> Tensor:
        return gpunet.ops.log_softmax(self, axis)

    def logsumexp(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return gpunet.ops.logsumexp(self, axis, keepdims)


def _rebuild(values: np.ndarray, device: str, requires_grad: bool) -> Tensor:
    from .backend import get_backend

    backend = get_backend(device)
    t = Tensor._wrap(backend.asarray(np.array(values)), backend)
    t._requires_grad = requires_grad
    return t
