"""Backends: one interface, the generic path proven on ``array_api_strict``, the "CuPy but no
GPU" path, and a GPU check that runs wherever a device answers.

(a) NumpyBackend and CupyBackend offer the same methods with the same signatures, and every
    primitive has its forward on the backend.
(b) The generic ArrayBackend runs on array_api_strict, which rejects anything outside the
    array API standard: each primitive's forward there matches the NumPy backend, and the
    Tensor layer runs a forward and backward on strict arrays.
(c) With CuPy installed but no usable GPU, the probe says why and asking for CUDA is a clear
    error, not a CUDA traceback.
(d) GPU tests (marked ``gpu``) compare CUDA results with the CPU's; they skip with the reason
    where no device is present.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet import backend as gb
from gpunet.backend.cupy_backend import CupyBackend  # importable without a GPU
from gpunet.backend.generic import ArrayBackend
from gpunet.backend.numpy_backend import NumpyBackend
from gpunet.primitives import REGISTRY

xps = pytest.importorskip("array_api_strict")
StrictArray = xps._array_object.Array

BACKENDS = (ArrayBackend, NumpyBackend, CupyBackend)


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))
    }


# ---------------------------------------------------------------------- (a) one interface
def test_numpy_and_cupy_backends_offer_the_same_methods() -> None:
    numpy_api, cupy_api = public_methods(NumpyBackend), public_methods(CupyBackend)
    assert sorted(numpy_api) == sorted(cupy_api)
    assert sorted(numpy_api) == sorted(public_methods(ArrayBackend))  # nothing backend-only


@pytest.mark.parametrize("name", sorted(public_methods(ArrayBackend)))
def test_signatures_match_across_backends(name: str) -> None:
    generic, numpy_sig, cupy_sig = (inspect.signature(getattr(c, name)) for c in BACKENDS)
    assert numpy_sig == cupy_sig, f"{name}: numpy {numpy_sig} != cupy {cupy_sig}"
    # an override may narrow a return annotation, never change how it is called
    assert list(numpy_sig.parameters.values()) == list(generic.parameters.values())


def test_backend_names_are_distinct() -> None:
    assert {c.name for c in BACKENDS} == {"generic", "numpy", "cupy"}


def test_cupy_is_not_imported_by_gpunet() -> None:
    code = "import sys, gpunet; gpunet.zeros(1, device='cpu'); print('cupy' in sys.modules)"
    env = {**os.environ, "GPUNET_DEVICE": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_primitive_has_a_backend_method(name: str) -> None:
    method = getattr(ArrayBackend, name, None)
    assert callable(method), f"primitive {name!r} has no forward ArrayBackend.{name}"
    assert method.__name__ == name


# ---------------------------------------------------------------------- (b) array-api-strict
@pytest.fixture(scope="module")
def strict() -> ArrayBackend:
    return ArrayBackend(xps, gpunet.Device("cpu"), StrictArray)


@pytest.fixture(scope="module")
def ref() -> NumpyBackend:
    return NumpyBackend(gpunet.Device("cpu"))


def to_numpy(a: Any) -> np.ndarray:
    """A host array from either backend (strict arrays cross through DLPack)."""
    return np.asarray(np.from_dlpack(a) if isinstance(a, StrictArray) else a)


def gen() -> np.random.Generator:
    return np.random.default_rng(20240607)


X = gen().standard_normal((3, 4))
Y = gen().uniform(0.5, 2.0, (3, 4))
POS = np.abs(X) + 0.5
TIES = np.round(X * 2) / 2  # makes equal entries, so eq/ne/ge/le are exercised
IDX = np.array([[0, 3], [3, 3], [1, 0]])
COND = X > 0.0

# (method, positional raw inputs, params): every primitive forward, and a few with axes
CASES: list[tuple[str, tuple[np.ndarray, ...], dict[str, Any]]] = [
    ("neg", (X,), {}),
    ("exp", (X,), {}),
    ("log", (POS,), {}),
    ("log1p", (POS,), {}),
    ("tanh", (X,), {}),
    ("sqrt", (POS,), {}),
    ("abs", (X,), {}),
    ("sign", (np.array([-2.0, 0.0, 3.0]),), {}),
    ("sigmoid", (np.array([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4]),), {}),
    ("relu", (X,), {}),
    ("leaky_relu", (X,), {"negative_slope": 0.1}),
    ("leaky_relu", (X,), {"negative_slope": -0.2}),
    ("elu", (X,), {"alpha": 1.0}),
    ("softplus", (X * 20,), {"beta": 0.5}),
    ("silu", (X * 10,), {}),
    ("gelu", (X * 4,), {"approximate": "none"}),
    ("gelu", (X * 4,), {"approximate": "tanh"}),
    ("erf", (np.array([-30.0, -3.0, -0.7, -0.5, -0.1, 0.0, 0.3, 0.5, 1.0, 4.0, 27.0]),), {}),
    ("isfinite", (np.array([1.0, np.inf, -np.inf, np.nan]),), {}),
    ("add", (X, Y), {}),
    ("sub", (X, Y), {}),
    ("mul", (X, Y), {}),
    ("div", (X, Y), {}),
    ("pow", (Y, X), {}),
    ("maximum", (X, TIES), {}),
    ("minimum", (X, TIES), {}),
    *[("compare", (TIES, np.round(Y)), {"op": op}) for op in ("lt", "le", "gt", "ge", "eq", "ne")],
    ("where", (COND, X, Y), {}),
    ("cast", (X,), {"dtype": np.dtype(np.float32)}),
    ("cast", (X * 10,), {"dtype": np.dtype(np.int64)}),
    ("copy", (X,), {}),
    ("stop_gradient", (X,), {}),
    *[
        (r, (X,), {"axis": ax, "keepdims": kd})
        for r in ("sum", "max", "logsumexp")
        for ax in ((0,), (1,), (0, 1))
        for kd in (False, True)
    ],
    (
        "logsumexp",
        (np.array([[1e4, 1e4 - 1.0], [-np.inf, -np.inf]]),),
        {"axis": (1,), "keepdims": False},
    ),
    ("argmax", (X,), {"axis": 1, "keepdims": False}),
    ("argmax", (X,), {"axis": 0, "keepdims": True}),
    ("argmax", (X,), {"axis": None, "keepdims": False}),
    ("broadcast_to", (X[:1],), {"shape": (2, 3, 4)}),
    ("reshape", (X,), {"shape": (2, 6)}),
    ("transpose", (X,), {"perm": (1, 0)}),
    ("slice", (X,), {"key": (slice(1, None), slice(None, None, 2))}),
    ("slice", (X,), {"key": (None, 1, slice(None))}),
    ("slice", (X,), {"key": (2,)}),  # a partial key: the array API needs the trailing ...
    ("slice", (X,), {"key": (Ellipsis, slice(1, 3))}),
    (
        "slice_transpose",
        (X[1:, ::2],),
        {"key": (slice(1, None), slice(None, None, 2)), "shape": (3, 4)},
    ),
    ("slice_transpose", (X[2],), {"key": (2,), "shape": (3, 4)}),
    ("slice_transpose", (X[:2],), {"key": (slice(None, 2),), "shape": (3, 4)}),
    ("take", (X, IDX), {"axis": 1}),
    ("take", (X, np.array([2, 0, 2])), {"axis": 0}),
    ("scatter_add", (gen().standard_normal((3, 3, 2)), IDX), {"axis": 1, "size": 5}),
    ("scatter_add", (gen().standard_normal((2, 4)), np.array([1, 1])), {"axis": 0, "size": 3}),
    ("concatenate", (X, Y, X[:1]), {"axis": 0}),
    ("concatenate", (X, Y), {"axis": 1}),
    ("matmul", (X, Y.T), {"tx": False, "ty": False}),
    ("matmul", (X, Y), {"tx": False, "ty": True}),
    ("matmul", (X, Y), {"tx": True, "ty": False}),
    ("matmul", (X, Y.T), {"tx": True, "ty": True}),
    ("linear_activation", (X, Y.T, Y[:, 0]), {"activation": None, "alpha": 0.0}),
    ("linear_activation", (X, Y.T, Y[:, 0]), {"activation": "relu", "alpha": 0.0}),
    ("linear_activation", (X, Y.T, Y[:, 0]), {"activation": "softplus", "alpha": 2.0}),
    *(
        ("cross_entropy", (X, np.array([0, 3, 1])), {"reduction": r})
        for r in ("mean", "sum", "none")
    ),
    ("cross_entropy_backward", (np.array(0.7), X, np.array([0, 3, 1])), {"reduction": "mean"}),
    ("cross_entropy_backward", (np.array(1.5), X, np.array([2, 2, 1])), {"reduction": "sum"}),
    (
        "cross_entropy_backward",
        (np.array([1.0, -2.0, 0.5]), X, np.array([0, 3, 1])),
        {"reduction": "none"},
    ),
    (
        "matmul",
        (gen().standard_normal((2, 3, 4)), gen().standard_normal((2, 4, 5))),
        {"tx": False, "ty": False},
    ),
]


def case_id(case: tuple[str, tuple, dict]) -> str:
    name, _, params = case
    extra = ",".join(f"{k}={v}" for k, v in params.items() if k not in ("key",))
    return f"{name}[{extra}]" if extra else name


def test_cases_cover_every_differentiable_primitive_forward() -> None:
    covered = {c[0] for c in CASES}
    assert set(REGISTRY) - covered <= {"device_put"}


# out <- alpha P + beta out: write, sum into, a scaled write, an SGD step with weight decay
SCALINGS = [(1.0, 0.0), (1.0, 1.0), (-0.5, 0.0), (-0.1, 0.99)]


@pytest.mark.parametrize(("alpha", "beta"), SCALINGS)
@pytest.mark.parametrize(("tx", "ty"), [(False, False), (True, False), (False, True)])
def test_matmul_into_on_array_api_strict_matches_numpy(strict, ref, tx, ty, alpha, beta) -> None:
    a, b = (X.T.copy() if tx else X), (Y if ty else Y.T.copy())
    c0 = gen().standard_normal((3, 3))
    want, got = c0.copy(), strict.asarray(c0.copy())
    ref.matmul_into(want, a, b, tx=tx, ty=ty, alpha=alpha, beta=beta)
    strict.matmul_into(
        got, strict.asarray(a), strict.asarray(b), tx=tx, ty=ty, alpha=alpha, beta=beta
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    np.testing.assert_allclose(want, beta * c0 + alpha * (X @ Y.T), rtol=1e-12)


@pytest.mark.parametrize(("alpha", "beta"), SCALINGS)
def test_sum_into_and_axpby_on_array_api_strict_match_numpy(strict, ref, alpha, beta) -> None:
    c0 = gen().standard_normal(4)
    want, got = c0.copy(), strict.asarray(c0.copy())
    ref.sum_into(want, X, axis=(0,), alpha=alpha, beta=beta)
    strict.sum_into(got, strict.asarray(X), axis=(0,), alpha=alpha, beta=beta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    np.testing.assert_allclose(want, beta * c0 + alpha * X.sum(0), rtol=1e-12)
    x = X[0].copy()
    want, got = c0.copy(), strict.asarray(c0.copy())
    ref.axpby_into(want, x, alpha=alpha, beta=beta)
    strict.axpby_into(got, strict.asarray(x), alpha=alpha, beta=beta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    np.testing.assert_allclose(want, beta * c0 + alpha * x, rtol=1e-12)
    np.testing.assert_array_equal(x, X[0])  # x is not written


def test_beta_zero_does_not_read_out(ref) -> None:
    """BLAS's convention: with beta = 0, NaN or inf already in out does not leak through."""
    for alpha in (1.0, -0.5):
        out = np.full((3, 3), np.nan)
        ref.matmul_into(out, X, Y, tx=False, ty=True, alpha=alpha, beta=0.0)
        np.testing.assert_allclose(out, alpha * (X @ Y.T), rtol=1e-12)
        out = np.full(4, np.inf)
        ref.sum_into(out, X, axis=(0,), alpha=alpha, beta=0.0)
        np.testing.assert_allclose(out, alpha * X.sum(0), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf is right
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_generic_backend_on_array_api_strict_matches_numpy(case, strict, ref) -> None:
    name, args, params = case
    want = getattr(ref, name)(*args, **params)
    got = getattr(strict, name)(*[strict.asarray(a) for a in args], **params)
    assert isinstance(got, StrictArray), f"{name} left the strict namespace: {type(got)}"
    got_np = to_numpy(got)
    want = np.asarray(want)
    assert got_np.shape == want.shape
    assert got_np.dtype == want.dtype
    np.testing.assert_allclose(got_np, want, rtol=1e-13, atol=1e-13)


def test_scatter_add_accumulates_repeats_on_strict(strict) -> None:
    g = strict.asarray(np.ones((1, 4)))
    out = strict.scatter_add(g, strict.asarray(np.array([2, 0, 2, 2])), axis=1, size=3)
    np.testing.assert_array_equal(to_numpy(out), [[1.0, 0.0, 3.0]])


def test_generic_helpers_on_strict(strict, ref) -> None:
    for dtype in (np.float32, np.float64, np.int64):
        assert to_numpy(strict.zeros((2, 3), dtype)).dtype == dtype
    np.testing.assert_array_equal(to_numpy(strict.ones((2,), np.float32)), [1.0, 1.0])
    np.testing.assert_array_equal(to_numpy(strict.full((2,), 3.5, np.float64)), [3.5, 3.5])
    np.testing.assert_array_equal(to_numpy(strict.arange(0, 5, 2, np.int64)), [0, 2, 4])
    assert isinstance(strict.to_numpy(strict.asarray(X)), np.ndarray)
    np.testing.assert_array_equal(strict.to_numpy(strict.asarray(X)), X)
    assert strict.all_finite(strict.asarray(X))
    assert not strict.all_finite(strict.asarray(np.array([1.0, np.nan])))
    np.testing.assert_array_equal(
        to_numpy(strict.nonzero_flat(strict.asarray(COND))), ref.nonzero_flat(COND)
    )
    a = strict.asarray(X)
    c = strict.copy(a)
    c[0, 0] = 123.0
    assert to_numpy(a)[0, 0] == X[0, 0]  # a real copy
    for kind, draw in (("normal", "standard_normal"), ("uniform", "random")):
        r = strict.random(gpunet.Generator(3), kind, (4,), np.float32)
        assert isinstance(r, StrictArray) and to_numpy(r).dtype == np.float32
        want = getattr(np.random.default_rng(3), draw)(4).astype(np.float32)
        np.testing.assert_array_equal(to_numpy(r), want)  # the host stream, cast


@pytest.fixture
def strict_tensors(strict):
    """Strict arrays registered with gpunet, so ``Tensor(array)`` wraps them."""
    gb.register_backend(StrictArray, strict)
    yield strict
    gb.register_backend(StrictArray, None)


def test_unregistered_array_types_are_rejected() -> None:
    with pytest.raises(TypeError, match="no gpunet backend for arrays of type Array"):
        gpunet.Tensor(xps.asarray([1.0]))


def _mlp_loss(x: gpunet.Tensor, w: gpunet.Tensor, b: gpunet.Tensor) -> gpunet.Tensor:
    """A small expression touching most primitives: matmul, broadcasting, activations,
    softmax, slicing, integer and mask indexing, reductions, concatenation."""
    h = (x @ w + b).tanh()
    logp = h.log_softmax(-1)
    picked = logp[[0, 2, 2]]
    extra = gpunet.concatenate([h.sigmoid(), h.relu()], 1).var(0).sum()
    rows = gpunet.concatenate([x, x[:1] * 3.0], 0)[-1].sum()  # partial slice keys in backward
    masked = x[x > 0.0].exp().log1p().mean()
    return -(picked * 2.0).sum() + extra + rows + masked + x[1:, ::2].max() + (w**2.0).sqrt().sum()


def test_tensor_forward_and_backward_on_strict_arrays(strict_tensors) -> None:
    rng = np.random.default_rng(5)
    raw = [rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)]

    strict_args = [gpunet.Tensor(strict_tensors.asarray(a), requires_grad=True) for a in raw]
    loss = _mlp_loss(*strict_args)
    assert loss._backend is strict_tensors and isinstance(loss.data, StrictArray)
    assert loss.dtype == np.float64
    loss.backward()

    numpy_args = [gpunet.tensor(a, requires_grad=True) for a in raw]
    want = _mlp_loss(*numpy_args)
    want.backward()

    np.testing.assert_allclose(to_numpy(loss.data), want.numpy(), rtol=1e-12)
    for s, n in zip(strict_args, numpy_args):
        assert isinstance(s.grad.data, StrictArray)
        np.testing.assert_allclose(to_numpy(s.grad.data), n.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_tensor_transforms_on_strict_arrays(strict_tensors) -> None:
    x = gpunet.Tensor(strict_tensors.asarray(np.array([0.3, -1.2, 2.0])))
    f = lambda t: (t.sigmoid() * t).sum()
    g = gpunet.grad(f)(x)
    assert isinstance(g.data, StrictArray)
    a = np.array([0.3, -1.2, 2.0])
    s = 1 / (1 + np.exp(-a))
    np.testing.assert_allclose(to_numpy(g.data), s + a * s * (1 - s), rtol=1e-12)
    _, tangent = gpunet.jvp(f, (x,), (gpunet.Tensor(strict_tensors.asarray(np.ones(3))),))
    np.testing.assert_allclose(to_numpy(tangent.data), (s + a * s * (1 - s)).sum(), rtol=1e-12)


# ---------------------------------------------------------------------- (c) CuPy but no GPU
def _cupy_without_gpu() -> tuple[Any, BaseException]:
    """(cupy, the exception asking it for devices raised), or skip."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return cupy, e
    pytest.skip(f"CuPy sees {count} CUDA device(s) here; this test needs a machine without")


@pytest.fixture
def real_probe(monkeypatch):
    """The probe as this machine answers it (nothing simulated)."""
    monkeypatch.delenv("GPUNET_DEVICE", raising=False)
    gb._reset_probe()
    yield
    gb._reset_probe()


def test_probe_with_cupy_but_no_driver(real_probe) -> None:
    cupy, error = _cupy_without_gpu()
    found = gb.probe_cuda()
    assert found.available is False
    assert found.device_count == 0 and found.devices == ()
    assert found.cupy_version == cupy.__version__
    assert "driver" in found.reason and cupy.__version__ in found.reason
    assert str(error) in found.reason


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpunet.tensor([1.0, 2.0], device="cuda"),
        lambda: gpunet.zeros(3, device="cuda:0"),
        lambda: gpunet.randn(3, device="cuda"),
    ],
)
def test_cuda_request_without_gpu_is_a_clear_error(real_probe, make) -> None:
    _cupy_without_gpu()
    with pytest.raises(RuntimeError) as err:
        make()
    assert type(err.value) is RuntimeError  # gpunet's own error, not CuPy's CUDARuntimeError
    message = str(err.value)
    assert "device cuda:0 requested but not usable" in message
    assert "driver" in message and "device='cpu'" in message


# ---------------------------------------------------------------------- (d) on a GPU
_probe = gb.probe_cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not _probe.available, reason=f"no CUDA device: {_probe.reason}")
class TestOnGPU:
    def test_forward_backward_matches_cpu(self) -> None:
        rng = np.random.default_rng(11)
        raw = [rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)]
        results = {}
        for dev in ("cpu", "cuda"):
            args = [gpunet.tensor(a, device=dev, requires_grad=True) for a in raw]
            loss = _mlp_loss(*args)
            assert loss.device.type == dev
            assert loss._backend.name == ("numpy" if dev == "cpu" else "cupy")
            assert isinstance(loss.data, loss._backend.array_type)
            loss.backward()
            results[dev] = [loss.numpy()] + [a.grad.numpy() for a in args]
        for got, want in zip(results["cuda"], results["cpu"]):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

    def test_transfer_round_trip_and_gradient(self) -> None:
        x = gpunet.tensor([1.0, -2.0, 3.0], dtype=gpunet.float64, requires_grad=True)
        y = x.to("cuda")
        assert y.device == "cuda:0"
        (y * y).sum().backward()
        assert x.grad.device == "cpu"
        np.testing.assert_array_equal(x.grad.numpy(), [2.0, -4.0, 6.0])

    def test_random_is_reproducible_on_device(self) -> None:
        a = gpunet.randn(5, device="cuda", generator=gpunet.Generator(1)).numpy()
        b = gpunet.randn(5, device="cuda", generator=gpunet.Generator(1)).numpy()
        np.testing.assert_array_equal(a, b)

    def test_dlpack_shares_device_memory(self) -> None:
        import cupy

        t = gpunet.zeros(3, device="cuda")
        c = cupy.from_dlpack(t)
        c[1] = 4.0
        assert t.tolist() == [0.0, 4.0, 0.0]
        u = gpunet.from_dlpack(c)
        assert u.device == "cuda:0" and u.data.data.ptr == t.data.data.ptr


@pytest.mark.parametrize("dtype", [gpunet.float16, gpunet.bfloat16])
def test_low_precision_draws_on_numpy_come_from_float32_and_stay_below_one(dtype: Any) -> None:
    """NumPy's generators draw float32 or float64 only: float16 raised 'Unsupported dtype'
    (dropout under float16 autocast, `gpunet train --precision fp16 --dropout ...`). Uniform
    draws keep [0, 1): the float32 draw floored onto the dtype's grid (rounding it would
    give 1.0 for the top 2**-9 of bfloat16 draws)."""
    digits = {gpunet.float16: 11, gpunet.bfloat16: 8}[dtype]
    u = gpunet.rand(200_000, dtype=dtype, generator=gpunet.Generator(0)).numpy()
    assert u.dtype == dtype and u.min() >= 0 and u.max() < 1
    want = np.random.default_rng(0).random(200_000, dtype=np.float32)
    want = np.floor(want * 2.0**digits) / 2.0**digits
    np.testing.assert_array_equal(u.astype(np.float32), want)
    z = gpunet.randn(1000, dtype=dtype, generator=gpunet.Generator(1)).numpy()
    want_z = np.random.default_rng(1).standard_normal(1000, dtype=np.float32).astype(dtype)
    np.testing.assert_array_equal(z.view(np.uint16), want_z.view(np.uint16))
    kept = gpunet.nn.functional.dropout(gpunet.ones(4000, dtype=dtype), 0.25).numpy()
    scale = float(np.array(4 / 3, dtype))  # 1 / (1 - p) in the dtype
    assert kept.dtype == dtype and set(np.unique(kept.astype(np.float32))) == {0.0, scale}


@pytest.mark.parametrize("dtype", [gpunet.float16, gpunet.bfloat16])
@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_cupy_draws_two_byte_floats_through_float32_like_numpy(dtype: Any, kind: str) -> None:
    """CuPy's generators draw float32 or float64 only, so float16 (dropout under float16
    autocast on CUDA) raised there: a stand-in CupyBackend over NumPy's generator draws the
    same bits as the NumPy backend, uniform draws floored onto the grid below 1."""
    import contextlib

    cupy_like = object.__new__(CupyBackend)
    ArrayBackend.__init__(cupy_like, np, gb.Device("cuda", 0), np.ndarray)
    cupy_like._cuda_device = contextlib.nullcontext()

    class Gen:
        def __init__(self) -> None:
            self.host_rng = np.random.default_rng(0)

        def device_rng(self, backend: object) -> np.random.Generator:
            return self.host_rng

    got = cupy_like.random(Gen(), kind, (1000,), np.dtype(dtype))
    want = NumpyBackend(gb.CPU).random(Gen(), kind, (1000,), np.dtype(dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    if kind == "uniform" and dtype == gpunet.float16:
        f32 = np.random.default_rng(0).random(1000, dtype=np.float32)
        np.testing.assert_array_equal(got, (np.floor(f32 * 2048) / 2048).astype(np.float16))
