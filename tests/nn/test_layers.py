"""Layers: Linear's analytic gradients, LayerNorm, activations, MLP construction and training."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet
from gpunet import nn
from gpunet.nn import functional as F

F64 = gpunet.float64


def test_linear_is_one_gemm_with_analytic_gradients() -> None:
    rng = np.random.default_rng(0)
    layer = nn.Linear(5, 3, dtype=F64)
    assert layer.weight.shape == (5, 3) and layer.bias.shape == (3,)  # (in, out) layout
    x_np, dy = rng.standard_normal((7, 5)), rng.standard_normal((7, 3))
    x = gpunet.tensor(x_np, requires_grad=True)
    y = layer(x)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    np.testing.assert_allclose(y.numpy(), x_np @ w + b, rtol=1e-12)
    y.backward(gpunet.tensor(dy))
    np.testing.assert_allclose(layer.weight.grad.numpy(), x_np.T @ dy, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dy @ w.T, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), dy.sum(0), rtol=1e-12)


def test_linear_batched_input_and_no_bias() -> None:
    layer = nn.Linear(4, 2, bias=False)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    x = gpunet.randn(3, 5, 4)
    np.testing.assert_allclose(
        layer(x).numpy(), x.numpy() @ layer.weight.numpy(), rtol=1e-5, atol=1e-6
    )


def test_linear_default_init_bounds_match_pytorch() -> None:
    gpunet.manual_seed(1)
    layer = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) and the bias rule agree
    w, b = layer.weight.numpy(), layer.bias.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.abs(b).max() <= bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound


def test_layer_norm_matches_numpy_and_its_gradients_check() -> None:
    rng = np.random.default_rng(2)
    x_np = rng.standard_normal((4, 6)) * 3 + 1
    ln = nn.LayerNorm(6).to(F64)
    mu, var = x_np.mean(-1, keepdims=True), x_np.var(-1, keepdims=True)
    want = (x_np - mu) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(ln(gpunet.tensor(x_np)).numpy(), want, rtol=1e-10, atol=1e-12)
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    gpunet.check_grads(
        lambda x, w, b: F.layer_norm(x, 6, w, b), [x_np, w, b], order=2, modes=("rev",)
    )
    gpunet.check_grads(lambda x: F.layer_norm(x, (2, 3)), [x_np.reshape(4, 2, 3)], order=1)


def test_layer_norm_options() -> None:
    assert list(nn.LayerNorm(3, elementwise_affine=False).parameters()) == []
    assert [n for n, _ in nn.LayerNorm(3, bias=False).named_parameters()] == ["weight"]
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(gpunet.ones(2, 3), 4)


@pytest.mark.parametrize(
    ("module", "reference"),
    [
        (nn.ReLU(), lambda x: np.maximum(x, 0)),
        (nn.LeakyReLU(0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
        (nn.ELU(0.5), lambda x: np.where(x > 0, x, 0.5 * np.expm1(x))),
        (nn.Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
        (nn.Tanh(), np.tanh),
        (nn.Softplus(2.0), lambda x: np.logaddexp(0, 2 * x) / 2),
        (nn.SiLU(), lambda x: x / (1 + np.exp(-x))),
        (nn.GELU(), None),
        (nn.GELU("tanh"), None),
    ],
)
def test_activation_modules(module: nn.Module, reference) -> None:  # type: ignore[no-untyped-def]
    x = np.linspace(-4, 4, 17)
    got = module(gpunet.tensor(x, dtype=F64)).numpy()
    if reference is None:
        from scipy.special import erf

        approximate = getattr(module, "approximate", "none")
        if approximate == "none":
            want = x * (1 + erf(x / math.sqrt(2))) / 2
        else:
            want = x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))) / 2
    else:
        want = reference(x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert list(module.parameters()) == []


def test_every_activation_kernel_has_a_module() -> None:
    from gpunet.primitives.activations import _COMPOSED

    kernels = {name.removesuffix("_tanh") for name in _COMPOSED}
    assert kernels == set(nn.ACTIVATIONS)


def test_mlp_construction() -> None:
    mlp = nn.MLP([4, 16, 8, 3], activation="tanh", dropout=0.1, norm="layernorm")
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == [
        "Linear", "LayerNorm", "Tanh", "Dropout",
        "Linear", "LayerNorm", "Tanh", "Dropout",
        "Linear",
    ]  # fmt: skip
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)] == [
        (4, 16), (16, 8), (8, 3),
    ]  # fmt: skip
    assert [type(m).__name__ for m in nn.MLP([2, 3])] == ["Linear"]
    assert [type(m).__name__ for m in nn.MLP([2, 3, 1], activation=nn.GELU)] == [
        "Linear", "GELU", "Linear",
    ]  # fmt: skip
    assert mlp(gpunet.randn(5, 4)).shape == (5, 3)
    assert isinstance(mlp[0], nn.Linear) and len(mlp) == 9
    with pytest.raises(ValueError, match="activation"):
        nn.MLP([2, 2], activation="swish")
    with pytest.raises(ValueError, match="norm"):
        nn.MLP([2, 2, 2], norm="batchnorm")


def test_two_layer_mlp_learns() -> None:
    """A two-layer MLP built from nn modules fits a small nonlinear problem with plain SGD."""
    gpunet.manual_seed(0)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((128, 2)).astype(np.float32)
    labels = (x_np[:, 0] * x_np[:, 1] > 0).astype(np.int64)  # XOR of the signs
    x, y = gpunet.tensor(x_np), gpunet.tensor(labels)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(300):
        loss = loss_fn(model(x), y)
        model.zero_grad()
        loss.backward()
        with gpunet.no_grad():
            for p in model.parameters():
                p -= p.grad * 0.5
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    accuracy = (model(x).argmax(1).numpy() == labels).mean()
    assert accuracy > 0.9


@pytest.mark.parametrize(
    "act",
    [nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Sigmoid(), nn.Tanh(), nn.Softplus(2.0)],
    ids=lambda m: type(m).__name__,
)
def test_mlp_fuses_linear_and_activation_with_the_same_values_and_gradients(act) -> None:
    gpunet.manual_seed(3)
    mlp = nn.MLP([6, 5, 4, 3], activation=lambda: act, dtype="float64", device="cpu")
    x = gpunet.tensor(np.random.default_rng(0).standard_normal((7, 6)))
    out = mlp(x)
    assert out._node.prim.name == "linear_activation"
    assert out._node.parents[0].prim.name == "linear_activation"
    assert out._node.parents[0].params["activation"] == nn.layers.fusable_activation(act)[0]
    out.sum().backward()
    fused = {n: p.grad.numpy().copy() for n, p in mlp.named_parameters()}
    mlp.zero_grad()
    ref = x
    for m in mlp._modules.values():  # the same layers, applied one by one (unfused)
        ref = m(ref)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14)
    ref.sum().backward()
    for n, p in mlp.named_parameters():
        np.testing.assert_allclose(fused[n], p.grad.numpy(), rtol=1e-10, atol=1e-14, err_msg=n)


def test_activations_that_need_their_input_are_not_fused() -> None:
    assert nn.layers.fusable_activation(nn.GELU()) is None
    assert nn.layers.fusable_activation(nn.SiLU()) is None
    assert nn.layers.fusable_activation(nn.LeakyReLU(-0.5)) is None  # f' needs x's sign
    mlp = nn.MLP([4, 3, 2], activation="gelu", device="cpu")
    hidden = mlp(gpunet.randn(5, 4))._node.parents[0]
    assert hidden.prim.name == "gelu" and hidden.parents[0].prim.name == "linear_activation"
    x, w, b = gpunet.randn(5, 4), gpunet.randn(4, 3), gpunet.randn(3)
    with pytest.raises(ValueError, match=r"cannot fuse activation 'gelu'.*after linear"):
        F.linear_activation(x, w, b, "gelu")
    with pytest.raises(ValueError, match=r"input \(5, 4\) @ weight \(3, 4\)"):
        F.linear_activation(x, gpunet.randn(3, 4), b, "relu")
    with pytest.raises(ValueError, match=r"input \(2, 5, 4\).*need input \(n, in\)"):
        F.linear_activation(gpunet.randn(2, 5, 4), w, b, "relu")


def test_linear_activation_second_order_through_the_fused_card() -> None:
    """create_graph goes through vjp_pre's composed (differentiable) g f'(y)."""
    r = np.random.default_rng(1)
    x = gpunet.tensor(r.standard_normal((4, 3)))
    w = gpunet.tensor(r.standard_normal((3, 2)), requires_grad=True)
    b = gpunet.tensor(r.standard_normal(2), requires_grad=True)
    gpunet.testing.check_grads(
        lambda w, b: F.linear_activation(x, w, b, "tanh").sum(), (w, b), order=2
    )


def test_a_users_sequential_fuses_too_and_leaves_other_inputs_alone() -> None:
    seq = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False), nn.ReLU())
    out = seq(gpunet.randn(5, 4))
    assert out._node.prim.name == "relu"  # no bias: not fused
    assert out._node.parents[0].parents[0].prim.name == "linear_activation"
    assert out._node.parents[0].parents[0].params["activation"] == "tanh"
    x3 = gpunet.randn(2, 5, 4)  # 3-d input: the modules one by one
    assert seq(x3).shape == (2, 5, 2)


@pytest.mark.parametrize("rate", [-0.1, float("nan"), 1.5])
def test_mlp_refuses_a_dropout_rate_outside_0_to_1(rate: float) -> None:
    """-0.1 and NaN built an MLP with no Dropout at all (the rate silently ignored)."""
    with pytest.raises(ValueError, match=r"MLP: dropout must be in \[0, 1\], got"):
        nn.MLP([2, 3, 1], dropout=rate)


def test_a_linear_with_no_inputs_is_made_as_in_pytorch() -> None:
    """Linear(0, 3) raised ZeroDivisionError from kaiming_uniform_ (fan_in 0); PyTorch makes
    it (its init of a zero-element tensor warns and does nothing): x @ W + b is then b."""
    with pytest.warns(UserWarning, match="zero-element"):
        layer = nn.Linear(0, 3)
    np.testing.assert_array_equal(layer(gpunet.zeros(2, 0)).numpy(), np.zeros((2, 3)))
    with pytest.warns(UserWarning, match="zero-element"):
        nn.init.kaiming_normal_(nn.Linear(3, 0).weight, mode="fan_out")


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: nn.Linear(2.5, 3), r"Linear: in_features must be an integer >= 0, got 2\.5"),
        (lambda: nn.Linear(2, -1), r"Linear: out_features must be an integer >= 0, got -1"),
        (lambda: nn.MLP([2, 2.5, 1]), r"MLP: sizes must be integers >= 0, got \[2, 2\.5, 1\]"),
        (lambda: nn.LayerNorm(-3), r"LayerNorm: normalized_shape must be integers >= 0, got -3"),
        (lambda: nn.LayerNorm(2.5), r"LayerNorm: normalized_shape must be integers >= 0"),
    ],
)
def test_layer_sizes_that_are_not_counts_are_refused_naming_the_layer(make, words) -> None:  # type: ignore[no-untyped-def]
    """2.5 was truncated to 2 without a word; -1 raised NumPy's 'negative dimensions are
    not allowed', naming no layer."""
    with pytest.raises((TypeError, ValueError), match=words):
        make()


@pytest.mark.parametrize("activation", [nn.GELU(), gpunet.relu])
def test_mlp_activation_that_makes_no_module_is_named(activation) -> None:  # type: ignore[no-untyped-def]
    """An instance (nn.GELU()) failed with "GELU.forward() missing 1 required positional
    argument", a function (gpunet.relu) with "relu() missing ... 'x'", naming no MLP."""
    with pytest.raises(
        TypeError, match=r"MLP: activation must be a name .* or a callable returning a Module"
    ):
        nn.MLP([2, 3, 1], activation=activation)
