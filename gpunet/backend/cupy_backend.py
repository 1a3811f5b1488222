"""The CuPy backend: generic ops through ``cupy``; fused ops through ``kernels/``.

CuPy is imported here and only here, and only when a CUDA device is first used, so
``import gpunet`` never touches CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .generic import Array, ArrayBackend, Shape


class CupyBackend(ArrayBackend):
    name = "cupy"

    def __init__(self, device: Any) -> None:
        import cupy

        self.cupy = cupy
        self._cuda_device = cupy.cuda.Device(device.index)
        super().__init__(cupy, device, cupy.ndarray)

    def as_dtype(self, dtype: np.dtype) -> np.dtype:
        return np.dtype(dtype)

    def asarray(self, data: Any, dtype: np.dtype | None = None) -> Array:
        with self._cuda_device:
            return self.cupy.asarray(data, dtype=dtype)

    def zeros(self, shape: Shape, dtype: np.dtype) -> Array:
        with self._cuda_device:
            return self.cupy.zeros(shape, dtype=dtype)

    def ones(self, shape: Shape, dtype: np.dtype) -> Array:
        with self._cuda_device:
            return self.cupy.ones(shape, dtype=dtype)

    def full(self, shape: Shape, value: float, dtype: np.dtype) -> Array:
        with self._cuda_device:
            return self.cupy.full(shape, value, dtype=dtype)

    def arange(self, start: float, stop: float, step: float, dtype: np.dtype) -> Array:
        with self._cuda_device:
            return self.cupy.arange(start, stop, step, dtype=dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        return self.cupy.asnumpy(x)

    def random(self, generator: Any, kind: str, shape: Shape, dtype: np.dtype) -> Array:
        rng = generator.device_rng(self)
        with self._cuda_device:
            if kind == "normal":
                return rng.standard_normal(shape, dtype=dtype)
            return rng.random(shape, dtype=dtype)

    def _new_rng(self, seed: int) -> Any:
        """A device-side generator for ``gpunet.Generator`` (one per device)."""
        with self._cuda_device:
            return self.cupy.random.default_rng(seed)

    def scatter_add(self, g: Array, indices: Array, *, axis: int, size: int) -> Array:
        import cupyx

        with self._cuda_device:
            out = self.cupy.zeros(
                g.shape[:axis] + (size,) + g.shape[axis + indices.ndim :], g.dtype
            )
            cupyx.scatter_add(out, (slice(None),) * axis + (indices,), g)
        return out
