"""Every per-step scalar of the fused updates on the device: step counts that the update
advances (a skipped step is no step at all, as in PyTorch: parameters, moments and counts
unchanged, and momentum SGD's next step is its first), the lr as a device array with
``capturable=True`` (bit for bit the float's result), and checkpoints with int step counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet import amp, nn, optim
from gpunet.optim import lr_scheduler

KINDS = {
    "adam": lambda ps, **kw: optim.Adam(ps, lr=1e-2, **kw),
    "adamw": lambda ps, **kw: optim.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "dampening": lambda ps, **kw: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, **kw),
    "nesterov": lambda ps, **kw: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, **kw),
}


def _params() -> list[gpunet.Tensor]:
    r = np.random.default_rng(3)
    return [
        gpunet.tensor(r.standard_normal(shape).astype(np.float32), requires_grad=True)
        for shape in ((4, 3), (3,), (2, 2))
    ]


def _coefficients(n: int) -> list[list[np.ndarray]]:
    r = np.random.default_rng(4)
    return [
        [r.standard_normal(s).astype(np.float32) for s in ((4, 3), (3,), (2, 2))] for _ in range(n)
    ]


def _loss(params: list[gpunet.Tensor], cs: list[np.ndarray]) -> gpunet.Tensor:
    """sum_i c_i p_i: the gradient of each parameter is its c (inf where c has one)."""
    total = (params[0] * gpunet.tensor(cs[0])).sum()
    for p, c in zip(params[1:], cs[1:]):
        total = total + (p * gpunet.tensor(c)).sum()
    return total


def _host(st: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in st.items() if v is not None}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the injected inf's arithmetic
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_skipped_step_is_no_step_at_all(kind: str) -> None:
    """A loss scaler skipping steps (the first one too): parameters, state and counts equal an
    optimizer that took only the clean steps, bit for bit (scales are powers of two, so the
    unscaled gradients are exact). SGD with dampening: the first clean step is the first."""
    skip = [True, False, True, True, False, False, True, False]
    cs = _coefficients(len(skip))
    ours, ref = _params(), _params()
    opt, ref_opt = KINDS[kind](ours), KINDS[kind](ref)
    scaler = amp.GradScaler(init_scale=4.0)
    for bad, c in zip(skip, cs):
        c = [a.copy() for a in c]
        if bad:
            c[1][1] = np.inf
        before = [p.numpy().copy() for p in ours]
        opt.zero_grad()
        scaler.scale(_loss(ours, c)).backward()
        scaler.step(opt)
        scaler.update()
        if bad:
            for p, b in zip(ours, before):
                np.testing.assert_array_equal(p.numpy(), b)
            continue
        ref_opt.zero_grad()
        _loss(ref, c).backward()
        ref_opt.step()
        for p, q in zip(ours, ref):
            np.testing.assert_array_equal(p.numpy(), q.numpy())
        for p, q in zip(ours, ref):
            a, b = _host(opt.state[p]), _host(ref_opt.state[q])
            assert a.keys() == b.keys() and "step" in a
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert int(opt.state[ours[0]]["step"]) == skip.count(False)


def test_step_counts_are_device_arrays_that_only_the_update_advances() -> None:
    """Adam's counts are 0-d int64 views of the flat buffer's counts: the host never writes
    them in a step. A parameter without a gradient keeps its count; the next step with every
    parameter updates them in two spans (two counts), and the counts stay right."""
    ps = _params()
    opt = optim.Adam(ps, lr=1e-2)
    cs = _coefficients(4)
    for i, c in enumerate(cs):
        opt.zero_grad()
        _loss(ps, c).backward()
        if i == 1:
            ps[1].grad = None
        opt.step()
    steps = [opt.state[p]["step"] for p in ps]
    assert all(isinstance(s, np.ndarray) and s.shape == () and s.dtype == np.int64 for s in steps)
    assert [int(s) for s in steps] == [4, 3, 4]
    flat = opt._flats[0]
    assert np.shares_memory(steps[0], flat.counts)
    assert flat.cohorts[0] == flat.cohorts[2] != flat.cohorts[1]


# (Adam's state always had a step count: nothing is missing there)
SAVED = [
    (kind, saved)
    for kind in sorted(KINDS)
    for saved in ("int", "float", "array", "missing")
    if not (saved == "missing" and kind.startswith("adam"))
]


@pytest.mark.parametrize(("kind", "saved"), SAVED)
def test_a_loaded_state_continues_bit_for_bit(kind: str, saved: str) -> None:
    """3 steps, state_dict (its counts are ints), load into a fresh optimizer, 5 more: the same
    bits as 8 steps in one go. Old checkpoints: a step count saved as an int, a float or a 0-d
    array loads; SGD states from before counts ("missing": a momentum buffer and no step)
    continue past their first step."""
    cs = _coefficients(8)
    whole = _params()
    opt = KINDS[kind](whole)
    for c in cs:
        opt.zero_grad()
        _loss(whole, c).backward()
        opt.step()
    first = _params()
    opt1 = KINDS[kind](first)
    for c in cs[:3]:
        opt1.zero_grad()
        _loss(first, c).backward()
        opt1.step()
    sd = opt1.state_dict()
    for st in sd["state"].values():
        assert type(st["step"]) is int and st["step"] == 3
        if saved == "float":
            st["step"] = 3.0
        elif saved == "array":
            st["step"] = np.asarray(3)
        elif saved == "missing":
            del st["step"]
    second = [gpunet.tensor(p.numpy().copy(), requires_grad=True) for p in first]
    opt2 = KINDS[kind](second)
    opt2.load_state_dict(sd)
    for c in cs[3:]:
        opt2.zero_grad()
        _loss(second, c).backward()
        opt2.step()
    for p, q in zip(whole, second):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    count = 1 + 5 if saved == "missing" else 8  # (an old buffer counts as one step taken)
    assert [int(opt2.state[p]["step"]) for p in second] == [count] * 3


def test_a_checkpoint_file_round_trips_the_counts(tmp_path: Any) -> None:
    model = nn.Linear(3, 2)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    x = gpunet.tensor(np.ones((4, 3), np.float32))
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    gpunet.save(tmp_path / "c.safetensors", model, opt)
    model2 = nn.Linear(3, 2)
    opt2 = optim.Adam(model2.parameters(), lr=1e-2)
    gpunet.load(tmp_path / "c.safetensors", model2, opt2)
    assert [int(opt2.state[p]["step"]) for p in model2.parameters()] == [2, 2]


# ---------------------------------------------------------------------- the lr on the device
@pytest.mark.parametrize("kind", [*sorted(KINDS), "sgd"])
def test_a_device_lr_gives_the_float_lr_s_bits(kind: str) -> None:
    """capturable=True: the kernels read the lr from a float64 array that follows the group's
    lr (a schedule, a hand-set value); the result is the float path's, bit for bit."""
    make = KINDS.get(kind, lambda ps, **kw: optim.SGD(ps, lr=0.1, **kw))
    runs = []
    for capturable in (False, True):
        ps = _params()
        opt = make(ps, capturable=capturable)
        sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        arrays = set()
        for i, c in enumerate(_coefficients(6)):
            if i == 4:
                opt.param_groups[0]["lr"] = 0.03
            opt.zero_grad()
            _loss(ps, c).backward()
            opt.step()
            sched.step()
            if capturable:
                lr = opt._lr(opt.param_groups[0], opt._flats[0])
                assert lr.dtype == np.float64 and float(lr) == opt.param_groups[0]["lr"]
                arrays.add(id(lr))
        assert len(arrays) == int(capturable)  # (one array, written in place)
        runs.append([p.numpy() for p in ps])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def _batches(seed: int, n: int) -> list[tuple[gpunet.Tensor, gpunet.Tensor]]:
    r = np.random.default_rng(seed)
    return [
        (
            gpunet.tensor(r.standard_normal((5, 6)).astype(np.float32)),
            gpunet.tensor(r.integers(0, 3, 5)),
        )
        for _ in range(n)
    ]


def _capturable_step(kind: str, capturable: bool) -> tuple[Any, Any, Any]:
    gpunet.manual_seed(0)
    model = nn.MLP([6, 8, 3])
    opt = KINDS[kind](model.parameters(), capturable=capturable)

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_captured_capturable_step_needs_no_host_scalar(kind: str) -> None:
    """Captured with capturable=True: replays equal eager bit for bit under an lr that a
    schedule outside the step changes, and the recording lists no per-step host scalar (Adam's
    count and the lr are device arrays; only the GEMMs keep it from a CUDA graph)."""
    batches = _batches(5, 6)
    results = []
    for captured, capturable in ((False, False), (True, True)):
        model, opt, step = _capturable_step(kind, capturable)
        sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        run = gpunet.capture(step) if captured else step
        for x, y in batches:
            run(x, y)
            sched.step()
        results.append([p.numpy().copy() for p in model.parameters()])
        if captured:
            assert run.replays == len(batches) - 2
            (cap,) = run._captures.values()
            blockers = cap.program.graph_blockers()
            assert not any("host scalars" in b for b in blockers), blockers
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_without_capturable_the_recording_names_the_host_scalars() -> None:
    r = np.random.default_rng(6)
    x, y = (
        gpunet.tensor(r.standard_normal((5, 6)).astype(np.float32)),
        gpunet.tensor(r.integers(0, 3, 5)),
    )
    _, _, step = _capturable_step("adam", False)
    run = gpunet.capture(step)
    for _ in range(3):
        run(x, y)
    (cap,) = run._captures.values()
    assert any(
        b.startswith("1 calls with per-step host scalars") for b in cap.program.graph_blockers()
    )


class _DeviceOnly(np.ndarray):
    """A flag the host must not read: what a GPU array is to a step without a sync."""

    def _host_read(self, *args: Any) -> Any:
        raise AssertionError("found_inf read on the host")

    __float__ = __bool__ = __int__ = __index__ = item = __getitem__ = _host_read  # type: ignore[assignment]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_optimizers_never_read_found_inf_on_the_host(kind: str, monkeypatch: Any) -> None:
    """The optimizers' own code hands the flag to the update and reads it nowhere: with a flag
    that raises on any host read (and the backend's update, which may read it on the CPU,
    stubbed), a scaled step runs, passing the flag and the span's counts to one update."""
    from gpunet.backend.numpy_backend import NumpyBackend

    seen: list[dict[str, Any]] = []
    name = "adam_update" if kind.startswith("adam") else "sgd_update"
    monkeypatch.setattr(NumpyBackend, name, lambda self, *a, **kw: seen.append(kw))
    ps = _params()
    opt = KINDS[kind](ps)
    scaler = amp.GradScaler()
    scaler.scale(_loss(ps, _coefficients(1)[0])).backward()
    flag = scaler._founds[id(opt)] = np.zeros((), np.float32).view(_DeviceOnly)
    scaler.step(opt)
    (kw,) = seen
    assert kw["found_inf"] is flag and kw["step"].dtype == np.int64


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_tensor_lr_is_read_afresh_at_every_step_eager_and_captured(kind: str) -> None:
    """PyTorch's ``lr=torch.tensor(...)`` with ``capturable=True``: the update reads the
    tensor's value at each step, so changing it in place (or a schedule rebinding it) takes
    effect, eager and in a captured step, bit for bit as the float lr would."""
    batches = _batches(6, 7)
    results = []
    for how in ("float", "tensor", "tensor captured"):
        model, opt, step = _capturable_step(kind, capturable=True)
        lr = gpunet.tensor(0.01, dtype=gpunet.float64)
        opt.param_groups[0]["lr"] = 0.01 if how == "float" else lr
        run = gpunet.capture(step) if how.endswith("captured") else step
        for i, (x, y) in enumerate(batches):
            if i == 4:
                if how == "float":
                    opt.param_groups[0]["lr"] = 0.003
                else:
                    with gpunet.no_grad():
                        lr[...] = 0.003
            run(x, y)
        results.append([p.numpy().copy() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_tensor_lr_without_capturable_is_refused_by_name(kind: str) -> None:
    """As in PyTorch (a tensor lr needs the capturable path): refused when the optimizer is
    made, and a tensor set into a group by hand is named at the step, before any update."""
    cls = optim.SGD if kind in ("dampening", "nesterov") else optim.AdamW
    with pytest.raises(ValueError, match="a Tensor lr needs capturable=True"):
        cls(_params(), lr=gpunet.tensor(0.01))
    ps = _params()
    opt = KINDS[kind](ps)
    opt.param_groups[0]["lr"] = gpunet.tensor(0.01)
    _loss(ps, _coefficients(1)[0]).backward()
    before = [p.numpy().copy() for p in ps]
    with pytest.raises(ValueError, match="a Tensor lr needs capturable=True"):
        opt.step()
    for p, b in zip(ps, before):
        np.testing.assert_array_equal(p.numpy(), b)
