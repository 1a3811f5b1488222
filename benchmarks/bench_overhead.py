"""Per-op Python overhead of gpunet on the CPU, against hand-written NumPy and PyTorch eager.

Two kinds of figures:

- ``mlp-step``: one SGD step of a tiny MLP (64-32-10, batch 32, float32, softmax
  cross-entropy with integer labels). The arrays are so small that the step is almost all
  dispatch: the hand-written NumPy step is the floor, PyTorch eager the bar to beat.
  ``test_steps_match`` (not timed) holds the three steps to the same updated weights, so the
  comparison is of equal work.
- ``per-op``: a chain of N elementwise ops on a tiny tensor, recorded (an input requires grad)
  and under ``no_grad``; the per-op cost is the median / N (printed at the end of the run).

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F

BATCH, D_IN, D_HIDDEN, D_OUT = 32, 64, 32, 10
LR = 0.05
N_OPS = 100  # ops per chain in the per-op benchmarks
OP_SHAPE = (16,)

STEP = "mlp-step 64-32-10 batch 32 f32 (forward+loss+backward+SGD)"
OP_ADD = f"per-op y = y + c, N={N_OPS}, shape {OP_SHAPE}"
OP_SCALAR = f"per-op y = y * 0.999 (Python scalar), N={N_OPS}, shape {OP_SHAPE}"
OP_BACKWARD = f"per-op y = y + c then y.sum().backward(), N={N_OPS}, shape {OP_SHAPE}"


# ---------------------------------------------------------------------- data
def initial_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights (drawn with gpunet.randn, scaled like a default init), inputs and labels."""
    g = gpunet.Generator(seed)

    def draw(*shape: int, scale: float) -> np.ndarray:
        return (gpunet.randn(*shape, device="cpu", generator=g).numpy() * scale).astype(np.float32)

    rng = np.random.default_rng(seed)
    return {
        "W1": draw(D_IN, D_HIDDEN, scale=D_IN**-0.5),
        "b1": draw(D_HIDDEN, scale=0.1),
        "W2": draw(D_HIDDEN, D_OUT, scale=D_HIDDEN**-0.5),
        "b2": draw(D_OUT, scale=0.1),
        "x": draw(BATCH, D_IN, scale=1.0),
        "y": rng.integers(0, D_OUT, BATCH).astype(np.int64),
    }


PARAMS = ("W1", "b1", "W2", "b2")


# ---------------------------------------------------------------------- the three steps
def make_gpunet_step(state: dict[str, np.ndarray]) -> tuple[Callable[[], Any], list]:
    """The step written with raw gpunet tensors; returns (step, [W1, b1, W2, b2])."""
    params = [gpunet.tensor(state[k], device="cpu", requires_grad=True) for k in PARAMS]
    W1, b1, W2, b2 = params
    x = gpunet.tensor(state["x"], device="cpu")
    y = gpunet.tensor(state["y"], device="cpu")

    def step() -> Any:
        h = (x @ W1 + b1).relu()
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, y)
        loss.backward()
        with gpunet.no_grad():
            for p in params:
                p -= LR * p.grad
                p.grad = None
        return loss

    return step, params


def make_numpy_step(state: dict[str, np.ndarray]) -> tuple[Callable[[], Any], list]:
    """The reference: forward, backward and SGD by hand, float32 throughout."""
    params = [state[k].copy() for k in PARAMS]
    W1, b1, W2, b2 = params
    x, y = state["x"], state["y"]
    rows = np.arange(BATCH)

    def step() -> Any:
        h = x @ W1
        h += b1
        np.maximum(h, 0, out=h)  # relu in place; h > 0 is its mask
        logits = h @ W2
        logits += b2
        # stable log-softmax: z = logits - max, logp = z - log(sum(exp(z)))
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        logp = z - np.log(s)
        loss = -logp[rows, y].mean()
        # dlogits = (softmax - onehot) / batch
        dlogits = e / s
        dlogits[rows, y] -= 1.0
        dlogits /= BATCH
        dW2 = h.T @ dlogits
        db2 = dlogits.sum(axis=0)
        dh = dlogits @ W2.T
        dh *= h > 0
        dW1 = x.T @ dh
        db1 = dh.sum(axis=0)
        for p, d in zip(params, (dW1, db1, dW2, db2)):
            d *= LR
            p -= d
        return loss

    return step, params


def make_torch_step(state: dict[str, np.ndarray]) -> tuple[Callable[[], Any], list]:
    """The same step in PyTorch eager on the CPU (same ops as the gpunet step)."""
    import torch

    params = [torch.tensor(state[k], requires_grad=True) for k in PARAMS]
    W1, b1, W2, b2 = params
    x = torch.tensor(state["x"])
    y = torch.tensor(state["y"])

    def step() -> Any:
        h = (x @ W1 + b1).relu()
        logits = h @ W2 + b2
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= LR * p.grad
                p.grad = None
        return loss

    return step, params


@pytest.fixture
def torch_1thread() -> Any:
    """torch, run on one intra-op thread while a benchmark runs.

    At these sizes nothing gains from threads (NumPy's OpenBLAS runs these GEMMs on one
    thread too), and on a busy 2-core machine an OpenMP team of 2 stalls on the thread that
    lost its core: medians of milliseconds for a step that takes a few hundred microseconds.
    """
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


def as_numpy(params: list) -> list[np.ndarray]:
    return [p.detach().numpy() if hasattr(p, "detach") else np.asarray(p) for p in params]


# ---------------------------------------------------------------------- equal work (not timed)
def test_steps_match() -> None:
    """From the same weights, three steps of each give the same weights and losses (1e-5)."""
    state = initial_state()
    ref_step, ref_params = make_numpy_step(state)
    makers = [make_gpunet_step]
    try:
        import torch  # noqa: F401

        makers.append(make_torch_step)
    except ImportError:
        pass
    runs = []
    for make in makers:
        step, params = make(state)
        runs.append((make.__name__, step, params))
    for _ in range(3):
        ref_loss = float(ref_step())
        for name, step, _params in runs:
            np.testing.assert_allclose(step().item(), ref_loss, rtol=1e-5, atol=1e-5, err_msg=name)
    for key, moved in zip(PARAMS, ref_params):  # the steps did work: every weight moved
        assert np.abs(moved - state[key]).max() > 1e-4, key
    for name, _step, params in runs:
        for key, got, want in zip(PARAMS, as_numpy(params), ref_params):
            assert got.dtype == np.float32, (name, key, got.dtype)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name}: {key}")


# ---------------------------------------------------------------------- mlp step
@pytest.mark.benchmark(group=STEP)
def test_step_numpy(bench: Any) -> None:
    step, _ = make_numpy_step(initial_state())
    assert np.isfinite(bench(step))


@pytest.mark.benchmark(group=STEP)
def test_step_gpunet(bench: Any) -> None:
    step, _ = make_gpunet_step(initial_state())
    assert np.isfinite(bench(step).item())


@pytest.mark.benchmark(group=STEP)
def test_step_torch(bench: Any, torch_1thread: Any) -> None:
    step, _ = make_torch_step(initial_state())
    assert np.isfinite(bench(step).item())


# ---------------------------------------------------------------------- per-op chains
def _chain_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (
        rng.standard_normal(OP_SHAPE).astype(np.float32),
        rng.standard_normal(OP_SHAPE).astype(np.float32) * 1e-3,
    )


@pytest.mark.benchmark(group=OP_ADD)
def test_add_numpy(bench: Any) -> None:
    x, c = _chain_data()

    def chain() -> Any:
        y = x
        for _ in range(N_OPS):
            y = y + c
        return y

    assert chain().shape == OP_SHAPE
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_ADD)
@pytest.mark.parametrize("mode", ["recording", "no_grad"])
def test_add_gpunet(bench: Any, mode: str) -> None:
    xa, ca = _chain_data()
    x = gpunet.tensor(xa, device="cpu", requires_grad=True)
    c = gpunet.tensor(ca, device="cpu")

    def chain() -> Any:
        with gpunet.set_grad_enabled(mode == "recording"):
            y = x
            for _ in range(N_OPS):
                y = y + c
            return y

    assert chain().requires_grad == (mode == "recording")
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_ADD)
@pytest.mark.parametrize("mode", ["recording", "no_grad"])
def test_add_torch(bench: Any, mode: str, torch_1thread: Any) -> None:
    torch = torch_1thread
    xa, ca = _chain_data()
    x = torch.tensor(xa, requires_grad=True)
    c = torch.tensor(ca)

    def chain() -> Any:
        with torch.set_grad_enabled(mode == "recording"):
            y = x
            for _ in range(N_OPS):
                y = y + c
            return y

    assert chain().requires_grad == (mode == "recording")
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_SCALAR)
def test_mul_scalar_numpy(bench: Any) -> None:
    x, _ = _chain_data()

    def chain() -> Any:
        y = x
        for _ in range(N_OPS):
            y = y * 0.999
        return y

    assert chain().dtype == np.float32
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_SCALAR)
@pytest.mark.parametrize("mode", ["recording", "no_grad"])
def test_mul_scalar_gpunet(bench: Any, mode: str) -> None:
    x = gpunet.tensor(_chain_data()[0], device="cpu", requires_grad=True)

    def chain() -> Any:
        with gpunet.set_grad_enabled(mode == "recording"):
            y = x
            for _ in range(N_OPS):
                y = y * 0.999
            return y

    assert chain().dtype == gpunet.float32
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_SCALAR)
@pytest.mark.parametrize("mode", ["recording", "no_grad"])
def test_mul_scalar_torch(bench: Any, mode: str, torch_1thread: Any) -> None:
    torch = torch_1thread
    x = torch.tensor(_chain_data()[0], requires_grad=True)

    def chain() -> Any:
        with torch.set_grad_enabled(mode == "recording"):
            y = x
            for _ in range(N_OPS):
                y = y * 0.999
            return y

    assert chain().dtype == torch.float32
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_BACKWARD)
def test_backward_gpunet(bench: Any) -> None:
    xa, ca = _chain_data()
    x = gpunet.tensor(xa, device="cpu", requires_grad=True)
    c = gpunet.tensor(ca, device="cpu")

    def chain() -> Any:
        y = x
        for _ in range(N_OPS):
            y = y + c
        y.sum().backward()
        g, x.grad = x.grad, None
        return g

    np.testing.assert_array_equal(chain().numpy(), np.ones(OP_SHAPE, np.float32))
    bench(chain, ops=N_OPS)


@pytest.mark.benchmark(group=OP_BACKWARD)
def test_backward_torch(bench: Any, torch_1thread: Any) -> None:
    torch = torch_1thread
    xa, ca = _chain_data()
    x = torch.tensor(xa, requires_grad=True)
    c = torch.tensor(ca)

    def chain() -> Any:
        y = x
        for _ in range(N_OPS):
            y = y + c
        y.sum().backward()
        g, x.grad = x.grad, None
        return g

    np.testing.assert_array_equal(chain().numpy(), np.ones(OP_SHAPE, np.float32))
    bench(chain, ops=N_OPS)
