"""SGD(in_backward=True): the step taken inside backward, folded into the weight GEMM where it
can be; the same parameters as backward() then step(), with no gradient stored."""

from __future__ import annotations

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet import nn, optim
from gpunet.checkpoint import CheckpointError

R = np.random.default_rng(11)


def _model(seed: int, dtype=gpunet.float64, norm: str | None = None) -> nn.Module:
    gpunet.manual_seed(seed)
    return nn.MLP([6, 8, 7, 3], activation="tanh", norm=norm).to(dtype)


def _data(dtype=np.float64) -> tuple[gpunet.Tensor, gpunet.Tensor]:
    x = gpunet.tensor(R.standard_normal((10, 6)).astype(dtype))
    y = gpunet.tensor(R.integers(0, 3, 10))
    return x, y


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("norm", [None, "layernorm"])
def test_same_parameters_as_backward_then_step(weight_decay: float, norm: str | None) -> None:
    """Five steps: in backward (GEMM-folded weights and biases, and LayerNorm's parameters
    through the whole-gradient path) equal backward() + step(), in float64."""
    x, y = _data()
    ref, fused = _model(0, norm=norm), _model(0, norm=norm)
    opt_ref = optim.SGD(ref.parameters(), lr=0.1, weight_decay=weight_decay)
    opt = optim.SGD(fused.parameters(), lr=0.1, weight_decay=weight_decay, in_backward=True)
    for _ in range(5):
        opt_ref.zero_grad()
        loss_ref = F.cross_entropy(ref(x), y)
        loss_ref.backward()
        opt_ref.step()
        opt.zero_grad()
        loss = F.cross_entropy(fused(x), y)
        loss.backward()
        opt.step()  # nothing left to do; harmless
        np.testing.assert_allclose(loss.item(), loss_ref.item(), rtol=1e-12)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
        assert p.grad is None, name
    assert all(flat._grad is None for flat in opt._flats)  # no gradient memory at all


def test_float32_mlp_matches_within_rounding() -> None:
    x, y = _data(np.float32)
    ref, fused = _model(1, gpunet.float32), _model(1, gpunet.float32)
    opt_ref = optim.SGD(ref.parameters(), lr=0.05)
    optim.SGD(fused.parameters(), lr=0.05, in_backward=True)  # not kept: the params hold it
    for _ in range(3):
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt_ref.step()
        F.cross_entropy(fused(x), y).backward()
    for p, q in zip(fused.parameters(), ref.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-5, atol=1e-6)


def _raw_step(in_backward: bool, fn, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """One SGD step (lr 0.1) on fresh leaves of ``shapes`` for loss ``fn(*leaves)``."""
    rng = np.random.default_rng(5)
    leaves = [gpunet.tensor(rng.standard_normal(s), requires_grad=True) for s in shapes]
    opt = optim.SGD(leaves, lr=0.1, in_backward=in_backward)
    fn(*leaves).backward()
    opt.step()
    return [p.numpy() for p in leaves]


@pytest.mark.parametrize(
    ("name", "fn", "shapes"),
    [
        # W first: its update must wait until dX = W^T g has read it
        ("weight-first matmul", lambda w, x: (w @ x).tanh().sum(), [(4, 3), (3, 5)]),
        # W used twice (tied): updated once, from the summed gradient, after both uses
        ("tied weight", lambda w, x: ((x @ w) @ w).tanh().sum(), [(4, 4), (3, 4)]),
        ("transposed use", lambda w, x: (x @ w.T).sum() ** 2, [(5, 4), (3, 4)]),
        ("elementwise use", lambda w, x: ((x @ w) * w[0]).sum(), [(4, 4), (2, 4)]),
    ],
)
def test_leaves_used_in_any_way(name: str, fn, shapes) -> None:
    got = _raw_step(True, fn, *shapes)
    want = _raw_step(False, fn, *shapes)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14, err_msg=name)


def test_hook_sees_the_gradient_before_the_update() -> None:
    w = gpunet.tensor(R.standard_normal((3, 2)), requires_grad=True)
    x = gpunet.tensor(R.standard_normal((4, 3)))
    w0 = w.numpy().copy()
    seen = []
    w.register_hook(lambda g: seen.append(g.numpy().copy()) or g * 2)
    optim.SGD([w], lr=0.5, in_backward=True)  # not kept: the parameter holds it
    (x @ w).sum().backward()
    expect = x.numpy().T @ np.ones((4, 2))
    np.testing.assert_allclose(seen[0], expect, rtol=1e-12)
    np.testing.assert_allclose(w.numpy(), w0 - 0.5 * 2 * expect, rtol=1e-12)
    assert w.grad is None


def test_learning_rate_is_read_at_each_backward() -> None:
    w = gpunet.tensor(np.zeros((2, 1)), requires_grad=True)
    x = gpunet.tensor(np.ones((1, 2)))
    opt = optim.SGD([w], lr=1.0, in_backward=True)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        (x @ w).sum().backward()
        opt.step()
        sched.step()
    np.testing.assert_allclose(w.numpy(), -(1.0 + 0.5 + 0.25) * np.ones((2, 1)))


def test_input_gradients_and_other_leaves_unchanged() -> None:
    """A non-optimized leaf (the input) gets its usual .grad, computed with the old weight."""
    w = gpunet.tensor(R.standard_normal((3, 2)), requires_grad=True)
    x = gpunet.tensor(R.standard_normal((4, 3)), requires_grad=True)
    w0 = w.numpy().copy()
    optim.SGD([w], lr=0.5, in_backward=True)  # not kept: the parameter holds it
    (x @ w).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.ones((4, 2)) @ w0.T, rtol=1e-12)


def test_functional_grad_and_create_graph() -> None:
    """gpunet.grad returns gradients and updates nothing; backward(create_graph=True)
    still takes the step (from the whole gradient) and stores no .grad."""
    w = gpunet.tensor(R.standard_normal((3, 2)), requires_grad=True)
    x = gpunet.tensor(R.standard_normal((4, 3)))
    w0 = w.numpy().copy()
    optim.SGD([w], lr=0.5, in_backward=True)  # not kept: the parameter holds it
    gw = gpunet.grad(lambda w: (x @ w).sum())(w)
    np.testing.assert_allclose(w.numpy(), w0)
    np.testing.assert_allclose(gw.numpy(), x.numpy().T @ np.ones((4, 2)), rtol=1e-12)
    ((x @ w) ** 2).sum().backward(create_graph=True)
    expect = w0 - 0.5 * (x.numpy().T @ (2 * (x.numpy() @ w0)))
    np.testing.assert_allclose(w.numpy(), expect, rtol=1e-12)
    assert w.grad is None


def test_a_later_plain_optimizer_takes_over() -> None:
    w = gpunet.tensor(np.ones((2, 2)), requires_grad=True)
    first = optim.SGD([w], lr=0.5, in_backward=True)
    second = optim.SGD([w], lr=0.5)
    (w * 3).sum().backward()
    np.testing.assert_allclose(w.numpy(), np.ones((2, 2)))  # not stepped in backward
    second.step()
    np.testing.assert_allclose(w.numpy(), -0.5 * np.ones((2, 2)))
    del first


def test_bad_combinations_raise_before_any_change() -> None:
    w = gpunet.tensor(np.ones(2), requires_grad=True)
    with pytest.raises(ValueError, match=r"in_backward=True\) with momentum 0\.9.*momentum=0"):
        optim.SGD([w], lr=0.1, momentum=0.9, in_backward=True)
    assert w.in_backward is None and w.grad_buffer is None
    with pytest.raises(ValueError, match="whole optimizer"):
        optim.SGD([{"params": [w], "in_backward": False}], lr=0.1, in_backward=True)
    opt = optim.SGD([w], lr=0.1, in_backward=True)
    (w * 2).sum().backward()
    for clip in (lambda: optim.clip_grad_norm_([w], 1.0), lambda: optim.clip_grad_value_(w, 1)):
        with pytest.raises(RuntimeError, match=r"clip_grad_.*updated inside backward"):
            clip()
    assert opt.state_dict()["param_groups"][0]["in_backward"] is True


def test_fit_trains_with_it() -> None:
    """The fit loop runs unchanged with a step in backward (no gradient norms to record)."""
    from gpunet.data import DataLoader, Dataset
    from gpunet.train import fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = _model(3, gpunet.float32)
    opt = optim.SGD(model.parameters(), lr=0.2, in_backward=True)
    loader = DataLoader(Dataset(x, y), batch_size=32, shuffle=True, seed=0)
    history = fit(model, F.cross_entropy, opt, loader, None, epochs=8, progress=False)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.grad_norm[-1] == {}


def test_an_mlp_step_is_its_gemms_and_reductions() -> None:
    """Profiled, an MLP step in backward has no update pass: every weight is stepped by its
    dW GEMM (beta = 1 - lr wd) and every bias by its reduction; no axpby, no sgd_update."""
    x, y = _data(np.float32)
    model = _model(4, gpunet.float32)
    opt = optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01, in_backward=True)
    with gpunet.profile() as prof:
        F.cross_entropy(model(x), y).backward()
        opt.step()
    names = [r.name for r in prof.records]
    assert "axpby" not in names and "sgd_update" not in names
    stepped = [r for r in prof.records if r.params.get("alpha") == -0.1]
    assert sorted(r.name for r in stepped) == ["matmul"] * 3 + ["sum"] * 3
    assert all(r.params["beta"] == pytest.approx(1 - 0.1 * 0.01) for r in stepped)


def test_a_leaf_that_is_also_an_output_is_stepped_once() -> None:
    """backward over [loss, w] seeds w's gradient directly and through its use: one step,
    from the sum, with the weight decay applied once."""
    from gpunet.autodiff import backprop

    def run(in_backward: bool) -> np.ndarray:
        w = gpunet.tensor(np.arange(6.0).reshape(3, 2), requires_grad=True)
        x = gpunet.tensor(np.ones((4, 3)))
        opt = optim.SGD([w], lr=0.1, weight_decay=0.5, in_backward=in_backward)
        backprop([(x @ w).sum(), w], [None, gpunet.ones(3, 2, dtype=gpunet.float64)])
        opt.step()
        return w.numpy()

    np.testing.assert_allclose(run(True), run(False), rtol=1e-12)


def test_state_dict_round_trip_and_mismatch() -> None:
    w = gpunet.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([w], lr=0.1, in_backward=True)
    state = opt.state_dict()
    optim.SGD([w], lr=0.3, in_backward=True).load_state_dict(state)  # lr comes back as 0.1
    assert w.in_backward.alpha_beta() == (-0.1, 1.0)
    plain = optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match=r"saved with in_backward=True.*in_backward=False"):
        plain.load_state_dict(state)
    assert plain.param_groups[0]["lr"] == 0.1 and w.in_backward is None  # nothing changed
    with pytest.raises(ValueError, match=r"saved with in_backward=False"):
        optim.SGD([w], lr=0.1, in_backward=True).load_state_dict(plain.state_dict())


def test_a_checkpoint_with_the_other_in_backward_is_refused_whole(tmp_path) -> None:
    x, y = _data()
    model = _model(5)
    opt = optim.SGD(model.parameters(), lr=0.1, in_backward=True)
    F.cross_entropy(model(x), y).backward()
    path = tmp_path / "run.safetensors"
    gpunet.save(path, model, opt)
    other = _model(6)
    before = [p.numpy().copy() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"in_backward=True in the checkpoint"):
        gpunet.load(path, other, optim.SGD(other.parameters(), lr=0.1))
    for p, b in zip(other.parameters(), before):  # nothing was loaded
        np.testing.assert_array_equal(p.numpy(), b)
    again = optim.SGD(other.parameters(), lr=0.3, in_backward=True)
    gpunet.load(path, other, again)
    assert again.param_groups[0]["lr"] == 0.1
    for p, q in zip(other.parameters(), model.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_only_a_leaf_takes_an_in_backward_step() -> None:
    w = gpunet.tensor(np.ones(2), requires_grad=True)
    with pytest.raises(ValueError, match="in_backward: only a leaf tensor"):
        (w * 2).in_backward = object()
