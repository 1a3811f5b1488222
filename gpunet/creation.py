"""Making tensors: from data, constants, ranges, and DLPack exchange."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import dtypes
from .backend import Device, backend_of, default_device, get_backend
from .ops import full_like, ones_like, zeros_like  # noqa: F401 (their one home; re-exported)
from .tensor import Tensor


def _backend(device: str | Device | None) -> Any:
    return get_backend(default_device() if device is None else device)


def _shape(shape: Sequence[Any]) -> tuple[int, ...]:
    """Accept zeros(2, 3) and zeros((2, 3)) alike."""
    if len(shape) == 1 and not isinstance(shape[0], int):
        shape = tuple(shape[0])
    return tuple(int(n) for n in shape)


def _finish(data: Any, backend: Any, requires_grad: bool) -> Tensor:
    t = Tensor._wrap(data, backend)
    if requires_grad:
        t.requires_grad = True
    return t


def tensor(
    data: Any, dtype: Any = None, device: str | Device | None = None, requires_grad: bool = False
) -> Tensor:
    """A new tensor holding a copy of ``data`` (a number, nested lists, a NumPy or CuPy array,
    or a Tensor). Python floats become float32 and ints int64; arrays keep their dtype."""
    if isinstance(data, Tensor):
        data = data.data
    if hasattr(data, "__cuda_array_interface__") or type(data).__module__.startswith("cupy"):
        src = backend_of(data)
        if device is None:
            device = src.device
        data = src.to_numpy(data)
    if isinstance(data, (np.ndarray, np.generic)):
        host = np.array(data, dtype=None if dtype is None else dtypes.as_dtype(dtype))
    else:
        host = np.array(data)
        if dtype is not None:
            host = host.astype(dtypes.as_dtype(dtype))
        elif host.dtype.kind == "f":
            host = host.astype(dtypes.DEFAULT_FLOAT)
        elif host.dtype.kind in "iu":
            host = host.astype(dtypes.DEFAULT_INT)
    if dtypes.kind(dtypes.as_dtype(host.dtype)) not in "biuf":
        raise TypeError(
            f"gpunet.tensor: cannot make a tensor of dtype {host.dtype} from {type(data).__name__}"
        )
    backend = _backend(device)
    return _finish(backend.asarray(host), backend, requires_grad)


def as_tensor(data: Any, dtype: Any = None, device: str | Device | None = None) -> Tensor:
    """``data`` as a tensor, without a copy when it already is one of the right kind."""
    if isinstance(data, Tensor):
        return data.to(*(s for s in (dtype, device) if s is not None))
    return tensor(data, dtype, device)


def _dtype(dtype: Any) -> np.dtype:
    return dtypes.DEFAULT_FLOAT if dtype is None else dtypes.as_dtype(dtype)


def zeros(
    *shape: Any, dtype: Any = None, device: str | Device | None = None, requires_grad: bool = False
) -> Tensor:
    b = _backend(device)
    return _finish(b.zeros(_shape(shape), _dtype(dtype)), b, requires_grad)


def ones(
    *shape: Any, dtype: Any = None, device: str | Device | None = None, requires_grad: bool = False
) -> Tensor:
    b = _backend(device)
    return _finish(b.ones(_shape(shape), _dtype(dtype)), b, requires_grad)


def full(
    shape: Sequence[int] | int,
    fill_value: float,
    dtype: Any = None,
    device: str | Device | None = None,
    requires_grad: bool = False,
) -> Tensor:
    b = _backend(device)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype is None and isinstance(fill_value, bool):
        dtype = dtypes.bool_
    elif dtype is None and isinstance(fill_value, int):
        dtype = dtypes.DEFAULT_INT
    return _finish(b.full(shape, fill_value, _dtype(dtype)), b, requires_grad)


def arange(
    start: float,
    stop: float | None = None,
    step: float = 1,
    dtype: Any = None,
    device: str | Device | None = None,
    requires_grad: bool = False,
) -> Tensor:
    """Evenly spaced values in [start, stop); integers give int64, as in PyTorch."""
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        ints = all(isinstance(v, int) for v in (start, stop, step))
        dtype = dtypes.DEFAULT_INT if ints else dtypes.DEFAULT_FLOAT
    b = _backend(device)
    return _finish(b.arange(start, stop, step, _dtype(dtype)), b, requires_grad)


def eye(n: int, dtype: Any = None, device: str | Device | None = None) -> Tensor:
    b = _backend(device)
    host = np.eye(n, dtype=_dtype(dtype))
    return Tensor._wrap(b.asarray(host), b)


def from_dlpack(obj: Any) -> Tensor:
    """Zero-copy import from any DLPack producer (NumPy, CuPy, PyTorch, JAX)."""
    kind, index = obj.__dlpack_device__()
    if int(kind) == 1:  # kDLCPU
        return Tensor(np.from_dlpack(obj))
    if int(kind) in (2, 3):  # kDLCUDA, kDLCUDAHost
        backend = get_backend(f"cuda:{index}")
        return Tensor._wrap(backend.xp.from_dlpack(obj), backend)
    raise TypeError(f"gpunet.from_dlpack: unsupported DLPack device type {kind}")
