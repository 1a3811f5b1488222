"""autocast, differentially: each op a user meets under ``gpunet.autocast`` equals, bit for
bit, a hand-written reference that casts as the README's policy says (GEMMs low, reductions,
exp/log, softplus and the losses float32, mixed floats the widest, the rest follow), forward
and backward (float32 weights get float32 gradients equal to the reference's)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet import nn
from gpunet.nn import functional as F

BF16, F16, F32, F64 = gpunet.bfloat16, gpunet.float16, gpunet.float32, gpunet.float64
LOWS = [BF16, F16]


def _bits(t: gpunet.Tensor) -> np.ndarray:
    a = np.ascontiguousarray(t.numpy())
    return a.view(np.uint8)


def _same(got: gpunet.Tensor, want: gpunet.Tensor, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, reference {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=what)


def _leaves(seed: int) -> dict[str, gpunet.Tensor]:
    """float32 master weights (requires_grad) and float32 data, the same for both runs."""
    rng = np.random.default_rng(seed)

    def t(*shape: int, grad: bool = True) -> gpunet.Tensor:
        a = rng.standard_normal(shape).astype(np.float32)
        return gpunet.tensor(a, requires_grad=grad)

    return {"x": t(4, 5), "w": t(5, 3), "b": t(3), "f": t(4, 3), "g": t(3), "h": t(3)}


def _c(t: gpunet.Tensor, dtype: Any) -> gpunet.Tensor:
    return t.to(dtype)


# Each case: (autocast body, reference body) over the leaves and the low dtype. The body is
# run under autocast; the reference outside it, with the policy's casts written out.
def _gemm(v: dict, low: Any) -> gpunet.Tensor:  # matmul, lowered
    return _c(v["x"], low) @ _c(v["w"], low)


CASES: dict[str, tuple[Callable, Callable]] = {
    "matmul": (lambda v, lo: v["x"] @ v["w"], _gemm),
    "linear": (
        lambda v, lo: F.linear(v["x"], v["w"], v["b"]),
        lambda v, lo: F.linear(_c(v["x"], lo), _c(v["w"], lo), _c(v["b"], lo)),
    ),
    "sum": (lambda v, lo: (v["x"] @ v["w"]).sum(), lambda v, lo: _c(_gemm(v, lo), F32).sum()),
    "mean": (
        lambda v, lo: (v["x"] @ v["w"]).mean(axis=0),
        lambda v, lo: _c(_gemm(v, lo), F32).mean(axis=0),
    ),
    "softmax": (
        lambda v, lo: F.softmax(v["x"] @ v["w"], -1),
        lambda v, lo: (lambda z: gpunet.exp(_c(z, F32) - gpunet.logsumexp(_c(z, F32), -1, True)))(
            _gemm(v, lo)
        ),
    ),
    "log_softmax": (
        lambda v, lo: F.log_softmax(v["x"] @ v["w"], -1),
        lambda v, lo: (lambda z: _c(z, F32) - gpunet.logsumexp(_c(z, F32), -1, True))(_gemm(v, lo)),
    ),
    "cross_entropy": (
        lambda v, lo: F.cross_entropy(v["x"] @ v["w"], gpunet.tensor([0, 2, 1, 2])),
        lambda v, lo: F.cross_entropy(_c(_gemm(v, lo), F32), gpunet.tensor([0, 2, 1, 2])),
    ),
    "cross_entropy_smoothed": (
        lambda v, lo: F.cross_entropy(
            v["x"] @ v["w"], gpunet.tensor([0, 2, 1, 2]), label_smoothing=0.1
        ),
        lambda v, lo: (
            lambda z: (
                F.cross_entropy(_c(z, F32), gpunet.tensor([0, 2, 1, 2])) * 0.9
                + (-(_c(z, F32) - gpunet.logsumexp(_c(z, F32), -1, True)).mean(1)).mean() * 0.1
            )
        )(_gemm(v, lo)),
    ),
    "mse": (
        lambda v, lo: F.mse_loss(v["x"] @ v["w"], v["f"]),
        lambda v, lo: (lambda d: _c(d * d, F32).mean())(_c(_gemm(v, lo), F32) - v["f"]),
    ),
    "bce_with_logits": (
        lambda v, lo: F.binary_cross_entropy_with_logits(v["x"] @ v["w"], gpunet.sigmoid(v["f"])),
        lambda v, lo: F.binary_cross_entropy_with_logits(
            _c(_gemm(v, lo), F32), gpunet.sigmoid(v["f"])
        ),
    ),
    "bce": (
        lambda v, lo: F.binary_cross_entropy(
            gpunet.sigmoid(v["x"] @ v["w"]), gpunet.sigmoid(v["f"])
        ),
        lambda v, lo: F.binary_cross_entropy(
            _c(gpunet.sigmoid(_gemm(v, lo)), F32), gpunet.sigmoid(v["f"])
        ),
    ),
    "mix_add_mul_div": (
        lambda v, lo: ((v["x"] @ v["w"]) + v["f"]) * v["g"] / (v["h"] * v["h"] + 1.0),
        lambda v, lo: (_c(_gemm(v, lo), F32) + v["f"]) * v["g"] / (v["h"] * v["h"] + 1.0),
    ),
    "mix_max_where": (
        lambda v, lo: gpunet.where(v["f"] > 0, gpunet.maximum(v["x"] @ v["w"], v["f"]), v["f"]),
        lambda v, lo: gpunet.where(
            v["f"] > 0, gpunet.maximum(_c(_gemm(v, lo), F32), v["f"]), v["f"]
        ),
    ),
    "mix_where_concat_stack_compare": (
        lambda v, lo: (
            gpunet.concatenate(
                [gpunet.where(v["x"] @ v["w"] > v["f"], v["x"] @ v["w"], v["f"]), v["f"]], 0
            )
            * gpunet.stack([v["x"] @ v["w"], v["f"]]).sum(0).sum(0)
        ),
        lambda v, lo: (
            gpunet.concatenate(
                [
                    gpunet.where(_c(_gemm(v, lo), F32) > v["f"], _c(_gemm(v, lo), F32), v["f"]),
                    v["f"],
                ],
                0,
            )
            * gpunet.stack([_c(_gemm(v, lo), F32), v["f"]]).sum(0).sum(0)
        ),
    ),
    "float32_list_pow_exp_log_log1p_var": (
        lambda v, lo: (
            (lambda z: (z**2) + gpunet.exp(z) + gpunet.log(z * z + 1.0) + z.var(0))(v["x"] @ v["w"])
            + gpunet.log1p(abs(v["x"] @ v["w"]))
        ),
        lambda v, lo: (
            (
                lambda z: (
                    (_c(z, F32) ** 2)
                    + gpunet.exp(_c(z, F32))
                    + gpunet.log(_c(z * z + 1.0, F32))
                    + _ref_var(z)
                )
            )(_gemm(v, lo))
            + gpunet.log1p(_c(abs(_gemm(v, lo)), F32))
        ),
    ),
    "follow_sqrt_abs_neg_clip_max_index": (
        lambda v, lo: (lambda z: gpunet.sqrt(abs(z)) - (-z).clip(-0.5, 0.5) + z.max(0) + z[1:2])(
            v["x"] @ v["w"]
        ),
        lambda v, lo: (lambda z: gpunet.sqrt(abs(z)) - (-z).clip(-0.5, 0.5) + z.max(0) + z[1:2])(
            _gemm(v, lo)
        ),
    ),
    "low_only_elementwise": (  # both inputs low: stays low
        lambda v, lo: (v["x"] @ v["w"]) * (v["x"] @ v["w"]) - (v["x"] @ v["w"]),
        lambda v, lo: _gemm(v, lo) * _gemm(v, lo) - _gemm(v, lo),
    ),
    "layer_norm": (
        lambda v, lo: F.layer_norm(v["x"] @ v["w"], 3, v["g"], v["h"]),
        lambda v, lo: _ref_layer_norm(_gemm(v, lo), v["g"], v["h"]),
    ),
    "dropout": (
        lambda v, lo: (gpunet.manual_seed(5), F.dropout(v["x"] @ v["w"], 0.3))[1],
        lambda v, lo: (gpunet.manual_seed(5), F.dropout(_gemm(v, lo), 0.3))[1],
    ),
}
for _name in ("relu", "gelu", "silu", "tanh", "sigmoid", "elu", "leaky_relu"):
    CASES[_name] = (
        lambda v, lo, n=_name: getattr(F, n)(v["x"] @ v["w"]),
        lambda v, lo, n=_name: getattr(F, n)(_gemm(v, lo)),
    )
CASES["softplus"] = (
    lambda v, lo: F.softplus(v["x"] @ v["w"]),
    lambda v, lo: F.softplus(_c(_gemm(v, lo), F32)),
)
_ALPHA = {"leaky_relu": 0.1, "elu": 1.0, "softplus": 2.0}
for _act in ("relu", "tanh", "sigmoid", "elu", "leaky_relu", "softplus"):
    # a Linear with a fusable activation (MLP fuses them): the GEMM and the bias lowered;
    # the activation fused where its policy follows (one rounding, the primitive's own
    # values), softplus (float32 by the policy) apart in float32, as unfused
    CASES[f"linear_activation_{_act}"] = (
        lambda v, lo, a=_act: F.linear_activation(v["x"], v["w"], v["b"], a, _ALPHA.get(a, 0.0)),
        lambda v, lo, a=_act: (
            F.softplus(_c(F.linear(_c(v["x"], lo), _c(v["w"], lo), _c(v["b"], lo)), F32), 2.0)
            if a == "softplus"
            else F.linear_activation(
                _c(v["x"], lo), _c(v["w"], lo), _c(v["b"], lo), a, _ALPHA.get(a, 0.0)
            )
        ),
    )


def _ref_var(z: gpunet.Tensor) -> gpunet.Tensor:
    # var(0) = sum((z - mean)^2) / (n - 1): the mean a float32 sum, z - mean promoted
    d = _c(z, F32) - _c(z, F32).sum(axis=0, keepdims=True) * (1.0 / z.shape[0])
    return _c(d * d, F32).sum(axis=0) / (z.shape[0] - 1)


def _ref_layer_norm(z: gpunet.Tensor, w: gpunet.Tensor, b: gpunet.Tensor) -> gpunet.Tensor:
    # mean is a sum (float32); x - mean promotes; the rest is float32 already
    n = 1.0 / z.shape[-1]
    d = _c(z, F32) - _c(z, F32).sum(axis=-1, keepdims=True) * n
    var = (d * d).sum(axis=-1, keepdims=True) * n
    return d / gpunet.sqrt(var + 1e-5) * w + b


def _run(body: Callable, low: Any, ctx: Any, inside: bool = False) -> tuple[gpunet.Tensor, dict]:
    """body's output and its leaves' gradients, backward run after ``ctx`` or ``inside``."""
    v = _leaves(0)
    with ctx:
        out = body(v, low)
        if inside:
            out.to(F32).sum().backward()
    if not inside:
        out.to(F32).sum().backward()
    return out, {k: t.grad for k, t in v.items()}


@pytest.mark.parametrize("inside", [False, True], ids=["backward_after", "backward_inside"])
@pytest.mark.parametrize("low", LOWS, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_op_equals_the_policys_casts_forward_and_backward(
    name: str, low: Any, inside: bool
) -> None:
    """Backward run inside autocast or after it: no policy applies in the sweep either way."""
    body, ref = CASES[name]
    got, ggot = _run(body, low, gpunet.autocast(dtype=low), inside)
    want, gwant = _run(ref, low, contextlib.nullcontext())
    _same(got, want, f"{name} forward")
    for k in ggot:
        if gwant[k] is None:
            assert ggot[k] is None, f"{name}: d/d{k} present only under autocast"
            continue
        assert ggot[k] is not None, f"{name}: d/d{k} missing under autocast"
        assert ggot[k].dtype == F32, f"{name}: d/d{k} is {ggot[k].dtype}, not float32"
        _same(ggot[k], gwant[k], f"{name} d/d{k}")


@pytest.mark.parametrize(
    ("activation", "norm", "dropout"),
    [
        ("relu", None, 0.0),
        ("softplus", None, 0.0),
        ("gelu", None, 0.0),
        ("tanh", "layernorm", 0.25),
    ],
)
def test_an_mlp_equals_its_layers_cast_by_hand(
    activation: str, norm: str | None, dropout: float
) -> None:
    """MLP fuses Linear + activation where it can; under autocast it must still equal the
    policy: GEMMs (and biases) low, softplus and LayerNorm float32, the rest following."""
    gpunet.manual_seed(1)
    model = nn.MLP([5, 8, 3], activation=activation, norm=norm, dropout=dropout)
    x = gpunet.randn(4, 5)
    gpunet.manual_seed(2)
    with gpunet.autocast(dtype=BF16):
        got = model(x)
    got.to(F32).sum().backward()
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in model if isinstance(m, nn.Linear)]
    gpunet.manual_seed(2)
    h = F.linear(x.to(BF16), w1.to(BF16), b1.to(BF16))
    if norm:
        ln = next(m for m in model if isinstance(m, nn.LayerNorm))
        h = _ref_layer_norm(h, ln.weight, ln.bias)
    h = F.softplus(h.to(F32)) if activation == "softplus" else getattr(F, activation)(h)
    h = F.dropout(h, dropout)
    want = F.linear(h.to(BF16), w2.to(BF16), b2.to(BF16))
    want.to(F32).sum().backward()
    _same(got, want, f"MLP({activation}, {norm}, {dropout}) forward")
    for p, g in zip(model.parameters(), grads):
        assert g.dtype == F32
        _same(g, p.grad, f"MLP({activation}, {norm}, {dropout}) gradient")


_TARGET = gpunet.ones((4, 3))  # (made once: a captured step reads the same array)


def _gemm_loss(x: gpunet.Tensor, w: gpunet.Tensor) -> gpunet.Tensor:
    return F.mse_loss(F.relu(x @ w), _TARGET)


def _ref_gemm_loss(x: gpunet.Tensor, w: gpunet.Tensor, low: Any) -> gpunet.Tensor:
    """_gemm_loss with the policy's casts written out: the GEMM low, the loss float32."""
    return F.mse_loss(F.relu(x.to(low) @ w.to(low)).to(F32), _TARGET)


def _data() -> tuple[gpunet.Tensor, gpunet.Tensor]:
    rng = np.random.default_rng(2)
    x = gpunet.tensor(rng.standard_normal((4, 5)).astype(np.float32))
    return x, gpunet.tensor(rng.standard_normal((5, 3)).astype(np.float32))


def test_nested_autocast_off_and_a_second_dtype_inside_then_the_outer_again() -> None:
    x, w = _data()
    plain = _gemm_loss(x, w)
    lowered = {lo: _ref_gemm_loss(x, w, lo) for lo in LOWS}
    with gpunet.autocast(dtype=BF16):
        with gpunet.autocast(enabled=False):
            _same(_gemm_loss(x, w), plain, "enabled=False inside")
            with gpunet.autocast(dtype=F16):
                _same(_gemm_loss(x, w), lowered[F16], "float16 inside off inside bfloat16")
            _same(_gemm_loss(x, w), plain, "off again after the inner float16")
        _same(_gemm_loss(x, w), lowered[BF16], "the outer bfloat16 after the inner ones")
    _same(_gemm_loss(x, w), plain, "after autocast")


@pytest.mark.parametrize(("device_type", "casts"), [("cpu", True), ("cuda", False), (None, True)])
def test_a_device_type_casts_only_its_devices_ops(device_type: str | None, casts: bool) -> None:
    x, w = _data()
    with gpunet.autocast(device_type, dtype=BF16):
        got = _gemm_loss(x, w)
        got_ce = F.cross_entropy(F.softplus(x @ w), gpunet.tensor([0, 1, 2, 0]))
    want = _ref_gemm_loss(x, w, BF16) if casts else _gemm_loss(x, w)
    _same(got, want, f"autocast({device_type!r}) on CPU tensors")
    z = F.linear(x.to(BF16), w.to(BF16)).to(F32) if casts else x @ w
    want_ce = F.cross_entropy(F.softplus(z), gpunet.tensor([0, 1, 2, 0]))
    _same(got_ce, want_ce, f"autocast({device_type!r}): softplus and cross_entropy")


def test_float64_is_left_alone_and_float64_meets_the_low_dtype_at_float64() -> None:
    x, w = _data()
    x64, w64 = x.to(F64), w.to(F64)
    with gpunet.autocast(dtype=BF16):
        got = [x64 @ w64, (x64 @ w64).sum(), F.softmax(x64, -1), F.mse_loss(x64, x64 * 2.0)]
        mixed = (x @ w) + w64[0]  # bfloat16 + float64: float64, not lowered
    want = [x64 @ w64, (x64 @ w64).sum(), F.softmax(x64, -1), F.mse_loss(x64, x64 * 2.0)]
    for i, (g, r) in enumerate(zip(got, want)):
        _same(g, r, f"float64 case {i}")
    _same(mixed, (x.to(BF16) @ w.to(BF16)).to(F64) + w64[0], "bfloat16 + float64")
    with gpunet.autocast(dtype=BF16), pytest.raises(TypeError, match="matmul"):
        x64 @ w  # (float64 @ float32: refused, as without autocast; float32 is lowered)


@pytest.mark.parametrize("low", LOWS, ids=["bf16", "fp16"])
def test_in_place_ops_under_no_grad_promote_into_float32_as_written_out(low: Any) -> None:
    x, w = _data()
    t, r = gpunet.ones((4, 3)), gpunet.ones((4, 3))
    with gpunet.no_grad():
        with gpunet.autocast(dtype=low):
            t += x @ w
            t *= x @ w
            t -= F.relu(x @ w)
        z = x.to(low) @ w.to(low)
        r += z.to(F32)
        r *= z.to(F32)
        r -= F.relu(z).to(F32)
    _same(t, r, "in-place float32 += low")
    h = gpunet.ones((4, 3), dtype=low)
    with gpunet.no_grad(), gpunet.autocast(dtype=low), pytest.raises(TypeError, match="in-place"):
        h += gpunet.ones((4, 3))  # (float32 into a low tensor: refused, as without autocast)
    np.testing.assert_array_equal(h.numpy(), np.ones((4, 3)))


@pytest.mark.parametrize("where", ["inside", "around"])
def test_autocast_entered_around_or_inside_a_captured_step_equals_eager(where: str) -> None:
    """The capture records the casts: a step recorded under autocast and one recorded
    without it are told apart (called both ways, each equals its eager run)."""
    x, w = _data()

    def step(x: gpunet.Tensor, w: gpunet.Tensor) -> gpunet.Tensor:
        if where == "inside":
            with gpunet.autocast(dtype=BF16):
                return _gemm_loss(x, w)
        return _gemm_loss(x, w)

    run = gpunet.capture(step)
    ctx = contextlib.nullcontext if where == "inside" else lambda: gpunet.autocast(dtype=BF16)
    want = _ref_gemm_loss(x, w, BF16)
    for _ in range(3):
        with ctx():
            _same(run(x, w), want, f"captured, autocast {where}")
    if where == "around":  # the same captured step, now called without autocast
        for _ in range(3):
            _same(run(x, w), _gemm_loss(x, w), "captured, autocast off afterwards")
        with gpunet.autocast(dtype=F16):
            _same(run(x, w), _ref_gemm_loss(x, w, F16), "captured, float16 now")


# ---------------------------------------------------------------- the optimizer's weight copy
def _fresh(model: nn.Module) -> nn.Module:
    """A model with ``model``'s weights and no optimizer: its weights are cast afresh."""
    other = nn.MLP([5, 8, 3])
    other.load_state_dict({k: v.numpy().copy() for k, v in model.state_dict().items()})
    return other


def _check_copy(model: nn.Module, x: gpunet.Tensor, low: Any, what: str) -> int:
    """Under autocast the model's forward (reading the copy where current) equals a fresh
    cast's, and every current copy equals the weight cast now; how many were current."""
    with gpunet.autocast(dtype=low):
        got, want = model(x), _fresh(model)(x)
    _same(got, want, f"{what}: forward through the copy")
    current = 0
    for p in model.parameters():
        entry = gpunet.optim.flat.flat_of(p)
        view = entry[0].lowp_view(entry[1], low) if entry is not None else None
        if view is not None:
            current += 1
            np.testing.assert_array_equal(
                np.asarray(view).view(np.uint8), _bits(p.to(low)), err_msg=what
            )
    return current


def _train_step(
    model: nn.Module, opt: Any, x: gpunet.Tensor, low: Any, y: Any = (0, 1, 2, 0)
) -> None:
    opt.zero_grad()
    with gpunet.enable_grad(), gpunet.autocast(dtype=low):
        loss = F.cross_entropy(model(x), gpunet.tensor(y))
    loss.backward()
    opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_the_weight_copy_equals_a_fresh_cast_after_every_kind_of_write(opt_name: str) -> None:
    gpunet.manual_seed(6)
    model, x = nn.MLP([5, 8, 3]), gpunet.randn(4, 5)
    opt = (
        gpunet.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if opt_name == "sgd"
        else gpunet.optim.Adam(model.parameters(), lr=0.01)
    )
    w = model[0].weight
    writes: list[tuple[str, Callable[[], Any]]] = [
        ("step", lambda: _train_step(model, opt, x, BF16)),
        ("step again", lambda: _train_step(model, opt, x, BF16)),
        ("p *= 0.5", lambda: w.__imul__(0.5)),
        ("step", lambda: _train_step(model, opt, x, BF16)),
        ("p[...] = v", lambda: w.__setitem__((0, slice(None)), 0.25)),
        ("step", lambda: _train_step(model, opt, x, BF16)),
        ("nn.init", lambda: nn.init.normal_(w)),
        ("step", lambda: _train_step(model, opt, x, BF16)),
        ("load_state_dict", lambda: model.load_state_dict(_fresh(nn.MLP([5, 8, 3])).state_dict())),
        ("step", lambda: _train_step(model, opt, x, BF16)),
        ("float16 step", lambda: _train_step(model, opt, x, F16)),
        ("bfloat16 step after float16", lambda: _train_step(model, opt, x, BF16)),
        ("p.data replaced", lambda: setattr(w, "data", w.data * 0.5)),
        ("step", lambda: _train_step(model, opt, x, BF16)),
        ("model.to(float32)", lambda: model.to(F32)),
        ("step", lambda: _train_step(model, opt, x, BF16)),
    ]
    for what, write in writes:
        with gpunet.no_grad():
            write()
        read = [_check_copy(model, x, low, f"{opt_name}, after {what} ({low})") for low in LOWS]
        if what in ("step", "step again", "bfloat16 step after float16"):  # (the copy is read)
            assert read[0] == len(list(model.parameters())), f"{what}: copies current {read}"


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_gradscaler_float16_over_injected_overflows_equals_the_clean_steps_alone(
    opt_name: str,
) -> None:
    """A skipped step changes nothing (weights, state, step count, the copy), and a taken one
    is the unscaled step: the run equals one that takes only the clean batches, no scaler
    (the scale is a power of two: scaling and unscaling are exact here)."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(6)]
    bad = {1, 4}  # an input past float16's range: the GEMM overflows, the gradients are NaN
    for i in bad:
        xs[i] = xs[i] * np.float32(1e6)
    y = gpunet.tensor([0, 1, 2, 0])  # (as _train_step's)

    def make() -> tuple[nn.Module, Any]:
        gpunet.manual_seed(8)
        model = nn.MLP([5, 8, 3])
        if opt_name == "sgd":
            return model, gpunet.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, gpunet.optim.Adam(model.parameters(), lr=0.01)

    model, opt = make()
    scaler = gpunet.amp.GradScaler("cpu", init_scale=2.0**8)
    for i, x in enumerate(xs):
        before = [p.numpy().copy() for p in model.parameters()]
        opt.zero_grad()
        with gpunet.autocast(dtype=F16), np.errstate(over="ignore", invalid="ignore"):
            loss = F.cross_entropy(model(gpunet.tensor(x)), y)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i in bad:
            for a, p in zip(before, model.parameters()):
                np.testing.assert_array_equal(a, p.numpy(), err_msg=f"skipped step {i}")
        _check_copy(model, gpunet.tensor(xs[0]), F16, f"{opt_name}, scaled step {i}")
    assert scaler.get_scale() == 2.0**8 * 0.5 ** len(bad)
    ref, ref_opt = make()
    for i, x in enumerate(xs):
        if i not in bad:
            _train_step(ref, ref_opt, gpunet.tensor(x), F16)
    for p, q in zip(model.parameters(), ref.parameters()):
        _same(p, q, f"{opt_name}: scaled run vs the clean steps alone")


def test_a_captured_in_place_update_under_autocast_replays_the_cast() -> None:
    x, w = _data()
    t, r = gpunet.zeros((4, 3)), gpunet.zeros((4, 3))

    def step(x: gpunet.Tensor, w: gpunet.Tensor) -> gpunet.Tensor:
        with gpunet.no_grad(), gpunet.autocast(dtype=BF16):
            t.__iadd__(x @ w)
        return t

    run = gpunet.capture(step)
    for i in range(4):
        run(x * float(i + 1), w)
        with gpunet.no_grad():
            r += ((x * float(i + 1)).to(BF16) @ w.to(BF16)).to(F32)
        _same(t, r, f"captured t += x @ w, call {i}")
    assert run.replays >= 1
