"""One code path, three backends: the same ops, fused kernels and MLP training step on NumPy,
on CuPy's backend over the g++ build of the CUDA kernels (``emulated_cupy_backend``: NumPy
arrays, the CUDA kernels and CupyBackend's own dispatch) and on the generic array-API backend
(array_api_strict), each held to NumPy's result.

Bit for bit where both compute the same float32 expression: CuPy's backend on NumPy arrays
runs NumPy's expressions except where it launches a kernel, and array_api_strict wraps NumPy.
The exceptions, each with its tolerance, are named where they are compared.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_ops_matrix as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_tools import emulated_cupy_backend, emulated_kernels

import gpunet
from gpunet import backend as gb
from gpunet.backend import Device
from gpunet.backend.fused import ACTIVATIONS, FROM_OUTPUT
from gpunet.backend.generic import ArrayBackend

xps = pytest.importorskip("array_api_strict")
StrictArray = xps._array_object.Array
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow)")

FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), M.BF16)


def skip_unsupported(backend: Any, dt: np.dtype) -> None:
    if backend.xp is not np and dt not in (np.float32, np.float64):
        pytest.skip(f"array_api_strict has no {dt}")


@pytest.fixture(scope="module")
def emu_backend() -> Any:
    return emulated_cupy_backend(emulated_kernels())


STRICT_DEVICE = Device("cuda", 7)  # a device name no test machine serves: the strict arrays'


@pytest.fixture(scope="module")
def strict_backend() -> Iterator[Any]:
    backend = ArrayBackend(xps, STRICT_DEVICE, StrictArray)
    gb.register_backend(StrictArray, backend)
    yield backend
    gb.register_backend(StrictArray, None)


@pytest.fixture(params=["cuda_on_cpu", "generic"])
def other(request: pytest.FixtureRequest, emu_backend: Any, strict_backend: Any) -> Any:
    """The backend under test, served at its device so ``.to(device)`` reaches it."""
    backend = emu_backend if request.param == "cuda_on_cpu" else strict_backend
    saved = gb._backends.get(backend.device)
    gb._backends[backend.device] = backend
    yield backend
    if saved is None:
        gb._backends.pop(backend.device, None)
    else:
        gb._backends[backend.device] = saved


def on(backend: Any, a: np.ndarray) -> gpunet.Tensor:
    """``a`` on ``backend``, its layout kept where the backend keeps layouts (NumPy arrays)."""
    data = a if backend.xp is np else backend.asarray(np.array(a))  # strict arrays have no strides
    return gpunet.Tensor._wrap(data, backend)


def host(t: gpunet.Tensor) -> np.ndarray:
    return np.asarray(t._backend.to_numpy(t.data))


def same(got: gpunet.Tensor, want: gpunet.Tensor, what: str) -> None:
    g, w = host(got), want.numpy()
    assert (g.dtype, g.shape) == (w.dtype, w.shape), (
        f"{what}: {g.dtype}{g.shape} {w.dtype}{w.shape}"
    )
    assert g.tobytes() == w.tobytes(), f"{what}: {g.ravel()[:6]} != {w.ravel()[:6]}"


def close(got: gpunet.Tensor, want: gpunet.Tensor, what: str) -> None:
    g, w = host(got), want.numpy()
    assert (g.dtype, g.shape) == (w.dtype, w.shape), what
    np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-300, err_msg=what)


# ---------------------------------------------------------------------- ops: forward
@pytest.mark.parametrize("dt", FLOATS, ids=str)
@pytest.mark.parametrize("name", list(M.UNARY))
def test_unary_forward_matches_numpy(other: Any, name: str, dt: np.dtype) -> None:
    """Bit for bit where NumPy's expression is the op's (UNARY's exact); the kernels' and
    the generic formulas of sigmoid, gelu and silu use the libm's exp and erf, not NumPy's
    SIMD ones: the ops matrix's few ulps."""
    skip_unsupported(other, dt)
    fn, _, domain, exact = M.UNARY[name]
    for shape in M.SHAPES:
        for layout, a in M.layouts(M.values(shape, dt, domain)).items():
            got, what = fn(on(other, a)), f"{name} {dt} {shape} {layout}"
            if exact:
                same(got, fn(M.tensor(a)), what)
            else:
                M.assert_ulps(gpunet.tensor(host(got)), fn(M.tensor(a)).numpy(), what)


@pytest.mark.parametrize("dt", FLOATS, ids=str)
@pytest.mark.parametrize("name", list(M.BINARY))
def test_binary_forward_matches_numpy(other: Any, name: str, dt: np.dtype) -> None:
    """Bit for bit, but pow: NumPy's own power differs by an ulp between its contiguous
    (SIMD) and strided loops, so the ops matrix's few ulps."""
    skip_unsupported(other, dt)
    fn, _, domain = M.BINARY[name]
    for sx, sy in M.PAIRS:
        x, y = M.values(sx, dt, domain), M.values(sy, dt, domain, seed=1)
        for layout, a in M.layouts(x).items():
            want, what = fn(M.tensor(a), M.tensor(y)), f"{name} {dt} {sx} {sy} {layout}"
            got = fn(on(other, a), on(other, y))
            if name == "pow":
                M.assert_ulps(gpunet.tensor(host(got)), want.numpy(), what)
            else:
                same(got, want, what)


# ---------------------------------------------------------------------- ops: VJP
NUMPY_ONLY_INPUTS = {
    "cross_entropy",
    "cross_entropy smoothed",
    "integer arrays",
    "boolean mask",
    "where",
}


@pytest.mark.parametrize("layout", ["contiguous", "negative strides"])
@pytest.mark.parametrize("name", [n for n in M.GRADS if n not in NUMPY_ONLY_INPUTS])
def test_vjp_matches_numpy(other: Any, name: str, layout: str) -> None:
    """The value and every input's cotangent, float64, on the ops matrix's cases."""
    if name.endswith("erf") and other.xp is np:
        pytest.skip("CupyBackend.erf is cupyx.scipy.special.erf: no host emulation")
    f = M.GRADS[name][0]
    xs = M._grad_inputs(name, layout)
    want, pull = gpunet.vjp(f, *xs)
    ct = M.values(want.shape, np.dtype(np.float64), "any", seed=9)
    wants = pull(M.tensor(ct))
    got, pull_other = gpunet.vjp(f, *[on(other, x.data) for x in xs])
    gots = pull_other(on(other, ct))
    # silu, softplus, elu, erf: the generic formulas' exp and erf are the libm's, not NumPy's
    check = close if name.startswith("silu") else same
    check(got, want, f"{name} value")
    for i, (g, w) in enumerate(zip(gots, wants)):
        check(g, w, f"{name} d/dx{i}")


# ---------------------------------------------------------------------- fused kernels
NP = gb.get_backend("cpu")
ACTS = [  # every activation (ACTIVATIONS), alpha where it takes one
    ("relu", 0.0),
    ("leaky_relu", 0.1),
    ("elu", 1.3),
    ("softplus", 2.0),
    ("sigmoid", 0.0),
    ("tanh", 0.0),
    ("gelu", 0.0),
    ("gelu_tanh", 0.0),
    ("silu", 0.0),
]
RTOL = {np.float32: 1e-6, np.float64: 1e-13, np.float16: 2.0**-10}
FUSED_SHAPES = [(0,), (0, 5), (1,), (7, 5), (33, 17)]


def fused_layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    """Contiguous, transposed and reversed views, as a layer's inputs and gradients come."""
    out = {"contiguous": a}
    if a.ndim == 2:
        out["transposed"] = np.ascontiguousarray(a.T).T
    out["reversed"] = np.ascontiguousarray(a[::-1])[::-1]
    return out


def agree(got: Any, want: np.ndarray, exact: bool, what: str) -> None:
    """Bit for bit where the formula is only +, -, *, / and selects (relu, leaky_relu: the
    kernels and NumPy agree to the bit, test_kernels.py); else the dtype's few ulps of the
    output plus the gradient's size, as libm's exp, tanh and erf differ from NumPy's."""
    g = np.asarray(got if isinstance(got, np.ndarray) else np.from_dlpack(got))
    assert (g.dtype, g.shape) == (want.dtype, want.shape), f"{what}: {g.dtype}{g.shape}"
    if exact:
        assert g.tobytes() == want.tobytes(), f"{what}: {g.ravel()[:6]} != {want.ravel()[:6]}"
        return
    tol = RTOL[want.dtype.type] * 4
    np.testing.assert_allclose(g, want, rtol=tol, atol=tol, err_msg=what)


def fused_inputs(other: Any, shape: tuple[int, ...], dt: Any) -> list[tuple[str, Any, Any]]:
    """(layout, NumPy's array, the other backend's) for x in ``shape``."""
    a = M.values(shape, np.dtype(dt), "any").astype(dt) * dt(3)
    if other.xp is not np:
        return [("contiguous", a, other.asarray(a))]
    return [(k, v, v) for k, v in fused_layouts(a).items()]


@pytest.mark.parametrize("dt", [np.float32, np.float64, np.float16], ids=str)
@pytest.mark.parametrize(("name", "alpha"), ACTS, ids=[a for a, _ in ACTS])
def test_fused_activation_matches_numpy(other: Any, name: str, alpha: float, dt: Any) -> None:
    """activation, activation_backward (from x and from y) and bias_activation, over shapes
    with size 0 and non-contiguous inputs."""
    skip_unsupported(other, np.dtype(dt))
    exact = name in ("relu", "leaky_relu")
    for shape in FUSED_SHAPES:
        for layout, a, x in fused_inputs(other, shape, dt):
            what = f"{name} {dt.__name__} {shape} {layout}"
            y = NP.activation(a, name, alpha)
            agree(other.activation(x, name, alpha), y, exact, f"{what} forward")
            gn = (a[::-1] if a.ndim else a).copy() if a.size else a.copy()
            g = gn if other.xp is np else other.asarray(gn)
            for from_output in [False, True] if name in FROM_OUTPUT else [False]:
                want = NP.activation_backward(
                    gn, y if from_output else a, name=name, alpha=alpha, from_output=from_output
                )
                saved = (y if other.xp is np else other.asarray(y)) if from_output else x
                got = other.activation_backward(
                    g, saved, name=name, alpha=alpha, from_output=from_output
                )
                agree(got, want, exact, f"{what} backward from_output={from_output}")
            if len(shape) == 2:
                bn = M.values(shape[1:], np.dtype(dt), "any", seed=3).astype(dt)
                b = bn if other.xp is np else other.asarray(bn)
                wy, wpre = NP.bias_activation(
                    a, bn, name=name, alpha=alpha, keep_preactivation=True
                )
                gy, gpre = other.bias_activation(
                    x, b, name=name, alpha=alpha, keep_preactivation=True
                )
                agree(gy, wy, exact, f"{what} bias forward")
                agree(gpre, wpre, True, f"{what} bias preactivation")


def test_acts_cover_every_activation() -> None:
    assert sorted(a for a, _ in ACTS) == sorted(ACTIVATIONS)
