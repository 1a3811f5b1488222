"""The backends' fused ops (gpunet/backend/fused.py, numpy_fused.py): the generic formulas on
array-api-strict match NumPy's in-place ones; NumPy's never write their inputs; the optimizer
updates follow torch.optim step for step; the gradient norm sums in float64.
(The CUDA kernels are held to the NumPy backend in test_kernels.py.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet.backend.fused import ACTIVATIONS, FROM_OUTPUT
from gpunet.backend.generic import ArrayBackend
from gpunet.backend.numpy_backend import NumpyBackend
from gpunet.backend.numpy_fused import CHUNK
from gpunet.backend.updates import AdamHyper, SGDHyper

xps = pytest.importorskip("array_api_strict")
NP = NumpyBackend(None)
STRICT = ArrayBackend(xps, gpunet.Device("cpu"), xps._array_object.Array)
ALPHAS = {"leaky_relu": (0.1, 1.5, -0.2), "elu": (1.0, 0.5, 1.3), "softplus": (0.7, 2.0)}
CASES = [(name, a) for name in ACTIVATIONS for a in ALPHAS.get(name, (0.0,))]


def host(a: Any) -> np.ndarray:
    return np.asarray(np.from_dlpack(a)) if not isinstance(a, np.ndarray) else a


def values(n: int = 200, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    x = r.choice([-1.0, 1.0], n) * r.uniform(0.0, 30.0, n)
    x[:4] = [0.0, -0.0, 1e-3, -1e-3]
    return x


@pytest.mark.parametrize("backend", [NP, STRICT], ids=["numpy", "generic"])
def test_each_backend_has_a_formula_table_of_every_activation(backend: Any) -> None:
    """Each backend class lists its formulas per activation, f' from y exactly where the
    kernels have it; an unknown name or a missing f' from y is a clear error."""
    table = type(backend).FORMULAS
    assert list(table) == list(ACTIVATIONS)
    assert {name for name, f in table.items() if f.dfy is not None} == FROM_OUTPUT
    owner = "NumpyFusedOps." if backend is NP else "FusedOps."  # NumPy's own, in place
    for formulas in table.values():
        for f in (formulas.f, formulas.df, formulas.dfy):
            assert f is None or f.__qualname__.startswith(owner), f
    x = backend.asarray(np.ones(3))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        backend.activation(x, name="swish")
    with pytest.raises(ValueError, match="silu has no derivative in terms of its output"):
        backend.activation_backward(x, x, name="silu", from_output=True)


@pytest.mark.parametrize(("name", "a"), CASES)
def test_generic_formulas_match_numpy(name: str, a: float) -> None:
    x, g = values(), values(seed=1)
    y = NP.activation(x, name=name, alpha=a)
    np.testing.assert_allclose(
        host(STRICT.activation(STRICT.asarray(x), name=name, alpha=a)), y, rtol=1e-13, atol=1e-300
    )
    kinds = [False, True] if name in FROM_OUTPUT else [False]
    for from_output in kinds:
        saved = y if from_output else x
        want = NP.activation_backward(g, saved, name=name, alpha=a, from_output=from_output)
        got = STRICT.activation_backward(
            STRICT.asarray(g), STRICT.asarray(saved), name=name, alpha=a, from_output=from_output
        )
        np.testing.assert_allclose(host(got), want, rtol=1e-13, atol=1e-300)
    X, b = values(60).reshape(6, 10), values(10, seed=2)
    want_y, want_pre = NP.bias_activation(X, b, name=name, alpha=a, keep_preactivation=True)
    got_y, got_pre = STRICT.bias_activation(
        STRICT.asarray(X), STRICT.asarray(b), name=name, alpha=a, keep_preactivation=True
    )
    np.testing.assert_allclose(host(got_y), want_y, rtol=1e-13, atol=1e-300)
    np.testing.assert_array_equal(host(got_pre), want_pre)
    assert NP.bias_activation(X, b, name=name, alpha=a)[1] is None


@pytest.mark.parametrize("n", [200, 70001])  # 70001: in chunks (numpy_fused.CHUNK)
@pytest.mark.parametrize(("name", "a"), CASES)
def test_numpy_never_writes_its_inputs_and_backward_may_write_into_g(
    name: str, a: float, n: int
) -> None:
    x, g = values(n).astype(np.float32), values(n, seed=3).astype(np.float32)
    x0, g0 = x.copy(), g.copy()
    NP.activation(x, name=name, alpha=a)
    dx = NP.activation_backward(g, x, name=name, alpha=a)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(g, g0)
    assert dx is not g and dx.dtype == np.float32
    same = NP.activation_backward(g, x, name=name, alpha=a, out=g)
    assert same is g
    np.testing.assert_array_equal(g, dx)
    scalar = NP.activation_backward(
        np.float32(2.0) * np.ones((), np.float32), np.ones((), np.float32), name=name, alpha=a
    )
    assert isinstance(scalar, np.ndarray) and scalar.shape == ()


def test_erf_generic_matches_scipy() -> None:
    x = np.concatenate([np.linspace(-7, 7, 301), [-30.0, 0.0, 27.0, np.inf, -np.inf]])
    np.testing.assert_allclose(host(STRICT.erf(STRICT.asarray(x))), NP.erf(x), rtol=2e-14)
    u = np.linspace(-5, 26, 311)
    import scipy.special

    np.testing.assert_allclose(
        host(STRICT._erfc(STRICT.asarray(u))), scipy.special.erfc(u), rtol=5e-14, atol=1e-300
    )


# ---------------------------------------------------------------------- optimizer updates
SGD = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
]
ADAM = [
    ({"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}, False),
    ({"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}, False),
    ({"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}, True),
]


# Around numpy_fused's chunking: one piece (above and below CHUNK: the 64-256-128-10 MLP of
# `gpunet train` has 50,826 parameters) and CHUNK-sized pieces with a tail.
UPDATE_SIZES = [257, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK + 3]


def _problem(n: int = 257, steps: int = 20) -> tuple[np.ndarray, list[np.ndarray]]:
    r = np.random.default_rng(11)
    return r.standard_normal(n).astype(np.float32), [
        r.standard_normal(n).astype(np.float32) for _ in range(steps)
    ]


def _ours_sgd(
    backend: Any, cfg: dict, p0: np.ndarray, grads: list, counted: bool = False
) -> np.ndarray:
    """SGD's steps, the first one said by ``first_step`` or (``counted``) by a step count."""
    p, buf = backend.asarray(p0.copy()), backend.asarray(np.zeros_like(p0))
    count = backend.asarray(np.zeros(1, np.int64)) if counted else None
    for i, g in enumerate(grads):
        momentum_buf = buf if cfg.get("momentum") else None
        first = i == 0 and not counted
        backend.sgd_update(
            p, backend.asarray(g), momentum_buf, SGDHyper(**cfg), first_step=first, step=count
        )
    return host(p)


def _ours_adam(backend: Any, cfg: dict, decoupled: bool, p0: np.ndarray, grads: list) -> Any:
    p, m, v = (backend.asarray(a) for a in (p0.copy(), np.zeros_like(p0), np.zeros_like(p0)))
    kw = {k: val for k, val in cfg.items() if k != "betas"}
    hyper = AdamHyper(beta1=cfg["betas"][0], beta2=cfg["betas"][1], decoupled=decoupled, **kw)
    count = backend.asarray(np.zeros(1, np.int64))  # (each update advances it)
    for g in grads:
        backend.adam_update(p, backend.asarray(g), m, v, hyper, step=count)
    assert int(host(count)[0]) == len(grads)
    return host(p)


@pytest.mark.parametrize("n", UPDATE_SIZES)
@pytest.mark.parametrize("cfg", SGD)
def test_sgd_on_strict_matches_numpy(cfg: dict, n: int) -> None:
    """Bit for bit, and a first step said by a step count is the one said by first_step."""
    p0, grads = _problem(n, steps=3)
    want = _ours_sgd(NP, cfg, p0, grads)
    np.testing.assert_array_equal(_ours_sgd(STRICT, cfg, p0, grads), want)
    for backend in (NP, STRICT):
        np.testing.assert_array_equal(_ours_sgd(backend, cfg, p0, grads, counted=True), want)


@pytest.mark.parametrize("n", UPDATE_SIZES)
@pytest.mark.parametrize(("cfg", "decoupled"), ADAM)
def test_adam_on_strict_matches_numpy(cfg: dict, decoupled: bool, n: int) -> None:
    p0, grads = _problem(n, steps=3)
    np.testing.assert_array_equal(
        _ours_adam(STRICT, cfg, decoupled, p0, grads), _ours_adam(NP, cfg, decoupled, p0, grads)
    )


@pytest.mark.parametrize("cfg", SGD)
def test_sgd_follows_torch(cfg: dict) -> None:
    torch = pytest.importorskip("torch")
    p0, grads = _problem()
    p = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.SGD([p], foreach=False, **cfg)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(
        _ours_sgd(NP, cfg, p0, grads), p.detach().numpy(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(("cfg", "decoupled"), ADAM)
def test_adam_follows_torch(cfg: dict, decoupled: bool) -> None:
    torch = pytest.importorskip("torch")
    p0, grads = _problem()
    p = torch.tensor(p0.copy(), requires_grad=True)
    make = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = make([p], foreach=False, **({"weight_decay": 0.0} | cfg))
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(
        _ours_adam(NP, cfg, decoupled, p0, grads), p.detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_update_arguments_are_checked() -> None:
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="momentum needs a momentum buffer"):
        NP.sgd_update(p, p.copy(), None, SGDHyper(lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="must match the parameter"):
        NP.sgd_update(p, np.zeros(5, np.float32), None, SGDHyper(lr=0.1))
    hyper, state = AdamHyper(0.1, 0.9, 0.9), (p.copy(), p.copy(), p.copy())
    with pytest.raises(ValueError, match="step must be an int64 array of step counts, got int"):
        NP.adam_update(p, *state, hyper, step=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an int64 array of the span's step counts"):
        NP.adam_update(p, *state, hyper, step=None)  # type: ignore[arg-type]
    count = np.full(1, -1, np.int64)
    with pytest.raises(ValueError, match=r"step counts the steps taken \(from 0\), got -1"):
        NP.adam_update(p, *state, hyper, step=count)
    assert count[0] == -1  # (refused before anything changed)
    with pytest.raises(ValueError, match="step must live with the parameters"):
        NP.adam_update(p, *state, hyper, step=STRICT.asarray(np.zeros(1, np.int64)))
    with pytest.raises(ValueError, match="lr must be a float or a float64 array"):
        NP.sgd_update(p, p.copy(), None, SGDHyper(lr=np.ones(1, np.float32)))
    with pytest.raises(ValueError, match=r"an lr array must have one element, got shape \(2,\)"):
        NP.sgd_update(p, p.copy(), None, SGDHyper(lr=np.ones(2)))
    np.testing.assert_array_equal(p, 0.0)


@pytest.mark.parametrize("n", [0, 1, 257, 100003])
def test_grad_norm_sums_in_float64(n: int) -> None:
    x = (np.random.default_rng(n).standard_normal(n) * 1e3).astype(np.float32)
    want = np.linalg.norm(x.astype(np.float64))
    for backend in (NP, STRICT):
        got = backend.grad_norm(backend.asarray(x))
        assert host(got).dtype == np.float32 and host(got).shape == ()
        np.testing.assert_allclose(host(got), want, rtol=1e-7)


@pytest.mark.parametrize("low", [np.float16, "bfloat16"])
@pytest.mark.parametrize("found", [False, True], ids=["taken", "skipped"])
def test_the_generic_updates_write_the_low_precision_copy_as_numpy_does(
    low: Any, found: bool
) -> None:
    """``lowp=`` on the generic path (an ArrayBackend over NumPy itself): the copy is NumPy's,
    bit for bit, the cast of the new p (of the old one on a skipped step)."""
    generic = ArrayBackend(np, gpunet.Device("cpu"), np.ndarray)
    dtype = np.dtype(gpunet.bfloat16 if low == "bfloat16" else low)
    p0, (g, *_) = _problem(300, 1)
    flag = {"found_inf": np.ones(1, np.float32)} if found else {}
    for update in ("sgd", "adam"):
        outs = []
        for backend in (NP, generic):
            p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
            copy, count = np.zeros(p0.shape, dtype), np.zeros(1, np.int64)
            if update == "sgd":
                hyper = SGDHyper(lr=0.1, momentum=0.9)
                backend.sgd_update(p, g, m, hyper, step=count, lowp=copy, **flag)
            else:
                backend.adam_update(p, g, m, v, AdamHyper(1e-2), step=count, lowp=copy, **flag)
            outs.append((p, copy))
        assert outs[0][1].tobytes() == outs[1][1].tobytes() == outs[0][0].astype(dtype).tobytes()
        assert (outs[0][0].tobytes() == p0.tobytes()) == found
