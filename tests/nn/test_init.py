"""Initialisers: fans for the (in, out) layout, sample statistics, and deep-stack signal scale."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import nn
from gpunet.nn import init


def test_fans_follow_the_in_out_layout() -> None:
    assert init.calculate_fan_in_and_fan_out(gpunet.zeros(30, 20)) == (30, 20)
    assert init.calculate_fan_in_and_fan_out(gpunet.zeros(3, 2, 5)) == (15, 10)
    with pytest.raises(ValueError, match="2 dimensions"):
        init.calculate_fan_in_and_fan_out(gpunet.zeros(4))


def test_gains_match_pytorch() -> None:
    assert init.calculate_gain("linear") == 1.0 == init.calculate_gain("sigmoid")
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / 1.0001))
    with pytest.raises(ValueError, match="nonlinearity"):
        init.calculate_gain("swish")


@pytest.mark.parametrize(
    ("fill", "mean", "std", "bound"),
    [
        (lambda w: init.uniform_(w, -2.0, 4.0), 1.0, 6 / math.sqrt(12), (-2.0, 4.0)),
        (lambda w: init.normal_(w, 0.5, 2.0), 0.5, 2.0, None),
        (lambda w: init.xavier_uniform_(w), 0.0, math.sqrt(2 / 500), None),
        (lambda w: init.xavier_normal_(w, gain=2.0), 0.0, 2 * math.sqrt(2 / 500), None),
        (lambda w: init.kaiming_uniform_(w, nonlinearity="relu"), 0.0, math.sqrt(2 / 200), None),
        (lambda w: init.kaiming_normal_(w, mode="fan_out"), 0.0, math.sqrt(2 / 300), None),
        (lambda w: init.zeros_(w), 0.0, 0.0, (0.0, 0.0)),
        (lambda w: init.ones_(w), 1.0, 0.0, (1.0, 1.0)),
    ],
)
def test_sample_statistics(fill, mean, std, bound) -> None:  # type: ignore[no-untyped-def]
    gpunet.manual_seed(0)
    w = nn.Parameter(gpunet.zeros(200, 300))  # fan_in 200, fan_out 300
    assert fill(w) is w and w.requires_grad and w.is_leaf and w.grad is None
    values = w.numpy()
    assert abs(values.mean() - mean) < 0.02 * max(std, 1.0)
    assert abs(values.std() - std) < 0.02 * max(std, 1e-3)
    if bound is not None:
        assert bound[0] <= values.min() and values.max() <= bound[1]


def test_generator_makes_init_reproducible() -> None:
    a, b = gpunet.zeros(4, 5), gpunet.zeros(4, 5)
    init.kaiming_normal_(a, generator=gpunet.Generator(3))
    init.kaiming_normal_(b, generator=gpunet.Generator(3))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _scales(activation: type[nn.Module], fill, depth: int = 20, width: int = 256):  # type: ignore[no-untyped-def]
    """Per-layer std of the activations (forward) and of the input gradients (backward)."""
    gpunet.manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        fill(lin.weight)
        init.zeros_(lin.bias)
        layers += [lin, activation()]
    x = gpunet.randn(512, width, requires_grad=True)
    h, acts = x, []
    for m in layers:
        h = m(h)
        if not isinstance(m, nn.Linear):
            acts.append(float(h.numpy().std()))
    (h * gpunet.randn(*h.shape)).sum().backward()
    return acts, float(x.grad.numpy().std()), float(layers[0].weight.grad.numpy().std())


def test_kaiming_keeps_a_deep_relu_stack_in_scale() -> None:
    acts, gx, gw = _scales(nn.ReLU, lambda w: init.kaiming_normal_(w, nonlinearity="relu"))
    assert all(0.3 < a < 3.0 for a in acts), acts
    assert acts[-1] / acts[0] == pytest.approx(1.0, abs=0.5)
    assert 0.1 < gx < 10.0 and 0.1 < gw < 1000.0
    # the default (PyTorch's a=sqrt(5)) shrinks a ReLU stack's signal: the reason for kaiming
    small, _, _ = _scales(nn.ReLU, lambda w: init.kaiming_uniform_(w, a=math.sqrt(5)))
    assert small[-1] < 1e-3 * small[0]


def test_xavier_keeps_a_deep_tanh_stack_in_scale() -> None:
    gain = init.calculate_gain("tanh")
    acts, gx, gw = _scales(nn.Tanh, lambda w: init.xavier_uniform_(w, gain=gain))
    assert all(0.2 < a < 1.0 for a in acts), acts
    assert acts[-1] > 0.3 * acts[0]
    assert 0.05 < gx < 20.0 and 0.01 < gw < 100.0
