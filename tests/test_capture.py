"""gpunet.capture: replayed steps equal eager steps bit for bit, host reads and value-dependent
branches raise CaptureError at the user's line, signatures recapture or raise, buffers keep
their addresses, and memory stays flat over 1,000 replays."""

from __future__ import annotations

import copy
import functools
import gc
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet import CaptureError, nn, optim
from gpunet.optim import lr_scheduler

STEPS = 6


def _batches(n: int = STEPS, rows: int = 8, features: int = 12, classes: int = 5) -> list:
    r = np.random.default_rng(1)
    return [
        (
            gpunet.tensor(r.standard_normal((rows, features)).astype(np.float32)),
            gpunet.tensor(r.integers(0, classes, rows)),
        )
        for _ in range(n)
    ]


def _setup(kind: str, activation: str = "relu", norm: str | None = None, dropout: float = 0.0):
    """A fresh model, optimizer and step function (the same seed each time)."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 16, 5], activation=activation, norm=norm, dropout=dropout)
    params = model.parameters()
    sched = None
    clip = None
    if kind == "sgd":
        opt = optim.SGD(params, lr=0.1)
    elif kind == "momentum":
        opt = optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1)
    elif kind == "nesterov":
        opt = optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    elif kind == "weight_decay":
        opt = optim.SGD(params, lr=0.1, momentum=0.5, weight_decay=0.01)
    elif kind == "in_backward":
        opt = optim.SGD(params, lr=0.1, weight_decay=0.01, in_backward=True)
        sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    elif kind == "adam":
        opt = optim.Adam(params, lr=1e-2)
    elif kind == "adamw":
        opt = optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    elif kind == "schedule":
        opt = optim.SGD(params, lr=0.1, momentum=0.9)
        sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    elif kind == "clip":
        opt = optim.Adam(params, lr=1e-2)
        clip = 0.5
    else:
        raise AssertionError(kind)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        norm = optim.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
        opt.step()
        if sched is not None:
            sched.step()
        return loss if norm is None else (loss, norm)

    return model, opt, step


def _run(kind: str, captured: bool, **model_kw: Any) -> tuple[list, list]:
    model, _, step = _setup(kind, **model_kw)
    run = gpunet.capture(step) if captured else step
    outs = []
    for x, y in _batches():
        out = run(x, y)
        outs.append([t.numpy().copy() for t in (out if isinstance(out, tuple) else (out,))])
    return outs, [p.numpy().copy() for p in model.parameters()]


def _assert_same(a: tuple[list, list], b: tuple[list, list]) -> None:
    for step, (oa, ob) in enumerate(zip(a[0], b[0])):
        for u, v in zip(oa, ob):
            assert np.array_equal(u, v), f"output differs at step {step}: {u} vs {v}"
    for i, (u, v) in enumerate(zip(a[1], b[1])):
        assert np.array_equal(u, v), f"parameter {i} differs after {STEPS} steps"


@pytest.mark.parametrize(
    "kind",
    [
        "sgd",
        "momentum",
        "nesterov",
        "weight_decay",
        "in_backward",
        "adam",
        "adamw",
        "schedule",
        "clip",
    ],
)
def test_replayed_steps_equal_eager_steps_bit_for_bit(kind: str) -> None:
    eager = _run(kind, captured=False)
    _assert_same(eager, _run(kind, captured=True))
    # and training moved the weights (a replay that did nothing would pass the test above
    # only if the eager run did nothing too)
    before = [p.numpy().copy() for p in _setup(kind)[0].parameters()]
    assert any(not np.array_equal(u, v) for u, v in zip(before, eager[1]))


@pytest.mark.parametrize("activation", sorted(nn.ACTIVATIONS))
def test_every_activation_replays_bit_for_bit(activation: str) -> None:
    _assert_same(
        _run("momentum", False, activation=activation),
        _run("momentum", True, activation=activation),
    )


def test_layer_norm_replays_bit_for_bit() -> None:
    _assert_same(_run("adam", False, norm="layernorm"), _run("adam", True, norm="layernorm"))


def test_dropout_draws_fresh_masks_each_replay_the_same_as_eager() -> None:
    eager = _run("sgd", False, dropout=0.5)
    _assert_same(eager, _run("sgd", True, dropout=0.5))
    # fresh masks: the same batch twice gives two different losses
    model, _, _ = _setup("sgd", dropout=0.5)
    x, _ = _batches(1)[0]

    @gpunet.capture
    def forward(x: gpunet.Tensor) -> gpunet.Tensor:
        return model(x)

    outs = [forward(x).numpy().copy() for _ in range(4)]
    assert not np.array_equal(outs[2], outs[3])


class _Scaled(nn.Module):
    """Branches on ``training`` with no backend call either way but its own: x 2 or x 3."""

    def forward(self, x: gpunet.Tensor) -> gpunet.Tensor:
        return x * 2.0 if self.training else x * 3.0


@pytest.mark.parametrize("model", ["dropout", "own branch"])
def test_a_captured_forward_follows_eval_set_outside_the_step(model: str) -> None:
    """torch.compile guards on ``module.training``: a mode a recording read and that has
    changed since makes the step record again (a new signature), in either direction."""
    gpunet.manual_seed(0)
    net = nn.MLP([12, 16, 5], dropout=0.5) if model == "dropout" else _Scaled()
    x, _ = _batches(1)[0]

    @gpunet.capture
    def predict(x: gpunet.Tensor) -> gpunet.Tensor:
        with gpunet.no_grad():
            return net(x)

    for _ in range(3):
        predict(x)
    assert predict.replays == 1
    net.eval()
    with gpunet.no_grad():
        expected = net(x).numpy()
    for _ in range(3):  # recorded twice in eval mode, then replayed
        np.testing.assert_array_equal(predict(x).numpy(), expected)
    assert predict.replays == 2 and len(predict._captures) == 2
    net.train()
    predict(x)  # the training mode's capture again: replayed, with a fresh dropout mask
    assert predict.replays == 3
    if model == "own branch":
        np.testing.assert_array_equal(predict(x).numpy(), x.numpy() * 2.0)


def test_a_mode_the_step_sets_itself_is_not_a_guard() -> None:
    """``model.train()`` inside the step decides the mode its reads see: a mode set outside
    changes nothing, so the step keeps replaying (the reads follow the step's own write)."""
    net = _Scaled()
    x = gpunet.ones(3)

    @gpunet.capture
    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        net.train()
        return net(x)

    for i in range(4):
        net.train(i % 2 == 0)
        np.testing.assert_array_equal(step(x).numpy(), np.full(3, 2.0, np.float32))
    assert step.replays == 2 and len(step._captures) == 1


def test_autocast_around_a_captured_call_is_part_of_its_signature() -> None:
    """torch.compile guards on the autocast state: a call outside the autocast the step was
    recorded under records again (float32 output), and back under it replays again."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    x, _ = _batches(1)[0]

    @gpunet.capture
    def forward(x: gpunet.Tensor) -> gpunet.Tensor:
        with gpunet.no_grad():
            return model(x)

    with gpunet.autocast(dtype=gpunet.bfloat16):
        for _ in range(3):
            assert forward(x).dtype == gpunet.bfloat16
    with gpunet.no_grad():
        expected = model(x).numpy()
    for _ in range(3):
        np.testing.assert_array_equal(forward(x).numpy(), expected)
    with gpunet.autocast(dtype=gpunet.float16):
        assert forward(x).dtype == gpunet.float16
    assert forward.replays == 2 and len(forward._captures) == 2
    # autocast("cuda") casts nothing on the CPU: a signature of its own, not bfloat16's
    with gpunet.autocast("cuda", dtype=gpunet.bfloat16):
        for _ in range(3):
            np.testing.assert_array_equal(forward(x).numpy(), expected)
    assert forward.replays == 3 and len(forward._captures) == 3


def test_a_changed_mode_or_autocast_raises_naming_it_when_asked() -> None:
    model = nn.MLP([12, 16, 5], dropout=0.5)
    x, _ = _batches(1)[0]
    run = gpunet.capture(lambda x: model(x), on_new_signature="raise")
    for _ in range(3):
        run(x)
    model.eval()
    with pytest.raises(
        CaptureError, match=r"\[Dropout.training=False\].*\[Dropout.training=True\]"
    ):
        run(x)
    model.train()
    with gpunet.autocast(dtype=gpunet.bfloat16), pytest.raises(CaptureError, match="autocast bf"):
        run(x)
    run(x)
    assert run.replays == 2


def test_the_schedule_and_the_first_momentum_step_are_not_frozen() -> None:
    _, opt, step = _setup("schedule")
    run = gpunet.capture(step)
    lrs = []
    for x, y in _batches():
        run(x, y)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    assert run.replays == STEPS - 2


# ---------------------------------------------------------------------- loud when not safe
FORBIDDEN: list[tuple[str, Callable[[gpunet.Tensor], Any]]] = [
    ("Tensor.item()", lambda t: t.sum().item()),
    ("Tensor.numpy()", lambda t: t.numpy()),
    ("Tensor.tolist()", lambda t: t.tolist()),
    ("bool(tensor)", lambda t: bool(t.sum() > 0)),
    ("float(tensor)", lambda t: float(t.sum())),
    ("int(tensor)", lambda t: int(t.sum())),
    ("printing a tensor", lambda t: repr(t)),
    ("np.asarray(tensor)", lambda t: np.asarray(t)),
    ("boolean mask", lambda t: t[t > 0]),
    ("x[key] = value", lambda t: t.__setitem__(0, 1.0)),
]


@pytest.mark.parametrize("name, op", FORBIDDEN, ids=[n for n, _ in FORBIDDEN])
def test_host_reads_and_value_shapes_raise_naming_the_op_and_line(name: str, op: Callable) -> None:
    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        y = x * 2.0
        op(y)
        return y

    run = gpunet.capture(step)
    with pytest.raises(CaptureError) as info:
        run(gpunet.ones(3))
    message = str(info.value)
    assert name in message
    assert f"{__file__}:{op.__code__.co_firstlineno} in <lambda>" in message  # the user's line
    # the capture is left usable: a later step runs
    assert gpunet.autodiff.STATE.flags & gpunet.autodiff.CAPTURE == 0
    assert float(gpunet.ones(2).sum()) == 2.0


def test_a_value_dependent_branch_is_caught() -> None:
    calls = {"n": 0}

    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        calls["n"] += 1
        return x * 2.0 if calls["n"] % 2 else x + 2.0

    run = gpunet.capture(step)
    run(gpunet.ones(3))
    with pytest.raises(CaptureError, match=r"differ at backend call 1: 'mul'.*'add'"):
        run(gpunet.ones(3))


def test_an_array_made_outside_the_recorded_calls_is_caught() -> None:
    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        fresh = gpunet.tensor(np.ones(3, np.float32))  # made by no call the capture sees
        return x * fresh

    run = gpunet.capture(step)
    run(gpunet.ones(3))
    with pytest.raises(CaptureError, match="different array from outside"):
        run(gpunet.ones(3))


def test_a_new_shape_recaptures_by_default() -> None:
    def step(x: gpunet.Tensor) -> gpunet.Tensor:
        return (x * 3.0).sum()

    run = gpunet.capture(step)
    for n in (3, 3, 3, 5, 5, 5, 3):
        assert float(run(gpunet.ones(n))) == 3.0 * n
    assert len(run._captures) == 2 and run.replays == 3


def test_a_new_shape_raises_when_asked() -> None:
    run = gpunet.capture(lambda x: x * 3.0, on_new_signature="raise")
    for _ in range(3):
        run(gpunet.ones(3))
    with pytest.raises(CaptureError, match=r"new input signature \(cpu float32 \(4,\)\)"):
        run(gpunet.ones(4))
    with pytest.raises(ValueError, match="on_new_signature"):
        gpunet.capture(lambda x: x, on_new_signature="sometimes")


def test_buffers_keep_their_addresses_across_replays() -> None:
    model, _, step = _setup("adam")
    run = gpunet.capture(step)
    batches = _batches()
    run(*batches[0])
    run(*batches[1])
    datas = [p.data for p in model.parameters()]
    addresses = [p.data.__array_interface__["data"][0] for p in model.parameters()]
    loss = run(*batches[2])
    loss_address = loss.data.__array_interface__["data"][0]
    for x, y in batches[3:]:
        again = run(x, y)
        assert again is loss  # the capture's own output, rewritten in place
        assert again.data.__array_interface__["data"][0] == loss_address
    assert all(p.data is d for p, d in zip(model.parameters(), datas))
    assert [p.data.__array_interface__["data"][0] for p in model.parameters()] == addresses


def test_the_caller_s_inputs_are_never_written() -> None:
    x = gpunet.ones(3)
    run = gpunet.capture(lambda x: x * 2.0)
    for _ in range(3):
        out = run(x)
    assert np.array_equal(x.numpy(), np.ones(3, np.float32))
    assert np.array_equal(out.numpy(), np.full(3, 2.0, np.float32))


def test_repr_says_how_it_replays() -> None:
    run = gpunet.capture(lambda x: x * 2.0)
    assert "not captured yet" in repr(run)
    for _ in range(3):
        run(gpunet.ones(3))
    text = repr(run)
    assert "launch list" in text and "cpu float32 (3,)" in text and "1 calls" in text
    assert "on the CPU there is no graph" in text


def test_a_recording_says_what_keeps_it_from_a_cuda_graph() -> None:
    _, _, step = _setup("clip")
    run = gpunet.capture(step)
    for x, y in _batches()[:3]:
        run(x, y)
    (cap,) = run._captures.values()
    blockers = cap.program.graph_blockers()  # (its 8 GEMMs take the graph's cuBLAS route)
    assert blockers[0].startswith("1 calls with per-step host scalars")  # (adam_update)
    assert blockers[1].startswith("1 Python segments")  # (clipping)
    assert len(blockers) == 2


def test_profile_counts_a_captured_step_s_calls() -> None:
    batches = _batches()
    _, _, eager = _setup("momentum")
    for x, y in batches[:2]:
        eager(x, y)
    with gpunet.profile() as prof:
        eager(*batches[2])
    _, _, step = _setup("momentum")
    run = gpunet.capture(step)
    for x, y in batches[:2]:
        run(x, y)
    with gpunet.profile() as replayed:
        out = run(*batches[2])
    assert run.replays == 1
    names = [r.name for r in replayed.records]
    assert names == [r.name for r in prof.records]
    assert "linear_activation" in names and "sgd_update" in names
    # the same costs: the roofline model prices the replay as the eager step
    assert replayed.roofline("H100").total_s == prof.roofline("H100").total_s
    assert replayed.summary().launches == prof.summary().launches
    assert np.isfinite(out.numpy()).all()


def test_profile_around_the_recording_calls_prices_them() -> None:
    """``gpunet.profile()`` around a captured step's first calls (recording) hears the
    constants the step makes (backward's ones) and prices them; it once raised KeyError."""
    _, _, step = _setup("adam")
    run = gpunet.capture(step)
    for x, y in _batches(3):
        with gpunet.profile() as prof:
            run(x, y)
        names = [r.name for r in prof.records]
        assert "adam_update" in names
        assert prof.roofline("H100").total_s > 0
    assert run.replays == 1


def test_memory_is_flat_over_1000_replays() -> None:
    _, _, step = _setup("adam")
    run = gpunet.capture(step)
    x, y = _batches(1)[0]
    for _ in range(50):
        run(x, y)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(300):
            run(x, y)
        gc.collect()
        early = tracemalloc.get_traced_memory()[0]
        for _ in range(700):
            run(x, y)
        gc.collect()
        late = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert late - early < 20_000, (early, late)


def _replay_peak(work: Any, warm: int) -> float:
    """Bytes traced (held and transient) at the peak of one step after ``warm`` steps."""
    tracemalloc.start()
    try:
        for _ in range(warm):
            work.step()
        tracemalloc.reset_peak()
        work.step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("size", ["small", "medium"])
def test_a_replay_peaks_at_or_below_the_eager_step_s_memory(size: str) -> None:
    """Intermediates share buffers by liveness and SGD's scratch row is a dead one's."""
    from gpunet.bench.workloads import MLP_SIZES, gpunet_step, gpunet_step_captured, mlp_state

    state = mlp_state(*MLP_SIZES[size])
    gpunet_step(state).step()  # (imports and caches, outside the measure)
    gc.collect()
    eager = _replay_peak(gpunet_step(state), warm=2)
    gc.collect()
    captured = gpunet_step_captured(state)
    assert _replay_peak(captured, warm=3) <= eager
    assert captured.step.replays == 2
    (cap,) = captured.step._captures.values()
    if size == "medium":  # three of its six (256, 1024) intermediates take a dead one's buffer
        assert cap.program.reused == 3 * 256 * 1024 * 4


def test_shared_buffers_keep_every_output_and_every_array_held_outside() -> None:
    """A step with no optimizer: the gradients it leaves in ``p.grad`` (arrays the sweep made)
    and an output that is a view of an intermediate stay right after each replay."""

    def setup() -> tuple[Any, Callable]:
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 16, 16, 5])

        def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
            model.zero_grad()
            hidden = model[0](x)
            loss = F.cross_entropy(model[1:](hidden), y)
            loss.backward()
            return loss, hidden.detach().reshape(-1)[:20]

        return model, step

    (m1, eager), (m2, step) = setup(), setup()
    run = gpunet.capture(step)
    for x, y in _batches():
        a, b = eager(x, y), run(x, y)
        for u, v in zip(a, b):
            assert np.array_equal(u.numpy(), v.numpy())
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert np.array_equal(p.grad.numpy(), q.grad.numpy())
    (cap,) = run._captures.values()
    assert cap.program.reused > 0  # (and yet nothing anyone reads was overwritten)


def _sgd_run(
    fold: bool, steps: int = STEPS, change_at: int | None = None, set_to_none: bool = True
) -> tuple[Any, list, Any]:
    """Plain SGD, ``backward(); step()``, captured with ``fold_sgd`` (or eagerly, with the
    folded replays' rounding: SGD in backward from the 3rd step, the first two being the
    recordings); at ``change_at`` the group gets weight decay (no longer foldable). With
    ``set_to_none=False`` the gradients are zero-filled each step (one eager step first, so
    both recordings accumulate into them)."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 16, 5])
    opt = optim.SGD(model.parameters(), lr=0.1)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if not set_to_none:
        step(*_batches(1, rows=4)[0])
    run = gpunet.capture(step, fold_sgd=True) if fold else step
    losses = []
    for i, (x, y) in enumerate(_batches(steps)):
        if not fold and i == 2:  # the eager twin of a folded replay
            opt = optim.SGD(model.parameters(), lr=0.1, in_backward=True)
        if i == change_at:
            if not fold:  # (the twin's update goes back to step())
                opt = optim.SGD(model.parameters(), lr=0.1)
            opt.param_groups[0]["weight_decay"] = 0.05
        losses.append(run(x, y).numpy().copy())
    return run, [losses, [p.numpy().copy() for p in model.parameters()]], model


def test_folded_sgd_replays_equal_eager_sgd_in_backward_bit_for_bit() -> None:
    run, folded, model = _sgd_run(fold=True)
    _, eager, _ = _sgd_run(fold=False)
    for a, b in zip(folded[0], eager[0]):
        assert np.array_equal(a, b)
    for u, v in zip(folded[1], eager[1]):
        assert np.array_equal(u, v)
    (cap,) = run._captures.values()
    assert cap.program.folded == 6  # 3 weight GEMMs, 3 bias sums
    assert "plain SGD folded into 6 GEMMs and sums" in repr(run)
    assert "sgd_update" not in cap.program.source
    # the gradients are not written by a folded replay: p.grad reads NaN, not stale values
    assert all(np.isnan(p.grad.numpy()).all() for p in model.parameters())
    _, _, step = _setup("sgd")
    unfolded_twin = gpunet.capture(step)  # (without fold_sgd: the recorded update, as before)
    for x, y in _batches()[:3]:
        unfolded_twin(x, y)
    assert next(iter(unfolded_twin._captures.values())).program.folded == 0


def test_zero_filled_gradients_no_longer_block_the_fold() -> None:
    run, folded, _ = _sgd_run(fold=True, set_to_none=False)
    _, eager, _ = _sgd_run(fold=False, set_to_none=False)
    for a, b in zip(folded[0] + folded[1], eager[0] + eager[1]):
        assert np.array_equal(a, b)
    (cap,) = run._captures.values()
    assert (cap.program.dropped, cap.program.overwritten, cap.program.folded) == (1, 6, 6)
    assert "1 fill written over dropped" in repr(run) and "SGD folded into 6" in repr(run)


def test_a_folded_step_whose_group_gets_weight_decay_runs_the_update_unfolded() -> None:
    run, folded, _ = _sgd_run(fold=True, change_at=4)
    _, eager, _ = _sgd_run(fold=False, change_at=4)
    for u, v in zip(folded[1], eager[1]):
        assert np.array_equal(u, v)
    (cap,) = run._captures.values()
    assert cap.program.folded and not cap.program.may_fold()


def test_sgd_is_not_folded_where_the_step_reads_its_gradients() -> None:
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    opt = optim.SGD(model.parameters(), lr=0.1)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        norm = optim.clip_grad_norm_(model.parameters(), 1.0)  # (a segment reading p.grad)
        opt.step()
        return loss, norm

    run = gpunet.capture(step, fold_sgd=True)
    for x, y in _batches()[:3]:
        run(x, y)
    (cap,) = run._captures.values()
    assert cap.program.folded == 0 and "SGD folded" not in repr(run)
    assert all(np.isfinite(p.grad.numpy()).all() for p in model.parameters())


def test_profile_hears_a_folded_replay_s_calls() -> None:
    run, _, _ = _sgd_run(fold=True, steps=3)
    x, y = _batches(1)[0]
    with gpunet.profile() as prof:
        run(x, y)
    names = [r.name for r in prof.records]
    assert "sgd_update" not in names and names.count("matmul") == 5  # 3 dW (folded), 2 dX


# ---------------------------------------------------------------------- fills written over
def _dead_units_run(
    kind: str, captured: bool, steps: int = STEPS, warm: bool = True, by: str = "optimizer"
) -> tuple[list, Any]:
    """Two Linear layers, the second with 2 dead units under a loss whose cotangent is -1
    everywhere, so those units' gradients are sums of -0.0 (eager's 0 + (-0.0) is +0.0);
    ``zero_grad(set_to_none=False)``, with ``warm`` one eager step before the capture (the
    gradients exist); ``by='module'``: ``model.zero_grad`` (a fill per gradient). Returns each
    step's (loss, every parameter, every gradient) and the run."""
    gpunet.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5), nn.ReLU())
    with gpunet.no_grad():
        model[2].bias.data[:2] = -1e4
    opt = (
        optim.Adam(model.parameters(), lr=1e-2)
        if kind == "adam"
        else optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if kind == "momentum" else 0.0)
    )

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
        (model if by == "module" else opt).zero_grad(set_to_none=False)
        loss = (model(x) * -1.0).sum()
        loss.backward()
        opt.step()
        return loss

    batches = _batches(steps + 1)
    if warm:
        step(*batches[0])
    run = gpunet.capture(step) if captured else step
    seen = []
    for x, y in batches[1:]:
        loss = run(x, y).numpy().copy()
        seen.append([loss] + [t.numpy().copy() for p in model.parameters() for t in (p, p.grad)])
    return seen, run


def _bits(a: np.ndarray) -> np.ndarray:
    return np.atleast_1d(a).view(np.uint8)  # (-0.0 and +0.0 differ here, not under ==)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_a_zero_fill_written_over_is_dropped_bit_for_bit_signed_zeros_too(kind: str) -> None:
    captured, run = _dead_units_run(kind, captured=True)
    eager, _ = _dead_units_run(kind, captured=False)
    for step, (u, v) in enumerate(zip(captured, eager)):
        for a, b in zip(u, v):
            assert np.array_equal(_bits(a), _bits(b)), f"step {step} differs in a bit"
    dead = eager[-1][8][:2]  # (the second layer's bias gradient)
    assert (dead == 0).all() and not np.signbit(dead).any()
    (cap,) = run._captures.values()
    assert (cap.program.dropped, cap.program.overwritten) == (1, 4)  # 2 GEMMs, 2 bias sums
    assert "fill" not in cap.program.source and "beta=1" not in cap.program.source
    assert "(1 fill written over dropped, 4 accumulations into zeros now write)" in repr(run)


@pytest.mark.parametrize("by", ["optimizer", "module"])
def test_zero_filled_gradients_captured_from_their_first_step_replay_bit_for_bit(by: str) -> None:
    """Gradients still None at the first call are written there, added to at the second:
    without the fills both recordings are the same calls, and the replays equal eager's."""
    captured, run = _dead_units_run("momentum", captured=True, warm=False, by=by)
    eager, _ = _dead_units_run("momentum", captured=False, warm=False, by=by)
    for u, v in zip(captured, eager):
        for a, b in zip(u, v):
            assert np.array_equal(_bits(a), _bits(b))
    fills = "1 fill" if by == "optimizer" else "4 fills"  # (the flat buffer; each gradient)
    assert run.replays == STEPS - 2 and f"({fills} written over dropped" in repr(run)


@pytest.mark.parametrize("method", ["_matmul_out", "sum_into"])
def test_an_overwrite_that_would_leave_minus_zero_is_not_made(
    method: str, monkeypatch: Any
) -> None:
    """A BLAS or reduction that wrote -0.0 where eager's 0 + (-0.0) writes +0.0: the GEMM
    keeps its accumulation (and the fill); the sum overwrites, then adds +0 (-0.0 to +0.0)."""
    from gpunet.backend.numpy_backend import NumpyBackend

    own = getattr(NumpyBackend, method)

    def minus_zero(self: Any, out: Any, *args: Any, **kw: Any) -> None:
        own(self, out, *args, **kw)
        if kw.get("beta", 0.0) == 0.0:
            out[out == 0] = -0.0

    minus_zero.__name__ = method
    monkeypatch.setattr(NumpyBackend, method, minus_zero)
    captured, run = _dead_units_run("sgd", captured=True, steps=3)
    eager, _ = _dead_units_run("sgd", captured=False, steps=3)
    for u, v in zip(captured, eager):
        for a, b in zip(u, v):
            assert np.array_equal(_bits(a), _bits(b))
    (cap,) = run._captures.values()
    if method == "sum_into":
        assert (cap.program.dropped, cap.program.overwritten) == (1, 4)
        assert sum(e.fn.__name__ == "_plus_zero" for e in cap.program.rec.entries) == 2
    else:
        assert (cap.program.dropped, cap.program.overwritten) == (0, 0)


def _extra_run(
    captured: bool, make_opt: Callable, uses: list[int], set_to_none: bool = True
) -> tuple[list[list], Any]:
    """An MLP and a parameter ``extra`` in one optimizer, ``extra`` added to the logits by
    broadcasting at the calls whose ``use`` is 1 (its gradient a sum, added to ``.grad``
    rather than written in place) and unused at the others: after each call, every
    parameter and its ``.grad`` (None or bytes); and the captured step."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    extra = nn.Parameter(gpunet.zeros(5) + 0.25)
    params = [*model.parameters(), extra]
    opt = make_opt(params)

    def step(x: gpunet.Tensor, y: gpunet.Tensor, use: bool) -> gpunet.Tensor:
        opt.zero_grad(set_to_none=set_to_none)
        out = model(x)
        loss = F.cross_entropy(out + extra if use else out, y)
        loss.backward()
        opt.step()
        return loss

    run = gpunet.capture(step) if captured else None
    seen = []
    for (x, y), use in zip(_batches(len(uses)), uses):
        (run or step)(x, y, bool(use))
        grads = [None if p.grad is None else _bits(p.grad.numpy()).tobytes() for p in params]
        seen.append([_bits(p.numpy()).tobytes() for p in params] + grads)
    return seen, run


def _assert_same_calls(eager: list[list], captured: list[list]) -> None:
    for i, (a, b) in enumerate(zip(eager, captured)):
        n = len(a) // 2
        for j, (u, v) in enumerate(zip(a, b)):
            what = f"parameter {j}" if j < n else f"parameter {j - n}'s .grad"
            assert u == v, f"after call {i}: {what} differs ({'None' if v is None else '...'})"


@pytest.mark.parametrize("extra_use", ["unused", "broadcast"])
def test_zeroed_gradients_a_first_call_found_none_are_recorded_again(extra_use: str) -> None:
    """``zero_grad(set_to_none=False)`` at a step's first call fills the flat gradient buffer
    but leaves ``.grad`` None, so the sweep writes (or makes) gradients there that the second
    call adds into. Where every filled byte is written over, the fill is dropped and the two
    agree; where it is not (a parameter without a gradient, or one whose gradient is added
    rather than written in place) the second call was refused, as micro-batches accumulated
    across calls ('unused') or as a value-dependent branch ('broadcast'). Now a third call
    records and is compared with the second; the replays equal eager bit for bit."""
    uses = [int(extra_use == "broadcast")] * 6
    sgd = functools.partial(optim.SGD, lr=0.1, momentum=0.9)
    eager, _ = _extra_run(False, sgd, uses, set_to_none=False)
    captured, run = _extra_run(True, sgd, uses, set_to_none=False)
    assert run.replays == 3  # recorded at the first three calls
    _assert_same_calls(eager, captured)


def test_module_zero_grad_whose_fills_stay_records_a_third_time() -> None:
    """``model.zero_grad(set_to_none=False)`` fills only the gradients that exist: none at
    a step's first call. Where backward writes over every fill the second call makes, they
    are dropped and the two calls agree; LayerNorm's gain and bias gradients are added to
    ``.grad`` instead, their fills stay, and the second call was refused as a value-dependent
    branch ('linear_activation' then, 'fill' now). Now a third call records and is compared
    with the second, and the replays equal eager bit for bit."""

    def run(captured: bool) -> tuple[list[np.ndarray], Any]:
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 5], norm="layernorm")
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
            model.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        go = gpunet.capture(step) if captured else step
        for x, y in _batches():
            go(x, y)
        return [p.numpy().copy() for p in model.parameters()], go

    (eager, _), (captured, go) = run(False), run(True)
    assert go.replays == STEPS - 3
    for a, b in zip(eager, captured):
        assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("zero", ["model", "optimizer"])
def test_an_optimizer_state_loaded_between_replays_is_recorded_again_and_replayed(
    zero: str,
) -> None:
    """A checkpoint's optimizer state loaded between replays (``opt.load_state_dict``)
    replaces the optimizer's arrays: the step records again. With
    ``model.zero_grad(set_to_none=False)`` the first of those calls zero-fills the old gradient
    arrays, which backward adds into, and the second writes the new flat buffer, so the
    second call was refused as a value-dependent branch ('fill' then, 'linear_activation'
    now); now a third records, and the run equals eager bit for bit."""

    def run(captured: bool) -> list[np.ndarray]:
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 5])
        opt = optim.Adam(model.parameters(), lr=1e-2)

        def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
            (model if zero == "model" else opt).zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        go = gpunet.capture(step) if captured else step
        for i, (x, y) in enumerate(_batches(9)):
            if i == 3:
                saved = copy.deepcopy(opt.state_dict())
            if i == 5:
                opt.load_state_dict(saved)
            go(x, y)
        return [p.numpy().copy() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_gradients_zeroed_at_the_end_of_the_step_replay_bit_for_bit(kind: str) -> None:
    """``opt.zero_grad(set_to_none=False)`` as the step's last line (zeroed inside the step,
    as the README asks): the first call writes its gradients fresh, the second adds into the
    zeros the first left, and the second call was refused as micro-batches accumulated
    across calls. Now a third call records and is compared with the second; the replays
    equal eager bit for bit, gradients (zeros) included."""

    def run(captured: bool) -> tuple[list[np.ndarray], Any]:
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 5], norm="layernorm")
        make = optim.Adam if kind == "adam" else optim.SGD
        opt = make(model.parameters(), lr=1e-2)

        def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss

        go = gpunet.capture(step) if captured else step
        for x, y in _batches():
            go(x, y)
        params = list(model.parameters())
        return [p.numpy().copy() for p in params] + [p.grad.numpy().copy() for p in params], go

    (eager, _), (captured, go) = run(False), run(True)
    assert go.replays == STEPS - 3
    for a, b in zip(eager, captured):
        assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_p_grad_after_a_replay_is_the_gradient_the_replay_made(set_to_none: bool) -> None:
    """A parameter used under one signature of the step and not under another (a Python
    flag): after the other signature's recordings left its ``.grad`` None, a replay of the
    first computed and applied its gradient but left ``.grad`` None. Every ``.grad`` the
    step set now reads as the eager step leaves it, after each call."""
    sgd = functools.partial(optim.SGD, lr=0.1)
    uses = [1, 1, 1, 0, 0, 0, 1, 0, 1]
    eager, _ = _extra_run(False, sgd, uses, set_to_none)
    _assert_same_calls(eager, _extra_run(True, sgd, uses, set_to_none)[0])


@pytest.mark.parametrize("kind", ["adam", "adamw", "momentum"])
def test_step_counts_that_part_after_a_recording_are_not_replayed_as_one(kind: str) -> None:
    """Adam's (and momentum SGD's) update runs once over neighbours that share a step count.
    A parameter without a gradient for a few steps (used under one signature of the step,
    not another) falls behind its neighbours: eager then updates it apart, with its own
    count, but a replay recorded while they shared one ran one update over both, with the
    neighbours' count (its weights off from the next replay on). Now the counts parting
    makes the step record again."""
    make = {
        "adam": functools.partial(optim.Adam, lr=0.1),
        "adamw": functools.partial(optim.AdamW, lr=0.1),
        "momentum": functools.partial(optim.SGD, lr=0.1, momentum=0.9, dampening=0.5),
    }[kind]
    uses = [1, 1, 1, 0, 0, 0, 1, 1, 1]
    _assert_same_calls(_extra_run(False, make, uses)[0], _extra_run(True, make, uses)[0])


@pytest.mark.parametrize("grads", ["in a flat buffer", "own arrays"])
def test_micro_batches_summed_over_captured_calls_get_a_message_naming_it(grads: str) -> None:
    """A PyTorch user accumulates micro-batches: ``micro(x1); micro(x2); opt.step()``. The
    message says the gradients accumulated across calls, and what to do."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    opt = optim.SGD(model.parameters(), lr=0.1) if grads == "in a flat buffer" else None

    @gpunet.capture
    def micro(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        loss = F.cross_entropy(model(x), y) / 2
        loss.backward()
        return loss

    (x1, y1), (x2, y2) = _batches(2)
    micro(x1, y1)
    with pytest.raises(CaptureError) as info:
        micro(x2, y2)
    message = str(info.value)
    assert "the gradients accumulated across calls" in message
    assert f"{__file__}:" in message and "in micro" in message  # the user's line
    assert "Zero the gradients inside the step" in message and "as one step" in message
    if opt is not None:
        assert "'matmul' (backend call 9" in message and "(beta=1) on its second" in message


def test_a_second_backward_into_the_written_gradients_still_adds() -> None:
    """Two backward passes in one step (gradient accumulation): the first one's writes
    overwrite where the fill went, the second's still add to them, as eager's do."""

    def run(captured: bool) -> tuple[list, Any]:
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 5])
        opt = optim.SGD(model.parameters(), lr=0.1)

        def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x[:4]), y[:4]).backward()
            F.cross_entropy(model(x[4:]), y[4:]).backward()
            opt.step()
            return next(iter(model.parameters())).grad

        batches = _batches(STEPS + 1)
        step(*batches[0])
        go = gpunet.capture(step) if captured else step
        seen = [go(x, y).numpy().copy() for x, y in batches[1:]]
        return seen + [p.numpy().copy() for p in model.parameters()], go

    captured, go = run(True)
    eager, _ = run(False)
    for a, b in zip(captured, eager):
        assert np.array_equal(_bits(a), _bits(b))
    (cap,) = go._captures.values()
    assert (cap.program.dropped, cap.program.overwritten) == (1, 4)
    assert sum(e.params.get("beta") == 1.0 for e in cap.program.rec.entries) == 4  # (the 2nd)


def _read_fill_run(case: str, captured: bool) -> tuple[list, Any]:
    """A zero-fill the step reads: ``before`` reads a gradient before backward writes it;
    ``unused``, a parameter with no gradient, whose zeros the update reads (its gradient
    made stale between steps, as a dropped fill would leave it)."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    spare = nn.Linear(3, 2)
    opt = optim.SGD([*model.parameters(), *spare.parameters()], lr=0.1)
    first = next(iter(model.parameters()))

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> Any:
        opt.zero_grad(set_to_none=False)
        read = first.grad * 1.0 if case == "before" and first.grad is not None else None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return (loss, read) if read is not None else (loss,)

    batches = _batches(STEPS + 1)
    step(*batches[0])
    run = gpunet.capture(step) if captured else step
    seen = []
    for x, y in batches[1:]:
        if case == "unused":
            opt._flats[0].grad[...] = 7.0
        out = run(x, y)
        seen.append(
            [t.numpy().copy() for t in out] + [p.numpy().copy() for p in spare.parameters()]
        )
    return seen, run


@pytest.mark.parametrize("case", ["before", "unused"])
def test_a_zero_fill_that_is_read_is_kept(case: str) -> None:
    captured, run = _read_fill_run(case, captured=True)
    eager, _ = _read_fill_run(case, captured=False)
    for u, v in zip(captured, eager):
        for a, b in zip(u, v):
            assert np.array_equal(_bits(a), _bits(b))
    if case == "before":
        assert all((step[1] == 0).all() for step in captured)
    (cap,) = run._captures.values()
    assert cap.program.dropped == 0 and "written over dropped" not in repr(run)


# ---------------------------------------------------------------------- where users meet it
def _fit(capture: bool, dropout: float = 0.2) -> tuple[Any, list]:
    from gpunet.data import DataLoader, Dataset
    from gpunet.train import fit

    r = np.random.default_rng(0)
    y = r.integers(0, 3, 150)  # 150 rows, batches of 32: a last batch of 22 (a 2nd signature)
    x = (np.eye(3)[y] @ r.standard_normal((3, 6)) + r.standard_normal((150, 6))).astype(np.float32)
    gpunet.manual_seed(0)
    model = nn.MLP([6, 16, 3], dropout=dropout)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    train = DataLoader(Dataset(x, y), batch_size=32, shuffle=True, seed=0)
    history = fit(model, F.cross_entropy, opt, train, epochs=4, progress=False, capture=capture)
    return history, [p.numpy().copy() for p in model.parameters()]


def test_fit_with_capture_equals_fit_without_bit_for_bit() -> None:
    (eager, we), (captured, wc) = _fit(False), _fit(True)
    assert eager.train_loss == captured.train_loss
    assert eager.train_accuracy == captured.train_accuracy
    for u, v in zip(we, wc):
        assert np.array_equal(u, v)
    assert not captured.warnings


def test_fit_runs_a_step_it_cannot_capture_eagerly_with_a_warning() -> None:
    from gpunet.data import DataLoader, Dataset
    from gpunet.train import fit

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: gpunet.Tensor) -> gpunet.Tensor:
            if float(x.sum()) > 1e9:  # a host read: not capturable
                return x
            return self.lin(x)

    gpunet.manual_seed(0)
    model = Reads()
    data = Dataset(np.ones((8, 4), np.float32), np.array([0, 1] * 4))
    history = fit(
        model,
        F.cross_entropy,
        optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=4),
        epochs=2,
        progress=False,
        capture=True,
    )
    assert len(history.train_loss) == 2
    assert any("cannot be captured" in w and "float(tensor)" in w for w in history.warnings)


def test_replaced_arrays_make_the_step_record_again() -> None:
    model, opt, step = _setup("momentum")
    run = gpunet.capture(step)
    batches = _batches()
    for x, y in batches[:3]:
        run(x, y)
    assert run.replays == 1
    opt.add_param_group({"params": [nn.Parameter(gpunet.zeros(2))]})  # packs new flat buffers
    for x, y in batches[3:]:
        run(x, y)
    assert run.replays == 2  # two recordings again, then a replay on the new buffers
    twin, twin_opt, twin_step = _setup("momentum")
    for i, (x, y) in enumerate(batches):
        if i == 3:
            twin_opt.add_param_group({"params": [nn.Parameter(gpunet.zeros(2))]})
        twin_step(x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert np.array_equal(p.numpy(), q.numpy())


@pytest.mark.parametrize("first", [False, True])
def test_freezing_or_unfreezing_a_parameter_makes_the_step_record_again(first: bool) -> None:
    """Setting ``requires_grad`` between replays changes which gradients the step makes (as
    torch.compile guards on it): the step records again, equal to eager, never the old
    recording's frozen layer."""
    runs = []
    for captured in (False, True):
        model, _, step = _setup("momentum")
        run = gpunet.capture(step) if captured else step
        weight = next(iter(model.parameters()))
        weight.requires_grad = first
        for i, (x, y) in enumerate(_batches()):
            if i == 4:
                weight.requires_grad = not first
            run(x, y)
        runs.append([p.numpy().copy() for p in model.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("key", "before", "after"), [("momentum", 0.0, 0.9), ("in_backward", 1, 0)]
)
def test_a_hyperparameter_that_changes_the_update_s_calls_records_again(
    key: str, before: float, after: float
) -> None:
    """SGD's momentum set from 0 (a buffer appears) or ``in_backward`` turned off by hand
    between replays change which calls the update makes: the step records again, equal to
    eager (the replay once failed deep in ``sgd_update`` or the sweep)."""
    runs = []
    for captured in (False, True):
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 5])
        opt = optim.SGD(model.parameters(), lr=0.1, **{key: before})

        def step(x: gpunet.Tensor, y: gpunet.Tensor, model=model, opt=opt) -> gpunet.Tensor:  # type: ignore[no-untyped-def]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        run = gpunet.capture(step) if captured else step
        for i, (x, y) in enumerate(_batches()):
            if i == 4:
                opt.param_groups[0][key] = type(before)(after)
            run(x, y)
        runs.append([p.numpy().copy() for p in model.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_hyperparameter_changed_between_replays_is_used() -> None:
    """Plain SGD replays as two ufunc calls; weight decay set later takes the full update."""
    runs = []
    for captured in (False, True):
        model, opt, step = _setup("sgd")
        run = gpunet.capture(step) if captured else step
        for i, (x, y) in enumerate(_batches()):
            if i == 4:
                opt.param_groups[0]["weight_decay"] = 0.05
                opt.param_groups[0]["lr"] = 0.02
            run(x, y)
        runs.append([p.numpy().copy() for p in model.parameters()])
    for u, v in zip(*runs):
        assert np.array_equal(u, v)


def test_an_argument_requiring_grad_is_refused() -> None:
    run = gpunet.capture(lambda w: (w * 2.0).sum())
    with pytest.raises(CaptureError, match=r"argument 0 \(cpu float32 \(3,\)\) requires grad"):
        run(gpunet.ones(3, requires_grad=True))


def test_other_arguments_are_part_of_the_signature_and_first_recordings_are_bounded() -> None:
    run = gpunet.capture(lambda x, scale: x * scale, max_captures=2)
    with pytest.warns(RuntimeWarning, match="argument 1 .* changes"):
        for i in range(10):  # a new value each call: recorded once each, never replayed
            assert float(run(gpunet.ones(1), float(i)).sum()) == float(i)
    assert run.replays == 0 and len(run._pending) <= 2
    for _ in range(3):
        assert float(run(gpunet.ones(1), 2.0).sum()) == 2.0
    assert run.replays == 1


def _weighted_step() -> tuple[nn.Module, Callable]:
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    opt = optim.SGD(model.parameters(), lr=0.1)

    def step(x: gpunet.Tensor, y: gpunet.Tensor, weight: Any) -> gpunet.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * weight
        loss.backward()
        opt.step()
        return loss

    return model, step


def test_a_python_number_that_changes_per_call_is_named_once_in_a_warning() -> None:
    """torch.compile warns at its recompile limit: when first recordings churn (a new
    signature each call past max_captures), one warning names the argument that changes and
    the fix; passing it as a tensor then replays, bit for bit the eager step's."""
    runs = {}
    for captured in ("number", "tensor", "eager"):
        model, step = _weighted_step()
        run = step if captured == "eager" else gpunet.capture(step)
        x, y = _batches(1)[0]
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for i in range(20):
                w = 1.0 + 0.01 * i
                run(x, y, w if captured == "number" else gpunet.tensor(np.float32(w)))
        told = [str(w.message) for w in said if issubclass(w.category, RuntimeWarning)]
        if captured == "number":
            assert run.replays == 0 and len(told) == 1, told
            assert "argument 2 ('weight') is a Python float that changes" in told[0]
            assert "Pass it as a tensor" in told[0] and said[0].filename == __file__
        elif captured == "tensor":
            assert run.replays == 18 and not told
        runs[captured] = [p.numpy().copy() for p in model.parameters()]
    for p, q in zip(runs["tensor"], runs["eager"]):
        assert np.array_equal(p, q)


def test_a_shape_that_changes_per_call_is_named_in_the_warning() -> None:
    run = gpunet.capture(lambda x: x * 2.0, max_captures=2)
    with pytest.warns(RuntimeWarning, match=r"shape of its argument 0 \('x'\) changes"):
        for n in range(1, 5):
            run(gpunet.ones(n))


def test_an_ndarray_passed_to_a_captured_step_is_refused_by_name() -> None:
    """JAX users pass NumPy arrays to jitted steps: refused up front, before anything is
    recorded, naming the argument and saying to pass a gpunet tensor (a NumPy scalar: a
    Python number)."""
    model = nn.MLP([12, 16, 5])

    @gpunet.capture
    def forward(x: np.ndarray, scale: Any = 1.0) -> gpunet.Tensor:
        return model(gpunet.tensor(x)) * scale

    a = _batches(1)[0][0].numpy()
    with pytest.raises(CaptureError, match=r"argument 0 \('x'\) is a numpy.ndarray \(float32, "):
        forward(a)
    assert not forward._pending and forward.calls == 1
    run = gpunet.capture(lambda x, scale: x * scale)
    with pytest.raises(CaptureError, match=r"argument 'scale' is a numpy.ndarray.*gpunet.tensor"):
        run(gpunet.ones(2), scale=np.ones(2))
    with pytest.raises(CaptureError, match=r"argument 1 \('scale'\) is a NumPy scalar.*float\(val"):
        run(gpunet.ones(2), np.float32(2.0))
    for _ in range(3):
        assert run(gpunet.ones(2), scale=2.0).numpy().tolist() == [2.0, 2.0]
    assert run.replays == 1


@pytest.mark.gpu
def test_a_captured_step_on_a_gpu_replays_as_launches_equal_to_eager() -> None:
    def setup() -> tuple[Any, Callable]:
        gpunet.manual_seed(0)
        model = nn.MLP([12, 16, 5], dropout=0.2, device="cuda")
        opt = optim.Adam(model.parameters(), lr=1e-2)

        def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return model, step

    (m1, eager), (m2, step) = setup(), setup()
    run = gpunet.capture(step)
    for x, y in _batches():
        x, y = x.to("cuda"), y.to("cuda")
        assert np.array_equal(eager(x, y).numpy(), run(x, y).numpy())
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert np.array_equal(p.numpy(), q.numpy())
    assert run.replays == STEPS - 2 and "CUDA graph blockers: 1 calls with per-step" in repr(run)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("loss_fn", ["square", "cross_entropy"])
def test_low_and_double_precision_steps_replay_bit_for_bit(
    dtype: str, opt: str, loss_fn: str
) -> None:
    """float16 and bfloat16 compute through float32 in the backend; a replay must too (it
    once wrote NumPy's float16 GEMM straight into the output and drifted from eager, and
    replayed bfloat16 cross-entropy with its gradient in bfloat16's own loops)."""

    def run(captured: bool) -> list[np.ndarray]:
        gpunet.manual_seed(0)
        model = nn.MLP([8, 16, 4]).to(getattr(gpunet, dtype))
        params = model.parameters()
        o = optim.Adam(params, lr=1e-2) if opt == "adam" else optim.SGD(params, lr=1e-2)
        x = gpunet.randn(5, 8).to(getattr(gpunet, dtype))
        labels = gpunet.tensor(np.arange(5) % 4)

        def step(x: gpunet.Tensor) -> gpunet.Tensor:
            o.zero_grad()
            y = model(x)
            loss = (y * y).sum() if loss_fn == "square" else F.cross_entropy(y, labels)
            loss.backward()
            o.step()
            return loss

        f = gpunet.capture(step) if captured else step
        for _ in range(4):
            f(x)
        return [p.numpy().astype(np.float64) for p in model.parameters()]

    for eager, replayed in zip(run(False), run(True)):
        np.testing.assert_array_equal(replayed, eager)


def test_a_python_value_the_step_returns_must_not_change_between_recordings() -> None:
    """A replay returns its tensors afresh and any Python value as recorded: an lr read from
    ``param_groups`` under a schedule would be frozen, so two recordings that return different
    values raise, naming both; constant values (a NaN too) replay."""
    gpunet.manual_seed(0)
    model = nn.MLP([12, 16, 5])
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batches = _batches(4)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> tuple:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss, opt.param_groups[0]["lr"]

    run = gpunet.capture(step)
    run(*batches[0])
    sched.step()
    with pytest.raises(CaptureError, match=r"returned 0\.1 at its first call and 0\.05 at"):
        run(*batches[1])

    @gpunet.capture
    def constant(x: gpunet.Tensor, y: gpunet.Tensor) -> tuple:
        return F.cross_entropy(model(x), y), "loss", float("nan"), None

    for x, y in batches:
        _, name, nan, none = constant(x, y)
        assert name == "loss" and nan != nan and none is None
    assert constant.replays == 2
