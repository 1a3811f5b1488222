"""gpunet.autocast: one policy table at the dispatch point, registry-driven."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from primitives.specs import SPECS

import gpunet
from gpunet import amp
from gpunet.autodiff import observing
from gpunet.primitives import REGISTRY

BF16, F16, F32 = gpunet.bfloat16, gpunet.float16, gpunet.float32


def test_every_primitive_has_one_policy_and_the_table_names_no_other() -> None:
    missing = sorted(set(REGISTRY) - set(amp.POLICY))
    assert not missing, f"primitives without an autocast policy in gpunet.amp.POLICY: {missing}"
    assert not sorted(set(amp.POLICY) - set(REGISTRY))
    assert set(amp.POLICY.values()) <= {amp.LOWER, amp.FLOAT32, amp.PROMOTE, amp.FOLLOW}
    assert {n for n, p in amp.POLICY.items() if p is amp.LOWER} == {"matmul", "linear_activation"}


def _floats(values: Any) -> list[Any]:
    return [v.dtype for v in values if v is not None and gpunet.dtypes.is_floating(v.dtype)]


@pytest.mark.parametrize("name", sorted(REGISTRY))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_primitive_sees_the_dtypes_its_policy_says(name: str, data: st.DataObject) -> None:
    """GEMMs are fed float32 and must run in bfloat16; every other op is fed bfloat16 and must
    run in float32 (FLOAT32) or stay in bfloat16 (the rest)."""
    policy = amp.POLICY[name]
    case = SPECS[name](data.draw)
    fed = F32 if policy is amp.LOWER else BF16
    args = [gpunet.tensor(np.asarray(a, np.float32), dtype=fed) for a in case.args]
    seen: list[tuple[tuple, Any]] = []
    listen = observing(lambda n, ins, params, out: seen.append((ins, out)) if n == name else None)
    with listen, gpunet.autocast(dtype=BF16):
        case.fn(*args)
    assume(seen)  # (a broadcast to the same shape applies nothing)
    want = {amp.LOWER: BF16, amp.FLOAT32: F32}.get(policy, BF16)
    for ins, _ in seen:
        skip = REGISTRY[name].nondiff
        got = _floats(a for i, a in enumerate(ins) if i not in skip)
        if name == "cast":
            got = got[:1]  # (its output dtype is its parameter)
        assert all(d == want for d in got), f"{name} ({policy}): inputs {got}, want {want}"


def test_promote_takes_the_widest_and_float64_is_never_lowered() -> None:
    x = gpunet.ones((2, 3), dtype=BF16)
    with gpunet.autocast(dtype=BF16):
        assert (x + gpunet.ones((2, 3))).dtype == F32
        assert (x * gpunet.ones((2, 3), dtype=gpunet.float64)).dtype == gpunet.float64
        assert (x.to(F16) - x).dtype == F32  # float16 with bfloat16 meet at float32
        d = gpunet.ones((3, 2), dtype=gpunet.float64)
        assert (d.T @ d).dtype == gpunet.float64
    assert x.to(F32).dtype == F32


def _mlp_grads(precision: Any) -> tuple[np.ndarray, list[np.ndarray], list[Any]]:
    gpunet.manual_seed(0)
    model = gpunet.nn.Sequential(
        gpunet.nn.Linear(12, 32), gpunet.nn.GELU(), gpunet.nn.LayerNorm(32), gpunet.nn.Linear(32, 5)
    )
    rng = np.random.default_rng(1)
    x = gpunet.tensor(rng.standard_normal((16, 12)).astype(np.float32))
    y = gpunet.tensor(rng.integers(0, 5, 16))
    with gpunet.autocast(dtype=precision or BF16, enabled=precision is not None):
        out = model(x)
        loss = gpunet.nn.functional.cross_entropy(out, y)
    loss.backward()
    params = list(model.parameters())
    return (
        loss.numpy(),
        [p.grad.numpy().astype(np.float64) for p in params],
        [out.dtype, loss.dtype] + [p.grad.dtype for p in params],
    )


@pytest.mark.parametrize(("low", "eps"), [(BF16, 2**-8), (F16, 2**-11)])
def test_gradients_under_autocast_match_float32_within_the_precision(low: Any, eps: float) -> None:
    loss32, g32, _ = _mlp_grads(None)
    loss, g, kinds = _mlp_grads(low)
    assert kinds[0] == low  # the last Linear's GEMM
    assert kinds[1] == F32 and all(k == F32 for k in kinds[2:])  # float32 master gradients
    assert abs(float(loss) - float(loss32)) < 20 * eps
    for a, b in zip(g, g32):
        assert np.abs(a - b).max() <= 30 * eps * max(np.abs(b).max(), 1e-3)
    assert not all(np.array_equal(a, b) for a, b in zip(g, g32))  # (it did run in low precision)


def test_linear_runs_in_low_precision_and_its_gradient_comes_back_float32() -> None:
    w = gpunet.randn(4, 3, requires_grad=True)
    x = gpunet.randn(5, 4)
    with gpunet.autocast(dtype=F16):
        z = x @ w
        assert z.dtype == F16
        assert z.sum().dtype == F32
        z.sum().backward()
    assert w.grad.dtype == F32
    np.testing.assert_allclose(w.grad.numpy(), x.numpy().sum(0)[:, None].repeat(3, 1), rtol=2e-3)


def test_composes_with_no_grad_and_nests_with_enabled_false() -> None:
    w = gpunet.randn(4, 3, requires_grad=True)
    with gpunet.no_grad(), gpunet.autocast(dtype=BF16):
        z = gpunet.randn(2, 4) @ w
        assert z.dtype == BF16 and not z.requires_grad
        with gpunet.autocast(enabled=False):
            assert (gpunet.randn(2, 4) @ w).dtype == F32
            assert not amp.is_autocast_enabled()
        assert amp.is_autocast_enabled()
    assert not amp.is_autocast_enabled()
    assert (gpunet.randn(2, 4) @ w).dtype == F32


def test_only_low_precision_dtypes_are_accepted() -> None:
    with pytest.raises(ValueError, match=r"bfloat16 or gpunet\.float16, got float32"):
        gpunet.autocast(dtype=F32)


def test_takes_pytorchs_device_type_first_and_casts_only_that_devices_ops() -> None:
    """torch.autocast(device_type, dtype=...): autocast for "cuda" leaves CPU ops alone, as
    in PyTorch; None (gpunet's default) casts on every device."""
    w, x = gpunet.randn(4, 3), gpunet.randn(2, 4)
    with gpunet.autocast("cpu", dtype=BF16):
        assert (x @ w).dtype == BF16
    with gpunet.autocast(device_type="cpu", dtype=F16):
        assert (x @ w).dtype == F16
    with gpunet.autocast("cuda", dtype=BF16):
        assert amp.is_autocast_enabled() and (x @ w).dtype == F32
        with pytest.raises(TypeError, match="different dtypes"):  # (no promote: as if off)
            _ = x.to(BF16) + x
    with gpunet.autocast("cuda", dtype=BF16), gpunet.autocast("cpu"):
        assert (x @ w).dtype == BF16  # (the inner one's device type, restored after)
    for bad in ("cuda:0", "tpu", BF16):
        with pytest.raises(ValueError, match=r"device_type must be 'cpu', 'cuda' or None"):
            gpunet.autocast(bad)


def test_dtype_none_is_the_device_types_default_as_in_pytorch() -> None:
    """torch.autocast(dtype=None): the device type's default low dtype (float16 on "cuda",
    bfloat16 on "cpu"; bfloat16 with no device type); enabled=False casts nothing."""
    w, x = gpunet.randn(4, 3), gpunet.randn(2, 4)
    with gpunet.autocast(dtype=None, enabled=False):
        assert (x @ w).dtype == F32
    with gpunet.autocast(dtype=None):
        assert (x @ w).dtype == BF16
    with gpunet.autocast("cpu", dtype=None):
        assert (x @ w).dtype == BF16
    assert gpunet.autocast("cuda").dtype == F16 and gpunet.autocast().dtype == BF16


@pytest.mark.parametrize(
    ("set_to_none", "in_backward"), [(True, False), (False, False), (True, True)]
)
def test_a_captured_step_under_autocast_replays_what_eager_computes(
    set_to_none: bool, in_backward: bool
) -> None:
    """Also where backward casts a weight's gradient back into an array it adds to (the
    zeroed gradient of ``set_to_none=False``, the weight itself in backward): that cast is a
    call the capture records, not an array made where it cannot see."""

    def make() -> tuple[Any, Any]:
        gpunet.manual_seed(3)
        model = gpunet.nn.MLP([6, 16, 4])
        return model, gpunet.optim.SGD(model.parameters(), lr=0.1, in_backward=in_backward)

    rng = np.random.default_rng(4)
    batches = [
        (
            gpunet.tensor(rng.standard_normal((8, 6)).astype(np.float32)),
            gpunet.tensor(rng.integers(0, 4, 8)),
        )
        for _ in range(5)  # (the first step makes the weights' copy: recorded at 2 and 3)
    ]
    results = []
    for captured in (False, True):
        model, opt = make()

        def step(x: gpunet.Tensor, y: gpunet.Tensor, model=model, opt=opt) -> gpunet.Tensor:  # type: ignore[no-untyped-def]
            opt.zero_grad(set_to_none=set_to_none)
            with gpunet.autocast(dtype=BF16):
                loss = gpunet.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        run = gpunet.capture(step) if captured else step
        losses = [float(run(x, y).item()) for x, y in batches]
        results.append((losses, [p.numpy().copy() for p in model.parameters()]))
        if captured:
            assert run.replays >= 2  # (recorded, then replayed: not an eager fallback)
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(a, b)


def test_float32_weight_gradients_are_written_into_the_optimizer_buffer_as_cast_back() -> None:
    """Master weights: the gradient of a float32 weight that autocast cast to bfloat16 is cast
    back straight into the optimizer's float32 flat buffer (no copy in afterwards)."""
    gpunet.manual_seed(0)
    model = gpunet.nn.MLP([6, 16, 4])
    opt = gpunet.optim.SGD(model.parameters(), lr=0.1)
    x, y = gpunet.randn(8, 6), gpunet.tensor(np.arange(8) % 4)
    with gpunet.autocast(dtype=BF16):
        loss = gpunet.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    (flat,) = opt._flats
    for p in model.parameters():
        assert p.dtype == F32 and p.grad.dtype == F32
        assert np.shares_memory(p.grad.numpy(), flat.grad)
    gpunet.manual_seed(0)
    plain = gpunet.nn.MLP([6, 16, 4])  # the same weights, no optimizer: .grad accumulated
    with gpunet.autocast(dtype=BF16):
        gpunet.nn.functional.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())
