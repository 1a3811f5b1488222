"""The activation functions' public API and their fused-or-composed backward.

The registry suite (test_primitives.py) checks each activation's values and derivatives to
second order; here: the fused backward (a plain ``backward()``) equals the composed one
(``create_graph``), the choice between them is made where it should be, and bad arguments
are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import gpunet
from gpunet.backend.numpy_backend import NumpyBackend

ACTIVATIONS: dict[str, Callable[[gpunet.Tensor], gpunet.Tensor]] = {
    "relu": gpunet.relu,
    "sigmoid": gpunet.sigmoid,
    "tanh": gpunet.tanh,
    "silu": gpunet.silu,
    "gelu": gpunet.gelu,
    "gelu_tanh": lambda t: gpunet.gelu(t, approximate="tanh"),
    "softplus": lambda t: gpunet.softplus(t, beta=0.5),
    "elu": gpunet.elu,
    "elu_negative_alpha": lambda t: gpunet.elu(t, alpha=-0.5),
    "leaky_relu": gpunet.leaky_relu,
    "leaky_relu_negative_slope": lambda t: gpunet.leaky_relu(t, negative_slope=-0.2),
}


def _values(dtype: np.dtype) -> np.ndarray:
    r = np.random.default_rng(1)
    x = r.choice([-1.0, 1.0], 500) * r.uniform(0.01, 30.0, 500)
    return np.concatenate([x, [-80.0, -10.0, 10.0, 80.0]]).astype(dtype)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the activations whose backward went through the backend's fused op."""
    calls: list[str] = []
    original = NumpyBackend.activation_backward

    def spy(self, g, saved, **kw):
        calls.append(kw["name"])
        return original(self, g, saved, **kw)

    monkeypatch.setattr(NumpyBackend, "activation_backward", spy)
    return calls


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_fused_backward_equals_composed(name: str, dtype: np.dtype, fused_calls) -> None:
    f = ACTIVATIONS[name]
    raw = _values(dtype)
    upstream = np.random.default_rng(2).standard_normal(raw.shape).astype(dtype)

    x = gpunet.tensor(raw, requires_grad=True)
    f(x).backward(gpunet.tensor(upstream))
    assert len(fused_calls) == 1, "a plain backward takes the fused op"

    x2 = gpunet.tensor(raw, requires_grad=True)
    f(x2).backward(gpunet.tensor(upstream), create_graph=True)
    assert len(fused_calls) == 1, "create_graph takes the composed formula"

    # to rounding, relative to the size of the terms: g * f' (the composed exact GELU takes
    # Phi = (1 + erf) / 2, accurate to eps absolutely; the fused erfc form also relatively)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    err = np.abs(x.grad.numpy() - x2.grad.numpy())
    assert (err <= rtol * (np.abs(x2.grad.numpy()) + np.abs(upstream))).all(), err.max()


def test_forward_mode_and_anomaly_detection_use_the_composed_rule(fused_calls) -> None:
    x = gpunet.tensor(np.linspace(-2, 2, 5))
    gpunet.jvp(gpunet.silu, [x], [gpunet.ones_like(x)])  # nothing records the tangent: fused
    assert fused_calls == ["silu"]
    x.requires_grad_()
    gpunet.jvp(gpunet.silu, [x], [gpunet.ones_like(x)])  # the tape sees x: composed
    assert fused_calls == ["silu"]
    with gpunet.detect_anomaly():
        gpunet.gelu(x).sum().backward()
    assert fused_calls == ["silu"], "anomaly checks see every op, so the rule is composed"
    hv = gpunet.hvp(lambda v: gpunet.gelu(v).sum(), [x], [gpunet.ones_like(x)])
    assert hv is not None


def test_leaky_relu_and_elu_keep_the_output_only_for_nonnegative_parameters() -> None:
    x = gpunet.tensor([-1.0, 2.0], requires_grad=True)
    for y in (gpunet.leaky_relu(x, 0.1), gpunet.elu(x, 1.0)):
        assert y._node.out_data is not None  # the saved value is the output itself
    for y in (gpunet.leaky_relu(x, -0.1), gpunet.elu(x, -1.0)):
        assert y._node.out_data is None and y._node.saved[0] is x


def test_values_at_extremes_are_finite_and_right() -> None:
    x = gpunet.tensor([-1e4, -20.0, 0.0, 20.0, 1e4])
    want = [0, np.exp(-20.0), np.log(2), 20.0, 1e4]  # to float32 precision
    np.testing.assert_allclose(gpunet.softplus(x).numpy(), want, rtol=1e-6)
    assert gpunet.gelu(gpunet.tensor([-10.0])).item() < 0  # erfc keeps the tail: -7.6e-23
    assert np.isclose(
        gpunet.gelu(gpunet.tensor([-10.0], dtype=gpunet.float64)).item(), -7.62e-23, rtol=1e-3
    )
    for f in ACTIVATIONS.values():
        assert np.isfinite(f(x).numpy()).all()


def test_bad_arguments_are_refused() -> None:
    x = gpunet.tensor([1.0])
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        gpunet.gelu(x, approximate="erf")
    with pytest.raises(ValueError, match="beta must be positive"):
        gpunet.softplus(x, beta=0.0)
    with pytest.raises(TypeError, match="expected a Tensor"):
        gpunet.silu(np.ones(3))
    with pytest.raises(TypeError, match="expected a floating tensor"):
        gpunet.elu(gpunet.tensor([1, 2]))
    backend = NumpyBackend(None)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        backend.activation(np.ones(2), name="swish")
    with pytest.raises(ValueError, match="gelu has no derivative in terms of its output"):
        backend.activation_backward(np.ones(2), np.ones(2), name="gelu", from_output=True)


def test_warmup_without_a_gpu_returns_false_quietly(caplog) -> None:
    if gpunet.backend.probe_cuda().available:
        pytest.skip("a GPU answers here")
    assert gpunet.warmup() is False
    assert not caplog.records
