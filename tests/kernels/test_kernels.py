"""The CUDA kernels, verified without a GPU (the README's Kernels section says how and why).

1. NVRTC (the pip package nvidia-cuda-nvrtc; no driver, no device) compiles every kernel file
   for compute_80 and compute_90 with the options CuPy uses; a failure shows NVRTC's log.
2. Every extern "C" signature, read from the preprocessed sources, equals its entry in the
   launch table (gpunet/backend/kernels.py), and the PTX declares each table kernel with
   parameters of the table's widths.
3. g++ compiles the same .cu files with kernels/host_emulation.h into a shared library; every
   kernel runs on the CPU, launched through the same Python glue CupyBackend uses
   (``Kernels``: argument casts, grid size, the n == 0 rule), on random inputs up to +-1e4
   with infinities and NaN at n in {0, 1, 255, 257, 100003}, and must match the NumPy
   backend: bit for bit where the formula uses only IEEE-exact operations (relu, leaky_relu,
   the derivatives from y but softplus's), else to 1e-6 relative (float32; libm differs),
   with NaN in the same places. The optimizer kernels run 100 steps against the NumPy
   backend's updates.

Without g++ or NVRTC these tests skip with the reason, except under CI=true, where a missing
tool is a failure (so CI can never pass by skipping them).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from kernel_tools import (
    EmulatedKernels,
    Nvrtc,
    emulated_cupy_backend,
    emulated_kernels,
    find_gxx,
    find_libnvrtc,
    unavailable,
)

import gpunet
from gpunet.backend import kernels as K
from gpunet.backend.cupy_backend import CupyBackend
from gpunet.backend.faults import FAULT_CODES, LabelError
from gpunet.backend.fused import ACTIVATIONS, FROM_OUTPUT
from gpunet.backend.numpy_backend import NumpyBackend
from gpunet.backend.updates import AdamHyper, SGDHyper

SIZES = (0, 1, 255, 257, 100003)
ARCHS = ("compute_80", "compute_90")
# each parameter path of the NumPy mirror (see numpy_fused.py); the others ignore alpha
ALPHAS = {"leaky_relu": (0.1, 1.7), "elu": (1.0, 0.5, 1.7), "softplus": (0.7,)}
REF = NumpyBackend(None)


# ---------------------------------------------------------------------- NVRTC
@pytest.fixture(scope="module")
def nvrtc() -> Nvrtc:
    path = find_libnvrtc()
    if path is None:
        unavailable("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (it needs no GPU)")
    return Nvrtc(path)


@pytest.fixture(scope="module")
def ptx(nvrtc: Nvrtc) -> dict[tuple[str, str], str]:
    """Every source compiled for every architecture, once per module."""
    out = {}
    for src in K.SOURCES:
        for arch in ARCHS:
            options = (f"--gpu-architecture={arch}", *K.NVRTC_OPTIONS, *K.CUPY_NVRTC_OPTIONS)
            ok, log, code = nvrtc.compile(K.source(src), src, options)
            assert ok, f"NVRTC {nvrtc.version} failed to compile {src} for {arch}:\n{log}"
            out[src, arch] = code
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", K.SOURCES)
def test_nvrtc_compiles_every_kernel(ptx: dict, src: str, arch: str) -> None:
    entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx[src, arch]))
    assert entries == {name for name, spec in K.TABLE.items() if spec.source == src}


def test_nvrtc_failure_shows_the_log(nvrtc: Nvrtc) -> None:
    ok, log, _ = nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = y; }', "k.cu", ())
    assert not ok and "identifier" in log and '"y"' in log


_PTX_TYPE = {"long long": ".u64", "int": ".u32", "float": ".f32", "double": ".f64"}


def test_ptx_parameters_have_the_table_widths(ptx: dict) -> None:
    for (_, arch), code in ptx.items():
        for name, params in re.findall(r"\.entry\s+(\w+)\s*\(([^)]*)\)", code):
            got = re.findall(r"\.param\s+(\.\w+)", params)
            want = [".u64" if t.endswith("*") else _PTX_TYPE[t] for t, _ in K.TABLE[name].params]
            assert got == want, f"{name} ({arch}): PTX {got}, table {want}"


# ---------------------------------------------------------------------- g++ and signatures
@pytest.fixture(scope="module")
def gxx() -> str:
    return find_gxx()


def preprocessed(gxx: str, src: str) -> str:
    """The source after the preprocessor, as g++ sees it under host emulation."""
    root = K.kernel_dir()
    cmd = [gxx, "-E", "-P", "-x", "c++", "-std=c++17", "-I", str(root)]
    cmd += ["-include", str(root / "host_emulation.h"), str(root / src)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_extern_c_signatures_match_the_launch_table(gxx: str) -> None:
    parsed: dict[str, tuple[tuple[str, str], ...]] = {}
    for src in K.SOURCES:
        text = preprocessed(gxx, src)
        for name, params in re.findall(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)', text):
            assert name not in parsed, f"{name} defined twice"
            parsed[name] = K._params(" ".join(params.split()))
            assert K.TABLE[name].source == src, name
    assert sorted(parsed) == sorted(K.TABLE)
    for name, params in parsed.items():
        assert params == K.TABLE[name].params, f"{name}: source {params}, table"


def symbols_by_line(gxx: str, src: str) -> dict[int, set[str]]:
    """Each line of ``kernels/<src>`` -> the extern "C" symbols the preprocessor emits for it
    (a macro's expansion is emitted at the line of the invocation)."""
    root = K.kernel_dir()
    cmd = [gxx, "-E", "-x", "c++", "-std=c++17", "-I", str(root)]
    cmd += ["-include", str(root / "host_emulation.h"), str(root / src)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found: dict[int, set[str]] = {}
    line, file = 0, ""
    for text in out.splitlines():
        marker = re.match(r'# (\d+) "([^"]*)"', text)
        if marker:
            line, file = int(marker.group(1)), Path(marker.group(2)).name
            continue
        if file == src:
            for name in re.findall(r'extern\s+"C"\s+void\s+(\w+)\s*\(', text):
                found.setdefault(line, set()).add(name)
        line += 1
    return found


@pytest.mark.parametrize("src", K.SOURCES)
def test_each_macro_instantiation_lists_the_symbols_it_defines(gxx: str, src: str) -> None:
    """A kernel defined by a macro is named in the comment line above the macro's line, so
    that grep finds every launched name in the sources; the list must be exactly what the
    preprocessor makes of that line."""
    lines = (K.kernel_dir() / src).read_text().splitlines()
    found = symbols_by_line(gxx, src)
    assert found, f"no kernels found in {src}"
    for number, names in found.items():
        code = lines[number - 1]
        if all(name in code for name in names):
            continue  # written out, not generated
        above = lines[number - 2].strip()
        assert above.startswith("//"), f"{src}:{number} ({code}) defines {names} unlisted"
        listed = set(above.removeprefix("//").split())
        assert listed == names, f"{src}:{number} ({code}) defines {names}, lists {listed}"
    assert sorted(n for names in found.values() for n in names) == sorted(
        name for name, spec in K.TABLE.items() if spec.source == src
    )


def test_launch_tables_name_kernels_of_the_table() -> None:
    """Every name in the activation and cross-entropy tables is a kernel of the launch table
    with the dtype of its key, and the activation table covers every activation and dtype."""
    assert set(K.ACTIVATION_KERNELS) == {(a, sfx) for a in ACTIVATIONS for sfx in K.DTYPES}
    for (act, sfx), kernels in K.ACTIVATION_KERNELS.items():
        assert (kernels.bwd_from_y is not None) == (act in FROM_OUTPUT), act
        for name in (kernels.fwd, kernels.bwd, kernels.bias_fwd, kernels.bwd_from_y):
            if name is not None:
                assert act in name and name.endswith(sfx) and name in K.TABLE, name
    for sfx, names in K.CROSS_ENTROPY_KERNELS.items():
        assert all(n.endswith(sfx) and K.TABLE[n].source == "losses.cu" for n in names)


def test_the_table_names_every_activation_op_and_dtype() -> None:
    for sfx in K.DTYPES:
        for act in ACTIVATIONS:
            for op in ("fwd", "bwd"):
                assert f"{act}_{op}_{sfx}" in K.TABLE
            assert f"bias_{act}_fwd_{sfx}" in K.TABLE
            assert (f"{act}_bwd_from_y_{sfx}" in K.TABLE) == (act in FROM_OUTPUT)


def test_arguments_are_cast_to_their_c_types() -> None:
    spec = K.TABLE["sgd_update_f32"]
    p = np.zeros(3, np.float32)
    scalars = (3, 0.1, None, 0.9, 0.0, 0.0, 1, 0)  # n, lr, lr_ptr, momentum, ..., first_step

    def args(p: Any = p, step: Any = None, found_inf: Any = None) -> tuple:
        return (p, p, None, *scalars, step, None, found_inf, None, None)

    cast = spec.cast(args())
    want = [np.int64, np.float64, type(None)] + [np.float32] * 3 + [np.int32] * 2
    assert [type(a) for a in cast[3:11]] == want
    with pytest.raises(TypeError, match="float32"):
        spec.cast(args(p.astype(np.float64)))
    with pytest.raises(TypeError, match="C-contiguous"):
        spec.cast(args(np.zeros(6, np.float32)[::2]))
    with pytest.raises(TypeError, match="step must be a C-contiguous int64 array"):
        spec.cast(args(step=np.zeros(1, np.int32)))
    with pytest.raises(TypeError, match="found_inf must be a C-contiguous float32"):
        spec.cast(args(found_inf=np.zeros(1, np.float64)))
    with pytest.raises(TypeError, match="takes 16 arguments"):
        spec.cast((p,))


def test_grid_size_rule() -> None:
    assert K.grid_size(1, 132) == 1
    assert K.grid_size(256, 132) == 1 and K.grid_size(257, 132) == 2
    assert K.grid_size(10**9, 132) == 32 * 132


BF16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------- host emulation
@pytest.fixture(scope="module")
def emu() -> EmulatedKernels:
    return emulated_kernels()


@pytest.fixture
def cuda_on_cpu(emu: EmulatedKernels) -> CupyBackend:
    emu.launches.clear()
    return emulated_cupy_backend(emu)


def inputs(n: int, dtype: Any, seed: int, scale: float = 1e4) -> np.ndarray:
    """Random values spread over magnitudes up to ``scale``, with the special values first."""
    r = np.random.default_rng(seed)
    x = r.choice([-1.0, 1.0], n) * 10.0 ** r.uniform(-3, np.log10(scale), n)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, scale, -scale, 1.0, -1.0, 20.0, -20.0, 0.5]
    k = min(n, len(special))
    x[:k] = special[:k] if n > 1 else [np.nan]
    r.shuffle(x[: n // 2])  # specials anywhere in the first half (n = 1: NaN)
    return x.astype(dtype)


def _kernel_op(name: str) -> tuple[str, str, str]:
    """'bias_elu_fwd_f32' -> ('bias', 'elu', 'f32'); 'relu_bwd_from_y_f16' -> ('bwd_y', ...)."""
    m = re.fullmatch(r"(bias_)?(\w+?)_(fwd|bwd_from_y|bwd)_(bf16|f16|f32|f64)", name)
    assert m, name
    op = "bias" if m.group(1) else {"fwd": "fwd", "bwd": "bwd", "bwd_from_y": "bwd_y"}[m.group(3)]
    return op, m.group(2), m.group(4)


# Formulas of only +, -, *, / and selects: the kernels and NumPy agree to the bit.
def _exact(op: str, act: str) -> bool:
    return act in ("relu", "leaky_relu") or (op == "bwd_y" and act != "softplus")


def assert_matches(got: np.ndarray, want: np.ndarray, scale: Any, exact: bool, what: str) -> None:
    """Same NaN positions; then bit equality (exact) or |got - want| <= 1e-6 (|want| +
    scale) in float32 (1e-13 in float64, a half ulp in float16); scale is the size of the
    terms that cancel (|g| for a backward)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions differ")
    g, w = got[~nan], want[~nan]
    if exact:
        bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.itemsize]
        bad = np.flatnonzero(g.view(bits) != w.view(bits))
        assert bad.size == 0, f"{what}: bits differ at {bad[:5]}: {g[bad[:5]]} vs {w[bad[:5]]}"
        return
    rtol = {np.float16: 2.0**-10, BF16.type: 2.0**-7, np.float32: 1e-6, np.float64: 1e-13}[
        got.dtype.type
    ]
    tiny = float(ml_dtypes.finfo(got.dtype).tiny)  # denormals: the CPU keeps them, formulas differ
    wide, wwide = g.astype(np.float64), w.astype(np.float64)
    both_inf = np.isinf(wide) & (wide == wwide)
    s = np.broadcast_to(np.asarray(scale, np.float64), want.shape)[~nan]
    tol = rtol * (np.abs(wwide) + np.where(np.isfinite(s), s, 0.0)) + 16 * tiny
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        err = np.where(both_inf, 0.0, np.abs(wide - wwide))
    bad = np.flatnonzero(~(err <= tol))
    assert bad.size == 0, (
        f"{what}: {bad.size} values differ, e.g. {g[bad[:5]]} vs {w[bad[:5]]} "
        f"(error {err[bad[:5]]}, tolerance {tol[bad[:5]]})"
    )


ELEMENTWISE = sorted(n for n, s in K.TABLE.items() if s.source == "elementwise.cu")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy on inf and NaN inputs
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_kernel_matches_numpy_backend(cuda_on_cpu: CupyBackend, name: str) -> None:
    gpu, emu = cuda_on_cpu, cuda_on_cpu._kernels
    op, act, sfx = _kernel_op(name)
    dtype = K.DTYPES[sfx][0]
    half = dtype in (np.float16, BF16)
    ref_dtype = np.float32 if half else dtype  # half, bfloat16: computed in float
    shapes = [(n,) for n in SIZES] if op != "bias" else [(0, 3), (1, 1), (5, 51), (257, 1)]
    if op == "bias":
        shapes += [(1, 255), (97, 1031)]
    cases = [(alpha, shape) for alpha in ALPHAS.get(act, (0.0,)) for shape in shapes]
    for seed, (alpha, shape) in enumerate(cases):
        n = int(np.prod(shape))
        x = inputs(n, dtype, seed).reshape(shape)
        x_ref = x.astype(ref_dtype)
        exact = _exact(op, act) and not half
        g = inputs(n, dtype, seed + 50, scale=100.0)
        saved = gpu.activation(x, name=act, alpha=alpha) if op == "bwd_y" else x
        emu.launches.clear()
        pre = want_pre = None
        if op == "fwd":
            got = gpu.activation(x, name=act, alpha=alpha)
            want = REF.activation(x_ref, name=act, alpha=alpha)
            scale: Any = 0.0
        elif op == "bias":
            b = inputs(shape[1], dtype, seed + 100, scale=10.0)
            keep = bool(seed % 2)
            got, pre = gpu.bias_activation(x, b, name=act, alpha=alpha, keep_preactivation=keep)
            want, want_pre = REF.bias_activation(
                x_ref, b.astype(ref_dtype), name=act, alpha=alpha, keep_preactivation=True
            )
            assert (pre is None) == (not keep)
            scale = 0.0
        else:
            got = gpu.activation_backward(
                g, saved, name=act, alpha=alpha, from_output=op == "bwd_y"
            )
            want = REF.activation_backward(
                g.astype(ref_dtype),
                saved.astype(ref_dtype),
                name=act,
                alpha=alpha,
                from_output=op == "bwd_y",
            )
            scale = np.abs(g.astype(np.float64))
        launches, emu.launches = emu.launches, []
        what = f"{name}, alpha {alpha}, shape {shape}"
        assert_matches(got, want.astype(dtype), scale, exact, what)
        if pre is not None:
            assert_matches(pre, want_pre.astype(dtype), 0.0, True, f"{what}: pre")
        if op in ("bwd", "bwd_y"):  # in place into g, as the design allows: the same values
            g2 = g.copy()
            dx = gpu.activation_backward(
                g2, saved, name=act, alpha=alpha, from_output=op == "bwd_y", out=g2
            )
            assert dx is g2
            np.testing.assert_array_equal(g2.view(np.uint8), got.view(np.uint8))
        if n == 0:
            assert launches == [], "nothing is launched for n == 0"
        else:
            assert launches == [(name, K.grid_size(n, emu.sm_count), K.BLOCK)]


def test_half_conversions_round_to_nearest_even(emu: EmulatedKernels) -> None:
    """half -> float is exact: leaky_relu with slope 1 is the identity on every half value
    (but -0, which max(x, 0) + min(x, 0) makes +0). float -> half rounds to nearest even:
    bias + leaky_relu(slope 1) computes x + b in float and rounds once, as NumPy's cast of
    the float32 sum does, overflow to infinity and subnormal results included."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    got = emu.activation(every, "leaky_relu", 1.0)
    same = np.isfinite(every) & (every.view(np.uint16) != 0x8000)
    np.testing.assert_array_equal(got[same].view(np.uint16), every[same].view(np.uint16))
    assert np.isnan(got[np.isnan(every)]).all() and got[0x8000] == 0
    r = np.random.default_rng(3)
    x = r.choice(every[np.isfinite(every)], (4096, 16))
    b = r.choice(every[np.isfinite(every)], 16)
    got, _ = emu.bias_activation(x, b, "leaky_relu", 1.0, False)
    with np.errstate(over="ignore"):
        want = (x.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    want[want.view(np.uint16) == 0x8000] = 0  # -0 sums: +0 through max + min, as above
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_bfloat16_conversions_match_ml_dtypes_bit_for_bit(emu: EmulatedKernels) -> None:
    """The same for bfloat16 storage (``gn_bf16``): exact loads of every value, and x + b
    computed in float and rounded once to nearest even, as ml_dtypes casts the float32 sum
    (overflow to infinity included; a NaN sum is NaN)."""
    every = np.arange(1 << 16, dtype=np.uint16).view(BF16)
    got = emu.activation(every, "leaky_relu", 1.0)
    finite = np.isfinite(every.astype(np.float32))
    same = finite & (every.view(np.uint16) != 0x8000)
    np.testing.assert_array_equal(got[same].view(np.uint16), every[same].view(np.uint16))
    assert np.isnan(got[~finite & np.isnan(every.astype(np.float32))].astype(np.float32)).all()
    r = np.random.default_rng(4)
    x = r.choice(every[finite], (4096, 16))
    b = r.choice(every[finite], 16)
    got, _ = emu.bias_activation(x, b, "leaky_relu", 1.0, False)
    with np.errstate(over="ignore", invalid="ignore"):
        want = (x.astype(np.float32) + b.astype(np.float32)).astype(BF16)
    want[want.view(np.uint16) == 0x8000] = 0  # -0 sums: +0 through max + min, as above
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got.astype(np.float32)[nan]).all()


def test_denormals_are_kept_on_the_cpu(emu: EmulatedKernels) -> None:
    """Under host emulation sigmoid(-100) is a float32 denormal, as in NumPy; on the GPU
    (-ftz=true) it flushes to 0 (test_gpu_flushes_denormals). Tests keep away from denormals."""
    x = np.array([-100.0], np.float32)
    got = emu.activation(x, "sigmoid", 0.0)
    assert 0 < got[0] < np.finfo(np.float32).tiny
    assert got[0] == REF.activation(x, name="sigmoid")[0]


# ---------------------------------------------------------------------- optimizer kernels
OPTIMIZERS = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.1}),
    ("adam", {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
    ("adam", {"lr": 1e-2, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 1e-2}),
    ("adamw", {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}),
]


def _run_optimizer(
    ops: Any, kind: str, cfg: dict, n: int, steps: int, dtype: Any = np.float32
) -> list[np.ndarray]:
    """``steps`` updates of p (``dtype``; its state float32) on the noisy quadratic
    0.5 |p - target|^2."""
    r = np.random.default_rng(7)
    target = r.standard_normal(n).astype(dtype)
    p = r.standard_normal(n).astype(dtype)
    state = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    count = np.zeros(1, np.int64)  # (advanced by each update, as the optimizers' counts)
    for _ in range(steps):
        grad = (p - target) + r.standard_normal(n).astype(dtype) * dtype(0.1)
        _update(ops, kind, cfg, p, grad, state, count)
    assert count[0] == (0 if kind == "sgd" and not cfg.get("momentum") else steps)
    return [p, *state]


def _update(
    ops: Any, kind: str, cfg: dict, p: Any, grad: Any, state: list, count: Any, **scaling: Any
) -> None:
    """One update as the optimizers make it: Adam's and momentum SGD's with step counts."""
    if kind == "sgd":
        buf = state[0] if cfg.get("momentum") else None
        step = count if buf is not None else None
        ops.sgd_update(p, grad, buf, SGDHyper(**cfg), step=step, **scaling)
    else:
        hyper = AdamHyper(**cfg, decoupled=kind == "adamw")
        ops.adam_update(p, grad, *state, hyper, step=count, **scaling)


def _kernels(kind: str, cfg: dict, sfx: str = "f32") -> set[str]:
    """The kernels an update launches: the count's before Adam's and momentum SGD's."""
    counted = kind != "sgd" or bool(cfg.get("momentum"))
    return {f"{kind.rstrip('w')}_update_{sfx}"} | ({K.COUNT_KERNEL} if counted else set())


@pytest.mark.parametrize(("kind", "cfg"), OPTIMIZERS)
def test_optimizer_kernels_match_numpy_for_100_steps(
    cuda_on_cpu: CupyBackend, kind: str, cfg: dict
) -> None:
    n = 10007  # not a multiple of the block; grid-stride loops wrap (2 emulated SMs)
    got = _run_optimizer(cuda_on_cpu, kind, cfg, n, 100)
    want = _run_optimizer(REF, kind, cfg, n, 100)
    for a, b, what in zip(got, want, ("param", "state 1", "state 2")):
        np.testing.assert_array_equal(a, b, err_msg=f"{kind} {cfg}: {what}")
    assert {name for name, _, _ in cuda_on_cpu._kernels.launches} == _kernels(kind, cfg)


@pytest.mark.parametrize(("kind", "cfg"), OPTIMIZERS)
def test_float16_optimizer_kernels_match_numpy(
    cuda_on_cpu: CupyBackend, kind: str, cfg: dict
) -> None:
    """float16 parameters, float32 state and arithmetic: the kernels and NumPy compute the same
    float32 expression and round p once per step (1 float16 ulp apart at most, 20 steps)."""
    n = 3001
    got = _run_optimizer(cuda_on_cpu, kind, cfg, n, 20, np.float16)
    want = _run_optimizer(REF, kind, cfg, n, 20, np.float16)
    assert got[0].dtype == np.float16 and np.isfinite(got[0]).all()
    np.testing.assert_array_max_ulp(got[0], want[0], maxulp=1)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {cfg}: state")
    assert {name for name, _, _ in cuda_on_cpu._kernels.launches} == _kernels(kind, cfg, "f16")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("kind", "cfg"), OPTIMIZERS)
def test_optimizer_kernels_scale_the_gradient_and_skip_on_found_inf(
    cuda_on_cpu: CupyBackend, kind: str, cfg: dict, dtype: Any
) -> None:
    """grad_scale s: the kernel's update equals its update of g * s computed first (in float32,
    exactly representable here in the storage dtype as s is a power of two), bit for bit, and
    leaves g * s in the gradient; a set found_inf leaves p and the state untouched (and g * s
    in the gradient all the same). Both read through device pointers."""
    n, r = 3001, np.random.default_rng(5)
    p0, g = r.standard_normal(n).astype(dtype), r.standard_normal(n).astype(dtype)
    s = np.asarray(0.25, np.float32)

    def update(p: np.ndarray, grad: np.ndarray, state: list, **scaling: Any) -> None:
        count = np.zeros(1, np.int64)
        _update(cuda_on_cpu, kind, cfg, p, grad, state, count, **scaling)
        skipped = scaling.get("found_inf") is not None
        assert count[0] == (0 if skipped or (kind == "sgd" and not cfg.get("momentum")) else 1)

    fresh = [np.full(n, 0.5, np.float32), np.full(n, 0.25, np.float32)]
    scaled, scaled_state, scaled_g = p0.copy(), [a.copy() for a in fresh], g.copy()
    update(scaled, scaled_g, scaled_state, grad_scale=s)
    plain, plain_state = p0.copy(), [a.copy() for a in fresh]
    update(plain, (g * dtype(0.25)).astype(dtype), plain_state)
    np.testing.assert_array_equal(scaled, plain)
    np.testing.assert_array_equal(scaled_g, (g * dtype(0.25)).astype(dtype))
    for a, b in zip(scaled_state, plain_state):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(scaled, p0)
    skipped, skipped_state, skipped_g = p0.copy(), [a.copy() for a in fresh], g.copy()
    update(skipped, skipped_g, skipped_state, grad_scale=s, found_inf=np.ones(1, np.float32))
    np.testing.assert_array_equal(skipped, p0)
    np.testing.assert_array_equal(skipped_g, scaled_g)
    for a, b in zip(skipped_state, fresh):
        np.testing.assert_array_equal(a, b)
    # the skip happens in the kernels (and the count's)
    assert len(cuda_on_cpu._kernels.launches) == 3 * len(_kernels(kind, cfg))


@pytest.mark.parametrize(("kind", "cfg"), OPTIMIZERS)
def test_scaled_optimizer_kernels_match_numpy(
    cuda_on_cpu: CupyBackend, kind: str, cfg: dict
) -> None:
    """A non-power-of-two scale: the kernel and NumPy round g * s alike, in the update and in
    the gradient it leaves."""
    n, r = 10007, np.random.default_rng(6)
    s = np.asarray(1.0 / 3.0, np.float32)
    p0, g0 = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    outs = []
    for ops in (cuda_on_cpu, REF):
        p, g, state = p0.copy(), g0.copy(), [np.zeros(n, np.float32), np.zeros(n, np.float32)]
        _update(ops, kind, cfg, p, g, state, np.zeros(1, np.int64), grad_scale=s)
        outs.append([p, g, *state])
    assert not np.array_equal(outs[0][1], g0)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("low", [np.dtype(np.float16), BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize(("kind", "cfg"), OPTIMIZERS)
def test_optimizer_kernels_write_the_low_precision_copy_in_the_same_pass(
    cuda_on_cpu: CupyBackend, kind: str, cfg: dict, low: np.dtype
) -> None:
    """``lowp=``: the kernel's p, state and copy equal NumPy's bit for bit, the copy is the
    round-to-nearest-even cast of the new p (ml_dtypes' for bfloat16), and no other kernel
    runs; a skipped step (found_inf) leaves p and writes the old p's cast."""
    n, r = 10007, np.random.default_rng(9)
    p0, g = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    for found in (None, np.ones(1, np.float32)):
        outs = []
        for ops in (cuda_on_cpu, REF):
            p, state = p0.copy(), [np.zeros(n, np.float32), np.zeros(n, np.float32)]
            copy = np.full(n, 7.0, low)
            _update(ops, kind, cfg, p, g, state, np.zeros(1, np.int64), found_inf=found, lowp=copy)
            outs.append([p, *state, copy])
        for a, b in zip(*outs):
            assert a.tobytes() == b.tobytes(), f"{kind} {cfg} {low}"
        p, copy = outs[0][0], outs[0][-1]
        assert copy.tobytes() == p.astype(low).tobytes()
        assert (p.tobytes() == p0.tobytes()) == (found is not None)
    assert {name for name, _, _ in cuda_on_cpu._kernels.launches} == _kernels(kind, cfg)


def test_a_low_precision_copy_must_fit_a_float32_parameter(cuda_on_cpu: CupyBackend) -> None:
    p, g = np.zeros(4, np.float32), np.zeros(4, np.float32)
    for ops in (cuda_on_cpu, REF):
        for bad in (np.zeros(5, BF16), np.zeros(4, np.float32)):
            with pytest.raises(ValueError, match="lowp must be a bfloat16 or float16 array"):
                ops.sgd_update(p, g, None, SGDHyper(0.1), lowp=bad)
        half = np.zeros(4, np.float16)
        with pytest.raises(ValueError, match="float16 \\(4,\\) parameter"):
            ops.sgd_update(half, half, None, SGDHyper(0.1), lowp=np.zeros(4, BF16))


# Step counts across the range a run meets: the first 300, round and odd ones, and counts past
# 2^31 (an int64 in the kernel) where beta2^t has long underflowed to 0.
COUNTS = [*range(1, 301), 1000, 4096, 12345, 99999, 10**6, 2**31 + 5]


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_kernel_bias_corrections_equal_the_host_s_at_every_count(
    cuda_on_cpu: CupyBackend, decoupled: bool
) -> None:
    """The kernel computes step_size and sqrt(1 - beta2^t) from the count on the device, in
    double as AdamHyper.scalars does on the host (which the NumPy path uses): at every count
    the update is NumPy's, bit for bit, and the launch advances the count first. The lr as a
    float64 device array (lr_ptr) gives the float's bits."""
    n, r = 300, np.random.default_rng(8)
    p0, g = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    m0 = r.standard_normal(n).astype(np.float32) * np.float32(0.1)
    v0 = np.abs(r.standard_normal(n)).astype(np.float32) * np.float32(0.01)
    cfg = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05}
    for lr in (1e-3, np.asarray(1e-3)):
        hyper = AdamHyper(lr, decoupled=decoupled, **cfg)
        for t in COUNTS:
            outs = []
            for ops in (cuda_on_cpu, REF):
                p, m, v, count = p0.copy(), m0.copy(), v0.copy(), np.full(3, t - 1, np.int64)
                ops.adam_update(p, g, m, v, hyper, step=count)
                np.testing.assert_array_equal(count, t)
                outs.append((p, m, v))
            for a, b in zip(*outs):
                np.testing.assert_array_equal(a, b, err_msg=f"t = {t}, lr {type(lr).__name__}")
    launches = [name for name, _, _ in cuda_on_cpu._kernels.launches]
    assert launches[:2] == [K.COUNT_KERNEL, "adam_update_f32"]


def test_a_count_below_one_updates_nothing_in_the_kernel(cuda_on_cpu: CupyBackend) -> None:
    """A count the caller did not advance (-1 becomes 0): no step, nothing divided by 0."""
    p, m, v = np.ones(7, np.float32), np.zeros(7, np.float32), np.zeros(7, np.float32)
    count = np.full(1, -1, np.int64)
    cuda_on_cpu.adam_update(p, np.ones(7, np.float32), m, v, AdamHyper(0.1), step=count)
    assert count[0] == 0
    np.testing.assert_array_equal(p, 1.0)
    np.testing.assert_array_equal(m, 0.0)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_skipped_first_step_leaves_the_next_one_first_in_the_kernels(
    cuda_on_cpu: CupyBackend, kind: str
) -> None:
    """found_inf on the first step: the count stays 0, nothing changes; the next (clean) step is
    the first (SGD with dampening: buf = d; Adam: t = 1), as in NumPy, bit for bit. The lr read
    through lr_ptr."""
    n, r = 1000, np.random.default_rng(9)
    p0, g = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    lr = np.asarray(0.05)
    outs = []
    for ops in (cuda_on_cpu, REF):
        p, state, count = (
            p0.copy(),
            [np.zeros(n, np.float32), np.zeros(n, np.float32)],
            np.zeros(2, np.int64),
        )
        for found in (1.0, 0.0, 0.0):
            flag = np.full(1, found, np.float32)
            if kind == "sgd":
                hyper = SGDHyper(lr, momentum=0.9, dampening=0.5)
                ops.sgd_update(p, g, state[0], hyper, step=count, found_inf=flag)
            else:
                ops.adam_update(p, g, *state, AdamHyper(lr), step=count, found_inf=flag)
            if found:
                np.testing.assert_array_equal(p, p0)
                np.testing.assert_array_equal(count, 0)
        np.testing.assert_array_equal(count, 2)
        outs.append([p, *state])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    if kind == "sgd":  # the first clean step was the first (buf = d), as first_step says
        want, buf = p0.copy(), np.zeros(n, np.float32)
        for first in (True, False):
            hyper = SGDHyper(0.05, momentum=0.9, dampening=0.5)
            REF.sgd_update(want, g, buf, hyper, first_step=first)
        np.testing.assert_array_equal(outs[0][0], want)


@pytest.mark.parametrize("n", SIZES)
def test_grad_norm_two_stage_reduction(cuda_on_cpu: CupyBackend, n: int) -> None:
    emu = cuda_on_cpu._kernels
    x = inputs(n, np.float32, n)
    x[~np.isfinite(x)] = 3.0
    got = cuda_on_cpu.grad_norm(x)
    want = REF.grad_norm(x)
    assert got.shape == () and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, np.linalg.norm(x.astype(np.float64)), rtol=1e-6)
    blocks = K.grid_size(n, emu.sm_count) if n else 0
    want_launches = (
        [("grad_norm_partial_f32", blocks, 256), ("grad_norm_finish_f32", 1, 256)] if n else []
    )
    assert emu.launches == want_launches


def test_grad_norm_propagates_inf_and_nan(emu: EmulatedKernels) -> None:
    x = np.ones(1000, np.float32)
    x[500] = np.inf
    assert emu.grad_norm(x) == np.inf
    x[10] = np.nan
    assert np.isnan(emu.grad_norm(x))


def test_barrier_in_a_non_cooperative_launch_aborts(gxx: str, tmp_path: Path) -> None:
    """The emulator refuses a __syncthreads it cannot honour, rather than computing garbage."""
    code = tmp_path / "bad.cpp"
    code.write_text(
        '#include "host_emulation.h"\n'
        "void k(float* x) { x[threadIdx.x] = 1; __syncthreads(); }\n"
        "int main() { float x[4]; gn_emu::launch(false, k, 1, 4, (float*)x); }\n"
    )
    exe = tmp_path / "bad"
    root = K.kernel_dir()
    subprocess.run([gxx, "-std=c++17", "-I", str(root), str(code), "-o", str(exe)], check=True)
    done = subprocess.run([str(exe)], capture_output=True, text=True)
    assert done.returncode != 0 and "non-cooperative" in done.stderr


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy on inf inputs
def test_backward_into_a_strided_out_or_from_strided_inputs(cuda_on_cpu: CupyBackend) -> None:
    x = inputs(600, np.float32, 1, scale=10.0)
    g = inputs(600, np.float32, 2, scale=10.0)
    want = REF.activation_backward(g[::2], x[::2], name="silu")
    out = np.zeros(600, np.float32)[1::2]
    got = cuda_on_cpu.activation_backward(g[::2], x[::2], name="silu", out=out)
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-30)
    with pytest.raises(ValueError, match="out must have g's shape"):
        cuda_on_cpu.activation_backward(g, x, name="silu", out=np.zeros(5, np.float32))


def test_cupy_backend_falls_back_where_no_kernel_exists(cuda_on_cpu: CupyBackend) -> None:
    """Integer activations, float64 optimizer buffers: the generic path, nothing launched."""
    x = np.arange(-3, 4)
    np.testing.assert_array_equal(cuda_on_cpu.relu(x), np.maximum(x, 0))
    p = np.ones(5)
    cuda_on_cpu.sgd_update(p, np.ones(5), None, SGDHyper(lr=0.5))
    np.testing.assert_array_equal(p, 0.5)
    m, v = np.zeros(5), np.zeros(5)
    count = np.zeros(1, np.int64)
    cuda_on_cpu.adam_update(p, np.ones(5), m, v, AdamHyper(0.1, 0.9, 0.99, eps=0.0), step=count)
    np.testing.assert_allclose(p, 0.4)
    assert count[0] == 1
    assert cuda_on_cpu.grad_norm(np.full(4, 1.5)) == 3.0
    assert cuda_on_cpu._kernels.launches == []


# ---------------------------------------------------------------------- cross-entropy rows
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the mean of 0 rows: NaN
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("n", "c"), [(0, 3), (1, 1), (7, 10), (300, 5), (3, 1000)])
def test_cross_entropy_row_kernels_match_numpy_backend(
    cuda_on_cpu: CupyBackend, dtype: Any, reduction: str, n: int, c: int
) -> None:
    """One thread per row (n beyond one block too), logits up to +-1e4 (the max shift keeps
    exp finite), against the NumPy backend's fused forms."""
    from gpunet.backend import get_backend

    ref = get_backend("cpu")
    r = np.random.default_rng(n * 31 + c)
    z = (r.standard_normal((n, c)) * 10.0 ** r.uniform(-2, 4, (n, 1))).astype(dtype)
    y = r.integers(0, c, n)
    g = r.uniform(0.5, 2.0, n if reduction == "none" else ()).astype(dtype)
    with np.errstate(all="ignore"):
        want_loss = ref.cross_entropy(z, y, reduction=reduction)
        want_dz = ref.cross_entropy_backward(g, z, y, reduction=reduction)
    loss = cuda_on_cpu.cross_entropy(z, y, reduction=reduction)
    dz = cuda_on_cpu.cross_entropy_backward(g, z, y, reduction=reduction)
    rtol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss, want_loss, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(
        dz, want_dz, rtol=rtol, atol=rtol * float(np.max(np.abs(g), initial=1.0))
    )
    assert dz.dtype == dtype and np.asarray(loss).dtype == dtype
    launched = [name for name, _, _ in cuda_on_cpu._kernels.launches]
    sfx = K.SUFFIX[np.dtype(dtype)]
    kernels = [f"cross_entropy_rows_{sfx}", f"cross_entropy_rows_backward_{sfx}"]
    assert launched == ([] if n == 0 else kernels)  # n == 0 launches nothing


def test_cross_entropy_rows_make_a_bad_labels_row_nan_and_record_it(
    cuda_on_cpu: CupyBackend,
) -> None:
    """The GPU cannot raise: a label outside [0, c) makes its row NaN and the kernel records
    the first one (op, index, value, classes) in the fault buffer; the other rows are
    untouched. The forward and backward kernels both record; taking the fault clears it."""
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.array([0, 3, 2, -1])
    kernels = cuda_on_cpu._kernels
    loss = kernels.cross_entropy(z, y, reduction="none")
    assert np.isnan(loss[[1, 3]]).all() and np.isfinite(loss[[0, 2]]).all()
    assert kernels.take_fault().tolist() == [FAULT_CODES["cross_entropy"], 1, 3, 3]
    assert kernels.take_fault() is None  # cleared on the device
    dz = kernels.cross_entropy_backward(np.ones(4, np.float32), z, y[::-1], reduction="none")
    assert np.isnan(dz[[0, 2]]).all() and np.isfinite(dz[[1, 3]]).all()
    np.testing.assert_allclose(dz[[1, 3]].sum(axis=1), 0.0, atol=1e-6)  # softmax - onehot
    assert kernels.take_fault().tolist() == [FAULT_CODES["cross_entropy"], 0, -1, 3]


def test_cross_entropy_rows_leave_the_fault_clear_for_good_labels(
    cuda_on_cpu: CupyBackend,
) -> None:
    z = np.zeros((300, 5), np.float64)
    cuda_on_cpu.cross_entropy(z, np.arange(300) % 5, reduction="mean")
    assert cuda_on_cpu._kernels.take_fault() is None
    assert cuda_on_cpu._kernels._fault is not None  # the buffer exists and was read


@pytest.mark.parametrize("read", ["numpy", "item", "tolist", "float", "fit's epoch end"])
def test_the_cupy_backend_raises_a_recorded_label_at_the_next_host_read(
    cuda_on_cpu: CupyBackend, read: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host reads of CupyBackend (run here over NumPy arrays and the g++ kernels) raise
    the CPU's error, with the device named, once; the loss itself is NaN, never alone."""
    import gpunet.backend as B
    from gpunet.tensor import Tensor

    z = Tensor._wrap(np.zeros((5, 4), np.float32), cuda_on_cpu)
    y = Tensor._wrap(np.array([0, 1, 7, 2, -2]), cuda_on_cpu)
    loss = gpunet.ops.cross_entropy(z, y)  # no error yet: the kernel cannot raise
    reads = {
        "numpy": loss.numpy,
        "item": loss.item,
        "tolist": loss.tolist,
        "float": lambda: float(loss),
        "fit's epoch end": B.raise_pending_faults,
    }
    monkeypatch.setitem(B._backends, cuda_on_cpu.device, cuda_on_cpu)
    with pytest.raises(LabelError) as e:
        reads[read]()
    assert str(e.value).startswith(
        "cross_entropy: label 7 at index 2 is not a class: the logits have 4 classes, so "
        "labels must be in [0, 4)."
    )
    assert "found on cuda:0" in str(e.value)
    assert np.isnan(loss.item())  # raised once; the value is the NaN the kernel wrote


def test_fit_raises_pending_device_faults_at_each_epoch_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fault recorded after the epoch's last ``loss.item()`` is still raised by ``fit``."""
    import gpunet.train
    from gpunet import nn, optim
    from gpunet.data import DataLoader, Dataset

    calls: list[int] = []
    monkeypatch.setattr(gpunet.train, "raise_pending_faults", lambda: calls.append(1))
    model = nn.Linear(2, 3)
    data = Dataset(np.zeros((8, 2), np.float32), np.arange(8) % 3)
    opt = optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=4, device="cpu")
    gpunet.train.fit(model, gpunet.ops.cross_entropy, opt, loader, epochs=3, progress=False)
    assert len(calls) == 3


def test_float16_logits_check_labels_with_their_own_kernel(cuda_on_cpu: CupyBackend) -> None:
    """float16 has no row kernel: the generic gather wraps a negative label (here, as on a
    GPU, where CuPy wraps any out-of-range index), so a check kernel records it first."""
    z = np.zeros((3, 4), np.float16)
    cuda_on_cpu.cross_entropy(z, np.array([0, 3, 1]), reduction="mean")
    assert cuda_on_cpu._kernels.take_fault() is None
    loss = cuda_on_cpu.cross_entropy(z, np.array([0, -1, -2]), reduction="sum")
    with pytest.raises(LabelError, match=r"label -1 at index 1 .* 4 classes"):
        cuda_on_cpu.to_numpy(loss)
    assert [name for name, _, _ in cuda_on_cpu._kernels.launches] == ["check_range"] * 2


def test_gather_on_a_gpu_records_an_index_out_of_range(cuda_on_cpu: CupyBackend) -> None:
    """CuPy's gather wraps any index (NumPy, standing in, wraps -5 + 3); gpunet.take records
    one outside [-n, n) and raises it at the next host read, as the CPU raises at once."""
    from gpunet.tensor import Tensor

    x = Tensor._wrap(np.arange(3.0), cuda_on_cpu)
    ok = gpunet.ops.take(x, Tensor._wrap(np.array([2, -3, -1]), cuda_on_cpu), 0)
    np.testing.assert_array_equal(ok.numpy(), [2.0, 0.0, 2.0])
    bad = gpunet.ops.take(x, Tensor._wrap(np.array([0, -5, 2], np.int32), cuda_on_cpu), 0)
    with pytest.raises(IndexError) as e:
        bad.numpy()
    assert str(e.value).startswith(
        "gpunet.take: index -5 at position 1 is out of range for an axis of size 3: indices "
        "must be in [-3, 3) (found on cuda:0"
    )


@pytest.mark.parametrize("activation", [None, "relu", "tanh", "softplus"])
def test_cupy_linear_and_gradient_writers_under_emulation(
    cuda_on_cpu: CupyBackend, activation: str | None
) -> None:
    """CupyBackend's linear (GEMM, then the bias + activation kernel), matmul_into and
    sum_into, run over NumPy arrays and the emulated kernels, against the NumPy backend."""
    from gpunet.backend import get_backend

    ref = get_backend("cpu")
    r = np.random.default_rng(3)
    x, w, b = (r.standard_normal(s).astype(np.float32) for s in ((6, 5), (5, 4), (4,)))
    alpha = 1.5 if activation == "softplus" else 0.0
    got = cuda_on_cpu.linear_activation(x, w, b, activation=activation, alpha=alpha)
    want = ref.linear_activation(x, w, b, activation=activation, alpha=alpha)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    launched = [name for name, _, _ in cuda_on_cpu._kernels.launches]
    assert launched == ([] if activation is None else [f"bias_{activation}_fwd_f32"])
    for a, b in ((1.0, 0.0), (1.0, 1.0), (-0.1, 0.99)):  # write, sum into, SGD step
        dw, dw_ref = np.ones((5, 4), np.float32), np.ones((5, 4), np.float32)
        cuda_on_cpu.matmul_into(dw, x, got, tx=True, ty=False, alpha=a, beta=b)
        ref.matmul_into(dw_ref, x, got, tx=True, ty=False, alpha=a, beta=b)
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-6)
        db, db_ref = np.ones(4, np.float32), np.ones(4, np.float32)
        cuda_on_cpu.sum_into(db, got, axis=(0,), alpha=a, beta=b)
        ref.sum_into(db_ref, got, axis=(0,), alpha=a, beta=b)
        np.testing.assert_allclose(db, db_ref, rtol=1e-6)
    # the scaled GEMMs went to cuBLAS's (alpha, beta) GEMM, op(x) = x^T: ("T", "N")
    assert cuda_on_cpu._cublas.calls == [("T", "N", 1.0, 1.0), ("T", "N", -0.1, 0.99)]
