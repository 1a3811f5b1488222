"""Activation backward on NumPy at 10^6 float32 elements: gpunet's fused backend op against
the best plain-NumPy expression for the same derivative.

For each activation, ``dx = g * f'`` from what the primitive keeps (the output y for relu,
leaky_relu, elu, sigmoid, tanh and softplus; the input x for silu and the GELUs):

- ``numpy best expression``: the fastest one-line NumPy expression we could write for it
  (tried: np.where, boolean masks, in-place variants; kept: the fastest). For silu it is the
  textbook 1 / (1 + exp(-x)) form, which overflows (to a harmless inf, warnings silenced)
  for x < -88; gpunet's is the stable form of kernels/activations.cuh.
- ``gpunet activation_backward``: ``NumpyBackend.activation_backward``, what a plain
  ``loss.backward()`` runs (kernels/activations.cuh, mirrored in gpunet/backend/numpy_fused.py).

``test_same_values`` (not timed) holds both to the same result, so the work is equal.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks/bench_kernels.py
--benchmark-only``; ``--benchmark-disable`` runs each body once (smoke).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.special

from gpunet.backend.numpy_backend import NumpyBackend

N = 10**6
NP = NumpyBackend(None)
F = np.float32
K = F(math.sqrt(2 / math.pi))


def _silu(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-x))
    return g * (s * (1 + x * (1 - s)))


def _silu_stable(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    z = np.exp(-np.abs(x))
    s = np.exp(np.minimum(x, 0)) / (1 + z)
    return g * (s + x * (z / ((1 + z) * (1 + z))))


def _gelu(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    cdf = 0.5 * (1 + scipy.special.erf(x * F(1 / math.sqrt(2))))
    return g * (cdf + x * np.exp(-0.5 * x * x) * F(1 / math.sqrt(2 * math.pi)))


def _gelu_tanh(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    t = np.tanh(K * (x + F(0.044715) * x * x * x))
    return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * K * (1 + F(3 * 0.044715) * x * x))


Plain = Callable[[np.ndarray, np.ndarray], np.ndarray]
# case -> (activation, alpha, from_output, best plain expression of (saved, g))
CASES: dict[str, tuple[str, float, bool, Plain]] = {
    "relu": ("relu", 0.0, True, lambda y, g: g * (y > 0)),
    "leaky_relu": ("leaky_relu", 0.01, True, lambda y, g: g * np.maximum(y > 0, F(0.01))),
    "elu": ("elu", 1.0, True, lambda y, g: g * (np.minimum(y, 0) + 1)),
    "sigmoid": ("sigmoid", 0.0, True, lambda y, g: g * y * (1 - y)),
    "tanh": ("tanh", 0.0, True, lambda y, g: g * (1 - y * y)),
    "softplus": ("softplus", 1.0, True, lambda y, g: g * -np.expm1(-y)),
    "silu": ("silu", 0.0, False, _silu),  # textbook: exp(-x) overflows for x < -88
    "silu, stable plain": ("silu", 0.0, False, _silu_stable),  # gpunet's formula, unfused
    "gelu": ("gelu", 0.0, False, _gelu),
    "gelu_tanh": ("gelu_tanh", 0.0, False, _gelu_tanh),
}


def operands(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(saved, g): pre-activations ~ 3 N(0, 1), the saved output where the card keeps it."""
    r = np.random.default_rng(0)
    x = (r.standard_normal(N) * 3).astype(F)
    g = r.standard_normal(N).astype(F)
    name, alpha, from_output, _ = CASES[case]
    return (NP.activation(x, name=name, alpha=alpha) if from_output else x), g


def ours(case: str, saved: np.ndarray, g: np.ndarray) -> np.ndarray:
    name, alpha, from_output, _ = CASES[case]
    return NP.activation_backward(g, saved, name=name, alpha=alpha, from_output=from_output)


@pytest.mark.parametrize("case", CASES)
def test_same_values(case: str) -> None:
    saved, g = operands(case)
    np.testing.assert_allclose(
        ours(case, saved, g), CASES[case][3](saved, g), rtol=1e-5, atol=1e-5 * np.abs(g).max()
    )


@pytest.mark.parametrize("impl", ["numpy", "gpunet"])  # best plain expression; fused op
@pytest.mark.parametrize("case", CASES)
def test_activation_backward(bench: Any, benchmark: Any, case: str, impl: str) -> None:
    benchmark.group = f"activation backward {case}, 10^6 float32"
    saved, g = operands(case)
    plain = CASES[case][3]
    bench((lambda: plain(saved, g)) if impl == "numpy" else (lambda: ours(case, saved, g)))
