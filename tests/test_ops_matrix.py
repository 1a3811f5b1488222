"""Every public op and Tensor method against NumPy, over the inputs a user meets.

For each op of the README's tour and ``gpunet.ops``: shapes (0-d, size 0, size-1 axes,
broadcasting both ways), input layouts (contiguous, transposed, negative strides, zero
strides, gpunet's own views), dtypes (float32, float64, float16, bfloat16, ints and booleans
where allowed) and Python scalars on either side. Each case holds:

1. the forward to NumPy's, bit for bit where NumPy computes the same expression (float16 and
   bfloat16 compute in float32 and round once, so NumPy's float32 result rounded once is the
   same expression), else to a few ulps of the dtype, named per op below;
2. in float64, forward mode and reverse mode to central differences, and their own
   derivatives (``check_grads(order=2)``: grad of grad);
3. the JVP and the VJP to transposes of each other, <J v, u> == <v, J^T u> to rounding;
4. a refusal (shape mismatch, dtype mixing, out-of-range index or axis, integers where a
   derivative is asked) to one error naming the op, with its shapes or dtypes, raised before
   anything changed.

Below the matrix, one test per bug it found, each saying what a user saw before the fix; and
the two modes held to one choice where the derivative is a choice (ties, kinks).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.special

import gpunet
import gpunet.nn.functional as F
from gpunet.testing import check_grads

# (NumPy's references warn on log(0), 0/0 and friends: the cases choose those on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow)")

BF16 = gpunet.bfloat16
FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16)
LOW = (np.dtype(np.float16), BF16)
INTS = (np.dtype(np.int32), np.dtype(np.int64))
# ulps of slack for ops whose NumPy reference is a different formula (per dtype's epsilon)
ULPS = 4


def tensor(a: np.ndarray) -> gpunet.Tensor:
    return gpunet.as_tensor(a)


def compute_dtype(dt: np.dtype) -> np.dtype:
    """NumPy's reference dtype: low-precision storage computes in float32, as gpunet does."""
    return np.dtype(np.float32) if dt in LOW else dt


def reference(fn: Callable[..., Any], dt: np.dtype, *arrays: Any, **kwargs: Any) -> np.ndarray:
    """fn on the arrays in ``dt``'s compute dtype, rounded once to ``dt`` (floats only)."""
    cd = compute_dtype(dt)
    args = [a.astype(cd) if isinstance(a, np.ndarray) and a.dtype == dt else a for a in arrays]
    out = np.asarray(fn(*args, **kwargs))
    return out.astype(dt) if out.dtype.kind == "f" and cd.kind == "f" else out


def assert_bits(got: gpunet.Tensor, want: np.ndarray, what: str) -> None:
    g = got.numpy()
    assert (g.dtype, g.shape) == (want.dtype, want.shape), f"{what}: {g.dtype} {g.shape}"
    assert g.tobytes() == want.tobytes(), f"{what}: {g.ravel()[:6]} != {want.ravel()[:6]}"


def assert_ulps(got: gpunet.Tensor, want: np.ndarray, what: str, ulps: float = ULPS) -> None:
    g = got.numpy()
    assert (g.dtype, g.shape) == (want.dtype, want.shape), f"{what}: {g.dtype} {g.shape}"
    eps = float(np.finfo(np.float32 if g.dtype == BF16 else g.dtype).eps)
    eps = 2.0**-7 if g.dtype == BF16 else eps
    g64, w64 = g.astype(np.float64), want.astype(np.float64)
    ok = np.isclose(g64, w64, rtol=ulps * eps, atol=ulps * eps, equal_nan=True)
    assert ok.all(), f"{what}: {g64[~ok][:4]} != {w64[~ok][:4]}"


def values(shape: tuple[int, ...], dt: np.dtype, domain: str, seed: int = 0) -> np.ndarray:
    """Values of ``shape`` in ``dt``: "any" normal, "pos" in [0.5, 2.5), away from kinks."""
    r = np.random.default_rng(seed)
    if dt.kind in "iu":
        return r.integers(-5, 6, shape).astype(dt)
    a = r.standard_normal(shape)
    a = np.abs(a) + 0.5 if domain == "pos" else np.sign(a) * (np.abs(a) + 0.1)
    return a.astype(dt)


def layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as a contiguous array, a transposed view, a negatively strided view
    and (for a leading size-1 axis) a zero-strided broadcast view."""
    out = {"contiguous": a, "transposed": np.ascontiguousarray(a.T).T}
    flipped = np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])
    out["negative strides"] = flipped[(slice(None, None, -1),) * a.ndim]
    if a.ndim and a.shape[0] == 1:
        out["zero strides"] = np.broadcast_to(np.ascontiguousarray(a), a.shape)
    return out


# ---------------------------------------------------------------------- (1) elementwise
# name: (gpunet, NumPy, domain, exact) -- exact: NumPy computes the same expression
UNARY: dict[str, tuple[Callable, Callable, str, bool]] = {
    "neg": (lambda x: -x, np.negative, "any", True),
    "abs": (lambda x: x.abs(), np.abs, "any", True),
    "exp": (lambda x: x.exp(), np.exp, "any", True),
    "log": (lambda x: x.log(), np.log, "pos", True),
    "log1p": (lambda x: x.log1p(), np.log1p, "pos", True),
    "sqrt": (lambda x: x.sqrt(), np.sqrt, "pos", True),
    "tanh": (lambda x: x.tanh(), np.tanh, "any", True),
    "relu": (lambda x: x.relu(), lambda a: np.maximum(a, 0), "any", True),
    # sigmoid is exp(min(x, 0)) / (1 + exp(-|x|)): not NumPy's expression, so a few ulps
    "sigmoid": (lambda x: x.sigmoid(), lambda a: 1 / (1 + np.exp(-a)), "any", False),
    "gelu": (gpunet.gelu, lambda a: a * (1 + scipy.special.erf(a / np.sqrt(2))) / 2, "any", False),
    "silu": (gpunet.silu, lambda a: a / (1 + np.exp(-a)), "any", False),
}
SHAPES = [(), (0,), (1,), (3, 4), (2, 1, 3)]


@pytest.mark.parametrize("dt", FLOATS, ids=str)
@pytest.mark.parametrize("name", UNARY)
def test_unary_forward(name: str, dt: np.dtype) -> None:
    fn, ref, domain, exact = UNARY[name]
    for shape in SHAPES:
        for layout, a in layouts(values(shape, dt, domain)).items():
            want = reference(ref, dt, a)
            check = assert_bits if exact else assert_ulps
            check(fn(tensor(a)), want, f"{name} {dt} {shape} {layout}")


BINARY: dict[str, tuple[Callable, Callable, str]] = {
    "add": (lambda x, y: x + y, np.add, "any"),
    "sub": (lambda x, y: x - y, np.subtract, "any"),
    "mul": (lambda x, y: x * y, np.multiply, "any"),
    "div": (lambda x, y: x / y, np.divide, "pos"),
    "pow": (lambda x, y: x**y, np.power, "pos"),
    "maximum": (gpunet.maximum, np.maximum, "any"),
    "minimum": (gpunet.minimum, np.minimum, "any"),
    "lt": (lambda x, y: x < y, np.less, "any"),
    "ge": (lambda x, y: x >= y, np.greater_equal, "any"),
    "eq": (lambda x, y: x == y, np.equal, "any"),
}
PAIRS = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((), (2, 3)), ((0, 3), (3,))]
PAIRS += [((2, 1, 3), (4, 1)), ((1,), (0,))]


@pytest.mark.parametrize("dt", FLOATS, ids=str)
@pytest.mark.parametrize("name", BINARY)
def test_binary_forward(name: str, dt: np.dtype) -> None:
    """Broadcasting both ways, every layout on the left: bit for bit."""
    fn, ref, domain = BINARY[name]
    for sa, sb in PAIRS:
        b = values(sb, dt, domain, seed=1)
        for layout, a in layouts(values(sa, dt, domain)).items():
            what = f"{name} {dt} {sa} {sb} {layout}"
            assert_bits(fn(tensor(a), tensor(b)), reference(ref, dt, a, b), what)
            assert_bits(fn(tensor(b), tensor(a)), reference(ref, dt, b, a), what + " swapped")


@pytest.mark.parametrize("dt", FLOATS + INTS, ids=str)
@pytest.mark.parametrize("name", BINARY)
def test_python_scalars_take_the_tensor_dtype(name: str, dt: np.dtype) -> None:
    """x op s and s op x: the scalar becomes the tensor's dtype (no promotion); a float
    scalar makes an integer tensor float32, as does int / int."""
    fn, ref, domain = BINARY[name]
    a = values((2, 3), dt, domain)
    for s in (2, 3.0, 0.5, True):
        if name == "pow" and dt.kind in "iu" and isinstance(s, float):
            continue  # (a float power of an int tensor: float32 below, with the others)
        float_of_int = dt.kind in "iu" and (isinstance(s, float) or name == "div")
        cd = np.dtype(np.float32) if float_of_int else dt
        av = a.astype(cd)
        sv = cd.type(s)
        for x, y, ra, rb in ((tensor(a), s, av, sv), (s, tensor(a), sv, av)):
            if name == "pow" and x is s and dt.kind in "iu":
                continue  # (NumPy refuses negative integer powers, and so does gpunet)
            if not isinstance(x, gpunet.Tensor) and name in ("maximum", "minimum"):
                x, y, ra, rb = y, x, rb, ra
            want = reference(ref, cd, ra, rb)
            assert_bits(fn(x, y), np.asarray(want), f"{name} {dt} {x!r:.20} {y!r:.20}")


@pytest.mark.parametrize("dt", INTS, ids=str)
def test_integer_arithmetic(dt: np.dtype) -> None:
    a, b = values((3, 4), dt, "any"), values((4,), dt, "any", seed=1)
    b[b == 0] = 1
    for name in ("add", "sub", "mul", "maximum", "minimum", "lt", "eq"):
        fn, ref, _ = BINARY[name]
        assert_bits(fn(tensor(a), tensor(b)), ref(a, b), f"{name} {dt}")
    assert_bits(tensor(a) / tensor(b), (a / b).astype(np.float32), f"div {dt}")
    assert_bits(tensor(a).abs(), np.abs(a), "abs")
    assert_bits(tensor(a).relu(), np.maximum(a, 0), "relu")
    assert_bits(tensor(a).clip(-2, 3), np.clip(a, -2, 3), "clip")
    assert_bits(tensor(a).sum(axis=0), a.sum(axis=0), "sum")
    assert_bits(tensor(a).max(axis=1), a.max(axis=1), "max")
    assert_bits(tensor(a).min(), np.asarray(a.min()), "min")
    assert_bits(tensor(a) @ tensor(a.T), a @ a.T, "matmul")
    m = a > 0
    assert_bits(tensor(m).sum(), np.asarray(m.sum()), "bool sum")
    assert_bits(tensor(m) * 1.5, m.astype(np.float32) * np.float32(1.5), "bool * float")
    assert_bits(tensor(m) + 1, m.astype(np.int64) + 1, "bool + int")


# ---------------------------------------------------------------------- (1) reductions
AXES = [None, 0, -1, (0, 2), ()]


@pytest.mark.parametrize("dt", FLOATS, ids=str)
@pytest.mark.parametrize("name", ["sum", "max", "min", "mean", "var", "logsumexp"])
def test_reductions(name: str, dt: np.dtype) -> None:
    """sum, max and min are NumPy's expression (bit for bit); mean, var and logsumexp are
    formulas of their own (mean multiplies by 1/n, var subtracts the mean first)."""
    refs = {
        "sum": np.sum,
        "max": np.max,
        "min": np.min,
        "mean": np.mean,
        "var": lambda a, axis, keepdims: np.var(a, axis=axis, keepdims=keepdims, ddof=1),
        "logsumexp": scipy.special.logsumexp,
    }
    check = assert_bits if name in ("sum", "max", "min") else assert_ulps
    # NumPy reduces float16 natively (a float32 accumulator, rounded per axis), as gpunet does
    native = name in ("sum", "max", "min") and dt == np.float16
    for shape in [(2, 3, 4), (1, 3, 1)]:
        for layout, a in layouts(values(shape, dt, "any")).items():
            for axis in AXES:
                for keepdims in (False, True):
                    got = getattr(tensor(a), name)(axis=axis, keepdims=keepdims)
                    ref = refs[name]
                    want = np.asarray(
                        ref(a, axis=axis, keepdims=keepdims)
                        if native
                        else reference(ref, dt, a, axis=axis, keepdims=keepdims)
                    )
                    check(got, want, f"{name} {dt} {shape} {layout} {axis}")


# ---------------------------------------------------------------------- (1) matmul
MATMUL = [((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)), ((5, 2, 3), (3, 4))]
MATMUL += [((2, 3), (5, 3, 4)), ((5, 2, 3), (5, 3, 4)), ((1, 2, 3), (5, 3, 4))]
MATMUL += [((5, 1, 2, 3), (4, 3, 2)), ((0, 3), (3, 4)), ((2, 0), (0, 4)), ((3,), (2, 3, 4))]


@pytest.mark.parametrize("dt", FLOATS, ids=str)
def test_matmul(dt: np.dtype) -> None:
    """NumPy's rules: vectors, batch axes broadcast both ways, size 0 (a zero-size inner
    axis gives zeros); bit for bit in float32 and float64 (the same BLAS call)."""
    for sa, sb in MATMUL:
        b = values(sb, dt, "any", seed=1)
        for layout, a in layouts(values(sa, dt, "any")).items():
            check = assert_ulps if dt in LOW else assert_bits
            got = tensor(a) @ tensor(b)
            check(got, reference(np.matmul, dt, a, b), f"matmul {dt} {sa} {sb} {layout}")


# ---------------------------------------------------------------------- (1) shapes, indexing
BASIC_KEYS: list[Any] = [
    (slice(None, None, -1),),
    (slice(None, None, -2), slice(1, None, -1)),
    (Ellipsis, slice(None, None, -1)),
    (None, 1),
    (-1,),
    (slice(10, 20),),
    (slice(-100, 100, 3),),
    (1, -2),
    (slice(None), None, slice(3, 0, -1)),
]
ARRAY_KEYS: list[Any] = [
    ([0, 2, -1],),
    (np.array([[0, 1], [3, 3]]),),
    (np.array([], dtype=np.int64),),
    (slice(None), [4, 0, -5]),
    ([0, 1], [2, 3]),
    (np.array([True, False, True, True]),),
    (slice(None), np.array([True, False, False, True, True])),
    (np.arange(20).reshape(4, 5) % 3 == 0,),
]


@pytest.mark.parametrize("dt", FLOATS + INTS, ids=str)
def test_indexing(dt: np.dtype) -> None:
    """Basic keys (negative steps, None, Ellipsis, out-of-range slices), integer arrays as
    lists and tensors (negative entries), boolean masks; on every layout."""
    for layout, a in layouts(values((4, 5), dt, "any")).items():
        x = tensor(a)
        for key in BASIC_KEYS + ARRAY_KEYS:
            assert_bits(x[key], a[key], f"{dt} {layout} x[{key}]")
            as_tensors = tuple(tensor(np.asarray(k)) if isinstance(k, list) else k for k in key)
            assert_bits(x[as_tensors], a[key], f"{dt} {layout} x[{key}] (tensors)")
        assert_bits(x[::-1].T[1:, ::-2], a[::-1].T[1:, ::-2], "views of views")
        assert_bits(
            x[::-1].exp() if dt.kind == "f" else x[::-1].abs(),
            reference(np.exp if dt.kind == "f" else np.abs, dt, a[::-1]),
            "op on a view",
        )


@pytest.mark.parametrize("dt", FLOATS + INTS, ids=str)
def test_shape_ops(dt: np.dtype) -> None:
    a = values((2, 3, 4), dt, "any")
    x = tensor(a)
    assert_bits(x.reshape(4, -1), a.reshape(4, -1), "reshape")
    assert_bits(x.permute(2, 0, 1), a.transpose(2, 0, 1), "permute")
    assert_bits(x.transpose(0, -1), a.swapaxes(0, -1), "transpose")
    assert_bits(x.T, a.T, ".T")
    assert_bits(x.flatten(1), a.reshape(2, 12), "flatten")
    assert_bits(x[:, :1].squeeze(), a[:, :1].squeeze(), "squeeze")
    assert_bits(x.unsqueeze(-1), a[..., None], "unsqueeze")
    assert_bits(x[:1].broadcast_to((3, 3, 4)), np.broadcast_to(a[:1], (3, 3, 4)), "bcast")
    b = values((2, 1, 4), dt, "any", seed=1)
    cat = gpunet.concatenate([x, tensor(b), x[:, :0]], axis=1)
    assert_bits(cat, np.concatenate([a, b, a[:, :0]], axis=1), "concatenate")
    assert_bits(gpunet.concatenate([x.T, x.T], -1), np.concatenate([a.T, a.T], -1), "cat -1")
    for axis in (0, 1, -1, 3):
        assert_bits(gpunet.stack([x, x[::-1]], axis), np.stack([a, a[::-1]], axis), "stack")
    assert_bits(gpunet.stack([x[0, 0, 0], x[1, 2, 3]]), np.stack([a[0, 0, 0], a[1, 2, 3]]), "0-d")
    cond = a > 0
    assert_bits(gpunet.where(tensor(cond), x, x[:1]), np.where(cond, a, a[:1]), "where")
    lo, hi = (dt.type(-1), dt.type(1)) if dt.kind in "iu" else (-0.5, 0.5)
    want = reference(lambda v: np.clip(v, np.asarray(lo, v.dtype), np.asarray(hi, v.dtype)), dt, a)
    assert_bits(x.clip(lo, hi), want, "clip")


CAST_SOURCE = np.array([-2.7, -0.5, 0.5, 1.5, 2.5, 1e5, 70000.0, np.inf, -np.inf, np.nan])


@pytest.mark.parametrize("src", FLOATS, ids=str)
def test_casts(src: np.dtype) -> None:
    """x.to(dtype) is NumPy's astype, bit for bit, between every float dtype and to ints
    and booleans (finite values only where the target is an integer: NumPy's own result
    there is platform-defined)."""
    a = CAST_SOURCE.astype(src)
    for dst in FLOATS + INTS + (np.dtype(bool),):
        v = a[:7] if dst.kind in "iu" else a
        assert_bits(tensor(v).to(dst), v.astype(dst), f"{src} -> {dst}")
        assert_bits(tensor(v[::-2]).to(dst), v[::-2].astype(dst), f"{src} -> {dst} view")


# ---------------------------------------------------------------------- (1) losses, softmax
@pytest.mark.parametrize("dt", FLOATS, ids=str)
def test_softmax_and_losses(dt: np.dtype) -> None:
    z = values((4, 5), dt, "any")
    lab = np.array([0, 4, 2, 4])
    for axis in (0, -1):
        want = reference(scipy.special.softmax, dt, z, axis=axis)
        assert_ulps(tensor(z).softmax(axis), want, f"softmax {dt} {axis}")
        want = reference(scipy.special.log_softmax, dt, z, axis=axis)
        assert_ulps(tensor(z).log_softmax(axis), want, f"log_softmax {dt} {axis}", 8)

    def ce(v: np.ndarray) -> np.ndarray:
        return -scipy.special.log_softmax(v, axis=1)[np.arange(4), lab]

    for reduction, red in (("none", ce), ("sum", lambda v: ce(v).sum())):
        got = F.cross_entropy(tensor(z), gpunet.tensor(lab), reduction=reduction)
        assert_ulps(got, np.asarray(reference(red, dt, z)), f"cross_entropy {reduction}", 8)
    got = F.cross_entropy(tensor(z), gpunet.tensor(lab))
    assert_ulps(got, np.asarray(reference(lambda v: ce(v).mean(), dt, z)), "ce mean", 8)
    y = values((4, 5), dt, "any", seed=1)
    want = reference(lambda u, w: ((u - w) ** 2).mean(), dt, z, y)
    assert_ulps(F.mse_loss(tensor(z), tensor(y)), np.asarray(want), "mse_loss")


# ---------------------------------------------------------------------- (2-4) derivatives
def _labels() -> gpunet.Tensor:
    return gpunet.tensor([0, 2, 1, 2])


def _mask() -> gpunet.Tensor:
    return gpunet.tensor([True, False, True])


# name: (function of float64 tensors, the shapes and domains of its inputs)
GRADS: dict[str, tuple[Callable[..., gpunet.Tensor], list[tuple[tuple[int, ...], str]]]] = {
    "add broadcast both ways": (lambda a, b: a + b, [((3, 1), "any"), ((1, 4), "any")]),
    "sub": (lambda a, b: a - b, [((3, 4), "any"), ((4,), "any")]),
    "mul 0-d": (lambda a, b: a * b, [((), "any"), ((2, 3), "any")]),
    "div": (lambda a, b: a / b, [((2, 3), "any"), ((3,), "pos")]),
    "scalar on the left": (lambda a: 2.0 / a - 3.0 * a + (1 - a), [((2, 3), "pos")]),
    "pow": (lambda a, b: a**b, [((2, 3), "pos"), ((2, 1), "any")]),
    "pow scalar": (lambda a: a**3 + 2.0**a, [((2, 3), "any")]),
    "maximum, minimum": (
        lambda a, b: gpunet.maximum(a, b) * gpunet.minimum(b, a),
        [((3, 4), "any"), ((4,), "pos")],
    ),
    "exp, log, log1p, sqrt": (
        lambda a: a.exp() + a.log() + a.log1p() + a.sqrt(),
        [((2, 3), "pos")],
    ),
    "tanh, sigmoid, abs": (lambda a: a.tanh() * a.sigmoid() + a.abs(), [((2, 3), "any")]),
    "relu": (lambda a: a.relu(), [((2, 3), "any")]),
    "gelu": (lambda a: gpunet.gelu(a) + gpunet.gelu(a, approximate="tanh"), [((2, 3), "any")]),
    "silu, softplus, elu, leaky_relu, erf": (
        lambda a: (
            gpunet.silu(a)
            + gpunet.softplus(a)
            + gpunet.elu(a)
            + gpunet.leaky_relu(a)
            + gpunet.erf(a)
        ),
        [((3, 2), "any")],
    ),
    "softmax": (lambda a: a.softmax(0), [((3, 4), "any")]),
    "log_softmax": (lambda a: a.log_softmax(), [((3, 4), "any")]),
    "logsumexp": (lambda a: a.logsumexp((0, 2), keepdims=True), [((2, 3, 4), "any")]),
    "sum, mean": (lambda a: a.sum(1) + a.mean((0, 2), keepdims=True).sum(), [((2, 3, 4), "any")]),
    "var, std": (lambda a: a.var(0) + a.std(1).sum(), [((3, 4), "any")]),
    "max, min": (lambda a: a.max(1) + a.min(), [((3, 4), "any")]),
    "0-d": (lambda a: a.exp() * a + a.logsumexp(), [((), "any")]),
    "size 0": (lambda a: a.exp().sum(0), [((0, 3), "any")]),
    "matmul batch": (lambda a, b: a @ b, [((2, 1, 2, 3), "any"), ((4, 3, 2), "any")]),
    "matmul vector": (lambda a, b: a @ b, [((3,), "any"), ((2, 3, 4), "any")]),
    "matmul vectors": (lambda a, b: a @ b, [((3,), "any"), ((3,), "any")]),
    "matmul size 0": (lambda a, b: a @ b, [((0, 3), "any"), ((3, 2), "any")]),
    "reshape, permute": (
        lambda a: a.reshape(4, -1).T.permute(1, 0).flatten(),
        [((2, 3, 2), "any")],
    ),
    "slices, negative steps": (lambda a: a[::-1, 1::-2] * a[None, ..., 1:3], [((3, 4), "any")]),
    "integer arrays": (
        lambda a: a[gpunet.tensor([0, 2, 0, -1])] + a[[0, 2], [1, -1]].sum(),
        [((3, 4), "any")],
    ),
    "boolean mask": (lambda a: a[_mask()], [((3, 4), "any")]),
    "concatenate, stack": (
        lambda a, b: gpunet.stack([gpunet.concatenate([a, b], -1)] * 2, 1),
        [((2, 3), "any"), ((2, 1), "any")],
    ),
    "where": (
        lambda a, b: gpunet.where(_mask(), a, b) + gpunet.where(_mask(), a, 0.0),
        [((2, 3), "any"), ((1, 3), "any")],
    ),
    "clip": (lambda a: a.clip(-0.5, 0.5) + a.clip(min=0.05), [((4,), "any")]),
    "broadcast_to, squeeze, unsqueeze": (
        lambda a: a.broadcast_to((2, 3, 4)).unsqueeze(0).squeeze(0),
        [((3, 1), "any")],
    ),
    "cross_entropy": (
        lambda a: F.cross_entropy(a, _labels()) + F.cross_entropy(a, _labels(), reduction="none"),
        [((4, 3), "any")],
    ),
    "cross_entropy smoothed": (
        lambda a: F.cross_entropy(a, _labels(), label_smoothing=0.1),
        [((4, 3), "any")],
    ),
    "mse_loss": (lambda a, b: F.mse_loss(a, b), [((4, 3), "any"), ((4, 3), "any")]),
}


def _grad_inputs(name: str, layout: str) -> list[gpunet.Tensor]:
    specs = GRADS[name][1]
    arrays = [values(s, np.dtype(np.float64), d, seed=i) for i, (s, d) in enumerate(specs)]
    return [tensor(layouts(a).get(layout, a)) for a in arrays]


@pytest.mark.parametrize("layout", ["contiguous", "negative strides"])
@pytest.mark.parametrize("name", GRADS)
def test_derivatives_match_finite_differences(name: str, layout: str) -> None:
    """(2) and (4): forward and reverse mode against central differences, and their own
    derivatives (grad of grad, jvp of jvp), on contiguous and negatively strided inputs."""
    check_grads(GRADS[name][0], _grad_inputs(name, layout), order=2)


@pytest.mark.parametrize("name", GRADS)
def test_jvp_and_vjp_are_transposes(name: str) -> None:
    """(3) <J v, u> == <v, J^T u>: the two modes are one linear map, to rounding."""
    f, xs = GRADS[name][0], _grad_inputs(name, "transposed")
    vs = [
        tensor(values(x.shape, np.dtype(np.float64), "any", seed=7 + i)) for i, x in enumerate(xs)
    ]
    out, jv = gpunet.jvp(f, xs, vs)
    u = tensor(values(out.shape, np.dtype(np.float64), "any", seed=3))
    _, pullback = gpunet.vjp(f, *xs)
    jtu = pullback(u)
    lhs = float(np.vdot(jv.numpy(), u.numpy()))
    rhs = sum(float(np.vdot(v.numpy(), g.numpy())) for v, g in zip(vs, jtu))
    scale = 1.0 + abs(lhs) + sum(float(np.abs(v.numpy()).sum()) for v in vs)
    assert abs(lhs - rhs) <= 1e-12 * scale, f"{name}: <J v, u> = {lhs}, <v, J^T u> = {rhs}"


# ---------------------------------------------------------------------- (5) refusals
def _f32(*shape: int) -> gpunet.Tensor:
    return gpunet.ones(*shape)


def _i64(*shape: int) -> gpunet.Tensor:
    return gpunet.tensor(np.arange(int(np.prod(shape))).reshape(shape))


# name: (the call, the exception, what its message must name)
REFUSALS: dict[str, tuple[Callable[[], Any], type, list[str]]] = {
    "add shapes": (lambda: _f32(2, 3) + _f32(4), ValueError, ["gpunet.add", "(2, 3)", "(4,)"]),
    "add dtypes": (
        lambda: _f32(2, 3) + _f32(3).double(),
        TypeError,
        ["gpunet.add", "float32", "float64"],
    ),
    "add float and int": (
        lambda: _f32(2, 3) + _i64(2, 3),
        TypeError,
        ["gpunet.add", "float32", "int64"],
    ),
    "mul float16 and bfloat16": (
        lambda: _f32(3).to(gpunet.float16) * _f32(3).to(BF16),
        TypeError,
        ["gpunet.mul", "float16", "bfloat16"],
    ),
    "maximum dtypes": (
        lambda: gpunet.maximum(_f32(3), _f32(3).double()),
        TypeError,
        ["gpunet.maximum", "float64"],
    ),
    "where shapes": (
        lambda: gpunet.where(gpunet.tensor([True] * 4), _f32(2, 3), 0.0),
        ValueError,
        ["gpunet.where", "(4,)", "(2, 3)"],
    ),
    "where dtypes": (
        lambda: gpunet.where(_f32(3) > 0, _f32(3), _f32(3).double()),
        TypeError,
        ["gpunet.where", "float64"],
    ),
    "matmul shapes": (lambda: _f32(2, 3) @ _f32(2, 3), ValueError, ["gpunet.matmul", "(2, 3)"]),
    "matmul batch": (
        lambda: _f32(2, 2, 3) @ _f32(3, 3, 4),
        ValueError,
        ["gpunet.matmul", "(2,)", "(3,)"],
    ),
    "matmul 0-d": (lambda: _f32(3) @ gpunet.tensor(1.0), ValueError, ["gpunet.matmul", "1-d"]),
    "matmul dtypes": (
        lambda: _f32(2, 3) @ _f32(3, 2).double(),
        TypeError,
        ["gpunet.matmul", "float64"],
    ),
    "concatenate shapes": (
        lambda: gpunet.concatenate([_f32(2, 3), _f32(2, 4)]),
        ValueError,
        ["gpunet.concatenate", "(2, 3)", "(2, 4)"],
    ),
    "concatenate dtypes": (
        lambda: gpunet.concatenate([_f32(2), _f32(2).double()]),
        TypeError,
        ["gpunet.concatenate", "float64"],
    ),
    "stack shapes": (
        lambda: gpunet.stack([_f32(2), _f32(3)]),
        ValueError,
        ["gpunet.stack", "(2,)", "(3,)"],
    ),
    "reshape size": (
        lambda: _f32(2, 3).reshape(4, 2),
        ValueError,
        ["gpunet.reshape", "(2, 3)", "(4, 2)"],
    ),
    "permute repeated": (
        lambda: _f32(2, 3).permute(0, 0),
        ValueError,
        ["gpunet.permute", "(2, 3)"],
    ),
    "sum axis": (lambda: _f32(2, 3).sum(axis=2), ValueError, ["gpunet.sum", "axis 2", "2-d"]),
    "mean repeated axis": (
        lambda: _f32(2, 3).mean(axis=(0, -2)),
        ValueError,
        ["gpunet.mean", "repeated"],
    ),
    "squeeze a non-1 axis": (
        lambda: _f32(2, 3).squeeze(0),
        ValueError,
        ["gpunet.squeeze", "(2, 3)"],
    ),
    "broadcast_to": (
        lambda: _f32(2, 3).broadcast_to((3, 3)),
        ValueError,
        ["gpunet.broadcast_to", "(2, 3)", "(3, 3)"],
    ),
    "cross_entropy shapes": (
        lambda: F.cross_entropy(_f32(2, 3), gpunet.tensor([0, 1, 2])),
        ValueError,
        ["cross_entropy", "(2, 3)", "(3,)"],
    ),
    "cross_entropy float labels": (
        lambda: F.cross_entropy(_f32(2, 3), gpunet.tensor([0.0, 1.0])),
        ValueError,
        ["cross_entropy", "float32"],
    ),
    "cross_entropy label out of range": (
        lambda: F.cross_entropy(_f32(2, 3), gpunet.tensor([0, 3])),
        ValueError,
        ["cross_entropy", "label 3", "[0, 3)"],
    ),
    "mse_loss shapes": (
        lambda: F.mse_loss(_f32(2, 3), _f32(3)),
        ValueError,
        ["mse_loss", "(3,)", "(2, 3)"],
    ),
    "integer index out of range": (
        lambda: _f32(4, 5)[[4]],
        IndexError,
        ["gpunet.take", "index 4", "size 4"],
    ),
    "negative index out of range": (
        lambda: _f32(4, 5)[:, [0, -6]],
        IndexError,
        ["gpunet.take", "-6", "size 5"],
    ),
    "float indices": (lambda: _f32(4)[gpunet.tensor([0.0])], TypeError, ["gpunet.take", "float32"]),
    "float key": (lambda: _f32(4)[1.5], IndexError, ["gpunet.getitem", "1.5"]),
    "mask shape": (
        lambda: _f32(2, 3)[gpunet.tensor([True] * 3)],
        IndexError,
        ["gpunet.getitem", "(3,)", "(2, 3)"],
    ),
    "grad of an int input": (
        lambda: gpunet.grad(lambda x: x.sum())(_i64(3)),
        TypeError,
        ["gpunet.grad", "int64"],
    ),
    "vjp of an int input": (
        lambda: gpunet.vjp(lambda x: x * 2, _i64(3)),
        TypeError,
        ["gpunet.vjp", "int64"],
    ),
    "requires_grad on ints": (lambda: _i64(3).requires_grad_(), TypeError, ["int64", "(3,)"]),
    "gelu of ints": (lambda: gpunet.gelu(_i64(3)), TypeError, ["gpunet.gelu", "int64"]),
    "in-place add of another dtype": (
        lambda: _f32(3).__iadd__(_f32(3).double()),
        TypeError,
        ["in-place add", "float64"],
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_name_the_op_and_its_inputs(name: str) -> None:
    call, error, fragments = REFUSALS[name]
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{name}: {message!r} does not name {missing}"


def test_a_refused_in_place_op_changes_nothing() -> None:
    for other in (_f32(3).double(), _f32(4), _f32(4, 2, 3)):
        x = gpunet.tensor(np.arange(6.0, dtype=np.float32).reshape(2, 3))
        before, version = x.numpy().copy(), getattr(x, "_version", None)
        with pytest.raises((TypeError, ValueError)):
            x += other
        assert x.shape == (2, 3) and x.numpy().tobytes() == before.tobytes()
        assert getattr(x, "_version", None) == version


def test_in_place_float_into_an_int_tensor_is_refused() -> None:
    """x += 0.5 on an int tensor used to truncate 0.5 to 0 and leave x as it was."""
    x = gpunet.tensor([0, 1, 2])
    for op, other in (("add", 0.5), ("mul", 1.5), ("sub", np.array([0.5])), ("div", 2)):
        with pytest.raises(TypeError, match=f"in-place {op} .* int64 \\(3,\\)"):
            {"add": x.__iadd__, "sub": x.__isub__, "mul": x.__imul__, "div": x.__itruediv__}[op](
                other
            )
        assert x.tolist() == [0, 1, 2] and x.dtype == gpunet.int64
    x += 2  # (integers into integers stay allowed)
    x *= gpunet.tensor([1, 2, 3])
    assert x.tolist() == [2, 6, 12]


@pytest.mark.parametrize("shape, axis", [((0, 3), 0), ((1, 3), 0), ((0,), None), ((2, 0), 1)])
def test_var_with_no_degrees_of_freedom_is_nan(shape: tuple[int, ...], axis: Any) -> None:
    """var over n <= correction elements is NaN, as NumPy's and PyTorch's (it was -0.0 over
    an empty axis: 0 / (0 - 1))."""
    a = np.zeros(shape, np.float32)
    for keepdims in (False, True):
        want = np.var(a, axis=axis, keepdims=keepdims, ddof=1)
        assert_bits(tensor(a).var(axis, keepdims), want, f"var {shape} {axis} {keepdims}")
        std = np.std(a, axis=axis, keepdims=keepdims, ddof=1)
        assert_bits(tensor(a).std(axis, keepdims), std, f"std {shape} {axis} {keepdims}")


@pytest.mark.parametrize(
    "op, call",
    [
        ("permute", lambda x: x.permute(0, 5)),
        ("permute", lambda x: x.permute(-3, 1)),
        ("swapaxes", lambda x: x.transpose(0, 5)),
        ("swapaxes", lambda x: gpunet.swapaxes(x, -3, 0)),
        ("flatten", lambda x: x.flatten(0, 5)),
        ("flatten", lambda x: x.flatten(-3)),
        ("unsqueeze", lambda x: x.unsqueeze(3)),
        ("unsqueeze", lambda x: x.unsqueeze(-4)),
    ],
)
def test_an_axis_out_of_range_is_refused(op: str, call: Callable) -> None:
    """An axis outside [-ndim, ndim) (unsqueeze: [-ndim - 1, ndim]) was taken modulo ndim:
    x.permute(0, 5) on a 2-d tensor returned x, x.unsqueeze(3) inserted axis 0."""
    with pytest.raises(ValueError, match=f"gpunet.{op}: .*out of range.*2-d"):
        call(_f32(2, 3))


def test_jvp_of_an_int_input_is_refused() -> None:
    """jvp gave an integer "tangent" (J v with J of an int input) where grad and vjp refuse."""
    with pytest.raises(TypeError, match=r"gpunet.jvp: .*floating.*int64 \(shape \(3,\)\)"):
        gpunet.jvp(lambda x: x * 2, [_i64(3)], [_i64(3)])
    with pytest.raises(TypeError, match=r"gpunet.jvp: .*floating.*int64"):  # (hvp is jvp of grad)
        gpunet.hvp(lambda x: (x * x).sum(), [_i64(3)], [_i64(3)])


@pytest.mark.parametrize("dt", FLOATS, ids=str)
def test_logsumexp_of_a_0d_tensor(dt: np.dtype) -> None:
    """logsumexp of a 0-d tensor (and softmax's kin through it) raised a TypeError from the
    NumPy backend: its in-place steps met the NumPy scalar a 0-d reduction returns."""
    a = np.asarray(1.5, dt)
    for keepdims in (False, True):
        for axis in (None, ()):
            got = tensor(a).logsumexp(axis, keepdims=keepdims)
            assert_bits(got, a, f"logsumexp {dt} {axis} {keepdims}")


@pytest.mark.parametrize("axis", [0, -1, (0,)])
def test_reducing_axis_0_of_a_0d_tensor(axis: Any) -> None:
    """Axis 0 (or -1) of a 0-d tensor is the tensor itself, as in PyTorch (normalize_axes
    accepts it); sum, mean, max, min, var, logsumexp, softmax and argmax raised NumPy's
    AxisError or an IndexError instead."""
    x = gpunet.tensor(1.5, dtype=gpunet.float64)
    for name in ("sum", "mean", "max", "min", "var", "logsumexp", "argmax"):
        for keepdims in (False, True):
            kw = {"keepdims": keepdims}
            want = getattr(x, name)(**kw).numpy()
            assert_bits(getattr(x, name)(axis, **kw), want, f"{name}({axis}, {keepdims})")
    if not isinstance(axis, tuple):
        assert_bits(x.softmax(axis), np.asarray(1.0), "softmax")
        assert_bits(x.log_softmax(axis), np.asarray(0.0), "log_softmax")
    check_grads(lambda a: a.sum(axis) * a.mean(axis) + a.logsumexp(axis), [x], order=2)
    assert_bits(x.squeeze(axis), x.numpy(), "squeeze")
    if not isinstance(axis, tuple):
        assert_bits(x.transpose(axis, axis), x.numpy(), "transpose")
        with pytest.raises(ValueError, match=r"gpunet.concatenate: 0-d.*gpunet.stack"):
            gpunet.concatenate([x, x], axis)


@pytest.mark.parametrize(
    "op, call",
    [
        ("logsumexp", lambda x: x.logsumexp()),
        ("softmax", lambda x: x.softmax()),
        ("log_softmax", lambda x: x.log_softmax(0)),
        ("var", lambda x: x.var()),
        ("var", lambda x: x.std(0)),
        ("cross_entropy", lambda x: F.cross_entropy(x, gpunet.tensor([0, 1]))),
    ],
)
def test_float_only_ops_refuse_integers(op: str, call: Callable) -> None:
    """As PyTorch does (and gelu here): these raised NumPy's UFuncTypeError, or var an error
    naming gpunet.sub and suggesting a cast to int64."""
    with pytest.raises(TypeError, match=rf"gpunet.{op}: expected a floating tensor, got int64"):
        call(_i64(2, 3))


@pytest.mark.parametrize(
    "op, call",
    [
        ("max", lambda x: x.max(0)),
        ("max", lambda x: x.max()),
        ("min", lambda x: x.min(axis=(0, 1))),
        ("argmax", lambda x: x.argmax(0)),
        ("logsumexp", lambda x: x.logsumexp(0)),
        ("logsumexp", lambda x: x.softmax(0)),
    ],
)
def test_reducing_an_empty_axis_without_identity_is_refused(op: str, call: Callable) -> None:
    """max, min, argmax and logsumexp over an empty axis raised NumPy's bare ValueError
    ("zero-size array to reduction operation maximum which has no identity")."""
    with pytest.raises(ValueError, match=rf"gpunet.{op}: .*empty.*\(0, 3\)"):
        call(_f32(0, 3))
    assert _f32(0, 3).max(1).shape == _f32(0, 3).logsumexp(1).shape == (0,)  # (no error)


@pytest.mark.parametrize("key", [(4,), (-5,), (0, 5), (slice(None), -6), (0, 0, 0), (None, 4)])
def test_basic_index_out_of_range_names_the_op(key: tuple) -> None:
    """x[4] on 4 rows raised NumPy's bare IndexError, naming neither gpunet nor the shape."""
    x = gpunet.tensor(np.arange(20.0).reshape(4, 5))
    with pytest.raises(IndexError, match=r"gpunet.getitem: .*\(4, 5\)"):
        x[key]
    with pytest.raises(IndexError, match=r"gpunet.setitem: .*\(4, 5\)"):
        x[key] = 1.0
    assert x.numpy().tobytes() == np.arange(20.0).reshape(4, 5).tobytes()


@pytest.mark.parametrize("other", [None, "2", object(), [1.0, None, 2.0]])
def test_a_non_number_operand_is_refused(other: Any) -> None:
    """x + None gave [nan nan nan] (None became NaN in the tensor's dtype), with no error."""
    x = gpunet.tensor([1.0, -2.0, 3.0])
    for call in (lambda: x + other, lambda: other * x, lambda: gpunet.maximum(x, other)):
        with pytest.raises(TypeError, match=r"gpunet\.\w+: .*operand"):
            call()


def test_numpy_integer_keys_and_empty_index_lists() -> None:
    """x[np.int64(1)] (an index from np.argmax) was refused as an unsupported index, and
    x[[]] as float indices; NumPy and PyTorch take both."""
    a = np.arange(12.0).reshape(3, 4)
    x = tensor(a)
    for key in [np.int64(1), (np.int32(-1), slice(None, None, -1)), (slice(None), np.uint8(2))]:
        assert_bits(x[key], a[key], f"x[{key!r}]")
    assert_bits(x[[]], a[np.array([], np.int64)], "x[[]]")
    assert_bits(x[:, []], a[:, np.array([], np.int64)], "x[:, []]")
    check_grads(lambda t: t[np.int64(2)][[1, -1]], [x], order=1)


@pytest.mark.parametrize("shape", [(4,), (4, 2, 3), (3, 2)])
def test_in_place_shape_mismatch_names_the_op(shape: tuple[int, ...]) -> None:
    """x += y with a y that does not broadcast to x raised NumPy's 'operands could not be
    broadcast together' (or 'non-broadcastable output operand'), naming neither op."""
    x = gpunet.tensor(np.arange(6.0, dtype=np.float32).reshape(2, 3))
    for other in (gpunet.ones(*shape), np.ones(shape, np.float32)):
        with pytest.raises(
            ValueError, match=rf"gpunet: in-place mul of shape {re.escape(str(shape))}"
        ):
            x *= other
    assert x.numpy().tobytes() == np.arange(6.0, dtype=np.float32).reshape(2, 3).tobytes()
    x *= gpunet.ones(3)  # (a shape that broadcasts to x's stays allowed)


@pytest.mark.parametrize("dt", INTS + (np.dtype(bool),), ids=str)
def test_sigmoid_of_integers_is_numpys(dt: np.dtype) -> None:
    """relu, sigmoid and tanh take integers as NumPy does (tanh(int) is float64); sigmoid
    raised NumPy's UFuncTypeError writing floats into an integer array."""
    a = np.array([-3, 0, 2, 40], dt)
    want = (1 / (1 + np.exp(-a.astype(np.float64)))).astype(np.tanh(a).dtype)
    assert_ulps(tensor(a).sigmoid(), want, f"sigmoid {dt}")
    assert_bits(tensor(a).tanh(), np.tanh(a), f"tanh {dt}")


def test_pow_derivatives_at_a_zero_base_are_finite() -> None:
    """d/dx x^0 = 0 and d/dy 0^y = 0 (y > 0) were NaN (0 * 0^-1 and 0 * log 0); PyTorch
    gives 0, as does the limit. In both modes and at second order."""
    x, y = gpunet.tensor([0.0, 0.0, 2.0, 0.0]), gpunet.tensor([0.0, 2.0, 0.0, 1.5])
    u = gpunet.tensor([1.0, 1.0, 1.0, 1.0])
    _, pullback = gpunet.vjp(lambda a, b: a**b, x, y)
    dx, dy = pullback(u)
    assert dx.tolist() == [0.0, 0.0, 0.0, 0.0] and dy.tolist() == [
        0.0,
        0.0,
        float(np.log(np.float32(2))),
        0.0,
    ]
    _, tx = gpunet.jvp(lambda a: a**0.0, [x], [u])
    _, ty = gpunet.jvp(lambda b: 0.0**b, [y[1:]], [u[1:]])
    assert tx.tolist() == [0.0] * 4 and ty.tolist() == [0.0] * 3
    hx = gpunet.grad(lambda a: gpunet.grad(lambda c: (c**0.0).sum())(a).sum())(x)
    assert np.isfinite(hx.numpy()).all()


KINKS = np.array([[1.0, 1.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, -3.0, 3.0, 0.5]])


@pytest.mark.parametrize(
    "f",
    [
        lambda a: a.max(1) + a.min(0).sum() + a.max(),
        lambda a: a.relu() + a.abs() + gpunet.leaky_relu(a) + gpunet.elu(a),
        lambda a: gpunet.maximum(a, a[:, ::-1]) * gpunet.minimum(a, 0.0) + gpunet.maximum(a, a),
        lambda a: a.clip(0.0, 1.0) + a**2.0 + a**0.0,
    ],
    ids=["max, min ties", "relu, abs at 0", "maximum ties", "clip at its ends, pow at 0"],
)
def test_jvp_and_vjp_agree_at_kinks_and_ties(f: Callable) -> None:
    """Where the derivative is a choice (ties, kinks), both modes make the same one."""
    x = tensor(KINKS)
    v = tensor(values(KINKS.shape, np.dtype(np.float64), "any", seed=1))
    out, jv = gpunet.jvp(f, [x], [v])
    u = tensor(values(out.shape, np.dtype(np.float64), "any", seed=2))
    (jtu,) = gpunet.vjp(f, x)[1](u)
    lhs, rhs = float(np.vdot(jv.numpy(), u.numpy())), float(np.vdot(v.numpy(), jtu.numpy()))
    assert np.isfinite(lhs) and abs(lhs - rhs) <= 1e-12 * (1 + abs(lhs))
