"""The reverse sweep's leaf plan (accumulate, buffer, in-backward step), the state the sweep
sets for rules and observers, and version counters on saved tensors."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import gpunet
from gpunet import autodiff, nn, optim


def _linear_leaves() -> tuple[gpunet.Tensor, gpunet.Tensor, gpunet.Tensor]:
    rng = np.random.default_rng(0)
    x = gpunet.tensor(rng.standard_normal((4, 3)), dtype=gpunet.float64)
    w = gpunet.tensor(rng.standard_normal((3, 2)), dtype=gpunet.float64, requires_grad=True)
    b = gpunet.tensor(rng.standard_normal(2), dtype=gpunet.float64, requires_grad=True)
    return x, w, b


def _loss(x: gpunet.Tensor, w: gpunet.Tensor, b: gpunet.Tensor) -> gpunet.Tensor:
    return (nn.functional.linear(x, w, b) ** 2).sum()


def test_the_three_routes_give_the_same_update() -> None:
    """.grad (accumulate), the grad_buffer (written by the GEMM) and the in-backward step
    (taken by the GEMM) agree: w - lr dL/dw each way."""
    lr = 0.1
    x, w, b = _linear_leaves()
    _loss(x, w, b).backward()
    want = w.numpy() - lr * w.grad.numpy()
    assert w.grad is not None and not np.allclose(w.grad.numpy(), 0)

    x, w, b = _linear_leaves()
    buf = np.full(w.shape, np.nan)
    w.grad_buffer = buf
    _loss(x, w, b).backward()
    assert w.grad.data is buf  # the buffer route: the GEMM wrote there, no new array
    np.testing.assert_allclose(w.numpy() - lr * buf, want, rtol=1e-12)

    x, w, b = _linear_leaves()
    optim.SGD([w, b], lr=lr, in_backward=True)
    _loss(x, w, b).backward()
    assert w.grad is None  # the in-backward route: stepped in place, no gradient kept
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-12)


def test_the_buffer_route_hands_grad_the_buffers_own_tensor() -> None:
    """Each backward that writes a grad_buffer sets .grad to the one tensor kept over it; where
    that tensor's array was replaced since (a module moved its grad), a new one over the buffer."""
    x, w, b = _linear_leaves()
    buf = np.zeros(w.shape)
    w.grad_buffer = buf
    _loss(x, w, b).backward()
    first = w.grad
    w.grad = None
    _loss(x, w, b).backward()
    assert w.grad is first and first.data is buf
    first.data = first.data.copy()  # what Module.to does to a grad it moves
    w.grad = None
    _loss(x, w, b).backward()
    assert w.grad is not first and w.grad.data is buf
    np.testing.assert_array_equal(buf, first.numpy())  # the same gradient, written in buf


def test_a_leaf_used_twice_takes_its_step_from_the_whole_gradient() -> None:
    x, w, b = _linear_leaves()
    (_loss(x, w, b) + (w * w).sum()).backward()
    want = w.numpy() - 0.1 * w.grad.numpy()
    x, w, b = _linear_leaves()
    optim.SGD([w, b], lr=0.1, in_backward=True)
    (_loss(x, w, b) + (w * w).sum()).backward()
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-12)


def test_no_walk_once_the_in_backward_model_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process-wide latch: once no live leaf has an in-backward step, a backward counts no
    uses (it never calls ``_reachable``)."""
    model = nn.Linear(3, 2)
    optim.SGD(model.parameters(), lr=0.1, in_backward=True)
    model(gpunet.ones((4, 3))).sum().backward()
    walks = []
    real = autodiff._reachable
    monkeypatch.setattr(autodiff, "_reachable", lambda *a: walks.append(1) or real(*a))
    model(gpunet.ones((4, 3))).sum().backward()
    assert walks == [1]  # (while the model lives, one walk counts its weights' uses)
    del model
    gc.collect()
    walks.clear()
    other = nn.Linear(3, 2)
    other(gpunet.ones((4, 3))).sum().backward()
    assert walks == [] and other.weight.grad is not None


def test_rules_read_the_sweeps_decision_to_fuse() -> None:
    """FUSED_VJP is set while a plain sweep runs, not with create_graph, and never after."""
    seen = []
    x = gpunet.tensor([1.0, -2.0], requires_grad=True)
    y = gpunet.relu(x)
    y.register_hook(lambda g: seen.append(bool(autodiff.STATE.flags & autodiff.FUSED_VJP)))
    y.sum().backward(retain_graph=True)
    y.sum().backward(create_graph=True)
    assert seen == [True, False]
    assert not autodiff.STATE.flags & (autodiff.FUSED_VJP | autodiff.BACKWARD)
    assert autodiff.differentiating(x)  # outside a sweep: the per-operand answer


def test_call_runs_the_method_and_tells_observers() -> None:
    heard = []
    out = np.zeros(3)
    with autodiff.observing(lambda *a: heard.append(a)):
        got = autodiff.call("add", np.add, np.ones(3), np.ones(3))
        autodiff.call(
            "axpby", gpunet.get_backend("cpu").axpby_into, out, np.ones(3), alpha=2.0, beta=1.0
        )
    assert np.array_equal(got, [2, 2, 2]) and np.array_equal(out, [2, 2, 2])
    assert [h[0] for h in heard] == ["add", "axpby"]
    assert len(heard[1][1]) == 1 and heard[1][3] is out  # (an _into method: out, then inputs)


def test_the_profiler_learns_the_phase_from_the_sweep() -> None:
    x = gpunet.tensor(np.ones((4, 3)), requires_grad=True)
    with gpunet.profile() as prof:
        (x * 2.0).sum().backward()
    phases = [(r.name, r.phase) for r in prof.records]
    assert phases[0] == ("mul", "forward") and ("mul", "backward") in phases[1:]


# ---------------------------------------------------------------------- version counters
def test_a_saved_input_changed_in_place_makes_backward_raise() -> None:
    a = gpunet.tensor([1.0, 2.0], requires_grad=True)
    b = gpunet.tensor([3.0, 4.0])
    c = a * b
    b += 10
    with pytest.raises(RuntimeError, match=r"'mul'.*\(2,\).*modified by an inplace operation"):
        c.sum().backward()
    assert a.grad is None


def test_item_assignment_counts_as_a_change() -> None:
    a = gpunet.tensor([1.0, 2.0], requires_grad=True)
    m = gpunet.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = m @ a
    m[0, 1] = 5.0
    with pytest.raises(RuntimeError, match=r"'matmul'.*\(2, 2\)"):
        c.sum().backward()


def test_changes_before_the_op_or_to_unsaved_tensors_are_fine() -> None:
    a = gpunet.tensor([1.0, 2.0], requires_grad=True)
    b = gpunet.tensor([3.0, 4.0])
    b += 10  # before the op that saves it
    c = a + b  # add saves no input values
    d = a * b
    b -= 10
    (c.sum() + 0 * d.detach().sum()).backward()
    np.testing.assert_array_equal(a.grad.numpy(), [1.0, 1.0])


def test_the_training_loop_with_in_place_parameter_steps_still_works() -> None:
    w = gpunet.tensor([1.0, 2.0], requires_grad=True)
    x = gpunet.tensor([3.0, 4.0])
    for _ in range(3):
        w.grad = None
        (w * x).sum().backward()
        with gpunet.no_grad():
            w -= 0.1 * w.grad  # stepped in place between two backward passes
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.9, 2.0 - 1.2], rtol=1e-5)
    model = nn.Linear(2, 2)
    opt = optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(gpunet.ones((3, 2))).sum().backward()
        opt.step()


def test_nondiff_is_read_from_the_vjp_tuples_markers() -> None:
    from gpunet import primitives as P

    assert P.where.nondiff == {0} and P.take.nondiff == {1} and P.scatter_add.nondiff == {1}
    assert P.cross_entropy.nondiff == {1}
    assert P.cross_entropy_backward.nondiff == {2}  # (no VJP tuple: declared on the card)
    for prim in P.REGISTRY.values():
        if isinstance(prim.vjp, tuple):
            assert {i for i, r in enumerate(prim.vjp) if r is P.NONDIFF} <= prim.nondiff


def test_a_tracked_nondiff_input_gets_no_edge() -> None:
    """A float mask that requires grad, bound straight to ``where``: its node has no edge to
    the mask (position 0 is nondiff), and backward leaves its .grad None."""
    from gpunet import primitives as P
    from gpunet.autodiff import bind

    cond = gpunet.tensor([1.0, 0.0], requires_grad=True)
    x, y = gpunet.tensor([2.0, 3.0], requires_grad=True), gpunet.tensor([4.0, 5.0])
    out = bind(P.where, cond, x, y)
    assert out._node.parents == (None, x, None)
    out.sum().backward()
    assert cond.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 0.0])


def test_an_output_the_node_kept_changed_in_place_makes_backward_raise() -> None:
    x = gpunet.tensor([0.5, 1.0], requires_grad=True)
    y = x.exp()  # exp keeps its output for the gradient
    with gpunet.no_grad():
        y += 1.0
    with pytest.raises(RuntimeError, match=r"'exp'.*\(2,\) \(its output\).*inplace operation"):
        y.sum().backward()
