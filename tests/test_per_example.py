"""Per-example gradients: one batched pass equals a loop of single-example backwards."""

from __future__ import annotations

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet import nn
from gpunet.per_example import per_example_grads


def _loop(model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    rows: dict[str, list[np.ndarray]] = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss = F.cross_entropy(
            model(gpunet.tensor(x[i : i + 1])), gpunet.tensor(y[i : i + 1]), reduction="sum"
        )
        loss.backward()
        for n, p in model.named_parameters():
            rows[n].append(p.grad.numpy().copy())
    return {n: np.stack(v) for n, v in rows.items()}


@pytest.mark.parametrize("norm", [None, "layernorm"])
def test_per_example_grads_equal_the_loop(norm: str | None) -> None:
    gpunet.manual_seed(0)
    model = nn.MLP([5, 7, 3], activation="tanh", norm=norm, dtype=gpunet.float64)
    r = np.random.default_rng(0)
    x, y = r.standard_normal((6, 5)), r.integers(0, 3, 6)
    got = per_example_grads(
        lambda out, t: F.cross_entropy(out, t, reduction="none"),
        model,
        gpunet.tensor(x),
        gpunet.tensor(y),
    )
    want = _loop(model, x, y)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == (6, *dict(model.named_parameters())[name].shape)
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-10, atol=1e-12)


def test_clip_per_example_bounds_each_examples_norm() -> None:
    gpunet.manual_seed(1)
    model = nn.MLP([4, 8, 2], dtype=gpunet.float64)
    r = np.random.default_rng(1)
    x, y = r.standard_normal((5, 4)) * 10, r.integers(0, 2, 5)
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")
    raw = per_example_grads(loss, model, gpunet.tensor(x), gpunet.tensor(y))
    clipped = per_example_grads(
        loss, model, gpunet.tensor(x), gpunet.tensor(y), clip_per_example=0.5
    )
    norms = np.sqrt(sum((g.numpy().reshape(5, -1) ** 2).sum(1) for g in clipped.values()))
    raw_norms = np.sqrt(sum((g.numpy().reshape(5, -1) ** 2).sum(1) for g in raw.values()))
    np.testing.assert_allclose(norms, np.minimum(raw_norms, 0.5), rtol=1e-9)


def test_a_scalar_loss_is_refused() -> None:
    model = nn.MLP([2, 2])
    with pytest.raises(ValueError, match="one loss per example"):
        per_example_grads(F.cross_entropy, model, gpunet.ones(3, 2), gpunet.tensor([0, 1, 0]))
