"""bfloat16 on the CPU: ml_dtypes storage, float32 arithmetic rounded once (to nearest even)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import gpunet

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


def test_casts_round_to_nearest_even_bit_for_bit_with_ml_dtypes() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(4096).astype(np.float32) * 1e3,
            np.float32([1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, -3.4e38, 1e-40, -0.0, np.inf, -np.inf]),
        ]
    )
    got = gpunet.tensor(x).to(gpunet.bfloat16)
    assert got.dtype == gpunet.bfloat16
    np.testing.assert_array_equal(_bits(got.numpy()), _bits(x.astype(BF16)))
    assert float(got.numpy()[4096]) == 1.0  # a tie rounds to the even mantissa
    assert float(got.numpy()[4097]) == 1.015625
    back = got.to(gpunet.float32).numpy()
    np.testing.assert_array_equal(back, x.astype(BF16).astype(np.float32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpunet.zeros(3, dtype=gpunet.bfloat16),
        lambda: gpunet.ones((2, 2), dtype=gpunet.bfloat16),
        lambda: gpunet.full((3,), 2.5, dtype=gpunet.bfloat16),
        lambda: gpunet.tensor([1.0, 2.0], dtype=gpunet.bfloat16),
        lambda: gpunet.tensor(np.ones(2, BF16)),
        lambda: gpunet.randn(4, dtype=gpunet.bfloat16),
        lambda: gpunet.rand(4, dtype=gpunet.bfloat16),
        lambda: gpunet.ones(3, dtype=gpunet.bfloat16) * 0.5,
    ],
)
def test_creation_and_scalars_keep_bfloat16(make) -> None:  # type: ignore[no-untyped-def]
    t = make()
    assert t.dtype == gpunet.bfloat16 and t.numpy().dtype == BF16


def _pair(seed: int, *shape: int) -> tuple[np.ndarray, gpunet.Tensor]:
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(BF16)
    return a, gpunet.tensor(a)


def test_gemms_compute_in_float32_and_round_once() -> None:
    a, x = _pair(1, 7, 33)
    b, w = _pair(2, 33, 5)
    c, bias = _pair(3, 5)
    f32 = np.float32
    want = (a.astype(f32) @ b.astype(f32)).astype(BF16)
    np.testing.assert_array_equal(_bits((x @ w).numpy()), _bits(want))
    lin = gpunet.nn.functional.linear(x, w, bias)  # (linear_activation: GEMM + bias, one round)
    want = (a.astype(f32) @ b.astype(f32) + c.astype(f32)).astype(BF16)
    np.testing.assert_array_equal(_bits(lin.numpy()), _bits(want))


def test_elementwise_and_reductions_round_once() -> None:
    a, x = _pair(4, 64, 16)
    b, y = _pair(5, 64, 16)
    f32 = np.float32
    np.testing.assert_array_equal(_bits((x + y).numpy()), _bits((a.astype(f32) + b).astype(BF16)))
    np.testing.assert_array_equal(_bits((x * y).numpy()), _bits((a.astype(f32) * b).astype(BF16)))
    np.testing.assert_array_equal(_bits(x.exp().numpy()), _bits(np.exp(a.astype(f32)).astype(BF16)))
    # the sum accumulates in float32 (bfloat16 accumulation would lose 1 + 1/256 steps)
    want = np.add.reduce(a.astype(f32), axis=1).astype(BF16)
    np.testing.assert_array_equal(_bits(x.sum(1).numpy()), _bits(want))
    ones = gpunet.ones(1024, dtype=gpunet.bfloat16)
    assert float(ones.sum().item()) == 1024.0  # (bfloat16 accumulation stops at 256)


def test_gradients_match_float64_within_bfloat16_tolerance() -> None:
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((16, 8)).astype(BF16)
    ws = (rng.standard_normal((8, 4)) * 0.3).astype(BF16)
    labels = gpunet.tensor(rng.integers(0, 4, 16))

    def loss_grads(dtype):  # type: ignore[no-untyped-def]
        x = gpunet.tensor(xs).to(dtype)
        w = gpunet.tensor(ws).to(dtype).detach().requires_grad_()
        loss = gpunet.nn.functional.cross_entropy(gpunet.nn.functional.gelu(x @ w), labels)
        loss.backward()
        return w.grad.to(gpunet.float64).numpy(), w.grad.dtype

    g16, dt = loss_grads(gpunet.bfloat16)
    g64, _ = loss_grads(gpunet.float64)
    assert dt == gpunet.bfloat16
    np.testing.assert_allclose(g16, g64, rtol=0, atol=4 * 2**-8 * np.abs(g64).max())


def test_adam_on_bfloat16_parameters_keeps_float32_state_and_learns() -> None:
    gpunet.manual_seed(0)
    model = gpunet.nn.MLP([8, 16, 3])
    model.to(gpunet.bfloat16)
    opt = gpunet.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(7)
    x = gpunet.tensor(rng.standard_normal((32, 8)).astype(np.float32)).to(gpunet.bfloat16)
    y = gpunet.tensor(rng.integers(0, 3, 32))
    losses = []
    for _ in range(30):
        loss = gpunet.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    params = list(model.parameters())
    assert all(p.dtype == gpunet.bfloat16 for p in params)
    assert all(np.isfinite(p.to(gpunet.float32).numpy()).all() for p in params)
    assert losses[-1] < 0.8 * losses[0]


def test_mixing_bfloat16_and_float32_is_an_error_naming_both() -> None:
    x = gpunet.ones(3, dtype=gpunet.bfloat16)
    with pytest.raises(TypeError, match=r"gpunet.add: .*bfloat16.*float32"):
        _ = x + gpunet.ones(3)


def test_cupy_draws_bfloat16_through_float32() -> None:
    """CuPy's generators draw float32 or float64 only (a stand-in backend over NumPy)."""
    import contextlib

    from gpunet.backend.cupy_backend import CupyBackend

    b = object.__new__(CupyBackend)
    b._cuda_device = contextlib.nullcontext()

    class Gen:
        def device_rng(self, backend: object) -> np.random.Generator:
            return np.random.default_rng(0)

    got = b.random(Gen(), "normal", (5,), BF16)
    want = np.random.default_rng(0).standard_normal((5,), dtype=np.float32).astype(BF16)
    assert got.dtype == BF16
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.gpu
def test_a_bfloat16_mlp_step_on_cuda_matches_the_cpu() -> None:
    rng = np.random.default_rng(8)
    xs = rng.standard_normal((32, 8)).astype(BF16)
    ws = (rng.standard_normal((8, 4)) * 0.3).astype(BF16)
    labels = rng.integers(0, 4, 32)
    grads = []
    for dev in ("cpu", "cuda"):
        x = gpunet.tensor(xs, device=dev)
        w = gpunet.tensor(ws, device=dev, requires_grad=True)
        loss = gpunet.nn.functional.cross_entropy(
            gpunet.nn.functional.gelu(x @ w), gpunet.tensor(labels, device=dev)
        )
        loss.backward()
        assert w.grad.dtype == gpunet.bfloat16
        grads.append(w.grad.to(gpunet.float32).numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=0, atol=4 * 2**-8 * np.abs(grads[0]).max())


@pytest.mark.parametrize(
    ("make", "cfg"),
    [
        (gpunet.optim.Adam, {"lr": 1e-3}),
        (gpunet.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (gpunet.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    ],
)
def test_a_bfloat16_step_is_the_float32_step_rounded_once(make, cfg) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 parameters are updated in float32 (float32 state) and rounded once: within
    one bfloat16 ulp of the float32 step, and never inf (gradients down to 1e-30)."""
    rng = np.random.default_rng(9)
    init = (rng.standard_normal((3, 50)) * 0.5).astype(BF16)
    p16 = gpunet.tensor(init, requires_grad=True)
    p32 = gpunet.tensor(init.astype(np.float32), requires_grad=True)
    opt16, opt32 = make([p16], **cfg), make([p32], **cfg)
    for step in range(3):
        g = (rng.standard_normal((3, 50)) * np.array([[1e-30], [1e-3], [1.0]])).astype(BF16)
        p32.data[...] = p16.numpy().astype(np.float32)
        p16.grad, p32.grad = gpunet.tensor(g), gpunet.tensor(g.astype(np.float32))
        opt16.step()
        opt32.step()
        got, want = p16.numpy(), p32.numpy().astype(BF16)
        assert got.dtype == BF16 and np.isfinite(got.astype(np.float32)).all()
        ulps = np.abs(_bits(got).astype(np.int32) - _bits(want).astype(np.int32))
        assert ulps.max() <= 1, step
    assert all(
        v.dtype == np.float32 for st in opt16.state.values() for k, v in st.items() if k != "step"
    )
