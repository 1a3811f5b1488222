"""Per-op Python overhead of gpunet on the CPU, against hand-written NumPy and PyTorch eager.

Two kinds of figures:

- ``mlp-step``: one SGD step of a tiny MLP (64-32-10, batch 32, float32, softmax
  cross-entropy with integer labels), written with raw gpunet tensors. The arrays are so small
  that the step is almost all dispatch: the hand-written NumPy step is the floor, PyTorch eager
  the bar to beat. The steps are defined once, in ``gpunet.bench.workloads``. Beside them, the
  same step on ``minimal_tape.py``, the smallest tape that runs it: the floor for any Python
  tape, so gpunet / minimal tape is what gpunet's per-op checks and features cost.
  ``test_steps_match`` (not timed) holds the steps to the same updated weights, so the
  comparison is of equal work.
- ``per-op``: a chain of N elementwise ops on a tiny tensor, recorded (an input requires grad)
  and under ``no_grad``; the per-op cost is the median / N (printed at the end of the run).

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import minimal_tape  # benchmarks/minimal_tape.py (pytest puts this folder on sys.path)
import numpy as np
import pytest

import gpunet
from gpunet.bench.workloads import (
    MLP_SIZES,
    MlpState,
    Workload,
    gpunet_tensors_step,
    mlp_state,
    numpy_step,
    torch_step,
)

SIZES, BATCH = MLP_SIZES["tiny"]  # 64-32-10, batch 32
LR = 0.05
N_OPS = 100  # ops per chain in the per-op benchmarks
OP_SHAPE = (16,)

STEP = "mlp-step 64-32-10 batch 32 f32 (forward+loss+backward+SGD)"
OP_ADD = f"per-op y = y + c, N={N_OPS}, shape {OP_SHAPE}"
OP_SCALAR = f"per-op y = y * 0.999 (Python scalar), N={N_OPS}, shape {OP_SHAPE}"
OP_BACKWARD = f"per-op y = y + c then y.sum().backward(), N={N_OPS}, shape {OP_SHAPE}"


# ---------------------------------------------------------------------- the three steps
# One definition of each step, shared with `gpunet bench`: gpunet.bench.workloads.
def initial_state(seed: int = 0) -> MlpState:
    """Weights, biases, inputs and labels of the tiny MLP."""
    return mlp_state(SIZES, BATCH, seed)


def minimal_tape_step(s: MlpState, lr: float) -> Workload:
    """The step on ``minimal_tape.py``: the floor for a Python tape."""
    weights = [np.array(a) for a in s.initial()]
    return Workload(minimal_tape.step_fn(weights, s.x, s.y, lr), lambda: weights)


def make_steps() -> list[tuple[str, Any]]:
    """The gpunet (raw tensors) step, the minimal tape's, and PyTorch eager's when installed."""
    makers = [("gpunet", gpunet_tensors_step), ("minimal tape", minimal_tape_step)]
    if importlib.util.find_spec("torch") is not None:
        makers.append(("torch", torch_step))
    return makers


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


# ---------------------------------------------------------------------- equal work (not timed)
def test_steps_match() -> None:
    """From the same weights, three steps of each give the same weights and losses (1e-5)."""
    state = initial_state()
    ref: Workload = numpy_step(state, lr=LR)
    runs = [(name, make(state, lr=LR)) for name, make in make_steps()]
    for _ in range(3):
        ref_loss = float(ref.step())
        for name, wl in runs:
            np.testing.assert_allclose(
                float(wl.step().item()), ref_loss, rtol=1e-5, atol=1e-5, err_msg=name
            )
    want = ref.weights()
    for start, moved in zip(state.initial(), want):  # the steps did work: every weight moved
        assert np.abs(moved - start).max() > 1e-4
    for name, wl in runs:
        for i, (got, w) in enumerate(zip(wl.weights(), want)):
            assert got.dtype == np.float32, (name, i, got.dtype)
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5, err_msg=f"{name}: {i}")


# ---------------------------------------------------------------------- mlp step
@pytest.mark.benchmark(group=STEP)
def test_step_numpy(bench: Any) -> None:
    step = numpy_step(initial_state(), lr=LR).step
    assert np.isfinite(bench(step))


@pytest.mark.benchmark(group=STEP)
def test_step_gpunet(bench: Any) -> None:
    step = gpunet_tensors_step(initial_state(), lr=LR).step
    assert np.isfinite(bench(step).item())


@pytest.mark.benchmark(group=STEP)
def test_step_minimal_tape(bench: Any) -> None:
    step = minimal_tape_step(initial_state(), lr=LR).step
    assert np.isfinite(bench(step))


@pytest.mark.benchmark(group=STEP)
def test_step_torch(bench: Any, torch_1thread: Any) -> None:
    step = torch_step(initial_state(), lr=LR).step
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
