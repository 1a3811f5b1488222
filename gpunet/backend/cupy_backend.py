"""The CuPy backend: generic ops through ``cupy``; fused ops through ``kernels/``.

CuPy is imported here and only here, and only when a CUDA device is first used, so
``import gpunet`` never touches CUDA.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from .faults import fault_error
from .generic import GRID, Array, ArrayBackend, Shape
from .precision import MATMUL
from .updates import AdamHyper, SGDHyper

log = logging.getLogger("gpunet")


class CupyBackend(ArrayBackend):
    name = "cupy"

    def __init__(self, device: Any) -> None:
        import cupy

        self.cupy = cupy
        self._cuda_device = cupy.cuda.Device(device.index)
        super().__init__(cupy, device, cupy.ndarray)

    # ---------------------------------------------------------------- TF32
    _tf32_applied: bool | None = None  # the setting cupy.matmul's compute type was last given

    def _tf32(self) -> bool:
        """Apply ``gpunet.backends.allow_tf32`` to CuPy's GEMMs; True when it is on.

        CuPy reads ``CUPY_TF32`` once, at its first GEMM; ``set_compute_type`` is its route
        for a program: cupy.matmul asks cuBLAS for ``CUBLAS_COMPUTE_32F_FAST_TF32`` for float32
        from then on (set again only when the setting changed). ``cupy.cublas.gemm`` (the
        scaled GEMM below) calls ``cublasSgemm``, which reads the handle's math mode instead."""
        on = MATMUL.allow_tf32
        if on is not self._tf32_applied:
            linalg = self._linalg
            kind = linalg.COMPUTE_TYPE_TF32 if on else linalg.COMPUTE_TYPE_DEFAULT
            linalg.set_compute_type(np.dtype(np.float32), kind)
            self._tf32_applied = on
        return on

    @property
    def _linalg(self) -> Any:
        from cupy._core import _routines_linalg

        return _routines_linalg

    def _math_mode(self, tf32: bool) -> None:
        """The cuBLAS handle's math mode for ``cublasSgemm``: TF32 tensor ops or the default,
        set when it changes (a handle is per thread, so is the record of its mode)."""
        modes = self.__dict__.setdefault("_sgemm_tf32", {})
        thread = threading.get_ident()
        if modes.get(thread, False) is tf32:
            return
        from cupy_backends.cuda.libs import cublas

        mode = cublas.CUBLAS_TF32_TENSOR_OP_MATH if tf32 else cublas.CUBLAS_DEFAULT_MATH
        cublas.setMathMode(self.cupy.cuda.device.get_cublas_handle(), mode)
        modes[thread] = tf32

    def matmul(self, x: Array, y: Array, *, tx: bool, ty: bool) -> Array:
        self._tf32()
        with self._cuda_device:
            return super().matmul(x, y, tx=tx, ty=ty)

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
        """A host copy; then raises a bad label or index a kernel recorded since the last
        read (a 32-byte copy more, once a kernel has made the fault buffer)."""
        host = self.cupy.asnumpy(x)
        self.raise_pending_faults()
        return host

    def check_indices(self, indices: Array, size: int, op: str) -> None:
        """CuPy's gather wraps an index outside [-size, size): a kernel records it instead."""
        with self._cuda_device:
            self.kernels.check_range(indices, -size, size, op)

    def raise_pending_faults(self) -> None:
        kernels = getattr(self, "_kernels", None)
        if kernels is None:  # no kernel has run on this device: nothing can be pending
            return
        with self._cuda_device:  # the buffer is cleared on its own device
            fault = kernels.take_fault()
        if fault is not None:
            raise fault_error(fault, self.device)

    def random(self, generator: Any, kind: str, shape: Shape, dtype: np.dtype) -> Array:
        with self._cuda_device:
            if np.dtype(dtype) in GRID:  # (cuRAND draws float32 or float64 only)
                return self.random_through_float32(generator, kind, shape, np.dtype(dtype))
            rng = generator.device_rng(self)
            if kind == "normal":
                return rng.standard_normal(shape, dtype=dtype)
            return rng.random(shape, dtype=dtype)

    def _new_rng(self, seed: int) -> Any:
        """A device-side generator for ``gpunet.Generator`` (one per device)."""
        with self._cuda_device:
            return self.cupy.random.default_rng(seed)

    def _rng_state(self, rng: Any) -> np.ndarray:
        """The device generator's cuRAND states as host bytes (CuPy keeps them in the bit
        generator's ``_state`` array; it has no public accessor)."""
        return self.cupy.asnumpy(rng.bit_generator._state)

    def _set_rng_state(self, rng: Any, state: np.ndarray) -> None:
        target = rng.bit_generator._state
        if target.nbytes != state.nbytes:
            # another GPU model sizes the cuRAND state array differently: keep the fresh stream
            log.warning(
                "gpunet: the saved %s generator state has %d bytes, this GPU's %d; the device "
                "stream is reseeded, so random draws on it differ from the saved run",
                self.device,
                state.nbytes,
                target.nbytes,
            )
            return
        with self._cuda_device:
            target[...] = self.cupy.asarray(state.view(target.dtype))

    def linear_activation(
        self, x: Array, w: Array, b: Array, *, activation: str | None, alpha: float
    ) -> Array:
        self._tf32()
        with self._cuda_device:
            z = self.cupy.matmul(x, w)
            if activation is None:
                z += b
                return z
            return self.bias_activation(z, b, name=activation, alpha=alpha)[0]  # one kernel

    def sum_into(
        self, out: Array, x: Array, *, axis: tuple[int, ...], alpha: float = 1.0, beta: float = 0.0
    ) -> None:
        with self._cuda_device:
            if alpha == 1.0 and beta == 0.0:
                self.cupy.sum(x, axis=axis, out=out)
            else:
                super().sum_into(out, x, axis=axis, alpha=alpha, beta=beta)

    def _matmul_out(self, out: Array, x: Array, y: Array, tx: bool, ty: bool) -> None:
        self._tf32()
        with self._cuda_device:
            a, b = (x.swapaxes(-1, -2) if tx else x), (y.swapaxes(-1, -2) if ty else y)
            self.cupy.matmul(a, b, out=out)  # cuBLAS writes out directly

    def _gemm(
        self, out: Array, x: Array, y: Array, tx: bool, ty: bool, alpha: float, beta: float
    ) -> bool:
        """cuBLAS's GEMM scales and accumulates as it writes (2-d float32/float64 operands of
        out's dtype)."""
        if not (
            x.ndim == y.ndim == out.ndim == 2
            and x.dtype == y.dtype == out.dtype
            and out.dtype.char in "fd"
        ):
            return False
        op = {False: "N", True: "T"}
        tf32 = self._tf32() and out.dtype.char == "f"
        with self._cuda_device:
            self._math_mode(tf32)
            self.cublas.gemm(op[tx], op[ty], x, y, out=out, alpha=alpha, beta=beta)
        return True

    @property
    def cublas(self) -> Any:
        """``cupy.cublas``, imported on first use (it loads the cuBLAS libraries)."""
        module = getattr(self, "_cublas", None)
        if module is None:
            import cupy.cublas as module

            self._cublas = module
        return module

    def scatter_add(self, g: Array, indices: Array, *, axis: int, size: int) -> Array:
        import cupyx

        with self._cuda_device:
            out = self.cupy.zeros(
                g.shape[:axis] + (size,) + g.shape[axis + indices.ndim :], g.dtype
            )
            cupyx.scatter_add(out, (slice(None),) * axis + (indices,), g)
        return out

    # ---------------------------------------------------------------- fused kernels
    # Launched through kernels.py for the dtypes that have kernels (float16/32/64; float16 and
    # float32 for the optimizer updates); anything else takes the generic path.
    @property
    def kernels(self) -> Any:
        k = getattr(self, "_kernels", None)
        if k is None:
            from .kernels import CupyKernels

            k = self._kernels = CupyKernels(self.cupy, self._cuda_device)
        return k

    def warmup(self) -> None:
        with self._cuda_device:
            self.kernels.compile_all()

    def erf(self, x: Array) -> Array:
        import cupyx.scipy.special

        with self._cuda_device:
            return cupyx.scipy.special.erf(x)

    def activation(self, x: Array, name: str, alpha: float = 0.0) -> Array:
        if not self.kernels.supports(x):
            return super().activation(x, name=name, alpha=alpha)
        with self._cuda_device:
            return self.kernels.activation(x, name, alpha)

    def activation_backward(
        self,
        g: Array,
        saved: Array,
        *,
        name: str,
        alpha: float = 0.0,
        from_output: bool = False,
        out: Array | None = None,
    ) -> Array:
        if not self.kernels.supports(g, saved, *(() if out is None else (out,))):
            return super().activation_backward(
                g, saved, name=name, alpha=alpha, from_output=from_output, out=out
            )
        with self._cuda_device:
            return self.kernels.activation_backward(g, saved, name, alpha, from_output, out)

    def bias_activation(
        self,
        x: Array,
        b: Array,
        *,
        name: str,
        alpha: float = 0.0,
        keep_preactivation: bool = False,
    ) -> tuple[Array, Array | None]:
        if not self.kernels.supports(x, b):
            return super().bias_activation(
                x, b, name=name, alpha=alpha, keep_preactivation=keep_preactivation
            )
        with self._cuda_device:
            return self.kernels.bias_activation(x, b, name, alpha, keep_preactivation)

    def cross_entropy(self, logits: Array, labels: Array, *, reduction: str) -> Array:
        if not self.kernels.supports_rows(logits):
            with self._cuda_device:  # the generic gather would wrap a bad label silently
                self.kernels.check_range(labels, 0, logits.shape[-1], "cross_entropy")
            return super().cross_entropy(logits, labels, reduction=reduction)
        with self._cuda_device:
            return self.kernels.cross_entropy(logits, labels, reduction)

    def cross_entropy_backward(
        self, g: Array, logits: Array, labels: Array, *, reduction: str
    ) -> Array:
        if not self.kernels.supports_rows(logits):
            return super().cross_entropy_backward(g, logits, labels, reduction=reduction)
        with self._cuda_device:
            return self.kernels.cross_entropy_backward(g, logits, labels, reduction)

    def sgd_update(
        self,
        param: Array,
        grad: Array,
        momentum_buf: Array | None,
        hyper: SGDHyper,
        *,
        first_step: bool = False,
        step: Array | None = None,
        grad_scale: Array | None = None,
        found_inf: Array | None = None,
        lowp: Array | None = None,
    ) -> None:
        scaling = {"step": step, "grad_scale": grad_scale, "found_inf": found_inf, "lowp": lowp}
        if not self.kernels.supports_update(param):
            return super().sgd_update(
                param, grad, momentum_buf, hyper, first_step=first_step, **scaling
            )
        with self._cuda_device:
            self.kernels.sgd_update(param, grad, momentum_buf, hyper, first_step, **scaling)
        return None

    def adam_update(
        self,
        param: Array,
        grad: Array,
        m: Array,
        v: Array,
        hyper: AdamHyper,
        *,
        step: Array,
        grad_scale: Array | None = None,
        found_inf: Array | None = None,
        lowp: Array | None = None,
    ) -> None:
        scaling = {"step": step, "grad_scale": grad_scale, "found_inf": found_inf, "lowp": lowp}
        if not self.kernels.supports_update(param):
            return super().adam_update(param, grad, m, v, hyper, **scaling)
        with self._cuda_device:
            self.kernels.adam_update(param, grad, m, v, hyper, **scaling)
        return None

    def grad_norm(self, x: Array) -> Array:
        if x.dtype != np.float32:
            return super().grad_norm(x)
        with self._cuda_device:
            return self.kernels.grad_norm(x)
