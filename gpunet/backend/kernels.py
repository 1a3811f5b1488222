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

import numpy as np

from .fused import ACTIVATIONS, FROM_OUTPUT, check_activation
from .updates import AdamHyper, SGDHyper, check_flat

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
    "f32": (np.dtype(np.float32), "float", "float"),
    "f64": (np.dtype(np.float64), "double", "double"),
}
SUFFIX = {dtype: sfx for sfx, (dtype, _, _) in DTYPES.items()}
UPDATE_SUFFIXES = ("f16", "f32")  # the parameter dtypes with optimizer-update kernels
C_SCALARS = {"float": np.float32, "double": np.float64, "long long": np.int64, "int": np.int32}
C_POINTEES = {c: dtype for dtype, c, _ in DTYPES.values()} | {"long long": np.dtype(np.int64)}


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

    for sfx, (_, s, c) in DTYPES.items():
        for act in ACTIVATIONS:
            add(f"{act}_fwd_{sfx}", "elementwise.cu", f"const {s}* x, {s}* y, long long n, {c} a")
            add(
                f"{act}_bwd_{sfx}",
                "elementwise.cu",
                f"const {s}* g, const {s}* x, {s}* dx, long long n, {c} a",
            )
            if act in FROM_OUTPUT:
                add(
                    f"{act}_bwd_from_y_{sfx}",
                    "elementwise.cu",
                    f"const {s}* g, const {s}* y, {s}* dx, long long n, {c} a",
                )
            add(
                f"bias_{act}_fwd_{sfx}",
                "elementwise.cu",
                f"const {s}* x, const {s}* b, {s}* y, {s}* pre, long long rows, "
                f"long long cols, {c} a",
            )
    for sfx in ("f32", "f64"):
        t = DTYPES[sfx][1]
        add(
            f"cross_entropy_rows_{sfx}",
            "losses.cu",
            f"const {t}* z, const long long* y, {t}* loss, long long n, long long c",
        )
        add(
            f"cross_entropy_rows_backward_{sfx}",
            "losses.cu",
            f"const {t}* z, const long long* y, const {t}* g, {t}* dz, long long n, "
            f"long long c, {t} scale, int g_per_row",
        )
    # The updates compute in float32 and keep their state in float32 for float16 and float32
    # parameters alike (updates.state_dtype).
    for sfx in UPDATE_SUFFIXES:
        s = DTYPES[sfx][1]
        add(
            f"sgd_update_{sfx}",
            "optim.cu",
            f"{s}* p, const {s}* g, float* buf, long long n, float lr, float momentum, "
            "float dampening, float weight_decay, int nesterov, int first_step",
        )
        add(
            f"adam_update_{sfx}",
            "optim.cu",
            f"{s}* p, const {s}* g, float* m, float* v, long long n, float beta1, "
            "float beta2, float eps, float weight_decay, float decay, float step_size, "
            "float bc2_sqrt",
        )
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


# ---------------------------------------------------------------------- launching
class Kernels:
    """The fused ops, launched by name through an executor (``_run``).

    ``xp`` allocates outputs (cupy on a GPU; numpy under host emulation in the tests).
    """

    def __init__(self, xp: Any, sm_count: int) -> None:
        self.xp = xp
        self.sm_count = sm_count

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

    def _contiguous(self, x: Any) -> Any:
        return self.xp.ascontiguousarray(x)

    # ---------------------------------------------------------------- activations
    def activation(self, x: Any, name: str, alpha: float) -> Any:
        check_activation(name)
        x = self._contiguous(x)
        y = self.xp.empty_like(x)
        self.launch(f"{name}_fwd_{SUFFIX[x.dtype]}", x.size, x, y, x.size, alpha)
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
        kind = "bwd_from_y" if from_output else "bwd"
        self.launch(f"{name}_{kind}_{SUFFIX[g.dtype]}", g.size, g_c, saved, dx, g.size, alpha)
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
        self.launch(f"bias_{name}_fwd_{SUFFIX[x.dtype]}", x.size, x, b, y, pre, rows, cols, alpha)
        return y, pre

    # ---------------------------------------------------------------- losses
    def supports_rows(self, logits: Any) -> bool:
        """Do the cross-entropy row kernels exist for these logits (float32/64, 2-d)?"""
        return logits.ndim == 2 and logits.dtype in (np.float32, np.float64)

    def _labels(self, labels: Any) -> Any:
        return self.xp.ascontiguousarray(labels, dtype=np.int64)

    def cross_entropy(self, logits: Any, labels: Any, reduction: str) -> Any:
        """Per row logsumexp(z) - z[y] in one kernel, then the mean or sum (one reduction)."""
        z, y = self._contiguous(logits), self._labels(labels)
        n, c = z.shape
        loss = self.xp.empty((n,), dtype=z.dtype)
        self.launch(f"cross_entropy_rows_{SUFFIX[z.dtype]}", n, z, y, loss, n, c)
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
        kernel = f"cross_entropy_rows_backward_{SUFFIX[z.dtype]}"
        self.launch(kernel, n, z, y, g, dz, n, c, scale, per_row)
        return dz

    # ---------------------------------------------------------------- optimizer updates
    def supports_update(self, param: Any) -> bool:
        """Do the optimizer-update kernels exist for this parameter's dtype?"""
        return SUFFIX.get(param.dtype) in UPDATE_SUFFIXES

    def _check_inplace(self, op: str, *arrays: Any) -> None:
        for a in arrays:
            if a is not None and not a.flags.c_contiguous:
                raise ValueError(f"{op}: the flat buffers must be C-contiguous")

    def sgd_update(
        self, param: Any, grad: Any, momentum_buf: Any, hyper: SGDHyper, first_step: bool
    ) -> None:
        check_flat("sgd_update", param, grad, momentum_buf)
        h = hyper
        if h.momentum != 0.0 and momentum_buf is None:
            raise ValueError("sgd_update: momentum needs a momentum buffer")
        self._check_inplace("sgd_update", param, grad, momentum_buf)
        buf = momentum_buf if h.momentum != 0.0 else None
        n = param.size
        self.launch(
            f"sgd_update_{SUFFIX[param.dtype]}",
            n,
            *(param, grad, buf, n, h.lr, h.momentum, h.dampening, h.weight_decay),
            *(h.nesterov, first_step),
        )

    def adam_update(
        self, param: Any, grad: Any, m: Any, v: Any, hyper: AdamHyper, step: int
    ) -> None:
        check_flat("adam_update", param, grad, m, v)
        self._check_inplace("adam_update", param, grad, m, v)
        l2, decay, step_size, bc2_sqrt = hyper.scalars(step)
        n = param.size
        self.launch(
            f"adam_update_{SUFFIX[param.dtype]}",
            n,
            *(param, grad, m, v, n, hyper.beta1, hyper.beta2, hyper.eps),
            *(l2, decay, step_size, bc2_sqrt),
        )

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
