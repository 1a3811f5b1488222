"""The registry-driven suite: every primitive card is checked the moment it exists, from its
spec in ``specs.py`` (what is checked is listed there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from primitives.specs import SPECS, rng, uniform

import gpunet
from gpunet import primitives as P
from gpunet.autodiff import SAVED_OUTPUT
from gpunet.primitives.card import LINEAR, NONDIFF


# ---------------------------------------------------------------------- the checks
def test_every_primitive_has_a_spec_and_rules() -> None:
    missing = sorted(set(P.REGISTRY) - set(SPECS))
    assert not missing, f"primitives without a test spec: {missing}"
    for name, prim in P.REGISTRY.items():
        assert prim.doc, name
        if not prim.differentiable:
            assert prim.vjp is None and prim.jvp is None, name
            continue
        assert prim.jvp is LINEAR or prim.jvp is not None, f"{name} has no JVP rule"
        if prim.variadic:
            assert callable(prim.vjp), f"{name} has no VJP rule"
            continue
        assert prim.vjp is not None, f"{name} has no VJP rule"
        for i, rule in enumerate(prim.vjp):
            if i in prim.nondiff:
                assert rule is NONDIFF, f"{name}: input {i} is nondiff but has a rule"
            else:
                assert callable(rule), f"{name}: input {i} has no VJP rule"
        if prim.jvp is not LINEAR:
            assert len(prim.jvp) == len(prim.vjp), f"{name}: JVP and VJP rules differ in arity"


def _tensors(arrays: list[np.ndarray]) -> list[gpunet.Tensor]:
    return [gpunet.tensor(a) for a in arrays]


def _unchanged(before: list[np.ndarray], tensors: list[gpunet.Tensor]) -> None:
    for b, t in zip(before, tensors):
        np.testing.assert_array_equal(b, t.numpy(), err_msg="an input was mutated")


@pytest.mark.parametrize("name", sorted(P.REGISTRY))
@given(data=st.data())
def test_primitive(name: str, data: st.DataObject) -> None:
    case = SPECS[name](data.draw)
    xs = _tensors(case.args)
    before = [a.copy() for a in case.args]

    out = case.fn(*xs)
    expected = np.asarray(case.ref(*case.args))
    assert out.shape == expected.shape, (out.shape, expected.shape)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    _unchanged(before, xs)
    prim = P.REGISTRY[name]
    if not prim.differentiable or out.dtype.kind != "f":
        with gpunet.enable_grad():
            leaf = [x.detach().requires_grad_() for x in xs]
            assert not case.fn(*leaf).requires_grad, f"{name} must not carry gradients"
        return

    # derivatives against finite differences, to second order, both modes
    gpunet.check_grads(case.fn, xs, order=2, modes=("rev", "fwd"))
    _unchanged(before, xs)

    # the dot-product test: <u, J v> == <J^T u, v> to rounding
    r = np.random.default_rng(0)
    vs = [gpunet.tensor(r.standard_normal(a.shape)) for a in case.args]
    u_arr = r.standard_normal(out.shape)
    u = gpunet.tensor(u_arr)
    _, jv = gpunet.jvp(case.fn, xs, vs)
    _, pullback = gpunet.vjp(case.fn, *xs)
    jtu = pullback(u)
    lhs = float(np.vdot(u_arr, jv.numpy()))
    rhs = float(sum(np.vdot(g.numpy(), v.numpy()) for g, v in zip(jtu, vs)))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
    np.testing.assert_array_equal(u.numpy(), u_arr, err_msg="the upstream gradient was mutated")
    _unchanged(before, xs)


@pytest.mark.parametrize("name", sorted(n for n, p in P.REGISTRY.items() if p.save is not None))
@given(data=st.data())
def test_a_node_never_holds_its_own_output(name: str, data: st.DataObject) -> None:
    """A card that saves its output saves it last, where the tape keeps a bare array in its
    place: node -> output -> node would be a cycle (freed only by the garbage collector)."""
    case = SPECS[name](data.draw)
    out = case.fn(*[x.requires_grad_() for x in _tensors(case.args)])
    if out._node is not None:
        assert not any(s is out for s in out._node.saved), name


def test_cast_to_float32_and_back() -> None:
    x = gpunet.tensor(np.array([1.5, -2.25]), requires_grad=True)
    y = x.to(gpunet.float32)
    assert y.dtype == np.float32 and y.requires_grad
    (y * 3.0).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])
    assert not x.to(gpunet.int64).requires_grad


def _recorded(name: str, data: st.DataObject) -> tuple[list, Any, gpunet.Tensor, tuple]:
    """A random case of primitive ``name`` recorded: (inputs, its node, an upstream
    gradient, the values its rules take)."""
    case = SPECS[name](data.draw)
    xs = [x.requires_grad_() for x in _tensors(case.args)]
    out = case.fn(*xs)
    g = gpunet.tensor(uniform(rng(data.draw), out.shape, -1, 1))
    return xs, out._node, g, tuple(out if s is SAVED_OUTPUT else s for s in out._node.saved)


@pytest.mark.parametrize("name", sorted(n for n, p in P.REGISTRY.items() if p.vjp_into))
@given(data=st.data())
def test_vjp_into_writes_what_the_vjp_returns(name: str, data: st.DataObject) -> None:
    """Each in-place VJP rule (gradient buffers, SGD in backward) equals its returning rule:
    out <- alpha rule + beta out, overwriting (beta = 0), adding, and scaling both."""
    prim = P.REGISTRY[name]
    _, node, g, saved = _recorded(name, data)
    for i, into in enumerate(prim.vjp_into):
        if into is None:
            continue
        expect = prim.vjp[i](g, *saved, **node.params).numpy()
        buf = np.full(expect.shape, np.nan)
        into(buf, 1.0, 0.0, g, *saved, **node.params)
        np.testing.assert_allclose(buf, expect, rtol=1e-12, atol=1e-12)
        into(buf, 1.0, 1.0, g, *saved, **node.params)
        np.testing.assert_allclose(buf, 2 * expect, rtol=1e-12, atol=1e-12)
        into(buf, -0.5, 2.0, g, *saved, **node.params)  # an SGD-like step: 4e - 0.5e
        np.testing.assert_allclose(buf, 3.5 * expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(n for n, p in P.REGISTRY.items() if p.vjp_into_independent))
@given(data=st.data())
def test_independent_into_rules_may_all_step_their_inputs(name: str, data: st.DataObject) -> None:
    """A card whose in-place rules read no input that has one (``vjp_into_independent``):
    stepping each such input in place, one after another, as SGD in backward does
    (x <- x - 0.5 dx), gives what stepping copies from the unchanged values gives."""
    prim = P.REGISTRY[name]
    xs, node, g, saved = _recorded(name, data)
    rules = [(i, rule) for i, rule in enumerate(prim.vjp_into) if rule is not None]
    assert len(rules) > 1
    expect = {
        i: xs[i].numpy().copy() - 0.5 * prim.vjp[i](g, *saved, **node.params).numpy()
        for i, _ in rules
    }
    for i, rule in rules:
        rule(xs[i].data, -0.5, 1.0, g, *saved, **node.params)  # the input's own array
    for i, _ in rules:
        np.testing.assert_allclose(xs[i].numpy(), expect[i], rtol=1e-12, atol=1e-12)
