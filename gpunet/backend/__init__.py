"""Devices and the backend that serves each one.

``"cpu"`` is served by NumPy, ``"cuda:N"`` by CuPy. The default device is chosen lazily, once:
``GPUNET_DEVICE`` if set, else CUDA when CuPy imports *and* a device answers, else the CPU with
one logged line saying why. ``use_device`` overrides it within a scope.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .generic import ArrayBackend
from .numpy_backend import NumpyBackend

log = logging.getLogger("gpunet")

__all__ = [
    "ArrayBackend",
    "Device",
    "default_device",
    "device",
    "get_backend",
    "raise_pending_faults",
    "register_backend",
    "use_device",
    "warmup",
]


@dataclass(frozen=True)
class Device:
    """A place arrays live: ``Device("cpu")`` or ``Device("cuda", 0)``. Compares equal to its
    string form, so ``t.device == "cuda:0"`` reads naturally."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"device('{self}')"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = device(other)
            except ValueError:
                return False
        if not isinstance(other, Device):
            return NotImplemented
        return (self.type, self.index) == (other.type, other.index)

    def __hash__(self) -> int:
        return hash((self.type, self.index))


def device(spec: str | Device) -> Device:
    """Parse ``"cpu"``, ``"cuda"`` (device 0) or ``"cuda:N"``."""
    if isinstance(spec, Device):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a device is a string like 'cpu' or 'cuda:0', got {spec!r}")
    kind, colon, index = spec.strip().lower().partition(":")
    if kind == "cpu" and not colon:
        return Device("cpu")
    if kind in ("cuda", "gpu") and (not colon or index.isdecimal()):  # "cuda:" is malformed
        return Device("cuda", int(index) if index else 0)
    raise ValueError(f"unknown device {spec!r}: use 'cpu', 'cuda' or 'cuda:N'")


CPU = Device("cpu")
_NUMPY = NumpyBackend(CPU)
_backends: dict[Device, ArrayBackend] = {CPU: _NUMPY}


@dataclass
class CudaProbe:
    """What looking for a GPU found: devices usable, and why not when none is."""

    available: bool
    reason: str
    device_count: int = 0
    cupy_version: str | None = None
    devices: tuple[str, ...] = ()


_probe: CudaProbe | None = None


def probe_cuda() -> CudaProbe:
    """Look for CuPy and a CUDA device, once per process; never raises."""
    global _probe
    if _probe is not None:
        return _probe
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken install raising anything
        _probe = CudaProbe(False, f"CuPy is not installed ({type(e).__name__}: {e})")
        return _probe
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, insufficient driver, ...
        _probe = CudaProbe(
            False,
            f"CuPy {cupy.__version__} found no usable CUDA driver ({e})",
            cupy_version=cupy.__version__,
        )
        return _probe
    if count == 0:
        _probe = CudaProbe(
            False, f"CuPy {cupy.__version__} found no CUDA device", cupy_version=cupy.__version__
        )
        return _probe
    names = []
    for i in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"]
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    _probe = CudaProbe(
        True,
        f"CuPy {cupy.__version__} found {count} CUDA device(s)",
        count,
        cupy.__version__,
        tuple(names),
    )
    return _probe


def _reset_probe() -> None:
    """Forget the probe and the auto choice (tests that simulate machines use this)."""
    global _probe, _auto
    _probe = None
    _auto = None


def get_backend(dev: str | Device) -> ArrayBackend:
    """The backend serving ``dev``; a CUDA device that cannot be used raises, saying why."""
    dev = device(dev)
    backend = _backends.get(dev)
    if backend is not None:
        return backend
    found = probe_cuda()
    if not found.available:
        raise RuntimeError(
            f"device {dev} requested but not usable: {found.reason}. "
            "Use device='cpu', or install a CuPy wheel (pip install "
            "'gpunet[cuda12]') on a machine with an NVIDIA driver."
        )
    if dev.index is None or dev.index >= found.device_count:
        raise RuntimeError(
            f"device {dev} does not exist: {found.device_count} CUDA device(s) found"
        )
    from .cupy_backend import CupyBackend

    backend = _backends[dev] = CupyBackend(dev)
    return backend


def raise_pending_faults() -> None:
    """Raise the first bad label a GPU kernel recorded on any device since the last host
    read (a kernel cannot raise; see faults.py). Tensor host reads (``item``, ``numpy``,
    ``tolist``, ``float``) do this for their own device; ``fit`` calls it at each epoch end."""
    for backend in list(_backends.values()):
        backend.raise_pending_faults()


def warmup(dev: str | Device | None = None) -> bool:
    """Compile the fused CUDA kernels now instead of at their first use: for ``dev``, else
    for the default device if it is a GPU, else for cuda:0 if a GPU answers. Returns whether
    kernels were compiled; on a machine without a GPU it does nothing, quietly."""
    if dev is None:
        if not probe_cuda().available:
            return False
        d = default_device()
        d = d if d.type == "cuda" else Device("cuda", 0)
    else:
        d = device(dev)
    get_backend(d).warmup()
    return d.type == "cuda"


_auto: Device | None = None
_scoped = threading.local()


def _auto_device() -> Device:
    global _auto
    if _auto is None:
        env = os.environ.get("GPUNET_DEVICE")
        if env:
            _auto = device(env)
        else:
            found = probe_cuda()
            _auto = Device("cuda", 0) if found.available else CPU
            if not found.available:
                log.warning("gpunet: running on the CPU with NumPy: %s.", found.reason)
    return _auto


def default_device() -> Device:
    """The device new tensors go to: the innermost ``use_device``, else the automatic choice."""
    stack = getattr(_scoped, "stack", None)
    return stack[-1] if stack else _auto_device()


@contextlib.contextmanager
def use_device(dev: str | Device) -> Iterator[Device]:
    """Within the block, new tensors are created on ``dev``: ``with gpunet.use_device("cpu"):``."""
    d = device(dev)
    get_backend(d)  # fail at the ``with`` line, not at the first tensor
    stack = getattr(_scoped, "stack", None)
    if stack is None:
        stack = _scoped.stack = []
    stack.append(d)
    try:
        yield d
    finally:
        stack.pop()


_registered: dict[type, ArrayBackend] = {}


def register_backend(array_type: type, backend: ArrayBackend | None) -> None:
    """Serve raw arrays of ``array_type`` with ``backend`` (``None`` unregisters), so that
    ``Tensor(array)`` wraps them: how another array-API library (``array_api_strict`` in the
    tests) plugs in without a change to gpunet."""
    if backend is None:
        _registered.pop(array_type, None)
    else:
        _registered[array_type] = backend


def backend_of(array: Any) -> ArrayBackend:
    """The backend for a raw array (NumPy, CuPy, or a registered type) by its type and device."""
    if isinstance(array, _NUMPY.array_type):
        return _NUMPY
    registered = _registered.get(type(array))
    if registered is not None:
        return registered
    module = type(array).__module__
    if module.startswith("cupy"):
        return get_backend(Device("cuda", int(array.device.id)))
    raise TypeError(f"no gpunet backend for arrays of type {type(array).__name__}")


def replay_mode(device: Device | None) -> tuple[str, str]:
    """How ``gpunet.capture`` replays a step on ``device``: ('a CUDA graph' or 'a launch
    list', why)."""
    if device is None or device.type == "cpu":
        return "a launch list", "on the CPU there is no graph to launch"
    return (
        "a CUDA graph where it can",
        "a captured step becomes one CUDA graph at its first replay, kept if it matches its "
        "launch list bit for bit, else it stays a launch list; its repr says which and why. "
        "Never yet run on a GPU",
    )


def tf32_state(cuda: bool) -> str:
    """What ``gpunet.backends.allow_tf32`` does here, in words."""
    from .precision import MATMUL

    on = "on" if MATMUL.allow_tf32 else "off (gpunet.backends.allow_tf32 = True turns it on)"
    where = "float32 GEMMs on CUDA" if cuda else "no-op on the CPU (float32 GEMMs stay float32)"
    return f"{on}: {where}"


def info() -> dict[str, Any]:
    """Versions, the devices found, and why the GPU is or is not used."""
    import platform

    import numpy
    import scipy

    from .. import __version__
    from . import blas

    found = probe_cuda()
    return {
        "gpunet": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "blas_gemm": blas.describe(),  # the GEMM with alpha/beta behind SGD in backward
        "cupy": found.cupy_version,
        "cuda_available": found.available,
        "cuda_devices": list(found.devices),
        "why": found.reason,
        "default_device": str(default_device()),
        "capture": "replays as {} ({})".format(*replay_mode(default_device())),
        "tf32": tf32_state(found.available),
        "GPUNET_DEVICE": os.environ.get("GPUNET_DEVICE"),
    }
