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
import gpunet.nn as nn
from gpunet import backend as gb
from gpunet.backend import Device
from gpunet.backend.fused import ACTIVATIONS, FROM_OUTPUT
from gpunet.backend.generic import ArrayBackend
from gpunet.backend.updates import AdamHyper, SGDHyper

xps = pytest.importorskip("array_api_strict")
StrictArray = xps._array_object.Array
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow)")

FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), M.BF16)


def with_backends(dtypes: Any) -> list[Any]:
    """(backend, dtype) cases for ``other`` (indirect) and ``dt``: array_api_strict has no
    float16 or bfloat16, so the generic backend takes float32 and float64 only."""
    return [
        pytest.param(b, d, id=f"{b}-{np.dtype(d)}")
        for b in ("cuda_on_cpu", "generic")
        for d in dtypes
        if b == "cuda_on_cpu" or np.dtype(d) in (np.float32, np.float64)
    ]


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
    tol = 4 * RTOL[w.dtype.type]
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=what)


# ---------------------------------------------------------------------- ops: forward
@pytest.mark.parametrize(("other", "dt"), with_backends(FLOATS), indirect=["other"])
@pytest.mark.parametrize("name", list(M.UNARY))
def test_unary_forward_matches_numpy(other: Any, name: str, dt: np.dtype) -> None:
    """Bit for bit where NumPy's expression is the op's (UNARY's exact); the kernels' and
    the generic formulas of sigmoid, gelu and silu use the libm's exp and erf, not NumPy's
    SIMD ones: the ops matrix's few ulps."""
    fn, _, domain, exact = M.UNARY[name]
    for shape in M.SHAPES:
        for layout, a in M.layouts(M.values(shape, dt, domain)).items():
            got, what = fn(on(other, a)), f"{name} {dt} {shape} {layout}"
            if exact:
                same(got, fn(M.tensor(a)), what)
            else:
                M.assert_ulps(gpunet.tensor(host(got)), fn(M.tensor(a)).numpy(), what)


@pytest.mark.parametrize(("other", "dt"), with_backends(FLOATS), indirect=["other"])
@pytest.mark.parametrize("name", list(M.BINARY))
def test_binary_forward_matches_numpy(other: Any, name: str, dt: np.dtype) -> None:
    """Bit for bit, but pow: NumPy's own power differs by an ulp between its contiguous
    (SIMD) and strided loops, so the ops matrix's few ulps."""
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


@pytest.mark.parametrize("dt", [np.float64, np.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "negative strides"])
@pytest.mark.parametrize("name", [n for n in M.GRADS if n not in NUMPY_ONLY_INPUTS])
def test_vjp_matches_numpy(other: Any, name: str, layout: str, dt: Any) -> None:
    """The value and every input's cotangent on the ops matrix's cases."""
    if name.endswith("erf") and other.xp is np:
        pytest.skip("CupyBackend.erf is cupyx.scipy.special.erf: no host emulation")
    f = M.GRADS[name][0]
    xs = [M.tensor(x.numpy().astype(dt)) for x in M._grad_inputs(name, layout)]
    want, pull = gpunet.vjp(f, *xs)
    ct = M.values(want.shape, np.dtype(dt), "any", seed=9)
    wants = pull(M.tensor(ct))
    got, pull_other = gpunet.vjp(f, *[on(other, x.data) for x in xs])
    gots = pull_other(on(other, ct))
    # gelu, silu, softplus, elu, erf: the kernels' and the generic formulas' exp and erf are
    # the libm's (or float32 erfc's), not NumPy's: the dtype's few ulps
    check = close if name.startswith(("silu", "gelu")) else same
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
RTOL = {np.float32: 1e-6, np.float64: 1e-13, np.float16: 2.0**-10, M.BF16.type: 2.0**-7}
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
    g = np.asarray(got if isinstance(got, (np.ndarray, np.generic)) else np.from_dlpack(got))
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


@pytest.mark.parametrize(
    ("other", "dt"),
    with_backends([np.float32, np.float64, np.float16, M.BF16.type]),
    indirect=["other"],
)
@pytest.mark.parametrize(("name", "alpha"), ACTS, ids=[a for a, _ in ACTS])
def test_fused_activation_matches_numpy(other: Any, name: str, alpha: float, dt: Any) -> None:
    """activation, activation_backward (from x and from y) and bias_activation, over shapes
    with size 0 and non-contiguous inputs."""
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


# ---------------------------------------------------------------------- losses
@pytest.mark.parametrize(
    ("other", "dt"), with_backends([np.float32, np.float64, np.float16]), indirect=["other"]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_numpy(other: Any, reduction: str, dt: Any) -> None:
    """The row kernels' loss and gradient, over batches of 0, 1 and 9 rows of 1 to 13
    classes: libm's exp and log, so the dtype's few ulps."""
    for rows, classes in [(0, 3), (1, 1), (9, 13), (4, 5)]:
        if rows == 0 and reduction == "mean":
            continue  # a mean over no rows is refused alike (test_ops_matrix)
        z = M.values((rows, classes), np.dtype(dt), "any").astype(dt) * dt(4)
        y = np.random.default_rng(rows).integers(0, classes, rows)
        g = np.full((rows,) if reduction == "none" else (), 0.75, dt)
        want = NP.cross_entropy(z, y, reduction=reduction)
        want_dz = NP.cross_entropy_backward(g, z, y, reduction=reduction)
        zo, yo, go = (a if other.xp is np else other.asarray(a) for a in (z, y, g))
        what = f"{dt.__name__} {rows}x{classes} {reduction}"
        agree(other.cross_entropy(zo, yo, reduction=reduction), want, False, what)
        got_dz = other.cross_entropy_backward(go, zo, yo, reduction=reduction)
        agree(got_dz, want_dz, False, f"{what} backward")


# ---------------------------------------------------------------------- optimizer updates
UPDATES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": False}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
]


def _steps(ops: Any, kind: str, cfg: dict, n: int, scaled: bool, lowp: Any) -> list[np.ndarray]:
    """Four updates of a float32 p (size n): with ``scaled``, a grad_scale of 1/128 and
    found_inf set on the third step (skipped); ``lowp`` the dtype of a copy written each step."""
    conv = (lambda a: a) if ops.xp is np else ops.asarray
    r = np.random.default_rng(n)
    p = conv(r.standard_normal(n).astype(np.float32))
    state = [conv(np.zeros(n, np.float32)), conv(np.zeros(n, np.float32))]
    count = conv(np.zeros(1, np.int64))
    low = None if lowp is None else conv(np.zeros(n, lowp))
    for i in range(4):
        g = conv(r.standard_normal(n).astype(np.float32) * np.float32(128 if scaled else 1))
        extra: dict[str, Any] = {"lowp": low}
        if scaled:
            extra["grad_scale"] = conv(np.array([1 / 128], np.float32))
            extra["found_inf"] = conv(np.array([1.0 if i == 2 else 0.0], np.float32))
        if kind == "sgd":
            buf = state[0] if cfg.get("momentum") else None
            ops.sgd_update(
                p, g, buf, SGDHyper(**cfg), step=count if buf is not None else None, **extra
            )
        else:
            hyper = AdamHyper(**cfg, decoupled=kind == "adamw")
            ops.adam_update(p, g, *state, hyper, step=count, **extra)
    out = [p, *state, count] + ([] if low is None else [low])
    return [np.asarray(a if ops.xp is np else np.from_dlpack(a)) for a in out]


@pytest.mark.parametrize(
    ("other", "lowp"),
    [
        pytest.param("cuda_on_cpu", None, id="cuda_on_cpu-f32"),
        pytest.param("cuda_on_cpu", np.float16, id="cuda_on_cpu-lowp f16"),
        pytest.param("cuda_on_cpu", M.BF16, id="cuda_on_cpu-lowp bf16"),
        pytest.param("generic", None, id="generic-f32"),  # (array_api_strict has no f16, bf16)
    ],
    indirect=["other"],
)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize(("kind", "cfg"), UPDATES, ids=[f"{k}{c}" for k, c in UPDATES])
def test_updates_match_numpy_bit_for_bit(
    other: Any, kind: str, cfg: dict, scaled: bool, lowp: Any
) -> None:
    """SGD (momentum, Nesterov, weight decay) and Adam/AdamW over 4 steps, with a loss scale
    and a skipped step, writing a float16 or bfloat16 copy: the same float32 expressions,
    so bit for bit; sizes 0, 1 and one not a multiple of the kernels' block."""
    for n in (0, 1, 1031):
        got = _steps(other, kind, cfg, n, scaled, lowp)
        want = _steps(NP, kind, cfg, n, scaled, lowp)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (
                f"{kind} {cfg} n={n} array {i}"
            )


# ---------------------------------------------------------------------- one training step
MLP_CASES = [("relu", "sgd"), ("gelu", "sgd"), ("tanh", "adam"), ("leaky_relu", "adam")]


def _train(device: str, activation: str, opt: str, dt: Any) -> list[np.ndarray]:
    """Two steps of an MLP 6-16-16-4 on a batch of 10 (a transposed input): forward,
    cross-entropy, backward, SGD with momentum or Adam; the parameters after, and the loss."""
    gpunet.manual_seed(0)
    model = nn.MLP([6, 16, 16, 4], activation=activation, dtype=dt).to(device)
    r = np.random.default_rng(1)
    x = gpunet.tensor(np.ascontiguousarray(r.standard_normal((6, 10)).astype(dt)).T).to(device)
    y = gpunet.tensor(r.integers(0, 4, 10)).to(device)
    params = list(model.parameters())
    if opt == "sgd":
        optimizer = gpunet.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        optimizer = gpunet.optim.Adam(params, lr=0.01)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = gpunet.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(host(loss))
    return [host(p) for p in params] + losses


@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=str)
@pytest.mark.parametrize(("activation", "opt"), MLP_CASES)
def test_mlp_training_step_matches_numpy(other: Any, activation: str, opt: str, dt: Any) -> None:
    """Forward, backward and update through the Tensor layer, the model moved with
    ``.to(device)``. The first loss bit for bit for relu/leaky_relu on the kernels (the same
    float32 expressions, GEMMs NumPy's here); the parameters to the dtype's rounding carried
    through two steps, as NumPy's backend writes weight gradients with BLAS gemm (alpha,
    beta) and the others with matmul then a scale: the same sums in another order (an ulp)."""
    want = _train("cpu", activation, opt, dt)
    if other.xp is np:
        other._kernels.launches.clear()
    got = _train(str(other.device), activation, opt, dt)
    if other.xp is np:  # the step ran on the kernels, not a fallback
        sfx = {np.float32: "f32", np.float64: "f64"}[dt]
        launched = {name for name, _, _ in other._kernels.launches}
        assert any(n.endswith(f"{activation}_fwd_{sfx}") for n in launched), launched
        assert f"cross_entropy_rows_{sfx}" in launched, launched
        assert dt != np.float32 or f"{opt}_update_f32" in launched, launched
    if activation in ("relu", "leaky_relu") and other.xp is np:
        assert got[-2].tobytes() == want[-2].tobytes(), f"first loss {got[-2]} != {want[-2]}"
    rtol = 1e-5 if dt == np.float32 else 1e-12
    for i, (g, w) in enumerate(zip(got, want)):
        what = f"{activation} {opt} {dt.__name__} array {i}"
        assert g.dtype == w.dtype and g.shape == w.shape, what
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol / 10, err_msg=what)
