"""JAX-style transforms: grad, value_and_grad, vjp, jvp, hvp, nesting, and the checkers."""

from __future__ import annotations

import numpy as np
import pytest

import gpunet
from gpunet.autodiff import bind
from gpunet.primitives.card import Primitive
from gpunet.testing import GradcheckError


def t64(values) -> gpunet.Tensor:
    return gpunet.tensor(np.asarray(values, dtype=np.float64))


def cubic(x: gpunet.Tensor) -> gpunet.Tensor:
    """f(x) = sum(x^3) + x0 x1; grad = 3x^2 + (x1, x0); Hessian = diag(6x) + [[0,1],[1,0]]."""
    return (x**3).sum() + x[0] * x[1]


def test_grad_matches_the_analytic_gradient() -> None:
    g = gpunet.grad(cubic)(t64([1.0, 2.0]))
    np.testing.assert_allclose(g.numpy(), [3.0 + 2.0, 12.0 + 1.0])
    assert not g.requires_grad


def test_grad_of_a_plain_array_and_argnums() -> None:
    f = lambda a, b: (a * b.exp()).sum()
    ga, gb = gpunet.grad(f, argnums=(0, 1))(np.array([1.0, 2.0]), t64([0.0, 1.0]))
    np.testing.assert_allclose(ga.numpy(), [1.0, np.e])
    np.testing.assert_allclose(gb.numpy(), [1.0, 2 * np.e])
    gb_only = gpunet.grad(f, argnums=1)(t64([1.0, 2.0]), t64([0.0, 1.0]))
    np.testing.assert_allclose(gb_only.numpy(), [1.0, 2 * np.e])


def test_value_and_grad_with_aux() -> None:
    def f(x: gpunet.Tensor) -> tuple[gpunet.Tensor, str]:
        return (x * x).sum(), "aux"

    (value, aux), g = gpunet.value_and_grad(f, has_aux=True)(t64([3.0]))
    assert value.item() == 9.0 and aux == "aux"
    assert g.item() == 6.0
    g2, aux2 = gpunet.grad(f, has_aux=True)(t64([3.0]))
    assert g2.item() == 6.0 and aux2 == "aux"


def test_grad_needs_a_scalar_and_a_float_input() -> None:
    with pytest.raises(TypeError, match="scalar"):
        gpunet.grad(lambda x: x * 2.0)(t64([1.0, 2.0]))
    with pytest.raises(TypeError, match="floating"):
        gpunet.grad(lambda x: x.sum())(gpunet.tensor([1, 2]))


def test_grad_leaves_existing_grads_alone() -> None:
    x = gpunet.tensor(np.array([1.0, 2.0]), requires_grad=True)
    gpunet.grad(lambda t: (t * t).sum())(x)
    assert x.grad is None


def test_vjp_is_reusable_and_matches_the_jacobian() -> None:
    x = t64([0.3, -0.7, 1.1])
    _, pullback = gpunet.vjp(lambda t: t.tanh() * 2.0, x)
    jac = np.diag(2 * (1 - np.tanh(x.numpy()) ** 2))
    for u in (np.array([1.0, 0, 0]), np.array([0.5, -1.0, 2.0])):
        (g,) = pullback(t64(u))
        np.testing.assert_allclose(g.numpy(), u @ jac)


def test_jvp_matches_the_jacobian() -> None:
    x, v = t64([0.3, -0.7]), t64([1.0, 2.0])
    out, tangent = gpunet.jvp(lambda t: t.sigmoid() * t, [x], [v])
    s = 1 / (1 + np.exp(-x.numpy()))
    np.testing.assert_allclose(out.numpy(), s * x.numpy())
    np.testing.assert_allclose(tangent.numpy(), (s * (1 - s) * x.numpy() + s) * v.numpy())


def test_jvp_of_a_function_that_ignores_its_input_is_zero() -> None:
    _, tangent = gpunet.jvp(
        lambda t: gpunet.ones(2, dtype=gpunet.float64), [t64([1.0, 2.0])], [t64([1.0, 1.0])]
    )
    np.testing.assert_array_equal(tangent.numpy(), [0.0, 0.0])


def test_jvp_rejects_mismatched_tangents() -> None:
    with pytest.raises(ValueError, match="tangent 0 has shape"):
        gpunet.jvp(lambda t: t, [t64([1.0, 2.0])], [t64([1.0])])


def test_a_tangent_tensor_of_another_dtype_is_refused_not_cast() -> None:
    """As JAX: a float64 tangent to a float32 primal would lose its digits in a silent cast;
    a list or NumPy tangent still takes its primal's dtype."""
    x32 = gpunet.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="tangent 0 is float64, its primal float32"):
        gpunet.jvp(lambda t: t * t, [x32], [t64([1.0, 0.5])])
    with pytest.raises(TypeError, match="tangent 0 is float32, its primal float64"):
        gpunet.hvp(lambda t: (t * t * t).sum(), [t64([1.0, 2.0])], [x32])
    _, tangent = gpunet.jvp(lambda t: t * t, [x32], [[1.0, 0.5]])
    assert tangent.dtype == gpunet.float32
    np.testing.assert_array_equal(tangent.numpy(), np.float32([2.0, 2.0]))


def test_hvp_matches_the_hessian() -> None:
    x, v = t64([1.0, 2.0]), t64([0.5, -1.0])
    hessian = np.diag(6 * x.numpy()) + np.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(gpunet.hvp(cubic, [x], [v]).numpy(), hessian @ v.numpy())
    assert gpunet.hessian_vector_product is gpunet.hvp


def test_nested_transforms_agree() -> None:
    f = lambda t: (t.sin() if hasattr(t, "sin") else t.tanh()).sum()
    x = t64([0.4])
    d1 = gpunet.grad(f)
    d2 = gpunet.grad(lambda t: d1(t).sum())
    d3 = gpunet.grad(lambda t: d2(t).sum())
    th = np.tanh(0.4)
    np.testing.assert_allclose(d1(x).numpy(), [1 - th**2])
    np.testing.assert_allclose(d2(x).numpy(), [-2 * th * (1 - th**2)])
    np.testing.assert_allclose(d3(x).numpy(), [(1 - th**2) * (6 * th**2 - 2)], rtol=1e-12)
    # forward over reverse and reverse over forward give the same second derivative
    _, fwd_rev = gpunet.jvp(d1, [x], [t64([1.0])])
    rev_fwd = gpunet.grad(lambda t: gpunet.jvp(f, [t], [t64([1.0])])[1])(x)
    np.testing.assert_allclose(fwd_rev.numpy(), rev_fwd.numpy(), rtol=1e-14)


def test_jvp_nested_in_jvp() -> None:
    f = lambda t: (t**4).sum()
    x = t64([2.0])
    _, second = gpunet.jvp(lambda a: gpunet.jvp(f, [a], [t64([1.0])])[1], [x], [t64([1.0])])
    assert second.item() == pytest.approx(12 * 2.0**2)


def test_grad_through_a_captured_parameter_is_recorded() -> None:
    w = gpunet.tensor(np.array([2.0]), requires_grad=True)
    g = gpunet.grad(lambda x: (w * x * x).sum())(t64([3.0]))  # 2 w x, depends on w
    assert g.requires_grad
    g.sum().backward()
    assert w.grad.item() == pytest.approx(6.0)


def test_check_grads_on_an_mlp_loss() -> None:
    r = np.random.default_rng(0)
    X = t64(r.standard_normal((5, 4)))
    labels = gpunet.tensor(np.array([0, 2, 1, 2, 0]))

    def loss(w1: gpunet.Tensor, b1: gpunet.Tensor, w2: gpunet.Tensor) -> gpunet.Tensor:
        h = (X @ w1 + b1).tanh()
        logp = (h @ w2).log_softmax(-1)
        return -logp[gpunet.arange(5), labels].mean()

    args = [r.standard_normal((4, 6)), r.standard_normal(6), r.standard_normal((6, 3))]
    gpunet.check_grads(loss, args, order=2)


def _wrong_exp() -> Primitive:
    """exp's forward with a deliberately wrong derivative (2 exp(x))."""
    return Primitive(
        "exp", "bogus", vjp=(lambda g, x: g * x.exp() * 2.0,), jvp=(lambda t, y, x: t * y * 2.0,)
    )


def test_check_grads_catches_a_wrong_rule() -> None:
    bogus = _wrong_exp()
    f = lambda x: bind(bogus, x)
    with pytest.raises(GradcheckError, match="reverse mode"):
        gpunet.check_grads(f, [t64([0.1, 0.2])], modes=("rev",))
    with pytest.raises(GradcheckError, match="forward mode"):
        gpunet.check_grads(f, [t64([0.1, 0.2])], modes=("fwd",))


def test_gradcheck_passes_and_fails() -> None:
    assert gpunet.gradcheck(lambda a, b: (a * b).tanh(), [t64([0.1, 0.5]), t64([1.0, -2.0])])
    bogus = _wrong_exp()
    assert not gpunet.gradcheck(lambda x: bind(bogus, x), [t64([0.1])], raise_exception=False)
    with pytest.raises(GradcheckError):
        gpunet.gradcheck(lambda x: bind(bogus, x), [t64([0.1])])
