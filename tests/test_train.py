"""The fit loop, with a stand-in model and optimizer (plain tensors, plain SGD)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet.data import DataLoader, Dataset
from gpunet.train import History, evaluate, fit, host_state


class Softmax:
    """A linear classifier with the Module methods fit uses."""

    def __init__(self, d: int, k: int, scale: float = 0.1) -> None:
        g = gpunet.Generator(0)
        self.w = (gpunet.randn(d, k, generator=g) * scale).requires_grad_()
        self.b = gpunet.zeros(k, requires_grad=True)
        self.training = True

    def __call__(self, x: gpunet.Tensor) -> gpunet.Tensor:
        return x @ self.w + self.b

    def named_parameters(self):  # type: ignore[no-untyped-def]
        return [("w", self.w), ("b", self.b)]

    def parameters(self):  # type: ignore[no-untyped-def]
        return [self.w, self.b]

    def train(self) -> None:
        self.training = True

    def eval(self) -> None:
        self.training = False

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"w": self.w.numpy().copy(), "b": self.b.numpy().copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        with gpunet.no_grad():
            self.w.data[...] = state["w"]
            self.b.data[...] = state["b"]


class SGD:
    def __init__(self, params: list, lr: float) -> None:
        self.params, self.param_groups = params, [{"lr": lr}]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        with gpunet.no_grad():
            for p in self.params:
                p -= self.param_groups[0]["lr"] * p.grad


def blobs(n: int = 300, seed: int = 0) -> Dataset:
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    centers = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    return Dataset((centers[y] + r.standard_normal((n, 2))).astype(np.float32), y)


def test_fit_learns_and_records_history() -> None:
    model = Softmax(2, 3)
    train = DataLoader(blobs(), batch_size=32, shuffle=True, seed=0)
    val = DataLoader(blobs(seed=1), batch_size=64)
    before = evaluate(model, F.cross_entropy, val)[0]
    h = fit(
        model, F.cross_entropy, SGD(model.parameters(), 0.2), train, val, epochs=15, progress=False
    )
    assert len(h.train_loss) == len(h.val_loss) == 15
    assert h.val_loss[-1] < before / 4 and h.val_loss[-1] < h.val_loss[0]
    assert h.val_accuracy[-1] > 0.85 and set(h.grad_norm[-1]) == {"w", "b"}
    assert h.lr == [0.2] * 15 and all(s > 0 for s in h.samples_per_second)
    loss, acc = evaluate(model, F.cross_entropy, val)
    assert loss == pytest.approx(h.val_loss[-1]) and acc == pytest.approx(h.val_accuracy[-1])


def test_early_stopping_restores_the_best_weights() -> None:
    model = Softmax(2, 3)
    train = DataLoader(blobs(), batch_size=32, shuffle=True, seed=0)
    val = DataLoader(blobs(seed=1), batch_size=64)
    snapshots = []
    # a learning rate far too high: validation loss soon stops improving
    h = fit(
        model,
        F.cross_entropy,
        SGD(model.parameters(), 40.0),
        train,
        val,
        epochs=30,
        early_stopping=2,
        progress=False,
        on_epoch_end=lambda e, _: snapshots.append(model.state_dict()),
    )
    assert h.stopped_early and len(h.val_loss) < 30
    best = snapshots[h.best_epoch]
    np.testing.assert_array_equal(model.w.numpy(), best["w"])
    assert evaluate(model, F.cross_entropy, val)[0] == pytest.approx(min(h.val_loss), rel=1e-6)


def test_nan_loss_stops_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = Softmax(2, 3)
    with gpunet.no_grad():
        model.w.data[0, 0] = np.nan
    train = DataLoader(blobs(), batch_size=32)
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        h = fit(
            model, F.cross_entropy, SGD(model.parameters(), 0.1), train, epochs=5, progress=False
        )
    assert h.train_loss == [] and "became nan" in h.warnings[0]
    assert "became nan" in caplog.text


def test_vanishing_and_exploding_gradients_are_named(caplog: pytest.LogCaptureFixture) -> None:
    model = Softmax(2, 3, scale=0.0)
    data = Dataset(np.zeros((8, 2), np.float32), np.zeros(8, np.int64))
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        h = fit(
            model,
            F.cross_entropy,
            SGD(model.parameters(), 0.0),
            DataLoader(data),
            epochs=1,
            progress=False,
        )
    assert any("vanishing gradient in w" in w for w in h.warnings)
    big = Softmax(2, 3)
    data = Dataset(np.full((8, 2), 1e5, np.float32), np.arange(8) % 3)
    h = fit(
        big, F.cross_entropy, SGD(big.parameters(), 0.0), DataLoader(data), epochs=1, progress=False
    )
    assert any("exploding gradient in w" in w for w in h.warnings)


def test_empty_data_is_an_error_not_a_zero() -> None:
    model = Softmax(2, 3)
    empty = Dataset(np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="evaluate: the batches hold no rows"):
        evaluate(model, F.cross_entropy, DataLoader(empty))
    before = model.w.numpy().copy()
    for loader in (DataLoader(blobs(10), batch_size=32, drop_last=True), []):
        with pytest.raises(ValueError, match="fit: the training loader has no batches"):
            fit(model, F.cross_entropy, SGD(model.parameters(), 0.1), loader, progress=False)
    with pytest.raises(ValueError, match="fit: the training loader gave no batches"):
        fit(model, F.cross_entropy, SGD(model.parameters(), 0.1), iter([]), progress=False)
    for epochs, patience in ((0, None), (3, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            opt = SGD(model.parameters(), 0.1)
            fit(model, F.cross_entropy, opt, [], epochs=epochs, early_stopping=patience)
    np.testing.assert_array_equal(model.w.numpy(), before)


def _loss_that(at_step: int, does: Callable[[], None]) -> Callable[..., gpunet.Tensor]:
    """Cross-entropy that runs `does` in training step `at_step` (from 1; evaluation aside)."""
    calls = [0]

    def loss(out: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        if gpunet.is_grad_enabled():
            calls[0] += 1
            if calls[0] == at_step:
                does()
        return F.cross_entropy(out, y)

    return loss


def _fit_with(loss: Callable[..., gpunet.Tensor], epochs: int = 6) -> tuple[Softmax, History, list]:
    model, snapshots = Softmax(2, 3), []
    h = fit(
        model,
        loss,
        SGD(model.parameters(), 0.2),
        DataLoader(blobs(), batch_size=32, shuffle=True, seed=0),  # 10 steps an epoch
        DataLoader(blobs(seed=1), batch_size=64),
        epochs=epochs,
        progress=False,
        on_epoch_end=lambda e, _: snapshots.append(model.state_dict()),
    )
    return model, h, snapshots


def test_ctrl_c_inside_a_step_stops_with_the_best_weights() -> None:
    def ctrl_c() -> None:
        raise KeyboardInterrupt

    model, h, snapshots = _fit_with(_loss_that(35, ctrl_c))  # in epoch 4
    assert h.interrupted and len(h.train_loss) == len(h.val_loss) == 3  # complete epochs only
    np.testing.assert_array_equal(model.w.numpy(), snapshots[h.best_epoch]["w"])
    assert "interrupted after 3 complete epochs" in h.warnings[0]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_real_sigint_lets_the_step_finish_then_stops() -> None:
    model, h, snapshots = _fit_with(_loss_that(25, lambda: os.kill(os.getpid(), signal.SIGINT)))
    assert h.interrupted and len(h.train_loss) == 2  # epoch 3 was cut after its 5th step
    np.testing.assert_array_equal(model.w.numpy(), snapshots[h.best_epoch]["w"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_diverged_fit_restores_the_best_weights(caplog: pytest.LogCaptureFixture) -> None:
    def nan_loss(out: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        return F.cross_entropy(out, y) * (np.nan if nan_loss.on else 1.0)  # type: ignore[attr-defined]

    nan_loss.on = False  # type: ignore[attr-defined]
    model, snapshots = Softmax(2, 3), []

    def turn_on(epoch: int, _: History) -> None:
        snapshots.append(model.state_dict())
        nan_loss.on = epoch == 2  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING, logger="gpunet"):
        h = fit(
            model,
            nan_loss,
            SGD(model.parameters(), 0.2),
            DataLoader(blobs(), batch_size=32),
            DataLoader(blobs(seed=1), batch_size=64),
            epochs=6,
            progress=False,
            on_epoch_end=turn_on,
        )
    assert h.diverged and len(h.train_loss) == 3 and h.best_epoch == 2
    assert "epoch 4: the training loss became nan" in caplog.text
    assert any("restored the best weights (epoch 3)" in w for w in h.warnings)
    np.testing.assert_array_equal(model.w.numpy(), snapshots[2]["w"])


def test_gradient_warnings_once_per_parameter_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    model = Softmax(2, 3, scale=0.0)
    data = Dataset(np.zeros((8, 2), np.float32), np.zeros(8, np.int64))
    opt = SGD(model.parameters(), 0.0)
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        h = fit(model, F.cross_entropy, opt, DataLoader(data, 4), epochs=2, progress=False)
    for epoch in (1, 2):  # numbered from 1, as the progress bar and the CLI number them
        msg = f"epoch {epoch}: vanishing gradient in w"
        assert sum(msg in w for w in h.warnings) == 1
        assert sum(msg in r.getMessage() for r in caplog.records) == 1
    assert not any("epoch 0" in w for w in h.warnings)


def test_fit_continues_a_history_exactly() -> None:
    """fit(history=..., best_state=...) runs only the epochs left; the weights match a run
    straight through (early stopping's counters come from the history)."""

    def run(split_at: int | None) -> tuple[np.ndarray, History]:
        model = Softmax(2, 3)
        opt = SGD(model.parameters(), 5.0)
        train = DataLoader(blobs(), batch_size=32, shuffle=True, seed=0)
        val = DataLoader(blobs(seed=1), batch_size=64)
        kw = {"early_stopping": 3, "progress": False}
        if split_at is None:
            h = fit(model, F.cross_entropy, opt, train, val, epochs=12, **kw)
            return model.w.numpy().copy(), h
        best, last = [], []  # what a checkpoint written at each epoch's end holds

        def keep(epoch: int, h: History) -> None:
            last[:] = [model.state_dict()]
            if h.best_epoch == epoch:
                best[:] = [model.state_dict()]

        h = fit(model, F.cross_entropy, opt, train, val, epochs=split_at, on_epoch_end=keep, **kw)
        model.load_state_dict(last[0])  # fit ended by restoring the best; continue from the last
        h = fit(model, F.cross_entropy, opt, train, val, 12, history=h, best_state=best[0], **kw)
        return model.w.numpy().copy(), h

    want, straight = run(None)
    assert straight.stopped_early and len(straight.train_loss) == 4
    for split_at in (2, 4):  # mid-run, and a history that had already stopped early
        got, resumed = run(split_at)
        assert resumed.train_loss == straight.train_loss
        assert resumed.best_epoch == straight.best_epoch and resumed.stopped_early
        np.testing.assert_array_equal(got, want)


def test_fit_refuses_a_history_with_a_best_epoch_but_no_best_state() -> None:
    """A history continued without its best weights ended, under early stopping, on the last
    epoch's weights where the straight run restored its best epoch's: silently other weights.
    It is refused before anything trains."""
    model = Softmax(2, 3)
    opt = SGD(model.parameters(), 5.0)
    train = DataLoader(blobs(), batch_size=32, shuffle=True, seed=0)
    h = fit(model, F.cross_entropy, opt, train, epochs=2, progress=False)
    before = model.w.numpy().copy()
    with pytest.raises(ValueError, match=r"fit: the history passed has a best epoch \(\d\) but no"):
        fit(model, F.cross_entropy, opt, train, epochs=4, history=h, early_stopping=1)
    np.testing.assert_array_equal(model.w.numpy(), before)
    assert len(h.train_loss) == 2
    fit(model, F.cross_entropy, opt, train, epochs=3, history=h, best_state=host_state(model))
    assert len(h.train_loss) == 3


def test_gradient_norms_under_a_loss_scaler_are_the_unscaled_ones() -> None:
    """fit with a GradScaler records and warns about the true gradient norms: the scaled
    gradients' norms (x 2**16) were reported as exploding every epoch."""
    runs = []
    for scaled in (False, True):
        model = gpunet.nn.Linear(2, 3)
        for p, v in zip(model.parameters(), Softmax(2, 3).parameters()):
            p.data[...] = v.data
        scaler = gpunet.amp.GradScaler() if scaled else None
        h = fit(
            model,
            F.cross_entropy,
            gpunet.optim.SGD(model.parameters(), lr=0.0),
            DataLoader(blobs(16), 16),
            epochs=1,
            progress=False,
            autocast=gpunet.float16,
            scaler=scaler,
        )
        runs.append(h)
    plain, scaled_h = runs
    assert not any("exploding" in w for w in scaled_h.warnings), scaled_h.warnings
    for name, norm in plain.grad_norm[0].items():
        assert scaled_h.grad_norm[0][name] == pytest.approx(norm, rel=1e-3), name


def test_a_loss_scaled_step_is_captured_and_equals_the_eager_one() -> None:
    """fit(capture=True) with a GradScaler replays the scaled step (scale, skip and update on
    the device); weights, history and the scaler's state equal the eager fit's bit for bit,
    over a start scale that overflows float16 so that steps are skipped and the scale backs off."""
    runs = []
    for capture in (False, True):
        gpunet.manual_seed(0)
        model = gpunet.nn.MLP([2, 8, 3])
        scaler = gpunet.amp.GradScaler(init_scale=2.0**24, growth_interval=3)
        h = fit(
            model,
            F.cross_entropy,
            gpunet.optim.Adam(model.parameters(), lr=1e-2),
            DataLoader(blobs(64), 16),
            epochs=4,
            progress=False,
            capture=capture,
            autocast=gpunet.float16,
            scaler=scaler,
        )
        assert not any("eagerly" in w for w in h.warnings), h.warnings
        runs.append((model, h, scaler))
    (m1, h1, s1), (m2, h2, s2) = runs
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert np.array_equal(p.numpy(), q.numpy())
    assert h1.train_loss == h2.train_loss and h1.train_loss[-1] < h1.train_loss[0]
    np.testing.assert_equal(h1.grad_norm, h2.grad_norm)  # (NaN equal to NaN)
    assert h1.warnings == h2.warnings and not any("exploding" in w for w in h1.warnings)
    assert (
        s1.get_scale() == s2.get_scale() < 2.0**40
    )  # (overflows were skipped, the scale backed off)


def test_a_loss_scaled_fit_prints_no_numpy_overflow_warnings() -> None:
    """float16 overflows are what the scaler finds and skips: fit keeps NumPy quiet about them
    (a start scale of 2**24 overflows on the first steps)."""
    import warnings

    gpunet.manual_seed(0)
    model = gpunet.nn.MLP([2, 8, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit(
            model,
            F.cross_entropy,
            gpunet.optim.Adam(model.parameters(), lr=1e-2),
            DataLoader(blobs(64), 16),
            epochs=2,
            progress=False,
            autocast=gpunet.float16,
            scaler=gpunet.amp.GradScaler(init_scale=2.0**24),
        )


def test_a_shard_evaluated_without_its_world_is_refused() -> None:
    """evaluate on rank 0's shard of 2 without comm (a test set after fit, as a
    DistributedSampler user writes it) gave that shard's loss and accuracy as if the set's,
    silently; refused, in fit before the first step too, saying to pass comm."""
    data = blobs(30)
    model = Softmax(2, 3)
    shard = DataLoader(data, 8, num_replicas=2, rank=0, pad=False)
    with pytest.raises(ValueError, match=r"evaluate: the loader holds 1 shard of 2.*comm="):
        evaluate(model, F.cross_entropy, shard)
    before = model.state_dict()
    train = DataLoader(data, 8, shuffle=True, seed=0)
    with pytest.raises(ValueError, match=r"fit: the validation loader holds 1 shard of 2"):
        fit(model, F.cross_entropy, SGD(model.parameters(), 0.1), train, shard, progress=False)
    assert all(np.array_equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_float64_model_fed_float32_batches_is_told_to_set_the_loaders_dtype() -> None:
    """DataLoader makes float32 batches unless told: a float64 model's first op refuses them,
    and fit's error says what to change; with ``dtype=gpunet.float64`` it trains."""
    r = np.random.default_rng(0)
    data = Dataset(r.standard_normal((32, 5)), r.integers(0, 3, 32))
    model = gpunet.nn.MLP([5, 8, 3], dtype="float64")
    opt = gpunet.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="different dtypes") as info:
        fit(model, F.cross_entropy, opt, DataLoader(data, 16), epochs=1, progress=False)
    assert "DataLoader(..., dtype=gpunet.float64)" in "".join(info.value.__notes__)
    loader = DataLoader(data, 16, dtype=gpunet.float64)
    h = fit(model, F.cross_entropy, opt, loader, epochs=1, progress=False)
    assert np.isfinite(h.train_loss[0])
