"""The tape: accumulation, graph release, errors, hooks, grad modes, anomaly detection."""

from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpunet
from gpunet.autodiff import Node


def leaf(values, dtype=np.float64) -> gpunet.Tensor:
    return gpunet.tensor(np.asarray(values, dtype=dtype), requires_grad=True)


def test_backward_accumulates_into_leaves() -> None:
    x = leaf([1.0, 2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0, 6.0])
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 7.0, 9.0])
    x.zero_grad()
    assert x.grad is None


def test_gradient_through_a_shared_subexpression() -> None:
    x = leaf([0.5, -1.5])
    y = x.exp()
    (y * y + y).sum().backward()  # d/dx (e^2x + e^x) = 2 e^2x + e^x
    xv = np.array([0.5, -1.5])
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.exp(2 * xv) + np.exp(xv), rtol=1e-14)


def test_broadcast_gradient_sums_back_to_the_input_shape() -> None:
    x = leaf(np.ones((4, 3)))
    b = leaf([1.0, 2.0, 3.0])
    ((x * b) + b).sum().backward()
    np.testing.assert_array_equal(b.grad.numpy(), [8.0, 8.0, 8.0])  # 4 rows of x, plus 4
    np.testing.assert_array_equal(x.grad.numpy(), np.tile([1.0, 2.0, 3.0], (4, 1)))


def test_grads_of_leaves_never_alias_each_other_or_the_users_gradient() -> None:
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    seed = gpunet.tensor(np.array([1.0, 1.0]))
    (a + b).backward(seed)
    assert a.grad.data is not b.grad.data
    a.grad.data[0] = 100.0
    assert b.grad.numpy()[0] == 1.0 and seed.numpy()[0] == 1.0
    c = leaf([1.0, 2.0])
    c.reshape(2, 1).backward(gpunet.tensor(np.array([[5.0], [6.0]])))
    assert not np.shares_memory(c.grad.data, np.zeros(1))
    np.testing.assert_array_equal(c.grad.numpy(), [5.0, 6.0])


def test_fresh_leaf_gradients_are_not_copied() -> None:
    """A rule's fresh result becomes the leaf's .grad as it is. (The seed's array is held
    through the sweep: once freed, a new gradient array could take its id and be copied as
    if it were the user's.)"""
    rng = np.random.default_rng(0)
    x = gpunet.tensor(rng.standard_normal((32, 8)).astype(np.float32))
    w = gpunet.tensor(rng.standard_normal((8, 10)).astype(np.float32), requires_grad=True)
    b = gpunet.tensor(np.zeros(10, np.float32), requires_grad=True)
    labels = gpunet.tensor(rng.integers(0, 10, 32))
    calls: list[str] = []
    for _ in range(20):
        loss = gpunet.nn.functional.cross_entropy(x @ w + b, labels)
        with gpunet.autodiff.observing(lambda name, *_: calls.append(name)):
            loss.backward()
        w.grad = b.grad = None
    assert "copy" not in calls and calls.count("sum") == 20, calls


# Binary ops that keep values in [-1, 1] at any depth: (gpunet, NumPy) forms.
_DAG_OPS = [
    (lambda a, b: (a + b) * 0.5, lambda a, b: (a + b) * 0.5),
    (lambda a, b: a * b, lambda a, b: a * b),
    (lambda a, b: (a - b * 0.5).tanh(), lambda a, b: np.tanh(a - b * 0.5)),
    (lambda a, b: a * 0.5 + b.tanh() * 0.5, lambda a, b: a * 0.5 + np.tanh(b) * 0.5),
]


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 10**6)),
        min_size=1,
        max_size=25,
    )
)
def test_any_dag_gets_the_gradient_of_its_finite_differences(program: list) -> None:
    """The sweep runs a node only after every node that uses it: on random DAGs whose nodes
    reuse earlier values at any depth (diamonds, fan-out, one value twice in one op), every
    leaf's gradient matches central finite differences in float64."""

    def run(values: list, form: int) -> object:
        vals = list(values)
        for op, i, j in program:
            vals.append(_DAG_OPS[op][form](vals[i % len(vals)], vals[j % len(vals)]))
        total = vals[len(values)]
        for v in vals[len(values) + 1 :]:
            total = total + v
        return total.sum()

    rng = np.random.default_rng(len(program))
    starts = [rng.uniform(-1.0, 1.0, 3) for _ in range(3)]
    leaves = [leaf(v) for v in starts]
    run(leaves, 0).backward()
    eps = 1e-6
    for k in range(len(starts)):
        want = np.empty(3)
        for e in range(3):
            hi = [v.copy() for v in starts]
            lo = [v.copy() for v in starts]
            hi[k][e] += eps
            lo[k][e] -= eps
            want[e] = (run(hi, 1) - run(lo, 1)) / (2 * eps)
        got = np.zeros(3) if leaves[k].grad is None else leaves[k].grad.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"leaf {k}")


def test_non_scalar_backward_needs_a_gradient() -> None:
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"non-scalar output \(shape \(2,\)\).*gradient"):
        (x * 2.0).backward()


def test_gradient_argument_must_match_the_output() -> None:
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match="must match the output"):
        (x * 2.0).backward(gpunet.tensor(np.ones(3)))


def test_backward_of_an_output_without_grad_says_why() -> None:
    x = leaf([1.0])
    with gpunet.no_grad():
        y = x * 2.0
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_second_backward_through_a_freed_graph_raises() -> None:
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match=r"a second time.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward() -> None:
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.numpy().copy()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * first)


def test_saved_arrays_are_released_after_backward() -> None:
    x = leaf(np.linspace(0.5, 2.0, 5))
    a = x * 3.0
    saved = weakref.ref(a.data)  # log keeps its input: this array lives in the graph
    y = a.log().sum()
    del a
    gc.collect()
    assert saved() is not None
    y.backward()
    assert saved() is None, "backward must free what the graph saved"


def test_saved_arrays_are_kept_with_retain_graph() -> None:
    x = leaf(np.linspace(0.5, 2.0, 5))
    a = x * 3.0
    saved = weakref.ref(a.data)
    y = a.log().sum()
    del a
    y.backward(retain_graph=True)
    assert saved() is not None


def test_a_graph_is_freed_when_its_output_is_dropped() -> None:
    x = leaf([1.0, 2.0])
    a = x * 2.0
    saved = weakref.ref(a.data)  # log keeps its input
    y = a.log().sum()
    del a
    assert saved() is not None
    del y
    assert saved() is None, "a dropped graph must not linger (no reference cycles)"


def test_a_node_does_not_keep_its_output_tensor_alive() -> None:
    x = leaf([1.0, 2.0])
    y = x.exp()  # exp keeps its output's array, not the tensor
    ref = weakref.ref(y)
    node = y._node
    del y
    assert ref() is None and node.out_data is not None


def test_a_chain_of_100000_ops_differentiates() -> None:
    x = leaf([1.0])
    y = x
    for _ in range(100_000):
        y = y * 1.0
    assert sys.getrecursionlimit() < 100_000
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0])
    del y  # freeing a 100k-deep graph must not overflow the C stack either


def test_requires_grad_on_integers_raises() -> None:
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        gpunet.tensor([1, 2, 3], requires_grad=True)
    t = gpunet.tensor([1, 2])
    with pytest.raises(TypeError, match=r"int64.*to\(gpunet.float32\)"):
        t.requires_grad_()


def test_requires_grad_cannot_be_cleared_on_a_non_leaf() -> None:
    y = leaf([1.0]) * 2.0
    with pytest.raises(RuntimeError, match="detach"):
        y.requires_grad = False


def test_hooks_see_and_replace_gradients() -> None:
    x = leaf([1.0, 2.0])
    seen = []
    y = x * 3.0
    y.register_hook(lambda g: seen.append(g.numpy().copy()))
    handle = x.register_hook(lambda g: g * 10.0)
    y.sum().backward()
    np.testing.assert_array_equal(seen[0], [1.0, 1.0])
    np.testing.assert_array_equal(x.grad.numpy(), [30.0, 30.0])
    handle.remove()
    x.zero_grad()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])


def test_hook_on_a_non_leaf_replaces_the_gradient_flowing_on() -> None:
    x = leaf([1.0, 2.0])
    y = x * 2.0
    y.register_hook(lambda g: g * 0.0)
    (y * y).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0])


def test_no_grad_and_enable_grad() -> None:
    x = leaf([1.0])
    with gpunet.no_grad():
        assert not gpunet.is_grad_enabled()
        y = x * 2.0
        with gpunet.enable_grad():
            z = x * 2.0
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad and z.grad_fn == "mul"
    assert gpunet.is_grad_enabled()

    @gpunet.no_grad()
    def step(t: gpunet.Tensor) -> gpunet.Tensor:
        return t * 2.0

    assert not step(x).requires_grad
    assert gpunet.is_grad_enabled()


def test_create_graph_gives_gradients_of_gradients() -> None:
    x = leaf([1.0, 2.0])
    (x**3).sum().backward(create_graph=True)
    g = x.grad  # 3 x^2, itself differentiable
    assert g.requires_grad
    x.grad = None
    (g * g).sum().backward()  # d/dx sum(9 x^4) = 36 x^3
    np.testing.assert_allclose(x.grad.numpy(), [36.0, 288.0])


def test_gradient_penalty() -> None:
    w = leaf([[0.5, -1.0], [2.0, 0.25]])
    xin = gpunet.tensor(np.array([[1.0, 2.0]]), requires_grad=True)
    (gx,) = gpunet.vjp(lambda t: (t @ w).tanh().sum(), xin)[1](gpunet.tensor(np.float64(1.0)))
    penalty = (gx * gx).sum()
    penalty.backward()
    assert w.grad is not None and np.all(np.isfinite(w.grad.numpy()))

    # check against finite differences of the penalty as a function of w
    def penalty_of(wt: gpunet.Tensor) -> gpunet.Tensor:
        one = gpunet.tensor(np.float64(1.0))
        (g,) = gpunet.vjp(lambda t: (t @ wt).tanh().sum(), xin.detach())[1](one)
        return (g * g).sum()

    gpunet.check_grads(penalty_of, [w.detach()], order=1)


def test_anomaly_in_the_forward_names_the_primitive_and_the_line() -> None:
    x = leaf([1.0, -1.0])
    with (
        gpunet.detect_anomaly(),
        np.errstate(invalid="ignore"),
        pytest.raises(FloatingPointError) as info,
    ):
        x.log()
    message = str(info.value)
    assert "'log'" in message and "(2,)" in message
    assert "test_autodiff.py" in message


def test_anomaly_in_the_backward_names_the_primitive_it_came_from() -> None:
    x = leaf([0.0, 4.0])
    with gpunet.detect_anomaly(), np.errstate(divide="ignore"):
        y = x.sqrt().sum()  # finite forward; d sqrt / dx = inf at 0
        with pytest.raises(FloatingPointError) as info:
            y.backward()
    message = str(info.value)
    assert "backward pass of 'sqrt'" in message and "test_autodiff.py" in message


def test_anomaly_mode_is_off_by_default() -> None:
    x = leaf([-1.0])
    with np.errstate(invalid="ignore"):
        assert np.isnan(x.log().item())


def test_node_records_only_what_its_rule_needs() -> None:
    x = leaf([1.0, 2.0])
    y = x.sigmoid()
    assert isinstance(y._node, Node)
    assert y._node.out_data is y.data  # sigmoid keeps its output y for y (1 - y)
    b = gpunet.broadcast_to(x, (3, 2))
    assert b._node.saved == ((2,),)  # broadcasting keeps only the input shape


def test_two_layer_mlp_fits_a_regression_with_sgd() -> None:
    gpunet.manual_seed(0)
    r = np.random.default_rng(0)
    X = r.uniform(-1, 1, (128, 3)).astype(np.float32)
    Y = (np.sin(X @ np.array([[1.0], [-2.0], [0.5]])) + 0.5 * X[:, :1] ** 2).astype(np.float32)
    x, y = gpunet.tensor(X), gpunet.tensor(Y)
    W1 = (gpunet.randn(3, 32) * (1 / np.sqrt(3))).requires_grad_()
    b1 = gpunet.zeros(32, requires_grad=True)
    W2 = (gpunet.randn(32, 1) * (1 / np.sqrt(32))).requires_grad_()
    b2 = gpunet.zeros(1, requires_grad=True)
    params = [W1, b1, W2, b2]

    def loss_fn() -> gpunet.Tensor:
        h = (x @ W1 + b1).tanh()
        return ((h @ W2 + b2 - y) ** 2).mean()

    first = loss_fn().item()
    for _ in range(2000):
        loss = loss_fn()
        loss.backward()
        with gpunet.no_grad():
            for p in params:
                p -= 0.1 * p.grad
                p.grad = None
    last = loss_fn().item()
    assert last < first / 100, (first, last)


@pytest.mark.parametrize(
    ("step", "names", "advice"),
    [
        (lambda x: x.sum().item(), "Tensor.item", "read it after the call"),
        (lambda x: x[x > 0].sum(), "boolean mask", "gpunet.where"),
        (lambda x: x.__setitem__(0, 1.0), "x[key] = value", "gpunet.where"),
    ],
)
def test_a_refused_op_in_a_captured_step_says_what_to_do_for_that_op(step, names, advice) -> None:
    """Each refusal names the op and the user's line and gives advice that fits it: only a
    host read is told to return the tensor and read it after the call."""
    captured = gpunet.capture(step)
    with pytest.raises(gpunet.CaptureError) as e:
        captured(gpunet.tensor([1.0, -2.0, 3.0]))
    message = str(e.value)
    assert names in message and "test_autodiff.py" in message and advice in message, message
    if advice != "read it after the call":
        assert "read it after the call" not in message, message
