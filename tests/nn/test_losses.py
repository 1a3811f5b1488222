"""Losses against stable NumPy formulas in float64, at large logits too, and their gradients."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax as np_log_softmax

import gpunet
from gpunet import nn
from gpunet.nn import functional as F

REDUCE = {"mean": np.mean, "sum": np.sum, "none": lambda a: a}


def t64(a: np.ndarray) -> gpunet.Tensor:
    return gpunet.tensor(np.asarray(a, dtype=np.float64))


def np_bce_logits(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def np_bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log1p(-p), -100))


def np_cross_entropy(z: np.ndarray, labels: np.ndarray, eps: float = 0.0) -> np.ndarray:
    logp = np_log_softmax(z, axis=1)
    nll = -logp[np.arange(len(labels)), labels]
    return (1 - eps) * nll - eps * logp.mean(1)


LOGITS = np.array([[-1e4, 0.0, 1e4], [3.0, -2.0, 0.5], [1e4, 1e4 - 1, -1e4], [0.1, 0.2, 0.3]])
LABELS = np.array([0, 2, 1, 1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy(reduction: str, eps: float) -> None:
    got = F.cross_entropy(t64(LOGITS), LABELS, reduction, label_smoothing=eps).numpy()
    want = REDUCE[reduction](np_cross_entropy(LOGITS, LABELS, eps))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    module = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=eps)
    np.testing.assert_allclose(module(t64(LOGITS), LABELS).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_large_logits(reduction: str) -> None:
    z = np.array([-1e4, -30.0, -1.0, 0.0, 0.5, 30.0, 1e4])
    y = np.array([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0])
    got = F.binary_cross_entropy_with_logits(t64(z), t64(y), reduction=reduction).numpy()
    assert np.all(np.isfinite(got))
    want = REDUCE[reduction](np_bce_logits(z, y))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    zt = gpunet.tensor(z, requires_grad=True)
    nn.BCEWithLogitsLoss(reduction="sum")(zt, t64(y)).backward()
    sig = np.exp(-np.logaddexp(0, -z))
    np.testing.assert_allclose(zt.grad.numpy(), sig - y, atol=1e-15)


def test_bce_with_logits_weights() -> None:
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal(6) * 3, (rng.random(6) > 0.5).astype(np.float64)
    w, pw = rng.random(6), np.array(3.0)
    sig = 1 / (1 + np.exp(-z))
    want = -w * (pw * y * np.log(sig) + (1 - y) * np.log(1 - sig))
    got = F.binary_cross_entropy_with_logits(
        t64(z), t64(y), weight=t64(w), pos_weight=t64(pw), reduction="none"
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_clamps_log_like_pytorch(reduction: str) -> None:
    p = np.array([0.0, 1e-50, 0.3, 0.5, 1.0, 1.0, 0.0])
    y = np.array([1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0])
    got = F.binary_cross_entropy(t64(p), t64(y), reduction=reduction).numpy()
    want = REDUCE[reduction](np_bce(p, y))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.isfinite(got))
    pt = gpunet.tensor(p, requires_grad=True)
    nn.BCELoss(reduction="sum")(pt, t64(y)).backward()
    assert np.all(np.isfinite(pt.grad.numpy()))  # no 0 / 0 where p is 0 or 1
    inner = slice(2, 4)
    want = (p[inner] - y[inner]) / (p[inner] * (1 - p[inner]))
    np.testing.assert_allclose(pt.grad.numpy()[inner], want, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse(reduction: str) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    want = REDUCE[reduction]((a - b) ** 2)
    np.testing.assert_allclose(F.mse_loss(t64(a), t64(b), reduction).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(nn.MSELoss(reduction)(t64(a), t64(b)).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        F.mse_loss(t64(a), t64(b[:2]))
    with pytest.raises(ValueError, match="reduction"):
        F.mse_loss(t64(a), t64(b), "avg")


def test_loss_gradients_check_to_second_order() -> None:
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 3))
    y01 = (rng.random((4, 3)) > 0.5).astype(np.float64)
    p = rng.uniform(0.1, 0.9, (4, 3))
    target = rng.standard_normal((4, 3))
    labels = gpunet.tensor(np.array([0, 2, 1, 1]))
    gpunet.check_grads(lambda a: F.mse_loss(a, t64(target)), [z], order=2)
    gpunet.check_grads(lambda a: F.binary_cross_entropy_with_logits(a, t64(y01)), [z], order=2)
    gpunet.check_grads(lambda a: F.binary_cross_entropy(a, t64(y01)), [p], order=2)
    gpunet.check_grads(
        lambda a: F.cross_entropy(a, labels, label_smoothing=0.2), [z], order=2, modes=("rev",)
    )
    gpunet.check_grads(lambda a: F.cross_entropy(a, labels, reduction="none"), [z], order=1)


def test_loss_module_repr() -> None:
    assert repr(nn.MSELoss()) == "MSELoss()"
    assert repr(nn.CrossEntropyLoss(reduction="sum")) == "CrossEntropyLoss(reduction='sum')"
    with pytest.raises(ValueError, match="reduction"):
        nn.BCELoss(reduction="avg")


def test_float32_losses_and_gradients_stay_finite_at_extreme_logits() -> None:
    z = gpunet.tensor([[-1e4, 0.0, 1e4], [1e4, -1e4, 5.0]], requires_grad=True)
    y = gpunet.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    labels = gpunet.tensor([0, 1])
    loss = (
        F.cross_entropy(z, labels, label_smoothing=0.1)
        + F.binary_cross_entropy_with_logits(z, y)
        + F.binary_cross_entropy(gpunet.sigmoid(z), y)
    )
    loss.backward()
    assert z.dtype == np.float32 and np.isfinite(loss.item())
    assert np.all(np.isfinite(z.grad.numpy()))
    want = np_cross_entropy(z.numpy().astype(np.float64), labels.numpy(), 0.1).mean()
    got = F.cross_entropy(z, labels, label_smoothing=0.1).item()
    assert got == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------- bad labels and ranges
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 2, 1, -1], "label -1 at index 3 is not a class: the logits have 3 classes"),
        ([0, 3, 1, 1], "label 3 at index 1 is not a class: the logits have 3 classes"),
        ([7, 0, -2, 1], "label 7 at index 0 is not a class"),  # the first bad one is named
        ([0, -100, 1, 1], "gpunet has no ignore_index: drop the rows labelled -100"),
    ],
)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_refuses_labels_outside_the_classes(
    labels: list[int], message: str, eps: float
) -> None:
    """Before: -1 was silently the last class on the CPU and 3 a bare NumPy IndexError.
    Refused before anything runs: no graph, no gradient."""
    from gpunet.backend.faults import LabelError

    z = gpunet.tensor(LOGITS, requires_grad=True)
    for loss in (
        lambda: F.cross_entropy(z, labels, label_smoothing=eps),
        lambda: nn.CrossEntropyLoss(label_smoothing=eps)(z, gpunet.tensor(labels)),
        lambda: F.cross_entropy(z, np.array(labels, np.int32), reduction="none"),
    ):
        with pytest.raises(LabelError, match=message) as e:
            loss()
        assert isinstance(e.value, IndexError) and isinstance(e.value, ValueError)
        assert str(e.value).startswith("cross_entropy: label ")
    assert z.grad is None


def test_cross_entropy_accepts_every_class_and_unsigned_labels() -> None:
    z = t64(LOGITS)
    got = F.cross_entropy(z, np.array([0, 2, 1, 2], np.uint8), reduction="none").numpy()
    np.testing.assert_allclose(got, np_cross_entropy(LOGITS, np.array([0, 2, 1, 2])), rtol=1e-12)
    assert F.cross_entropy(t64(np.zeros((0, 3))), np.zeros(0, np.int64), reduction="sum") == 0.0


@pytest.mark.parametrize("indices", [[-4], [3], [0, 1, -7]])
def test_indexing_refuses_indices_outside_the_axis(indices: list[int]) -> None:
    """x[-4] on 3 elements used to wrap twice (to x[2]); NumPy's range is [-n, n)."""
    x = gpunet.tensor([1.0, 2.0, 3.0])
    with pytest.raises(
        IndexError,
        match=r"gpunet.take: index -?\d+ at position \d+ is out of range for an axis of size "
        r"3: indices must be in \[-3, 3\)",
    ):
        x[np.array(indices)]
    np.testing.assert_array_equal(x[np.array([-3, -1, 2])].numpy(), [1.0, 3.0, 3.0])


@pytest.mark.parametrize(
    ("p", "y", "message"),
    [
        (
            [0.2, 1.5],
            [0.0, 1.0],
            r"input\[1\] = 1.5",
        ),
        ([[0.2, 0.3], [-0.1, 0.5]], [[0, 1], [1, 1]], r"input\[1, 0\] = -0.1 \(shape \(2, 2\)\)"),
        ([0.2, np.nan], [0.0, 1.0], r"input\[1\] = nan"),
        (
            [0.2, 0.7],
            [0.0, 2.0],
            r"between 0 and 1, but target\[1\] = 2",
        ),
        ([0.2, 0.7], [-1.0, 1.0], r"target\[0\] = -1"),
    ],
)
def test_bce_refuses_values_outside_zero_one_like_pytorch(p: list, y: list, message: str) -> None:
    """Before: an input above 1 gave a negative loss. BCEWithLogits takes any logits."""
    for loss in (lambda: F.binary_cross_entropy(t64(p), t64(y)), lambda: nn.BCELoss()(t64(p), y)):
        with pytest.raises(ValueError, match="^binary_cross_entropy: all elements.*" + message):
            loss()
    if np.isfinite(p).all() and np.logical_and(np.asarray(y) >= 0, np.asarray(y) <= 1).all():
        assert np.isfinite(F.binary_cross_entropy_with_logits(t64(p), t64(y)).item())


def test_bce_takes_the_ends_of_the_interval() -> None:
    p, y = np.array([0.0, 1.0, 0.5, 1.0]), np.array([0.0, 1.0, 0.25, 0.0])
    got = F.binary_cross_entropy(t64(p), t64(y), reduction="none").numpy()
    np.testing.assert_allclose(got, np_bce(p, y), rtol=1e-12)


@pytest.mark.gpu
def test_cross_entropy_on_a_gpu_raises_a_bad_label_at_the_next_host_read() -> None:
    """The kernel records the label; .item() raises the CPU's error, naming the device."""
    from gpunet.backend.faults import LabelError

    z = gpunet.tensor(LOGITS, dtype=gpunet.float32, device="cuda")
    y = gpunet.tensor([0, 2, 5, 1], device="cuda")
    loss = F.cross_entropy(z, y)
    with pytest.raises(LabelError, match=r"label 5 at index 2 .* found on cuda:0"):
        loss.item()
    assert np.isfinite(F.cross_entropy(z, gpunet.tensor([0, 2, 1, 1], device="cuda")).item())


@pytest.mark.gpu
def test_indexing_on_a_gpu_raises_an_index_out_of_range_at_the_next_host_read() -> None:
    x = gpunet.tensor([1.0, 2.0, 3.0], device="cuda")
    picked = x[gpunet.tensor([0, -5], device="cuda")]  # CuPy alone would wrap -5 to 1
    with pytest.raises(IndexError, match=r"gpunet.take: index -5 at position 1 .*cuda:0"):
        picked.numpy()
    np.testing.assert_array_equal(x[gpunet.tensor([-1, 0], device="cuda")].numpy(), [3.0, 1.0])


def test_bce_weights_are_buffers_as_in_pytorch() -> None:
    """weight and pos_weight were plain attributes: .to() left them behind (a loss moved to
    the GPU kept CPU weights, or stayed float32 under .to(float64)) and state_dict lacked them."""
    loss = nn.BCEWithLogitsLoss(weight=gpunet.ones(2), pos_weight=gpunet.full((2,), 3.0))
    assert list(loss.state_dict()) == ["weight", "pos_weight"]
    loss.to(gpunet.float64)
    assert loss.weight.dtype == loss.pos_weight.dtype == gpunet.float64
    z = gpunet.zeros(4, 2, dtype=gpunet.float64)
    assert loss(z, gpunet.ones(4, 2, dtype=gpunet.float64)).dtype == gpunet.float64
    bce = nn.BCELoss(weight=gpunet.ones(2))
    assert list(bce.state_dict()) == ["weight"] and list(nn.BCELoss().state_dict()) == []
