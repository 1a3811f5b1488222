"""gpunet.amp.GradScaler: PyTorch's dynamic loss scaling, its defaults and its sequence."""

from __future__ import annotations

import numpy as np
import pytest

import gpunet
from gpunet.amp import GradScaler

# (overflow at this step?) for 14 steps: growth after 2 clean steps, backoff, repeated infs
PATTERN = [
    False,
    False,
    True,
    False,
    False,
    False,
    True,
    True,
    False,
    False,
    False,
    False,
    True,
    False,
]


def _run(scaler: GradScaler, pattern: list[bool]) -> tuple[list[float], list[bool], gpunet.Tensor]:
    """Train w on (w x).sum() with x = inf on the overflow steps; the scale after each
    update, and whether w moved."""
    w = gpunet.tensor(np.ones(3, np.float32), requires_grad=True)
    opt = gpunet.optim.SGD([w], lr=0.1)
    scales, moved = [], []
    for bad in pattern:
        x = gpunet.tensor(np.float32([1.0, np.inf if bad else 2.0, 3.0]))
        before = w.numpy().copy()
        opt.zero_grad()
        scaler.scale((w * x).sum()).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        moved.append(not np.array_equal(before, w.numpy()))
    return scales, moved, w


def test_defaults_are_pytorchs() -> None:
    s = GradScaler()
    assert s.get_scale() == 2.0**16
    assert s.state_dict() == {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }


def test_the_scale_sequence_over_injected_overflows_is_the_hand_computed_one() -> None:
    scales, moved, w = _run(GradScaler(init_scale=8.0, growth_interval=2), PATTERN)
    # by hand: x2 after two clean steps in a row, x0.5 on each overflow (the count restarts)
    assert scales == [8, 16, 8, 8, 16, 16, 8, 4, 4, 8, 8, 16, 8, 8]
    assert moved == [not bad for bad in PATTERN]  # skipped exactly on the overflows
    clean = PATTERN.count(False)
    # every clean step is the unscaled one: w -= 0.1 x, exactly (the scales are powers of 2)
    want = np.float32(1.0)
    for _ in range(clean):
        want = np.float32(want - np.float32(0.1) * np.float32(1.0))
    assert w.numpy()[0] == want


def test_the_scale_sequence_equals_torchs() -> None:
    torch = pytest.importorskip("torch", reason="torch (the bench extra) is not installed")
    w = torch.ones(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    ref = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    want = []
    for bad in PATTERN:
        x = torch.tensor([1.0, float("inf") if bad else 2.0, 3.0])
        opt.zero_grad()
        ref.scale((w * x).sum()).backward()
        ref.step(opt)
        ref.update()
        want.append(ref.get_scale())
    scales, _, ours = _run(GradScaler(init_scale=8.0, growth_interval=2), PATTERN)
    assert scales == want
    # the same steps skipped (SGD's own rounding differs by an ulp: torch's alpha is a double)
    np.testing.assert_allclose(ours.numpy(), w.detach().numpy(), rtol=1e-6)


def test_a_skipped_step_leaves_parameters_and_adam_state_alone() -> None:
    w = gpunet.tensor(np.ones(4, np.float32), requires_grad=True)
    opt = gpunet.optim.Adam([w], lr=0.1)
    scaler = GradScaler()
    scaler.scale((w * 2.0).sum()).backward()
    scaler.step(opt)
    scaler.update()
    params, state = (
        w.numpy().copy(),
        {k: np.array(v) for k, v in opt.state_dict()["state"][0].items()},
    )
    opt.zero_grad()
    scaler.scale((w * float("nan")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    np.testing.assert_array_equal(w.numpy(), params)
    after = opt.state_dict()["state"][0]
    assert all(np.array_equal(np.array(after[k]), v) for k, v in state.items())
    assert scaler.get_scale() == 2.0**15


def test_misuse_is_an_error() -> None:
    w = gpunet.tensor(np.ones(2, np.float32), requires_grad=True)
    opt = gpunet.optim.SGD([w], lr=0.1)
    scaler = GradScaler()
    with pytest.raises(RuntimeError, match="scale"):
        scaler.unscale_(opt)
    scaler.scale(w.sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(opt)
    sgd = gpunet.optim.SGD([gpunet.ones(2, requires_grad=True)], lr=0.1, in_backward=True)
    with pytest.raises(ValueError, match=r"in_backward=True"):
        scaler.step(sgd)
    with pytest.raises(ValueError, match="backoff_factor"):
        GradScaler(backoff_factor=2.0)


def _scaled_sgd() -> tuple[gpunet.Tensor, gpunet.optim.SGD, GradScaler, gpunet.Tensor]:
    w = gpunet.tensor(np.float32([1.0, -2.0, 3.0]), requires_grad=True)
    with gpunet.autocast(dtype=gpunet.float16):
        loss = (w * gpunet.tensor(np.float32([0.5, 1.0, 2.0]))).sum()
    return w, gpunet.optim.SGD([w], lr=0.1), GradScaler(), loss


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_second_step_before_update_raises_and_changes_nothing(
    kind: str, unscale_first: bool
) -> None:
    """PyTorch: 'step() has already been called since the last update()'; here a second step
    applied the scaled gradients (x 65536) again. unscale_ after step is refused too."""
    w, opt, scaler, loss = _scaled_sgd()
    if kind == "adam":
        opt = gpunet.optim.Adam([w], lr=0.1)
    scaler.scale(loss).backward()
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    before = w.numpy().copy()
    state = [np.array(v.numpy() if hasattr(v, "numpy") else v) for v in _state_values(opt)]
    for again in (scaler.step, scaler.unscale_):
        with pytest.raises(RuntimeError, match=r"step\(\) has already been called.*update\(\)"):
            again(opt)
    np.testing.assert_array_equal(w.numpy(), before)
    for v, b in zip(_state_values(opt), state):
        np.testing.assert_array_equal(np.array(v.numpy() if hasattr(v, "numpy") else v), b)
    scaler.update()
    scaler.step(opt)  # (after update() the optimizer is ready again)
    assert not np.array_equal(w.numpy(), before)


def _state_values(opt: gpunet.optim.Optimizer) -> list:
    return [v for s in opt.state.values() for v in s.values()]


def test_step_without_scale_says_to_call_scale_first() -> None:
    """PyTorch: 'Attempted step but _scale is None'; here an AttributeError on NoneType."""
    w, opt, scaler, loss = _scaled_sgd()
    loss.backward()
    before = w.numpy().copy()
    with pytest.raises(RuntimeError, match=r"scaler\.scale\(loss\)\.backward\(\) first"):
        scaler.step(opt)
    np.testing.assert_array_equal(w.numpy(), before)


def test_the_device_comes_first_as_in_torch_amp() -> None:
    """torch.amp.GradScaler("cuda", init_scale=...): the device first, then PyTorch's
    defaults; the scale lives on the loss's device whichever is named."""
    assert GradScaler("cpu").get_scale() == 2.0**16
    assert GradScaler("cuda", init_scale=1024.0).get_scale() == 1024.0
    assert GradScaler(device="cpu").device == "cpu" and GradScaler().device == "cuda:0"
    with pytest.raises(TypeError, match=r"first argument is the device.*init_scale=1024\.0"):
        GradScaler(1024.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        GradScaler("tpu")
    w, _, _, loss = _scaled_sgd()
    scaler = GradScaler("cuda", init_scale=4.0)  # (a CPU loss: the scale follows it)
    scaler.scale(loss).backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.float32([2.0, 4.0, 8.0]))


def test_state_dict_round_trips_and_disabled_is_a_pass_through() -> None:
    s = GradScaler(init_scale=8.0, growth_interval=2)
    _run(s, PATTERN[:5])
    t = GradScaler()
    t.load_state_dict(s.state_dict())
    assert (
        t.state_dict()
        == s.state_dict()
        == {
            "scale": 16.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2,
            "_growth_tracker": 0,
        }
    )
    off = GradScaler(enabled=False)
    loss = gpunet.ones(2).sum()
    assert off.scale(loss) is loss and off.state_dict() == {} and off.get_scale() == 1.0


OPTIMIZERS = {
    "adam": lambda ps: gpunet.optim.Adam(ps, lr=1e-2),
    "sgd": lambda ps: gpunet.optim.SGD(ps, lr=0.05, momentum=0.9),
    # plain SGD: the capture's own inlined update (p -= lr g) must not drop the scale
    "plain sgd": lambda ps: gpunet.optim.SGD(ps, lr=0.05),
}


def _mlp() -> gpunet.nn.Module:
    return gpunet.nn.Sequential(gpunet.nn.Linear(6, 8), gpunet.nn.ReLU(), gpunet.nn.Linear(8, 1))


def _scaled_step(model: gpunet.nn.Module, opt: object, scaler: GradScaler) -> object:
    """One training step of sum(model(x)^2) under ``scaler``: the loop the tests capture."""

    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        opt.zero_grad()  # type: ignore[attr-defined]
        y = model(x)
        loss = (y * y).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def _scaled_training(captured: bool, kind: str, pattern: list[bool]) -> tuple:
    """An MLP trained with a scaler through ``pattern`` (True: the batch holds an inf),
    eagerly or captured: its parameters, the optimizer's state and the scale after each step.
    float32: a captured float16 step already differs from eager by rounding without a scaler
    (the replay's float16 GEMMs), which would hide what this checks."""
    gpunet.manual_seed(0)
    model = _mlp()
    params = list(model.parameters())
    opt = OPTIMIZERS[kind](params)
    scaler = GradScaler(init_scale=2.0**8, growth_interval=2)
    step = _scaled_step(model, opt, scaler)
    run = gpunet.capture(step) if captured else step
    r = np.random.default_rng(1)
    trace = []
    for bad in pattern:
        x = r.standard_normal((4, 6)).astype(np.float32)
        if bad:
            x[1, 2] = np.inf
        run(gpunet.tensor(x))
        state = opt.state_dict()["state"]
        trace.append(
            (
                [p.numpy().copy() for p in params],
                [{k: np.array(v) for k, v in st.items() if v is not None} for st in state.values()],
                scaler.get_scale(),
            )
        )
    return trace


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the injected inf's arithmetic
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_a_captured_scaled_step_equals_the_eager_one_bit_for_bit(kind: str) -> None:
    """Overflows injected: the captured step (the skip decided by the
    fused update reading the flag, no host branch) matches eager at every step, parameters,
    state (Adam's step count too) and scale; a skipped step changes none of them."""
    pattern = [False, False, True, False, False, True, True, False]
    eager = _scaled_training(False, kind, pattern)
    captured = _scaled_training(True, kind, pattern)
    for i, (a, b) in enumerate(zip(eager, captured)):
        for x, y in zip(a[0], b[0]):
            np.testing.assert_array_equal(x, y, err_msg=f"step {i}: parameters")
        for sa, sb in zip(a[1], b[1]):
            assert sa.keys() == sb.keys()
            for k in sa:
                np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"step {i}: {k}")
        assert a[2] == b[2]
    for i, bad in enumerate(pattern):
        if bad and i:
            before, after = eager[i - 1], eager[i]
            for x, y in zip(before[0], after[0]):
                np.testing.assert_array_equal(x, y)
            for sa, sb in zip(before[1], after[1]):
                for k in sa:
                    np.testing.assert_array_equal(sa[k], sb[k])
            assert after[2] == before[2] / 2
    if kind == "adam":  # the step count is the number of clean steps
        assert int(eager[-1][1][0]["step"]) == pattern.count(False)


def test_scaling_a_loss_whose_weights_step_in_backward_is_refused_before_they_change() -> None:
    """SGD(in_backward=True) would step on the scaled gradients inside the scaled loss's
    backward, before ``scaler.step`` could refuse it: ``scale`` refuses it, weights untouched."""
    gpunet.manual_seed(0)
    model = gpunet.nn.MLP([4, 8, 3])
    gpunet.optim.SGD(model.parameters(), lr=0.1, in_backward=True)
    before = [p.numpy().copy() for p in model.parameters()]
    loss = model(gpunet.randn(5, 4)).sum()
    with pytest.raises(ValueError, match=r"in_backward=True.*use SGD\(\)"):
        GradScaler().scale(loss)
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the injected inf's arithmetic
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_after_scaler_step_the_gradients_read_unscaled(kind: str, captured: bool) -> None:
    """As after PyTorch's ``scaler.step(opt)``: ``p.grad`` holds the gradient of the loss
    itself, the step taken or skipped (a power-of-two scale: bit for bit the gradient of an
    unscaled backward at the same weights), eagerly and replayed."""
    gpunet.manual_seed(0)
    model, twin = _mlp(), _mlp()
    params = list(model.parameters())
    opt = OPTIMIZERS[kind](params)
    step = _scaled_step(model, opt, GradScaler(init_scale=2.0**10))
    run = gpunet.capture(step) if captured else step
    r = np.random.default_rng(2)
    for bad in (False, False, True, False, False):
        x = r.standard_normal((4, 6)).astype(np.float32)
        if bad:
            x[1, 2] = np.inf
        for p, q in zip(params, twin.parameters()):
            q.data[...] = p.data
            q.grad = None
        y = twin(gpunet.tensor(x))
        (y * y).sum().backward()  # (the gradient the scaled step should leave)
        run(gpunet.tensor(x))
        for p, q in zip(params, twin.parameters()):
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy(), err_msg=f"bad={bad}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the injected inf's arithmetic
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_an_overflow_in_one_optimizer_skips_its_step_only(captured: bool) -> None:
    """Two optimizers, one scaler (PyTorch keeps a found-inf flag per optimizer): an inf in
    the first one's gradients skips its step, the second steps as without the other, and
    update() backs the scale off once; clean steps after it step both."""
    gpunet.manual_seed(0)
    a, b = gpunet.nn.Linear(3, 2), gpunet.nn.Linear(3, 2)
    opt_a, opt_b = gpunet.optim.SGD(a.parameters(), lr=0.1), gpunet.optim.Adam(b.parameters())
    scaler = GradScaler(init_scale=2.0**8)
    solo_b, solo_opt = gpunet.nn.Linear(3, 2), None
    for p, q in zip(b.parameters(), solo_b.parameters()):
        q.data[...] = p.data
    solo_opt = gpunet.optim.Adam(solo_b.parameters())
    solo_scaler = GradScaler(init_scale=2.0**8)

    def step(xa: gpunet.Tensor, xb: gpunet.Tensor) -> gpunet.Tensor:
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss = a(xa).sum() + b(xb).sum()
        scaler.scale(loss).backward()
        scaler.step(opt_a)
        scaler.step(opt_b)
        scaler.update()
        return loss

    run = gpunet.capture(step) if captured else step
    r = np.random.default_rng(3)
    for i in range(5):
        xa, xb = r.standard_normal((4, 3)).astype(np.float32), r.standard_normal((4, 3))
        xb = xb.astype(np.float32)
        if i == 3:
            xa[0, 0] = np.inf
        before_a = [p.numpy().copy() for p in a.parameters()]
        run(gpunet.tensor(xa), gpunet.tensor(xb))
        solo_opt.zero_grad()
        solo_scaler.scale(solo_b(gpunet.tensor(xb)).sum()).backward()
        solo_scaler.step(solo_opt)
        solo_scaler.update()
        for p, q in zip(b.parameters(), solo_b.parameters()):  # (b stepped every time)
            np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=f"step {i}")
        moved = any(not np.array_equal(p.numpy(), w) for p, w in zip(a.parameters(), before_a))
        assert moved == (i != 3), f"step {i}: a moved {moved}"
    assert scaler.get_scale() == 2.0**7 and solo_scaler.get_scale() == 2.0**8
