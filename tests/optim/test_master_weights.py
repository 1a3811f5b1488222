"""Master weights under autocast: the optimizer's fused update writes the low-precision copy of
the weights that autocast's GEMMs read (``optim.flat``), used only where it is proved current.

Each check compares with a run that casts every weight (``_casting``: the copy never offered),
bit for bit; every route that writes a parameter outside the update must make the copy stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet import amp, distributed, nn, optim
from gpunet.amp import GradScaler
from gpunet.optim.flat import FlatBuffer, flat_of

BF16, F16 = gpunet.bfloat16, gpunet.float16
OPTIMIZERS: dict[str, Callable[[Any], optim.Optimizer]] = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda ps: optim.AdamW(ps, lr=1e-2),
}


@contextlib.contextmanager
def _casting() -> Iterator[None]:
    """No copy is ever offered: autocast casts every weight (the reference)."""
    keep = FlatBuffer.lowp_view
    FlatBuffer.lowp_view = lambda self, i, dtype: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        FlatBuffer.lowp_view = keep  # type: ignore[method-assign]


@contextlib.contextmanager
def _counting_copies() -> Iterator[list[int]]:
    """How many casts took their value from a copy."""
    count, keep = [0], amp.apply_with

    def counted(*args: Any) -> Any:
        count[0] += 1
        return keep(*args)

    amp.apply_with = counted
    try:
        yield count
    finally:
        amp.apply_with = keep


def _model(seed: int = 0) -> nn.Module:
    gpunet.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(seed: int) -> tuple[gpunet.Tensor, gpunet.Tensor]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((6, 8)).astype(np.float32)
    return gpunet.tensor(x), gpunet.tensor(r.integers(0, 4, 6))


def _loss(model: nn.Module, seed: int, dtype: Any) -> gpunet.Tensor:
    x, y = _batch(seed)
    with gpunet.autocast(dtype=dtype):
        return nn.functional.cross_entropy(model(x), y)


def _assert_copies_are_casts(opt: optim.Optimizer) -> None:
    """Every copy that would be used equals the cast of its parameter, bit for bit."""
    for flat in opt._flats:
        for i, p in enumerate(flat.params):
            view = flat.lowp_view(i, flat.lowp.dtype) if flat.lowp is not None else None
            if view is not None:
                assert view.tobytes() == p.data.astype(view.dtype).tobytes()


def _train(kind: str, dtype: Any, steps: int, scaler: GradScaler | None = None) -> tuple:
    """``steps`` autocast steps: the losses and the parameters after."""
    model = _model()
    opt = OPTIMIZERS[kind](model.parameters())
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = _loss(model, s, dtype)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        _assert_copies_are_casts(opt)
        losses.append(loss.numpy().tobytes())
    return losses, [p.numpy().tobytes() for p in model.parameters()], opt


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_steps_reading_the_copy_equal_steps_casting_every_weight(kind: str, dtype: Any) -> None:
    with _counting_copies() as used:
        got = _train(kind, dtype, 4)
    with _casting():
        want = _train(kind, dtype, 4)
    assert got[0] == want[0] and got[1] == want[1]
    # the first step asks for the copy; the 3 after read it for both weights and biases
    assert used[0] == 3 * 4
    flat = got[2]._flats[0]
    assert flat.lowp.dtype == dtype and flat.lowp.size == flat.size


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflowing float16 gradients
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_float16_with_the_scaler_and_skipped_steps_equals_casting(kind: str) -> None:
    """An initial scale of 2^28 overflows float16: the first steps are skipped (the copy is
    then the old weights' cast), and the later ones taken."""
    with _counting_copies() as used:
        got = _train(kind, F16, 12, GradScaler(init_scale=2.0**28))
    with _casting():
        reference = GradScaler(init_scale=2.0**28)
        want = _train(kind, F16, 12, reference)
    assert got[0] == want[0] and got[1] == want[1]
    assert 0 < reference.get_scale() <= 2.0**28 / 16  # (skipped steps, then clean ones)
    assert got[1] != [p.numpy().tobytes() for p in _model().parameters()]
    assert used[0] == 11 * 4


def test_float32_training_makes_no_copy() -> None:
    model = _model()
    opt = optim.Adam(model.parameters())
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt._flats[0].lowp is None


def test_a_second_low_dtype_replaces_the_copy_and_casts_until_written() -> None:
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    for dtype in (BF16, BF16, F16, F16):
        with _counting_copies() as used:
            _loss(model, 0, dtype).backward()
        opt.step()
        opt.zero_grad()
        assert opt._flats[0].lowp.dtype == dtype
        _assert_copies_are_casts(opt)
    assert used[0] == 4  # (the second float16 step only)


def test_sgd_in_backward_never_reads_a_copy() -> None:
    """Backward writes those weights itself, outside the fused update (even with its group's
    ``in_backward`` turned off for a while, when the update writes the copy)."""
    results = []
    for casting in (False, True):
        model = _model()
        opt = optim.SGD(model.parameters(), lr=0.1, in_backward=True)
        with _casting() if casting else contextlib.nullcontext(), _counting_copies() as used:
            for s in range(4):
                opt.param_groups[0]["in_backward"] = s == 1
                opt.zero_grad()
                _loss(model, s, BF16).backward()
                opt.step()
        assert used[0] == 0
        results.append([p.numpy().tobytes() for p in model.parameters()])
    assert results[0] == results[1]


# ---------------------------------------------------------------------- writes outside the update
def _trained(kind: str = "adam") -> tuple[nn.Module, optim.Optimizer]:
    """A model after two bfloat16 steps: its copies current."""
    model = _model()
    opt = OPTIMIZERS[kind](model.parameters())
    for s in range(2):
        opt.zero_grad()
        _loss(model, s, BF16).backward()
        opt.step()
    flat = opt._flats[0]
    assert all(flat.lowp_view(i, BF16) is not None for i in range(len(flat.params)))
    return model, opt


def _forward_bits(model: nn.Module) -> bytes:
    x, _ = _batch(9)
    with gpunet.no_grad(), gpunet.autocast(dtype=BF16):
        return model(x).numpy().tobytes()


def _via_load_state_dict(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})


def _via_checkpoint(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    other, other_opt = _trained("momentum")
    gpunet.save(tmp / "ckpt.safetensors", other, other_opt)
    gpunet.load(tmp / "ckpt.safetensors", model)


def _via_init(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    nn.init.normal_(model[0].weight)


def _via_inplace_op(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    with gpunet.no_grad():
        model[2].bias += 1.0
        model[0].weight[0] = 3.0


def _via_replaced_data(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    w = model[0].weight
    w.data = w.data * 3  # (the optimizer's next step re-adopts it: stale until then)


def _via_replaced_data_and_a_step_without_it(
    model: nn.Module, opt: optim.Optimizer, tmp: Path
) -> None:
    """Re-adopted by a step that updates only another parameter: the copy stays stale."""
    w = model[0].weight
    w.data = w.data * 3
    opt.zero_grad()
    with gpunet.autocast(dtype=BF16):
        model[2].bias.sum().backward()
    opt.step()


def _via_to(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    """New arrays: p.data is no flat view, so a write into one is not the copy's concern."""
    model.to(gpunet.float64).to(gpunet.float32)
    model[0].weight.data[...] = 0.5


class _RootOnes(distributed.LocalComm):
    """A rank whose root's parameters are all ones: broadcast writes them."""

    def broadcast(self, array: Any, root: int = 0) -> None:
        array[...] = 1


def _via_broadcast_parameters(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    distributed.broadcast_parameters(model, _RootOnes())


def _via_distributed_optimizer(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    distributed.DistributedOptimizer(opt, _RootOnes())


def _via_collective(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    prev = distributed._WORLD
    distributed._WORLD = _RootOnes()
    try:
        distributed.broadcast(model[0].weight)
    finally:
        distributed._WORLD = prev


def _via_optimizer_load_state_dict(model: nn.Module, opt: optim.Optimizer, tmp: Path) -> None:
    """Repacked flat buffers: a fresh flat without a copy (then the weights written)."""
    opt.load_state_dict(opt.state_dict())
    with gpunet.no_grad():
        model[0].weight *= 2


WRITES = [
    _via_load_state_dict,
    _via_checkpoint,
    _via_init,
    _via_inplace_op,
    _via_replaced_data,
    _via_replaced_data_and_a_step_without_it,
    _via_to,
    _via_broadcast_parameters,
    _via_distributed_optimizer,
    _via_collective,
    _via_optimizer_load_state_dict,
]


@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__.removeprefix("_via_"))
def test_a_write_outside_the_update_makes_the_copy_stale(write: Callable, tmp_path: Path) -> None:
    """After the write, an autocast forward equals one that casts every weight, bit for bit,
    and differs from the forward before it (the write changed the weights)."""
    model, opt = _trained()
    before = _forward_bits(model)
    write(model, opt, tmp_path)
    got = _forward_bits(model)
    with _casting():
        want = _forward_bits(model)
    assert got == want
    assert got != before


def test_the_next_update_makes_a_stale_copy_current_again() -> None:
    model, opt = _trained()
    _via_load_state_dict(model, opt, Path())
    flat = opt._flats[0]
    assert all(flat.lowp_view(i, BF16) is None for i in range(len(flat.params)))
    opt.zero_grad()
    _loss(model, 5, BF16).backward()
    opt.step()
    assert all(flat.lowp_view(i, BF16) is not None for i in range(len(flat.params)))
    _assert_copies_are_casts(opt)


def test_a_parameter_not_held_by_an_optimizer_is_cast() -> None:
    model = _model()
    with _counting_copies() as used:
        _forward_bits(model)
    assert used[0] == 0 and flat_of(model[0].weight) is None


# ---------------------------------------------------------------------- capture
def _step_of(model: nn.Module, opt: optim.Optimizer) -> Callable[..., gpunet.Tensor]:
    """A bfloat16 autocast training step of ``model`` on (x, y), to capture."""

    def step(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        opt.zero_grad()
        with gpunet.autocast(dtype=BF16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_a_captured_step_reads_the_copy_and_replays_what_eager_computes(kind: str) -> None:
    """Recorded once the copy is current (its first write changes the layout: the capture
    records again), the replays read it (four casts fewer among the recorded calls: the two
    weights and two biases) and equal the eager steps, bit for bit, which equal casting."""
    results, casts = [], []
    for captured, copies in ((False, True), (True, True), (True, False)):
        model = _model()
        opt = OPTIMIZERS[kind](model.parameters())

        step = _step_of(model, opt)
        run = gpunet.capture(step) if captured else step
        with contextlib.nullcontext() if copies else _casting():
            losses = [run(*_batch(s)).numpy().tobytes() for s in range(7)]
        results.append((losses, [p.numpy().tobytes() for p in model.parameters()]))
        if captured:
            # (with copies, recorded at calls 2 and 3, the copy current at both)
            assert run.replays == (4 if copies else 5)
            (cap,) = run._captures.values()
            casts.append(
                sum(e.name == "cast" and e.kind == "made" for e in cap.program.rec.entries)
            )
    assert results[0] == results[1] == results[2]
    assert casts[0] == casts[1] - 4


def test_a_write_between_replays_makes_the_capture_cast_again() -> None:
    model = _model()
    opt = OPTIMIZERS["adam"](model.parameters())
    run = gpunet.capture(_step_of(model, opt))
    for s in range(5):
        run(*_batch(s))
    replays = run.replays
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})
    weights = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    got = run(*_batch(9)).numpy().tobytes()
    assert run.replays == replays  # (recorded again, eagerly: not a replay of stale copies)
    ref = _model()
    ref.load_state_dict(weights)
    with _casting():
        assert got == _loss(ref, 9, BF16).numpy().tobytes()
