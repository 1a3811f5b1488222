"""The fused CUDA kernels: where their sources are, what each takes, and how they launch.

- Sources: ``kernels/*.cu`` at the top of a checkout, shipped in the wheel as
  ``gpunet/_kernels/``. ``#include "activations.cuh"`` is inlined before compiling, so NVRTC
  needs no include path and CuPy's disk cache is keyed by everything that is compiled.
- ``TABLE``: every extern "C" kernel with its C parameter types (a test parses the sources'
  signatures and holds them to it). Each argument is checked and cast to its C type before a
  launch: CuPy passes a Python int as ``long long`` and a float as ``double``, and checks
  nothing, so a float32 ``alpha`` sent as a double would be read as garbage.
- ``Kernels``: the launch rule (block 256, grid min(ceil(n / 256), 32 x SMs), nothing for
  n == 0) and the fused ops built on it (activation forward/backward, bias + activation,
  SGD/Adam updates, the global gradient norm), over an executor: ``CupyKernels`` compiles
  lazily with ``cupy.RawModule`` and launches on a GPU; the tests run the same ops through a
  g++ build of the same sources (host emulation), so this glue is checked without a GPU.

Nothing here imports CuPy or touches CUDA until a kernel is first used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .faults import FAULT_CODES
from .fused import check_activation
from .updates import AdamHyper, SGDHyper, check_adam_update, check_sgd_update

BLOCK = 256
BLOCKS_PER_SM = 32
HEADER = "activations.cuh"
SOURCES = ("elementwise.cu", "optim.cu", "losses.cu")
# Options for NVRTC beyond those CuPy adds itself (-arch, -ftz=true,
# --device-as-default-execution-space); the NVRTC test compiles with both sets.
NVRTC_OPTIONS = ("--std=c++17",)
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

# kernel suffix -> (storage dtype, C storage type, C scalar type)
DTYPES = {
    "f16": (np.dtype(np.float16), "gn_half", "float"),
    "bf16": (np.dtype(ml_dtypes.bfloat16), "gn_bf16", "float"),
    "f32": (np.dtype(np.float32), "float", "float"),
    "f64": (np.dtype(np.float64), "double", "double"),
}
SUFFIX = {dtype: sfx for sfx, (dtype, _, _) in DTYPES.items()}
C_SCALARS = {"float": np.float32, "double": np.float64, "long long": np.int64, "int": np.int32}
C_POINTEES = {c: dtype for dtype, c, _ in DTYPES.values()} | {"long long": np.dtype(np.int64)}


# ---------------------------------------------------------------------- the activation kernels
@dataclass(frozen=True)
class ActivationKernels:
    """The extern "C" kernels of one activation in one dtype, as elementwise.cu lists them
    beside the macro line that defines them: the forward, the backward from the input, bias +
    forward, and the backward from the output where f' has a form in it."""

    fwd: str
    bwd: str
    bias_fwd: str
    bwd_from_y: str | None = None


# Every activation kernel by name, one line per activation and dtype, as elementwise.cu lists
# them above the macro line that defines them: the forward, the backward from the input, bias
# + forward, and the backward from the output where f' has a form in it ("-" where not).
# Written out so that grep finds each launch; the key is read from the forward's name.
_ACTIVATION_KERNEL_NAMES = """
relu_fwd_f16         relu_bwd_f16         bias_relu_fwd_f16         relu_bwd_from_y_f16
leaky_relu_fwd_f16   leaky_relu_bwd_f16   bias_leaky_relu_fwd_f16   leaky_relu_bwd_from_y_f16
elu_fwd_f16          elu_bwd_f16          bias_elu_fwd_f16          elu_bwd_from_y_f16
sigmoid_fwd_f16      sigmoid_bwd_f16      bias_sigmoid_fwd_f16      sigmoid_bwd_from_y_f16
tanh_fwd_f16         tanh_bwd_f16         bias_tanh_fwd_f16         tanh_bwd_from_y_f16
softplus_fwd_f16     softplus_bwd_f16     bias_softplus_fwd_f16     softplus_bwd_from_y_f16
silu_fwd_f16         silu_bwd_f16         bias_silu_fwd_f16         -
gelu_fwd_f16         gelu_bwd_f16         bias_gelu_fwd_f16         -
gelu_tanh_fwd_f16    gelu_tanh_bwd_f16    bias_gelu_tanh_fwd_f16    -
relu_fwd_bf16        relu_bwd_bf16        bias_relu_fwd_bf16        relu_bwd_from_y_bf16
leaky_relu_fwd_bf16  leaky_relu_bwd_bf16  bias_leaky_relu_fwd_bf16  leaky_relu_bwd_from_y_bf16
elu_fwd_bf16         elu_bwd_bf16         bias_elu_fwd_bf16         elu_bwd_from_y_bf16
sigmoid_fwd_bf16     sigmoid_bwd_bf16     bias_sigmoid_fwd_bf16     sigmoid_bwd_from_y_bf16
tanh_fwd_bf16        tanh_bwd_bf16        bias_tanh_fwd_bf16        tanh_bwd_from_y_bf16
softplus_fwd_bf16    softplus_bwd_bf16    bias_softplus_fwd_bf16    softplus_bwd_from_y_bf16
silu_fwd_bf16        silu_bwd_bf16        bias_silu_fwd_bf16        -
gelu_fwd_bf16        gelu_bwd_bf16        bias_gelu_fwd_bf16        -
gelu_tanh_fwd_bf16   gelu_tanh_bwd_bf16   bias_gelu_tanh_fwd_bf16   -
relu_fwd_f32         relu_bwd_f32         bias_relu_fwd_f32         relu_bwd_from_y_f32
leaky_relu_fwd_f32   leaky_relu_bwd_f32   bias_leaky_relu_fwd_f32   leaky_relu_bwd_from_y_f32
elu_fwd_f32          elu_bwd_f32          bias_elu_fwd_f32          elu_bwd_from_y_f32
sigmoid_fwd_f32      sigmoid_bwd_f32      bias_sigmoid_fwd_f32      sigmoid_bwd_from_y_f32
tanh_fwd_f32         tanh_bwd_f32         bias_tanh_fwd_f32         tanh_bwd_from_y_f32
softplus_fwd_f32     softplus_bwd_f32     bias_softplus_fwd_f32     softplus_bwd_from_y_f32
silu_fwd_f32         silu_bwd_f32         bias_silu_fwd_f32         -
gelu_fwd_f32         gelu_bwd_f32         bias_gelu_fwd_f32         -
gelu_tanh_fwd_f32    gelu_tanh_bwd_f32    bias_gelu_tanh_fwd_f32    -
relu_fwd_f64         relu_bwd_f64         bias_relu_fwd_f64         relu_bwd_from_y_f64
leaky_relu_fwd_f64   leaky_relu_bwd_f64   bias_leaky_relu_fwd_f64   leaky_relu_bwd_from_y_f64
elu_fwd_f64          elu_bwd_f64          bias_elu_fwd_f64          elu_bwd_from_y_f64
sigmoid_fwd_f64      sigmoid_bwd_f64      bias_sigmoid_fwd_f64      sigmoid_bwd_from_y_f64
tanh_fwd_f64         tanh_bwd_f64         bias_tanh_fwd_f64         tanh_bwd_from_y_f64
softplus_fwd_f64     softplus_bwd_f64     bias_softplus_fwd_f64     softplus_bwd_from_y_f64
silu_fwd_f64         silu_bwd_f64         bias_silu_fwd_f64         -
gelu_fwd_f64         gelu_bwd_f64         bias_gelu_fwd_f64         -
gelu_tanh_fwd_f64    gelu_tanh_bwd_f64    bias_gelu_tanh_fwd_f64    -
"""


def _activation_kernels(names: str) -> dict[tuple[str, str], ActivationKernels]:
    """(activation, dtype suffix) -> its kernels, from the lines above (relu_fwd_f32: relu)."""
    kernels = {}
    for line in names.strip().splitlines():
        fwd, bwd, bias_fwd, from_y = line.split()
        activation, sfx = fwd.rsplit("_fwd_", 1)
        kernels[activation, sfx] = ActivationKernels(
            fwd, bwd, bias_fwd, None if from_y == "-" else from_y
        )
    return kernels


ACTIVATION_KERNELS = _activation_kernels(_ACTIVATION_KERNEL_NAMES)

# dtype suffix -> the cross-entropy row kernels of losses.cu: (forward, backward)
CROSS_ENTROPY_KERNELS = {
    "f32": ("cross_entropy_rows_f32", "cross_entropy_rows_backward_f32"),
    "f64": ("cross_entropy_rows_f64", "cross_entropy_rows_backward_f64"),
}

# parameter dtype suffix -> the optimizer-update kernels of optim.cu: (SGD, Adam). float16
# parameters keep float32 state and compute in float32 (updates.state_dtype). Before an update
# with step counts, ``COUNT_KERNEL`` advances them (unless found_inf is set).
UPDATE_KERNELS = {
    "f16": ("sgd_update_f16", "adam_update_f16"),
    "f32": ("sgd_update_f32", "adam_update_f32"),
}
COUNT_KERNEL = "count_steps"


# ---------------------------------------------------------------------- sources
def kernel_dir() -> Path:
    """The directory holding the .cu files: in the installed package, else the checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_kernels", package.parent / "kernels"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"gpunet's CUDA sources ({', '.join(SOURCES)}) are neither in {package / '_kernels'} "
        f"(an installed wheel) nor in {package.parent / 'kernels'} (a checkout)"
    )


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def source(name: str) -> str:
    """The text of ``kernels/<name>`` with our own includes inlined (once each)."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(file: str) -> str:
        text = (root / file).read_text()

        def include(m: re.Match[str]) -> str:
            inner = m.group(1)
            if inner in seen:
                return f"// {inner} already included"
            seen.add(inner)
            return f"// ---- {inner}\n{expand(inner)}\n// ---- end of {inner}"

        return _INCLUDE.sub(include, text)

    return expand(name)


# ---------------------------------------------------------------------- the launch table
@dataclass(frozen=True)
class KernelSpec:
    """One extern "C" kernel: its source file, its C parameters, and whether its threads
    cooperate through shared memory and __syncthreads (the host emulation must know)."""

    name: str
    source: str
    params: tuple[tuple[str, str], ...]  # (C type, name)
    cooperative: bool = False

    def cast(self, args: tuple[Any, ...]) -> list[Any]:
        """Arguments as their C types: arrays checked against pointee dtype and layout,
        scalars cast to NumPy scalars of the exact C width; None is a null pointer."""
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        out: list[Any] = []
        for (ctype, pname), value in zip(self.params, args):
            if ctype.endswith("*"):
                if value is not None:
                    want = C_POINTEES[ctype.removeprefix("const ").rstrip("*").strip()]
                    if value.dtype != want or not value.flags.c_contiguous:
                        raise TypeError(
                            f"{self.name}: {pname} must be a C-contiguous {want} array, "
                            f"got {value.dtype} (c_contiguous={value.flags.c_contiguous})"
                        )
                out.append(value)
            elif ctype in ("long long", "int"):
                out.append(C_SCALARS[ctype](int(value)))
            else:
                out.append(C_SCALARS[ctype](value))
        return out


def _params(spec: str) -> tuple[tuple[str, str], ...]:
    """ "const float* x, long long n" -> (("const float*", "x"), ("long long", "n"))."""
    out = []
    for part in spec.split(","):
        ctype, _, pname = part.strip().rpartition(" ")
        out.append((ctype.replace(" *", "*"), pname))
    return tuple(out)


def _build_table() -> dict[str, KernelSpec]:
    table: dict[str, KernelSpec] = {}

    def add(name: str, src: str, params: str, cooperative: bool = False) -> None:
        table[name] = KernelSpec(name, src, _params(params), cooperative)

    for (_, sfx), k in ACTIVATION_KERNELS.items():
        _, s, c = DTYPES[sfx]
        add(k.fwd, "elementwise.cu", f"const {s}* x, {s}* y, long long n, {c} a")
        add(k.bwd, "elementwise.cu", f"const {s}* g, const {s}* x, {s}* dx, long long n, {c} a")
        if k.bwd_from_y is not None:
            add(
                k.bwd_from_y,
                "elementwise.cu",
                f"const {s}* g, const {s}* y, {s}* dx, long long n, {c} a",
            )
        add(
            k.bias_fwd,
            "elementwise.cu",
            f"const {s}* x, const {s}* b, {s}* y, {s}* pre, long long rows, long long cols, {c} a",
        )
    for sfx, (rows, rows_backward) in CROSS_ENTROPY_KERNELS.items():
        t = DTYPES[sfx][1]
        add(
            rows,
            "losses.cu",
            f"const {t}* z, const long long* y, {t}* loss, long long n, long long c, "
            "long long* fault",
        )
        add(
            rows_backward,
            "losses.cu",
            f"const {t}* z, const long long* y, const {t}* g, {t}* dz, long long n, "
            f"long long c, {t} scale, int g_per_row, long long* fault",
        )
    add(
        "check_range",
        "losses.cu",
        "const long long* y, long long n, long long lo, long long hi, long long op, "
        "long long* fault",
    )
    for sfx, (sgd, adam) in UPDATE_KERNELS.items():
        s = DTYPES[sfx][1]
        add(
            sgd,
            "optim.cu",
            f"{s}* p, {s}* g, float* buf, long long n, double lr, const double* lr_ptr, "
            "float momentum, float dampening, float weight_decay, int nesterov, int first_step, "
            "const long long* step, const float* grad_scale, const float* found_inf, "
            "gn_half* low_f16, gn_bf16* low_bf16",
        )
        add(
            adam,
            "optim.cu",
            f"{s}* p, {s}* g, float* m, float* v, long long n, double lr, "
            "const double* lr_ptr, double beta1, double beta2, float eps, double weight_decay, "
            "int decoupled, const long long* step, const float* grad_scale, "
            "const float* found_inf, gn_half* low_f16, gn_bf16* low_bf16",
        )
    add(COUNT_KERNEL, "optim.cu", "long long* steps, long long n, const float* found_inf")
    add(
        "grad_norm_partial_f32",
        "optim.cu",
        "const float* x, long long n, double* partials",
        cooperative=True,
    )
    add(
        "grad_norm_finish_f32",
        "optim.cu",
        "const double* partials, long long num_partials, float* out",
        cooperative=True,
    )
    return table


TABLE = _build_table()


def grid_size(n: int, sm_count: int) -> int:
    """Blocks for n elements: enough to cover n once, at most 32 per SM (the grid-stride
    loops cover the rest)."""
    return min(-(-n // BLOCK), BLOCKS_PER_SM * sm_count)


def _lr_args(lr: Any) -> tuple[float, Any]:
    """(lr, lr_ptr) for an update kernel: a float as itself and a null pointer, or a device
    array (read by the kernel) and 0.0."""
    return (float(lr), None) if isinstance(lr, (int, float)) else (0.0, lr)


def _low_args(lowp: Any) -> tuple[Any, Any]:
    """(low_f16, low_bf16) for an update kernel: the low-precision copy in the slot of its
    dtype, null in the other (both null: no copy)."""
    if lowp is None:
        return None, None
    return (lowp, None) if lowp.dtype == np.float16 else (None, lowp)


# ---------------------------------------------------------------------- launching
class Kernels:
    """The fused ops, launched by name through an executor (``_run``).

    ``xp`` allocates outputs (cupy on a GPU; numpy under host emulation in the tests).
    """

    def __init__(self, xp: Any, sm_count: int) -> None:
        self.xp = xp
        self.sm_count = sm_count
        self._fault: Any = None  # (op code, index, value, bound), made at the first use

    def _run(self, spec: KernelSpec, grid: int, block: int, args: list[Any]) -> None:
        raise NotImplementedError

    def launch(self, name: str, n: int, *args: Any, grid: int | None = None) -> None:
        """Launch kernel ``name`` over n elements (nothing at all for n == 0)."""
        spec = TABLE[name]
        values = spec.cast(args)
        if n == 0:
            return
        self._run(spec, grid_size(n, self.sm_count) if grid is None else grid, BLOCK, values)

    def supports(self, *arrays: Any) -> bool:
        """Do the activation kernels exist for these arrays' dtype?"""
        return all(a.dtype in SUFFIX for a in arrays) and len({a.dtype for a in arrays}) == 1

    def _kernels(self, name: str, like: Any) -> ActivationKernels:
        """The kernels of activation ``name`` for ``like``'s dtype (``supports`` was asked)."""
        return ACTIVATION_KERNELS[name, SUFFIX[like.dtype]]

    def _contiguous(self, x: Any) -> Any:
        # NumPy's ascontiguousarray makes a 0-d array 1-d: the shape is kept on every xp
        return self.xp.ascontiguousarray(x).reshape(x.shape)

    # ---------------------------------------------------------------- activations
    def activation(self, x: Any, name: str, alpha: float) -> Any:
        check_activation(name)
        x = self._contiguous(x)
        y = self.xp.empty_like(x)
        self.launch(self._kernels(name, x).fwd, x.size, x, y, x.size, alpha)
        return y

    def activation_backward(
        self, g: Any, saved: Any, name: str, alpha: float, from_output: bool, out: Any
    ) -> Any:
        check_activation(name, from_output)
        if g.shape != saved.shape:
            raise ValueError(f"activation_backward: g {g.shape} and saved {saved.shape} differ")
        if out is not None and (out.shape != g.shape or out.dtype != g.dtype):
            raise ValueError("activation_backward: out must have g's shape and dtype")
        g_c, saved = self._contiguous(g), self._contiguous(saved)
        # in place when out is usable as it is (out is g: the kernel may write into g)
        dx = out if out is not None and out.flags.c_contiguous else self.xp.empty_like(g_c)
        kernels = self._kernels(name, g)
        kernel = kernels.bwd_from_y if from_output else kernels.bwd
        self.launch(kernel, g.size, g_c, saved, dx, g.size, alpha)
        if out is not None and dx is not out:
            out[...] = dx
            return out
        return dx

    def bias_activation(
        self, x: Any, b: Any, name: str, alpha: float, keep_preactivation: bool
    ) -> tuple[Any, Any]:
        check_activation(name)
        if x.ndim != 2 or b.shape != (x.shape[1],):
            raise ValueError(
                f"bias_activation: x must be (batch, features) and b (features,), got "
                f"{x.shape} and {b.shape}"
            )
        x, b = self._contiguous(x), self._contiguous(b)
        y = self.xp.empty_like(x)
        pre = self.xp.empty_like(x) if keep_preactivation else None
        rows, cols = x.shape
        self.launch(self._kernels(name, x).bias_fwd, x.size, x, b, y, pre, rows, cols, alpha)
        return y, pre

    # ---------------------------------------------------------------- losses
    def supports_rows(self, logits: Any) -> bool:
        """Do the cross-entropy row kernels exist for these logits (float32/64, 2-d)?"""
        return logits.ndim == 2 and logits.dtype in (np.float32, np.float64)

    def _labels(self, labels: Any) -> Any:
        return self.xp.ascontiguousarray(labels, dtype=np.int64)

    def fault(self) -> Any:
        """The device buffer where kernels record a bad label or index (see faults.py)."""
        if self._fault is None:
            self._fault = self.xp.zeros(4, dtype=np.int64)
        return self._fault

    def take_fault(self) -> np.ndarray | None:
        """The recorded fault, cleared on the device, or None (no buffer yet: nothing ran)."""
        if self._fault is None:
            return None
        host = self._fault.get() if hasattr(self._fault, "get") else self._fault.copy()
        if host[0] == 0:
            return None
        self._fault.fill(0)
        return host

    def check_range(self, values: Any, lo: int, hi: int, op: str) -> None:
        """Record the first value outside [lo, hi) as a fault of ``op`` (see faults.py)."""
        y = self._labels(values).reshape(-1)
        self.launch("check_range", y.size, y, y.size, lo, hi, FAULT_CODES[op], self.fault())

    def cross_entropy(self, logits: Any, labels: Any, reduction: str) -> Any:
        """Per row logsumexp(z) - z[y] in one kernel, then the mean or sum (one reduction)."""
        z, y = self._contiguous(logits), self._labels(labels)
        n, c = z.shape
        loss = self.xp.empty((n,), dtype=z.dtype)
        self.launch(CROSS_ENTROPY_KERNELS[SUFFIX[z.dtype]][0], n, z, y, loss, n, c, self.fault())
        if reduction == "none":
            return loss
        total = loss.sum()
        return total / n if reduction == "mean" else total

    def cross_entropy_backward(self, g: Any, logits: Any, labels: Any, reduction: str) -> Any:
        """(softmax(z) - onehot(y)) g per row (/ n for the mean) in one kernel."""
        z, y = self._contiguous(logits), self._labels(labels)
        n, c = z.shape
        g = self._contiguous(self.xp.asarray(g, dtype=z.dtype).reshape(-1))
        dz = self.xp.empty_like(z)
        scale = 1.0 / n if reduction == "mean" and n else 1.0
        per_row = reduction == "none"
        kernel = CROSS_ENTROPY_KERNELS[SUFFIX[z.dtype]][1]
        self.launch(kernel, n, z, y, g, dz, n, c, scale, per_row, self.fault())
        return dz

    # ---------------------------------------------------------------- optimizer updates
    def supports_update(self, param: Any) -> bool:
        """Do the optimizer-update kernels exist for this parameter's dtype?"""
        return SUFFIX.get(param.dtype) in UPDATE_KERNELS

    def _check_inplace(self, op: str, *arrays: Any) -> None:
        for a in arrays:
            if a is not None and not a.flags.c_contiguous:
                raise ValueError(f"{op}: the flat buffers must be C-contiguous")

    def sgd_update(
        self,
        param: Any,
        grad: Any,
        momentum_buf: Any,
        hyper: SGDHyper,
        first_step: bool,
        step: Any = None,
        grad_scale: Any = None,
        found_inf: Any = None,
        lowp: Any = None,
    ) -> None:
        check_sgd_update(param, grad, momentum_buf, hyper, step, grad_scale, found_inf, lowp)
        h = hyper
        self._check_inplace("sgd_update", param, grad, momentum_buf, step, lowp)
        buf = momentum_buf if h.momentum != 0.0 else None
        lr, lr_ptr = _lr_args(h.lr)
        self._count_steps(step, found_inf)
        n = param.size
        self.launch(
            UPDATE_KERNELS[SUFFIX[param.dtype]][0],
            n,
            *(param, grad, buf, n, lr, lr_ptr, h.momentum, h.dampening, h.weight_decay),
            *(h.nesterov, first_step, step, grad_scale, found_inf, *_low_args(lowp)),
        )

    def adam_update(
        self,
        param: Any,
        grad: Any,
        m: Any,
        v: Any,
        hyper: AdamHyper,
        step: Any,
        grad_scale: Any = None,
        found_inf: Any = None,
        lowp: Any = None,
    ) -> None:
        check_adam_update(param, grad, m, v, hyper, step, grad_scale, found_inf, lowp)
        self._check_inplace("adam_update", param, grad, m, v, step, lowp)
        lr, lr_ptr = _lr_args(hyper.lr)
        self._count_steps(step, found_inf)
        n = param.size
        h = hyper
        self.launch(
            UPDATE_KERNELS[SUFFIX[param.dtype]][1],
            n,
            *(param, grad, m, v, n, lr, lr_ptr, h.beta1, h.beta2, h.eps, h.weight_decay),
            *(h.decoupled, step, grad_scale, found_inf, *_low_args(lowp)),
        )

    def _count_steps(self, step: Any, found_inf: Any) -> None:
        """The span's step counts one further unless ``found_inf`` is set: the launch before
        an update that reads them."""
        if step is not None:
            self.launch(COUNT_KERNEL, step.size, step, step.size, found_inf)

    def grad_norm(self, x: Any) -> Any:
        """Stage 1: one partial sum of squares per block; stage 2: one block adds them up."""
        x = self._contiguous(x)
        out = self.xp.zeros((), dtype=np.float32)
        n = x.size
        if n == 0:
            return out
        blocks = grid_size(n, self.sm_count)
        partials = self.xp.empty(blocks, dtype=np.float64)
        self.launch("grad_norm_partial_f32", n, x, n, partials, grid=blocks)
        self.launch("grad_norm_finish_f32", blocks, partials, blocks, out, grid=1)
        return out


class CupyKernels(Kernels):
    """Kernels on one CUDA device: each source compiled on first use (``cupy.RawModule``,
    cached on disk by CuPy), each function looked up once."""

    def __init__(self, cupy: Any, device: Any) -> None:
        super().__init__(cupy, int(device.attributes["MultiProcessorCount"]))
        self._modules: dict[str, Any] = {}
        self._functions: dict[str, Any] = {}

    def module(self, src: str) -> Any:
        mod = self._modules.get(src)
        if mod is None:
            mod = self._modules[src] = self.xp.RawModule(code=source(src), options=NVRTC_OPTIONS)
        return mod

    def compile_all(self) -> None:
        for src in SOURCES:
            self.module(src).compile()

    def _run(self, spec: KernelSpec, grid: int, block: int, args: list[Any]) -> None:
        fn = self._functions.get(spec.name)
        if fn is None:
            fn = self._functions[spec.name] = self.module(spec.source).get_function(spec.name)
        fn((grid,), (block,), tuple(np.uintp(0) if a is None else a for a in args))
