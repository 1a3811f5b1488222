"""Optimizers over flat parameters: hand-computed steps, torch.optim over several steps (when
torch is installed), skipped gradients, state_dict round trips, and gradient clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpunet as gn
from gpunet import optim

SHAPES = [(3, 4), (4,), (2, 1)]


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    return init, [gn.tensor(a, requires_grad=True) for a in init]


def grads_for(step, dtype=np.float64):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


# ---------------------------------------------------------------- hand-computed steps
def test_sgd_momentum_by_hand():
    p = gn.tensor([1.0, -2.0], dtype=gn.float64, requires_grad=True)
    opt = optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)
    p.grad = gn.tensor([0.5, 1.0], dtype=gn.float64)
    opt.step()  # d = g + 0.01 p; buf = d; p -= 0.1 buf
    d1 = np.array([0.5 + 0.01, 1.0 - 0.02])
    w1 = np.array([1.0, -2.0]) - 0.1 * d1
    np.testing.assert_allclose(p.numpy(), w1, rtol=1e-14)
    p.grad = gn.tensor([0.5, 1.0], dtype=gn.float64)
    opt.step()  # buf = 0.9 buf + 0.5 d
    d2 = np.array([0.5, 1.0]) + 0.01 * w1
    buf = 0.9 * d1 + 0.5 * d2
    np.testing.assert_allclose(p.numpy(), w1 - 0.1 * buf, rtol=1e-14)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"], buf, rtol=1e-14)


def test_sgd_nesterov_by_hand():
    p = gn.tensor([1.0], dtype=gn.float64, requires_grad=True)
    opt = optim.SGD([p], lr=0.5, momentum=0.5, nesterov=True)
    for _ in range(2):
        p.grad = gn.tensor([2.0], dtype=gn.float64)
        opt.step()
    # step 1: buf = 2, d = 2 + 0.5 * 2 = 3, p = 1 - 1.5; step 2: buf = 1 + 2 = 3, d = 3.5
    np.testing.assert_allclose(p.numpy(), [1.0 - 1.5 - 1.75], rtol=1e-14)


@pytest.mark.parametrize("cls, wd", [(optim.Adam, 0.1), (optim.AdamW, 0.1)])
def test_adam_by_hand(cls, wd):
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-8
    w = np.array([0.5, -1.5])
    p = gn.tensor(w, requires_grad=True)
    opt = cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = v = np.zeros(2)
    for t in range(1, 4):
        g = np.array([0.3, -0.7]) * t
        p.grad = gn.tensor(g)
        opt.step()
        if cls is optim.AdamW:
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        w = w - lr * mhat / (np.sqrt(vhat) + eps)
        np.testing.assert_allclose(p.numpy(), w, rtol=1e-12)
    assert opt.state[p]["step"] == 3
    np.testing.assert_allclose(opt.state[p]["exp_avg"], m, rtol=1e-12)


# ---------------------------------------------------------------- flat parameters
def test_params_become_views_of_one_flat_buffer():
    _, ps = make_params()
    opt = optim.SGD(ps, lr=0.1)
    (flat,) = opt._flats
    assert flat.data.shape == (sum(p.numel() for p in ps),)
    for p in ps:
        assert np.shares_memory(p.data, flat.data)
    for p, g in zip(ps, grads_for(0)):
        p.grad = gn.tensor(g)
    opt.step()
    for p in ps:  # the gradients now live in the flat gradient array
        assert np.shares_memory(p.grad.data, flat.grad)


def test_one_buffer_per_dtype_and_groups_keep_their_hyperparameters():
    a = gn.tensor([1.0, 2.0], requires_grad=True)
    b = gn.tensor([1.0, 2.0], dtype=gn.float64, requires_grad=True)
    c = gn.tensor([3.0], requires_grad=True)
    opt = optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 1.0}], lr=0.1)
    assert len(opt._flats) == 2
    for t in (a, b, c):
        t.grad = gn.ones_like(t)
    opt.step()
    np.testing.assert_allclose(a.numpy(), [0.9, 1.9], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [0.9, 1.9])
    np.testing.assert_allclose(c.numpy(), [2.0])


def test_backward_then_step_trains():
    x = gn.tensor(np.linspace(-1, 1, 8, dtype=np.float32)[:, None])
    y = 3.0 * x + 1.0
    w = gn.zeros((1, 1), requires_grad=True)
    b = gn.zeros((1,), requires_grad=True)
    opt = optim.Adam([w, b], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss = (((x @ w + b) - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert abs(w.item() - 3.0) < 1e-2 and abs(b.item() - 1.0) < 1e-2


def test_replaced_data_is_readopted():
    _, ps = make_params()
    opt = optim.SGD(ps, lr=1.0)
    ps[0].data = np.zeros(SHAPES[0])
    ps[0].grad = gn.ones_like(ps[0])
    opt.step()
    np.testing.assert_array_equal(ps[0].numpy(), -np.ones(SHAPES[0]))
    assert np.shares_memory(ps[0].data, opt._flats[0].data)


def test_add_param_group_repacks_and_keeps_state():
    _, ps = make_params()
    opt = optim.Adam(ps[:2], lr=0.1)
    for p, g in zip(ps[:2], grads_for(0)):
        p.grad = gn.tensor(g)
    opt.step()
    m = opt.state[ps[0]]["exp_avg"].copy()
    opt.add_param_group({"params": [ps[2]], "lr": 0.5})
    np.testing.assert_array_equal(opt.state[ps[0]]["exp_avg"], m)
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    assert np.shares_memory(ps[2].data, opt._flats[0].data)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [ps[0]]})


def test_zero_grad():
    _, ps = make_params()
    opt = optim.SGD(ps, lr=0.1)
    for p, g in zip(ps, grads_for(0)):
        p.grad = gn.tensor(g)
    opt.zero_grad(set_to_none=False)
    assert all(np.all(p.grad.numpy() == 0) for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_none_grad_skips_param_and_its_state():
    init, ps = make_params()
    opt = optim.Adam(ps, lr=0.1)
    ps[1].grad = None
    for i in (0, 2):
        ps[i].grad = gn.tensor(grads_for(0)[i])
    opt.step()
    np.testing.assert_array_equal(ps[1].numpy(), init[1])
    assert ps[1] not in opt.state and opt.state[ps[0]]["step"] == 1


def test_state_dict_round_trip_continues_identically():
    _, ps = make_params()
    opt = optim.SGD(ps, lr=0.1, momentum=0.9)
    for p, g in zip(ps, grads_for(0)):
        p.grad = gn.tensor(g)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == [0, 1, 2]
    assert set(sd["state"]) == {0, 1, 2}
    _, qs = make_params()
    for p, q in zip(ps, qs):
        q.data[...] = p.numpy()
    opt2 = optim.SGD(qs, lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    for step in (1, 2):
        for p, q, g in zip(ps, qs, grads_for(step)):
            p.grad, q.grad = gn.tensor(g), gn.tensor(g)
        opt.step()
        opt2.step()
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_load_state_dict_rejects_a_mismatch():
    _, ps = make_params()
    opt = optim.Adam(ps)
    sd = opt.state_dict()
    sd["state"] = {0: {"step": 1, "exp_avg": np.zeros((5,)), "exp_avg_sq": np.zeros((5,))}}
    with pytest.raises(ValueError, match="exp_avg has shape"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})


# ---------------------------------------------------------------- clipping
@pytest.mark.parametrize("packed", [True, False])
def test_clip_grad_norm_by_hand(packed):
    _, ps = make_params()
    if packed:
        optim.SGD(ps, lr=0.1)
    gs = grads_for(0)
    for p, g in zip(ps, gs):
        p.grad = gn.tensor(g)
    norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
    total = optim.clip_grad_norm_(ps, 1.0)
    assert total.item() == pytest.approx(norm, rel=1e-12)
    for p, g in zip(ps, gs):
        np.testing.assert_allclose(p.grad.numpy(), g / (norm + 1e-6), rtol=1e-12)
    # under the limit nothing changes
    before = [p.grad.numpy().copy() for p in ps]
    optim.clip_grad_norm_(ps, 10.0)
    for p, b in zip(ps, before):
        np.testing.assert_allclose(p.grad.numpy(), b, rtol=1e-12)


def test_clip_grad_norm_inf_and_value():
    p = gn.tensor([1.0, -4.0, 2.0], dtype=gn.float64, requires_grad=True)
    p.grad = gn.tensor([1.0, -4.0, 2.0], dtype=gn.float64)
    assert optim.clip_grad_norm_([p], 2.0, norm_type=math.inf).item() == 4.0
    np.testing.assert_allclose(p.grad.numpy(), np.array([1.0, -4.0, 2.0]) * 2 / (4 + 1e-6))
    optim.clip_grad_value_(p, 0.4)
    np.testing.assert_allclose(p.grad.numpy(), [0.4, -0.4, 0.4])
    p.grad = gn.tensor([math.nan, 1.0, 0.0], dtype=gn.float64)
    with pytest.raises(RuntimeError, match="non-finite"):
        optim.clip_grad_norm_(p, 1.0, error_if_nonfinite=True)


# ---------------------------------------------------------------- against torch.optim
CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.85, 0.9), weight_decay=0.3)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, kwargs", CASES)
def test_matches_torch_over_several_steps(name, kwargs, dtype):
    torch = pytest.importorskip("torch")
    init, ps = make_params(dtype)
    ts = [torch.tensor(a, requires_grad=True) for a in init]
    opt = getattr(optim, name)(ps, **kwargs)
    topt = getattr(torch.optim, name)(ts, **kwargs)
    for step in range(6):
        for i, (p, t, g) in enumerate(zip(ps, ts, grads_for(step, dtype))):
            if step == 2 and i == 1:  # a skipped parameter falls one step behind
                p.grad = t.grad = None
            else:
                p.grad, t.grad = gn.tensor(g), torch.tensor(g)
        opt.step()
        topt.step()
        tol = 1e-6 if dtype == np.float32 else 1e-13
        for p, t in zip(ps, ts):
            np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=tol, atol=tol)


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    init, ps = make_params()
    optim.AdamW(ps)
    ts = [torch.tensor(a, requires_grad=True) for a in init]
    for p, t, g in zip(ps, ts, grads_for(0)):
        p.grad, t.grad = gn.tensor(g), torch.tensor(g)
    ours = optim.clip_grad_norm_(ps[::2], 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(ts[::2], 0.5)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    for p, t in zip(ps, ts):
        np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=1e-12)


def test_step_with_closure_returns_the_loss():
    w = gn.tensor([2.0], requires_grad=True)
    opt = optim.SGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    with gn.no_grad():  # the closure records even so
        loss = opt.step(closure)
    assert loss.item() == 4.0
    np.testing.assert_allclose(w.numpy(), [1.0])  # 2 - 0.25 * 4


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9), optim.Adam])
def test_a_captured_step_calling_step_with_a_closure_replays_what_eager_computes(make):
    """PyTorch's ``opt.step(closure)`` inside a captured step: the closure's forward and
    backward are recorded with the update (each call passes a new closure), not refused."""
    rng = np.random.default_rng(0)
    xs = [gn.tensor(rng.standard_normal((5, 3))) for _ in range(6)]
    results = []
    for captured in (False, True):
        _, ps = make_params()
        opt = make(ps)

        def step(x, ps=ps, opt=opt):
            def closure():
                opt.zero_grad()
                loss = ((x @ ps[0]).sum(0) * ps[1]).sum() + ps[2].sum()
                loss.backward()
                return loss

            return opt.step(closure)

        run = gn.capture(step) if captured else step
        losses = [run(x).item() for x in xs]
        results.append((losses, [p.numpy().copy() for p in ps]))
        if captured:
            assert run.replays == 4
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_numpy_chunked_updates_match_the_whole_buffer_update(op):
    from gpunet.backend import get_backend
    from gpunet.backend.fused import FusedOps
    from gpunet.backend.updates import AdamHyper, SGDHyper

    backend = get_backend("cpu")
    rng = np.random.default_rng(0)
    n = 100_003  # several chunks and a ragged tail
    bufs = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    bufs[3] = np.abs(bufs[3])  # Adam's v
    ours, whole = [b.copy() for b in bufs], [b.copy() for b in bufs]
    counts = [np.zeros(1, np.int64), np.zeros(1, np.int64)]  # (each update advances its own)
    for step in (1, 2):
        if op == "sgd":
            hyper = SGDHyper(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1)
            backend.sgd_update(*ours[:3], hyper, step=counts[0])
            FusedOps.sgd_update(backend, *whole[:3], hyper, first_step=step == 1)
        else:
            hyper = AdamHyper(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
            backend.adam_update(*ours, hyper, step=counts[0])
            FusedOps.adam_update(backend, *whole, hyper, step=counts[1])
    assert counts[0][0] == 2
    for a, b in zip(ours, whole):
        np.testing.assert_array_equal(a, b)


def test_a_parameter_moved_to_another_dtype_is_an_error():
    _, ps = make_params(np.float32)
    opt = optim.SGD(ps, lr=0.1)
    ps[0].data = ps[0].data.astype(np.float64)
    ps[0].grad = gn.ones_like(ps[0])
    with pytest.raises(ValueError, match="make the optimizer after moving the model"):
        opt.step()


def test_frozen_and_non_leaf_tensors():
    frozen = gn.tensor([1.0, 2.0])  # requires_grad=False: accepted, never has a grad
    w = gn.tensor([1.0], requires_grad=True)
    opt = optim.SGD([w, frozen], lr=0.5)
    w.grad = gn.tensor([1.0])
    opt.step()
    np.testing.assert_array_equal(frozen.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(w.numpy(), [0.5])
    with pytest.raises(ValueError, match="non-leaf"):
        optim.SGD([w * 2.0])


@pytest.mark.parametrize("name, kwargs", CASES[1:3] + CASES[4:5] + CASES[6:])
def test_generic_backend_on_array_api_strict(name, kwargs):
    """The optimizers, clipping and state_dict call only the array API on a non-NumPy
    backend (the path CuPy takes), and match NumPy."""
    xps = pytest.importorskip("array_api_strict")
    from gpunet.backend import ArrayBackend, register_backend

    strict = ArrayBackend(xps, gn.Device("cpu"), type(xps.asarray(1.0)))
    register_backend(type(xps.asarray(1.0)), strict)
    try:
        init, ps = make_params()
        qs = [gn.Tensor(strict.asarray(a), requires_grad=True) for a in init]
        opts = [getattr(optim, name)(ps, **kwargs), getattr(optim, name)(qs, **kwargs)]
        for step in range(3):
            for p, q, g in zip(ps, qs, grads_for(step)):
                p.grad, q.grad = gn.tensor(g), gn.Tensor(strict.asarray(g))
            norms = [optim.clip_grad_norm_(ps, 1.0), optim.clip_grad_norm_(qs, 1.0)]
            assert float(np.from_dlpack(norms[1].data)) == pytest.approx(norms[0].item())
            for o in opts:
                o.step()
        for p, q in zip(ps, qs):
            assert type(q.data) is strict.array_type
            np.testing.assert_allclose(np.from_dlpack(q.data), p.numpy(), rtol=1e-12)
        sd = opts[1].state_dict()
        opts[1].load_state_dict(sd)
    finally:
        register_backend(type(xps.asarray(1.0)), None)


def test_packed_parameters_are_forgotten_when_they_die():
    import gc

    from gpunet.optim import flat

    _, ps = make_params()
    optim.SGD(ps)
    keys = [id(p) for p in ps]
    assert all(k in flat._OWNER for k in keys)
    del ps
    gc.collect()
    assert not any(k in flat._OWNER for k in keys)


def test_loads_a_torch_adam_state_dict():
    torch = pytest.importorskip("torch")
    init, ps = make_params()
    ts = [torch.tensor(a, requires_grad=True) for a in init]
    topt = torch.optim.Adam(ts, lr=0.01)
    for step in range(2):
        for t, g in zip(ts, grads_for(step)):
            t.grad = torch.tensor(g)
        topt.step()
    for p, t in zip(ps, ts):
        p.data[...] = t.detach().numpy()
    sd = topt.state_dict()
    sd["state"] = {
        i: {k: v.numpy() if v.ndim else v for k, v in st.items()} for i, st in sd["state"].items()
    }
    opt = optim.Adam(ps)
    opt.load_state_dict(sd)
    assert opt.state[ps[0]]["step"] == 2 and opt.param_groups[0]["lr"] == 0.01
    for t, p, g in zip(ts, ps, grads_for(2)):
        t.grad, p.grad = torch.tensor(g), gn.tensor(g)
    topt.step()
    opt.step()
    for p, t in zip(ps, ts):
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-13)


# ---------------------------------------------------------------- float16 parameters
HALF_OPTIMIZERS = [
    (optim.Adam, {"lr": 1e-3}),
    (optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}),
    (optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.05}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
]


def _half_grads(step: int) -> list[np.ndarray]:
    """Gradients down to 1e-6: in float16 g^2 is then 0, and so would be sqrt(v) + eps."""
    rng = np.random.default_rng(200 + step)
    scale = [1e-6, 1e-3, 1.0]
    return [
        (rng.standard_normal(s) * scale[i % 3]).astype(np.float16) for i, s in enumerate(SHAPES)
    ]


@pytest.mark.parametrize(("make", "cfg"), HALF_OPTIMIZERS)
def test_float16_step_is_the_float32_step_rounded_once(make, cfg):
    """float16 parameters keep float32 state and are updated in float32: each step equals the
    float32 optimizer's step from the same parameters, rounded to float16 (within 1 ulp), and
    nothing becomes inf (in float16 Adam's eps = 1e-8 is 0)."""
    init, half = make_params(np.float16, seed=3)
    full = [gn.tensor(a.astype(np.float32), requires_grad=True) for a in init]
    opt16, opt32 = make(half, **cfg), make(full, **cfg)
    for step in range(3):
        for p16, p32, g in zip(half, full, _half_grads(step)):
            p32.data[...] = p16.numpy()  # the float32 step starts from the rounded parameters
            p16.grad, p32.grad = gn.tensor(g), gn.tensor(g.astype(np.float32))
        opt16.step()
        opt32.step()
        for p16, p32 in zip(half, full):
            got = p16.numpy()
            assert got.dtype == np.float16 and np.isfinite(got).all()
            np.testing.assert_array_max_ulp(got, p32.numpy().astype(np.float16), maxulp=1)
    for st in opt16.state.values():
        for name, value in st.items():
            if name != "step":
                assert value.dtype == np.float32, name


@pytest.mark.parametrize(("make", "cfg"), HALF_OPTIMIZERS[:1] + HALF_OPTIMIZERS[3:4])
def test_float16_state_dict_round_trip(make, cfg):
    _, ps = make_params(np.float16, seed=4)
    opt = make(ps, **cfg)
    for p, g in zip(ps, _half_grads(0)):
        p.grad = gn.tensor(g)
    opt.step()
    sd = opt.state_dict()
    _, ps2 = make_params(np.float16, seed=4)
    for p, q in zip(ps, ps2):
        q.data[...] = p.numpy()
    opt2 = make(ps2, **cfg)
    opt2.load_state_dict(sd)
    for opt_, params in ((opt, ps), (opt2, ps2)):
        for p, g in zip(params, _half_grads(1)):
            p.grad = gn.tensor(g)
        opt_.step()
    for p, q in zip(ps, ps2):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    for st in opt2.state.values():
        assert all(v.dtype == np.float32 for k, v in st.items() if k != "step")
