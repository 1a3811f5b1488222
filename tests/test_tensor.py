"""The Tensor API a PyTorch user expects: creation, dtypes, attributes, conversion, operators,
indexing (with gradients), the composite ops against NumPy/SciPy, stability, in-place updates
and DLPack exchange. Everything here runs on the CPU."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import scipy.special

import gpunet
from gpunet import Tensor

F64 = np.float64


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def t64(a: np.ndarray, requires_grad: bool = False) -> Tensor:
    return gpunet.tensor(np.asarray(a, F64), requires_grad=requires_grad)


# ---------------------------------------------------------------------- creation
@pytest.mark.parametrize(
    ("data", "dtype"),
    [
        (1.5, np.float32),
        ([1.0, 2.0], np.float32),
        ([[1, 2], [3, 4]], np.int64),
        (7, np.int64),
        (True, np.bool_),
        ([1, 2.5], np.float32),  # mixed Python numbers: floats win, then the default float
        (np.array([1.0], np.float64), np.float64),
        (np.array([1, 2], np.int32), np.int32),
        (np.arange(3, dtype=np.float16), np.float16),
        (np.float64(2.0), np.float64),
    ],
)
def test_tensor_dtype_inference(data, dtype) -> None:
    t = gpunet.tensor(data)
    assert t.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(t.numpy(), np.asarray(data, dtype))


def test_tensor_explicit_dtype_and_device() -> None:
    t = gpunet.tensor([1, 2, 3], dtype=gpunet.float64, device="cpu")
    assert t.dtype == np.float64
    assert t.device == "cpu"
    assert gpunet.tensor(np.ones(2, np.float32), dtype="float64").dtype == np.float64


def test_tensor_copies_its_data() -> None:
    a = np.arange(3.0)
    t = gpunet.tensor(a)
    a[0] = 99.0
    assert t.tolist() == [0.0, 1.0, 2.0]
    u = gpunet.tensor(t)  # from a tensor: a copy too
    with gpunet.no_grad():
        t += 1.0
    assert u.tolist() == [0.0, 1.0, 2.0]


def test_tensor_requires_grad() -> None:
    t = gpunet.tensor([1.0, 2.0], requires_grad=True)
    assert t.requires_grad and t.is_leaf and t.grad is None
    with pytest.raises(TypeError, match="floating"):
        gpunet.tensor([1, 2], requires_grad=True)


def test_tensor_rejects_non_numeric() -> None:
    with pytest.raises(TypeError, match="dtype"):
        gpunet.tensor(["a", "b"])


def test_constant_constructors() -> None:
    z = gpunet.zeros(2, 3)
    assert z.shape == (2, 3) and z.dtype == np.float32 and not z.numpy().any()
    assert gpunet.zeros((2, 3)).shape == (2, 3)
    o = gpunet.ones(4, dtype=gpunet.float64)
    assert o.dtype == np.float64 and o.tolist() == [1.0] * 4
    f = gpunet.full((2,), 3.5)
    assert f.dtype == np.float32 and f.tolist() == [3.5, 3.5]
    assert gpunet.full(3, 7).dtype == np.int64
    assert gpunet.full((1,), True).dtype == np.bool_
    assert gpunet.ones(2, requires_grad=True).requires_grad


def test_arange() -> None:
    a = gpunet.arange(5)
    assert a.dtype == np.int64 and a.tolist() == [0, 1, 2, 3, 4]
    assert gpunet.arange(2, 8, 3).tolist() == [2, 5]
    b = gpunet.arange(0.0, 1.0, 0.25)
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b.numpy(), [0.0, 0.25, 0.5, 0.75])
    assert gpunet.arange(3, dtype=gpunet.float64).dtype == np.float64


def test_like_constructors_and_eye() -> None:
    x = gpunet.tensor(np.ones((2, 3), np.float64))
    z, o = gpunet.zeros_like(x), gpunet.ones_like(x)
    assert z.shape == o.shape == (2, 3)
    assert z.dtype == o.dtype == np.float64
    assert not z.numpy().any() and o.numpy().all()
    assert gpunet.zeros_like(x, dtype=gpunet.float32).dtype == np.float32
    np.testing.assert_array_equal(gpunet.eye(3).numpy(), np.eye(3))
    assert gpunet.eye(2).dtype == np.float32


def test_manual_seed_reproduces_default_stream() -> None:
    gpunet.manual_seed(7)
    a, b = gpunet.randn(5), gpunet.rand(2, 3)
    gpunet.manual_seed(7)
    np.testing.assert_array_equal(gpunet.randn(5).numpy(), a.numpy())
    np.testing.assert_array_equal(gpunet.rand(2, 3).numpy(), b.numpy())
    assert not np.array_equal(gpunet.randn(5).numpy(), a.numpy())  # the stream moves on


def test_generator_is_independent_of_default_stream() -> None:
    g1, g2 = gpunet.Generator(42), gpunet.Generator(42)
    np.testing.assert_array_equal(
        gpunet.randn(6, generator=g1).numpy(), gpunet.randn(6, generator=g2).numpy()
    )
    assert not np.array_equal(
        gpunet.randn(6, generator=gpunet.Generator(43)).numpy(),
        gpunet.randn(6, generator=gpunet.Generator(42)).numpy(),
    )
    gpunet.manual_seed(1)
    want = gpunet.randn(3).numpy()
    gpunet.manual_seed(1)
    gpunet.randn(100, generator=gpunet.Generator(9))  # must not advance the default stream
    np.testing.assert_array_equal(gpunet.randn(3).numpy(), want)


def test_random_distributions_and_dtypes() -> None:
    g = gpunet.Generator(0)
    n = gpunet.randn(20000, dtype=gpunet.float64, generator=g).numpy()
    assert n.dtype == np.float64
    assert abs(n.mean()) < 0.05 and abs(n.std() - 1.0) < 0.05
    u = gpunet.rand(20000, generator=g).numpy()
    assert u.dtype == np.float32
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02
    assert gpunet.randn(2, 3, requires_grad=True).requires_grad
    with pytest.raises(TypeError, match="floating"):
        gpunet.randn(3, dtype=gpunet.int64)


# ---------------------------------------------------------------------- dtypes and scalars
BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.pow]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", BINARY, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scalar", [2.0, 3, np.float64(0.5)], ids=["float", "int", "np64"])
def test_python_scalars_do_not_promote(dtype, op, scalar) -> None:
    x = gpunet.tensor(np.array([1.0, 2.0, 4.0], dtype))
    assert op(x, scalar).dtype == dtype
    assert op(scalar, x).dtype == dtype  # the reflected operator too
    np.testing.assert_allclose(op(x, scalar).numpy(), op(x.numpy().astype(F64), scalar), rtol=1e-6)


def test_integer_tensors_with_float_scalars_become_float32() -> None:
    i = gpunet.tensor([1, 2, 3])
    assert (i * 0.5).dtype == np.float32
    assert (i / 2).dtype == np.float32
    assert (i + 1).dtype == np.int64
    np.testing.assert_array_equal((i / 2).numpy(), [0.5, 1.0, 1.5])


# ---------------------------------------------------------------------- attributes, conversion
def test_attributes() -> None:
    x = gpunet.zeros(2, 3, 4)
    assert x.shape == (2, 3, 4)
    assert x.dtype == gpunet.float32
    assert x.device == "cpu" and x.device == gpunet.Device("cpu")
    assert x.ndim == 3
    assert x.size() == (2, 3, 4) and x.size(1) == 3 and x.size(-1) == 4
    assert x.numel() == 24
    assert len(x) == 2
    assert x.T.shape == (4, 3, 2)
    m = gpunet.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(m.T.numpy(), m.numpy().T)


def test_numpy_shares_memory_on_cpu() -> None:
    x = gpunet.zeros(3)
    a = x.numpy()
    a[1] = 5.0
    assert x.tolist() == [0.0, 5.0, 0.0]
    b = np.asarray(x)  # __array__
    assert np.shares_memory(b, x.data)
    assert np.asarray(x, dtype=np.float64).dtype == np.float64
    assert np.array(x, copy=True) is not x.data


def test_item_and_tolist() -> None:
    assert gpunet.tensor(3.5).item() == 3.5
    assert isinstance(gpunet.tensor([7]).item(), int)
    assert gpunet.tensor([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="one element"):
        gpunet.tensor([1.0, 2.0]).item()
    assert float(gpunet.tensor(2.5)) == 2.5 and int(gpunet.tensor(4)) == 4
    assert bool(gpunet.tensor(1.0)) and not bool(gpunet.tensor(0.0))


def test_to_and_astype() -> None:
    x = gpunet.tensor([1.5, -2.5], requires_grad=True)
    y = x.to(gpunet.float64)
    assert y.dtype == np.float64 and y.tolist() == [1.5, -2.5]
    assert x.astype(gpunet.int64).tolist() == [1, -2]
    assert x.to("cpu") is x  # nothing to move
    assert x.to(gpunet.float32) is x
    assert x.double().dtype == np.float64 and y.float().dtype == np.float32
    y.sum().backward()  # the cast is differentiable; the gradient comes back as float32
    assert x.grad.dtype == np.float32 and x.grad.tolist() == [1.0, 1.0]
    assert not x.astype(gpunet.int64).requires_grad


def test_detach_and_clone() -> None:
    x = gpunet.tensor([1.0, 2.0], requires_grad=True)
    d = x.detach()
    assert d.data is x.data and not d.requires_grad and d.is_leaf
    c = x.clone()
    assert not np.shares_memory(c.data, x.data) and c.grad_fn == "copy"
    (c * 3.0).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]


def test_repr() -> None:
    assert repr(gpunet.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    r = repr(gpunet.tensor([1.0], dtype=gpunet.float64, requires_grad=True))
    assert "dtype=float64" in r and "requires_grad=True" in r
    y = gpunet.tensor([1.0], requires_grad=True) * 2.0
    assert "grad_fn=<mul>" in repr(y)
    assert "dtype=int64" in repr(gpunet.tensor([1]))


def test_format_spec_of_a_scalar_tensor_formats_its_value() -> None:
    """f"{loss:.4f}", as in PyTorch's loops: a 0-d tensor formats its item; any other tensor
    with a format spec raises naming its shape, and "{}" is its repr."""
    assert f"{gpunet.tensor(1.23456):.3f}" == "1.235"
    assert f"{gpunet.tensor(7):>3}" == "  7"
    assert f"{gpunet.tensor([1.0, 2.0])}" == "tensor([1., 2.])"
    with pytest.raises(TypeError, match=r"shape \(2,\).*\.item\(\)"):
        f"{gpunet.tensor([1.0, 2.0]):.3f}"


# ---------------------------------------------------------------------- operators
def test_arithmetic_operators_against_numpy(rng) -> None:
    a, b = rng.standard_normal((3, 4)), rng.uniform(0.5, 2.0, (3, 4))
    x, y = t64(a), t64(b)
    np.testing.assert_allclose((x + y).numpy(), a + b)
    np.testing.assert_allclose((x - y).numpy(), a - b)
    np.testing.assert_allclose((x * y).numpy(), a * b)
    np.testing.assert_allclose((x / y).numpy(), a / b)
    np.testing.assert_allclose((y**x).numpy(), b**a)
    np.testing.assert_allclose((-x).numpy(), -a)
    np.testing.assert_allclose(abs(x).numpy(), np.abs(a))
    np.testing.assert_allclose((x @ y.T).numpy(), a @ b.T)
    np.testing.assert_allclose((a + x).numpy(), 2 * a)  # ndarray (op) Tensor defers
    assert isinstance(a + x, Tensor)


def test_matmul_shapes(rng) -> None:
    a, v = rng.standard_normal((2, 3, 4)), rng.standard_normal(4)
    w = rng.standard_normal((4, 5))
    np.testing.assert_allclose((t64(a) @ t64(w)).numpy(), a @ w)
    np.testing.assert_allclose((t64(a) @ t64(v)).numpy(), a @ v)
    np.testing.assert_allclose((t64(v) @ t64(w)).numpy(), v @ w)
    with pytest.raises(ValueError, match="do not align"):
        t64(w) @ t64(w)


@pytest.mark.parametrize(
    "op",
    [operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne],
    ids=lambda f: f.__name__,
)
def test_comparisons_return_bool(op, rng) -> None:
    a = rng.integers(0, 3, (4, 5)).astype(F64)
    b = rng.integers(0, 3, (5,)).astype(F64)
    out = op(t64(a), t64(b))
    assert out.dtype == np.bool_ and not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), op(a, b))
    np.testing.assert_array_equal(op(t64(a), 1.0).numpy(), op(a, 1.0))


def test_broadcasting_gradients_sum_back(rng) -> None:
    a, b = rng.standard_normal((3, 1)), rng.standard_normal((4,))
    x, y = t64(a, True), t64(b, True)
    (x * y).sum().backward()
    assert x.grad.shape == (3, 1) and y.grad.shape == (4,)
    np.testing.assert_allclose(x.grad.numpy(), np.full((3, 1), b.sum()))
    np.testing.assert_allclose(y.grad.numpy(), np.full(4, a.sum()))
    with pytest.raises(ValueError, match="do not broadcast"):
        t64(np.ones((2, 3))) + t64(np.ones((4,)))


# ---------------------------------------------------------------------- indexing
@pytest.mark.parametrize(
    "key",
    [
        1,
        -1,
        (slice(1, None), slice(None, None, 2)),
        (Ellipsis, 2),
        (None, 0),
        (slice(None), slice(None, None, -1)),
        (0, slice(1, 3)),
    ],
    ids=repr,
)
def test_basic_slicing_values_and_gradient(key, rng) -> None:
    a = rng.standard_normal((3, 4))
    x = t64(a, True)
    y = x[key]
    np.testing.assert_array_equal(y.numpy(), a[key])
    w = rng.standard_normal(np.shape(a[key]))
    (y * t64(w)).sum().backward()
    want = np.zeros_like(a)
    want[key] = w
    np.testing.assert_array_equal(x.grad.numpy(), want)


def test_integer_array_index_repeated_indices_accumulate() -> None:
    x = t64(np.arange(5.0), True)
    idx = [0, 3, 3, 3, -1]
    y = x[idx]
    np.testing.assert_array_equal(y.numpy(), [0.0, 3.0, 3.0, 3.0, 4.0])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 0.0, 0.0, 3.0, 1.0])


@pytest.mark.parametrize(
    "make_index", [list, np.array, gpunet.tensor], ids=["list", "numpy", "tensor"]
)
def test_integer_array_index_kinds(make_index, rng) -> None:
    a = rng.standard_normal((4, 3))
    x = t64(a, True)
    rows = [2, 0, 2]
    y = x[make_index(rows)]
    np.testing.assert_array_equal(y.numpy(), a[rows])
    (y * t64(np.arange(9.0).reshape(3, 3))).sum().backward()
    want = np.zeros_like(a)
    np.add.at(want, rows, np.arange(9.0).reshape(3, 3))
    np.testing.assert_array_equal(x.grad.numpy(), want)


def test_index_on_a_later_axis_and_2d_index(rng) -> None:
    a = rng.standard_normal((3, 5))
    x = t64(a, True)
    idx = np.array([[0, 4], [4, 4]])
    y = x[:, idx]
    np.testing.assert_array_equal(y.numpy(), a[:, idx])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.tile([1.0, 0, 0, 0, 3.0], (3, 1)))


def test_rows_cols_pairs(rng) -> None:
    a = rng.standard_normal((3, 4))
    x = t64(a, True)
    rows, cols = [0, 2, 2, -1], [1, 3, 3, 0]
    y = x[rows, cols]
    np.testing.assert_array_equal(y.numpy(), a[rows, cols])
    y.sum().backward()
    want = np.zeros_like(a)
    np.add.at(want, (rows, cols), 1.0)
    np.testing.assert_array_equal(x.grad.numpy(), want)


def test_boolean_mask(rng) -> None:
    a = rng.standard_normal((3, 4))
    x = t64(a, True)
    mask = x > 0.0
    y = x[mask]
    np.testing.assert_array_equal(y.numpy(), a[a > 0])
    (y * y).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.where(a > 0, 2 * a, 0.0))
    rowmask = np.array([True, False, True])
    np.testing.assert_array_equal(x[rowmask].numpy(), a[rowmask])
    with pytest.raises(IndexError, match="mask"):
        x[np.array([True, False])]


def test_unsupported_index_raises() -> None:
    with pytest.raises(IndexError, match="unsupported index"):
        gpunet.zeros(3)[1.5]


# ---------------------------------------------------------------------- ops against NumPy
POS = "pos"  # inputs drawn from (0.5, 2) for log, sqrt, ...

UNARY = [
    ("exp", lambda t: t.exp(), np.exp, None),
    ("log", lambda t: t.log(), np.log, POS),
    ("log1p", lambda t: t.log1p(), np.log1p, POS),
    ("sqrt", lambda t: t.sqrt(), np.sqrt, POS),
    ("abs", lambda t: t.abs(), np.abs, None),
    ("tanh", lambda t: t.tanh(), np.tanh, None),
    ("sigmoid", lambda t: t.sigmoid(), scipy.special.expit, None),
    ("relu", lambda t: t.relu(), lambda a: np.maximum(a, 0.0), None),
    ("clip", lambda t: t.clip(-0.5, 0.7), lambda a: np.clip(a, -0.5, 0.7), None),
    ("clip_min", lambda t: gpunet.clip(t, min=0.1), lambda a: np.maximum(a, 0.1), None),
    ("neg", lambda t: -t, np.negative, None),
    ("square", lambda t: t**2, np.square, None),
    ("reshape", lambda t: t.reshape(4, 2, 3), lambda a: a.reshape(4, 2, 3), None),
    ("reshape_infer", lambda t: t.reshape(-1, 6), lambda a: a.reshape(-1, 6), None),
    ("view", lambda t: t.view(24), lambda a: a.reshape(24), None),
    ("flatten", lambda t: t.flatten(1), lambda a: a.reshape(2, 12), None),
    ("transpose", lambda t: t.transpose(0, 2), lambda a: a.swapaxes(0, 2), None),
    ("permute", lambda t: t.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1), None),
    ("unsqueeze", lambda t: t.unsqueeze(1), lambda a: a[:, None], None),
    ("squeeze", lambda t: t[:, :1].squeeze(1), lambda a: a[:, 0], None),
    (
        "broadcast_to",
        lambda t: t[:, :1].broadcast_to((2, 5, 4)),
        lambda a: np.broadcast_to(a[:, :1], (2, 5, 4)),
        None,
    ),
    ("sum", lambda t: t.sum(), np.sum, None),
    ("sum_axis", lambda t: t.sum(1), lambda a: a.sum(1), None),
    (
        "sum_axes_keep",
        lambda t: t.sum((0, 2), keepdims=True),
        lambda a: a.sum((0, 2), keepdims=True),
        None,
    ),
    ("mean", lambda t: t.mean(), np.mean, None),
    ("mean_axis", lambda t: t.mean(-1), lambda a: a.mean(-1), None),
    ("max", lambda t: t.max(), np.max, None),
    ("max_axis", lambda t: t.max(1), lambda a: a.max(1), None),
    ("max_keep", lambda t: t.max(2, keepdims=True), lambda a: a.max(2, keepdims=True), None),
    ("min", lambda t: t.min(), np.min, None),
    ("min_axis", lambda t: t.min((0, 1)), lambda a: a.min((0, 1)), None),
    ("var", lambda t: t.var(), lambda a: a.var(ddof=1), None),
    ("var_c0", lambda t: t.var(correction=0), np.var, None),
    ("var_axis", lambda t: t.var(1, correction=0), lambda a: a.var(1), None),
    (
        "var_axis_c1",
        lambda t: t.var(-1, keepdims=True),
        lambda a: a.var(-1, ddof=1, keepdims=True),
        None,
    ),
    ("std", lambda t: t.std(0), lambda a: a.std(0, ddof=1), None),
    ("softmax", lambda t: t.softmax(-1), lambda a: scipy.special.softmax(a, -1), None),
    ("softmax_0", lambda t: gpunet.softmax(t, 0), lambda a: scipy.special.softmax(a, 0), None),
    ("log_softmax", lambda t: t.log_softmax(1), lambda a: scipy.special.log_softmax(a, 1), None),
    ("logsumexp", lambda t: t.logsumexp(), scipy.special.logsumexp, None),
    (
        "logsumexp_axis",
        lambda t: gpunet.logsumexp(t, (0, 2)),
        lambda a: scipy.special.logsumexp(a, (0, 2)),
        None,
    ),
    (
        "logsumexp_keep",
        lambda t: t.logsumexp(1, keepdims=True),
        lambda a: scipy.special.logsumexp(a, 1, keepdims=True),
        None,
    ),
]


@pytest.mark.parametrize(("name", "op", "ref", "domain"), UNARY, ids=[u[0] for u in UNARY])
def test_unary_ops_against_numpy(name, op, ref, domain, rng) -> None:
    shape = (2, 3, 4)
    a = rng.uniform(0.5, 2.0, shape) if domain == POS else rng.standard_normal(shape)
    x = t64(a, True)
    y = op(x)
    want = np.asarray(ref(a))
    assert y.dtype == np.float64
    assert y.shape == want.shape
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)
    y.sum().backward()  # every op is differentiable and the gradient has the input's shape
    assert x.grad.shape == shape and x.grad.dtype == np.float64


COMPOSITES = [
    ("mean", lambda t: t.mean(1)),
    ("var", lambda t: t.var(0)),
    ("std", lambda t: t.std(-1, correction=0)),
    ("min", lambda t: t.min(1)),
    ("softmax", lambda t: t.softmax(-1)),
    ("log_softmax", lambda t: t.log_softmax(0)),
    ("logsumexp", lambda t: t.logsumexp(1)),
    ("clip", lambda t: t.clip(-0.3, 0.4)),
    ("stack", lambda t: gpunet.stack([t, t * t], 1)),
    ("index", lambda t: t[[0, 2, 2]][:, 1:]),
]


@pytest.mark.parametrize(("name", "op"), COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_composite_gradients_match_finite_differences(name, op, rng) -> None:
    a = rng.standard_normal((3, 4))
    if name == "clip":  # keep away from the kinks at the bounds
        a = np.where(np.abs(np.abs(a - 0.05) - 0.35) < 0.05, 0.0, a)
    gpunet.gradcheck(op, [t64(a, True)])


def test_binary_ops_against_numpy(rng) -> None:
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4,))
    x, y = t64(a), t64(b)
    np.testing.assert_array_equal(gpunet.maximum(x, y).numpy(), np.maximum(a, b))
    np.testing.assert_array_equal(gpunet.minimum(x, y).numpy(), np.minimum(a, b))
    np.testing.assert_array_equal(x.maximum(0.0).numpy(), np.maximum(a, 0.0))
    np.testing.assert_array_equal(gpunet.where(x > y, x, y).numpy(), np.where(a > b, a, b))
    np.testing.assert_array_equal(gpunet.where(x > 0, x, 0.0).numpy(), np.where(a > 0, a, 0.0))
    np.testing.assert_array_equal(
        gpunet.where(x > 0, 1.0, -1.0).numpy(), np.where(a > 0, 1.0, -1.0)
    )


def test_maximum_and_where_gradients(rng) -> None:
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    x, y = t64(a, True), t64(b, True)
    (gpunet.maximum(x, y) + 2.0 * gpunet.where(x < y, x, y)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), (a >= b) + 2.0 * (a < b))
    np.testing.assert_array_equal(y.grad.numpy(), (a < b) + 2.0 * (a >= b))


def test_concatenate_and_stack(rng) -> None:
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((4, 3))
    x, y = t64(a, True), t64(b, True)
    c = gpunet.concatenate([x, y], 0)
    np.testing.assert_array_equal(c.numpy(), np.concatenate([a, b], 0))
    (c * t64(np.arange(18.0).reshape(6, 3))).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(y.grad.numpy(), np.arange(6.0, 18.0).reshape(4, 3))
    s = gpunet.stack([x, x * 2.0], axis=-1)
    np.testing.assert_array_equal(s.numpy(), np.stack([a, a * 2], -1))
    np.testing.assert_array_equal(
        gpunet.concatenate([x.T, y.T], 1).numpy(), np.concatenate([a.T, b.T], 1)
    )
    with pytest.raises(ValueError, match="differ"):
        gpunet.concatenate([x, y.T], 0)
    with pytest.raises(ValueError, match="shapes differ"):
        gpunet.stack([x, y])


def test_argmax(rng) -> None:
    a = rng.standard_normal((3, 5))
    assert t64(a).argmax().item() == np.argmax(a)
    np.testing.assert_array_equal(t64(a).argmax(1).numpy(), np.argmax(a, 1))


def test_bad_axis_and_reshape_raise() -> None:
    x = gpunet.zeros(2, 3)
    with pytest.raises(ValueError, match="out of range"):
        x.sum(2)
    with pytest.raises(ValueError, match="cannot reshape"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match="not a permutation"):
        x.permute(0, 0)


# ---------------------------------------------------------------------- numerical stability
@pytest.mark.filterwarnings("error")
def test_stable_at_large_magnitudes_float32() -> None:
    """No overflow, division by zero or NaN anywhere (exp underflowing to 0 is the point)."""
    a = np.array([[1e4, -1e4, 0.0, 1e4 - 2.0], [-1e4, -1e4 + 3.0, -1e4 + 1.0, -1e4]], np.float32)
    ref = a.astype(F64)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        x = gpunet.tensor(a, requires_grad=True)
        sm, lsm = x.softmax(-1), x.log_softmax(-1)
        lse, sig = x.logsumexp(-1), x.sigmoid()
        for t in (sm, lsm, lse, sig):
            assert t.dtype == np.float32
            assert np.isfinite(t.numpy()).all()
        # float32 spacing at 1e4 is ~1e-3: compare to that precision
        np.testing.assert_allclose(sm.numpy(), scipy.special.softmax(ref, -1), atol=2e-3)
        np.testing.assert_allclose(lsm.numpy(), scipy.special.log_softmax(ref, -1), atol=2e-3)
        np.testing.assert_allclose(lse.numpy(), scipy.special.logsumexp(ref, -1), atol=2e-3)
        np.testing.assert_allclose(sig.numpy(), scipy.special.expit(ref), atol=1e-6)
        (sm[:, 0].sum() + lsm.sum() + lse.sum() + sig.sum()).backward()
        assert np.isfinite(x.grad.numpy()).all()


@pytest.mark.filterwarnings("error")
def test_sigmoid_tails_are_exact() -> None:
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        s = gpunet.tensor([-1e4, -100.0, 100.0, 1e4]).sigmoid().numpy()
    assert s[0] == 0.0 and s[3] == 1.0
    assert 0.0 < s[1] < 1e-40 or s[1] == 0.0  # float32 underflows gracefully, no warning
    assert s[2] == 1.0


# ---------------------------------------------------------------------- in place
def test_inplace_under_no_grad_writes_into_the_array() -> None:
    w = gpunet.tensor([1.0, 2.0, 3.0], requires_grad=True)
    view = w.numpy()
    with gpunet.no_grad():
        w -= 0.5 * gpunet.tensor([2.0, 2.0, 2.0])
        w *= 2.0
        w += 1
        w /= 2.0
    assert w.requires_grad and w.is_leaf and w.grad is None
    assert w.tolist() == [0.5, 1.5, 2.5]
    np.testing.assert_array_equal(view, [0.5, 1.5, 2.5])  # the same memory, updated


def test_inplace_on_a_tensor_requiring_grad_raises() -> None:
    w = gpunet.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        w -= 1.0
    assert w.tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="no_grad"):
        w[0] = 5.0
    assert w.tolist() == [1.0, 2.0]
    plain = gpunet.tensor([1.0, 2.0])  # no gradient wanted: in-place is fine
    plain -= 1.0
    plain[1] = 7.0
    assert plain.tolist() == [0.0, 7.0]


def test_inplace_with_mismatched_tensor_raises() -> None:
    x = gpunet.zeros(2)
    with pytest.raises(TypeError, match=r"\.to\("):
        x += gpunet.zeros(2, dtype=gpunet.float64)


# ---------------------------------------------------------------------- DLPack
def test_numpy_from_dlpack_shares_memory() -> None:
    t = gpunet.zeros(4)
    a = np.from_dlpack(t)
    assert np.shares_memory(a, t.data)
    a[2] = 3.0
    assert t.tolist() == [0.0, 0.0, 3.0, 0.0]
    t.data[0] = -1.0
    assert a[0] == -1.0


def test_gpunet_from_dlpack_shares_memory() -> None:
    a = np.arange(6.0).reshape(2, 3)
    t = gpunet.from_dlpack(a)
    assert t.dtype == np.float64 and t.shape == (2, 3) and t.device == "cpu"
    assert np.shares_memory(t.data, a)
    a[1, 1] = 100.0
    assert t.tolist()[1][1] == 100.0
    t.data[0, 0] = -5.0
    assert a[0, 0] == -5.0


def test_dlpack_exchange_with_pytorch_shares_memory() -> None:
    torch = pytest.importorskip("torch")
    t = gpunet.tensor([1.0, 2.0, 3.0])
    pt = torch.from_dlpack(t)
    pt[0] = 10.0
    assert t.numpy()[0] == 10.0
    back = gpunet.from_dlpack(torch.arange(4, dtype=torch.float64))
    assert back.dtype == np.float64 and back.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_deepcopy_and_pickle_give_independent_leaves() -> None:
    import copy
    import pickle

    t = gpunet.tensor([1.0, 2.0], requires_grad=True)
    for c in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert c.tolist() == [1.0, 2.0] and c.requires_grad and c.is_leaf
        c.data[0] = 5.0
        assert t.tolist() == [1.0, 2.0]


def test_an_int_input_to_a_float_op_is_told_to_become_float() -> None:
    """The dtype error suggests the floating dtype, whichever input comes first: converting
    a Linear's weights to int64 is never what the user wants."""
    layer = gpunet.nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"different dtypes.*x\.to\(gpunet\.float32\)"):
        layer(gpunet.tensor(np.ones((2, 3), np.int64)))
    with pytest.raises(TypeError, match=r"x\.to\(gpunet\.float64\)"):
        gpunet.ones(3, dtype=gpunet.float64) + gpunet.tensor(np.ones(3, np.float32))
