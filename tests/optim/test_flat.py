"""Gradient buffers: backward writes a leaf's gradient into ``grad_buffer`` (the optimizer's
flat array), by GEMM straight into it for a weight, and the result equals the ordinary one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet import nn, optim
from gpunet.autodiff import bind
from gpunet.primitives.linalg import matmul

R = np.random.default_rng(7)


def _problem() -> tuple[gpunet.Tensor, gpunet.Tensor, np.ndarray]:
    x = gpunet.tensor(R.standard_normal((6, 5)))
    w = gpunet.tensor(R.standard_normal((5, 3)), requires_grad=True)
    buf = np.full((5, 3), np.nan)  # whatever was there must not leak into the gradient
    return x, w, buf


def _loss(x: gpunet.Tensor, w: gpunet.Tensor) -> gpunet.Tensor:
    return gpunet.tanh(x @ w).sum()


def _reference(x: gpunet.Tensor, w: gpunet.Tensor, times: int = 1) -> np.ndarray:
    plain = gpunet.tensor(w.numpy(), requires_grad=True)
    for _ in range(times):
        _loss(x, plain).backward()
    return plain.grad.numpy()


def test_backward_writes_the_weight_gradient_into_the_buffer() -> None:
    x, w, buf = _problem()
    w.grad_buffer = buf
    _loss(x, w).backward()
    assert w.grad.data is buf
    np.testing.assert_allclose(buf, _reference(x, w), rtol=1e-12)


def test_a_second_backward_accumulates_in_place() -> None:
    x, w, buf = _problem()
    w.grad_buffer = buf
    _loss(x, w).backward()
    _loss(x, w).backward()
    assert w.grad.data is buf
    np.testing.assert_allclose(buf, _reference(x, w, times=2), rtol=1e-12)


def test_both_gemm_operand_layouts_write_the_buffer() -> None:
    x, w, _ = _problem()
    wt = gpunet.tensor(w.numpy().T.copy(), requires_grad=True)  # x @ op(wt), op transposes
    buf = np.zeros((3, 5))
    wt.grad_buffer = buf
    gpunet.tanh(bind(matmul, x, wt, tx=False, ty=True)).sum().backward()
    assert wt.grad.data is buf
    np.testing.assert_allclose(buf, _reference(x, w).T, rtol=1e-12)
    v = gpunet.tensor(R.standard_normal((4, 6)), requires_grad=True)  # the left operand
    vbuf = np.zeros((4, 6))
    v.grad_buffer = vbuf
    gpunet.tanh(v @ x).sum().backward()
    assert v.grad.data is vbuf
    ref = gpunet.tensor(v.numpy(), requires_grad=True)
    gpunet.tanh(ref @ x).sum().backward()
    np.testing.assert_allclose(vbuf, ref.grad.numpy(), rtol=1e-12)


def test_a_weight_used_twice_sums_both_uses_into_the_buffer() -> None:
    x, w, buf = _problem()
    w.grad_buffer = buf
    (_loss(x, w) + (x @ w * 3.0).sum()).backward()
    plain = gpunet.tensor(w.numpy(), requires_grad=True)
    (_loss(x, plain) + (x @ plain * 3.0).sum()).backward()
    assert w.grad.data is buf
    np.testing.assert_allclose(buf, plain.grad.numpy(), rtol=1e-12)


def test_a_grad_set_elsewhere_is_added_to_not_overwritten() -> None:
    x, w, buf = _problem()
    w.grad_buffer = buf
    w.grad = gpunet.ones((5, 3), dtype="float64")
    _loss(x, w).backward()
    assert not np.shares_memory(w.grad.data, buf)
    np.testing.assert_allclose(w.grad.numpy(), _reference(x, w) + 1.0, rtol=1e-12)


@pytest.mark.parametrize("how", ["hook", "create_graph", "grad"])
def test_buffer_left_alone_when_the_gradient_must_stay_a_tensor(how: str) -> None:
    x, w, buf = _problem()
    w.grad_buffer = buf
    if how == "hook":
        w.register_hook(lambda g: g * 2.0)
        _loss(x, w).backward()
        np.testing.assert_allclose(w.grad.numpy(), 2.0 * _reference(x, w), rtol=1e-12)
    elif how == "create_graph":
        _loss(x, w).backward(create_graph=True)
        assert w.grad.requires_grad
    else:
        g = gpunet.grad(lambda w: _loss(x, w))(w)
        np.testing.assert_allclose(g.numpy(), _reference(x, w), rtol=1e-12)
        assert w.grad is None
    assert np.isnan(buf).all()


def test_a_buffer_of_the_wrong_shape_or_dtype_is_refused() -> None:
    w = gpunet.zeros((5, 3), requires_grad=True)
    with pytest.raises(ValueError, match=r"float32 \(5, 3\).*float64 \(5, 3\)"):
        w.grad_buffer = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        w.grad_buffer = np.zeros((3, 5), np.float32)
    assert w.grad_buffer is None


def test_optimizer_gradients_land_in_its_flat_array() -> None:
    model = nn.MLP([5, 8, 3], device="cpu")
    opt = optim.SGD(model.parameters(), lr=0.1)
    x, y = gpunet.tensor(R.standard_normal((4, 5)).astype(np.float32)), gpunet.tensor([0, 1, 2, 1])
    for _ in range(2):  # the second step overwrites the first's gradients after zero_grad
        opt.zero_grad()
        before = {n: p.numpy().copy() for n, p in model.named_parameters()}
        nn.functional.cross_entropy(model(x), y).backward()
        (flat,) = opt._flats
        for p in model.parameters():  # dW's GEMM and db's reduction wrote there in place
            assert np.shares_memory(p.grad.data, flat.grad)
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            np.testing.assert_allclose(p.numpy(), before[n] - 0.1 * grads[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tx", [False, True])
@pytest.mark.parametrize("ty", [False, True])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (1.0, 1.0), (-0.1, 0.99)])
def test_matmul_into_writes_or_adds_in_place(
    dtype: Any, tx: bool, ty: bool, alpha: float, beta: float
) -> None:
    x = R.standard_normal((7, 5) if tx else (5, 7)).astype(dtype)
    y = R.standard_normal((3, 7) if ty else (7, 3)).astype(dtype)
    c = R.standard_normal((5, 3)).astype(dtype)
    expect = beta * c + alpha * ((x.T if tx else x) @ (y.T if ty else y))
    be = gpunet.backend.get_backend("cpu")
    be.matmul_into(c, x, y, tx=tx, ty=ty, alpha=alpha, beta=beta)
    np.testing.assert_allclose(c, expect, rtol=1e-5 if dtype == np.float32 else 1e-12)
