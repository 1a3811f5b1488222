"""The fit loop, with a stand-in model and optimizer (plain tensors, plain SGD)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet.data import DataLoader, Dataset
from gpunet.train import evaluate, fit


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
