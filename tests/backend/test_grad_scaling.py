"""The fused updates' loss-scaling arrays (PyTorch's fused ``grad_scale`` and ``found_inf``):
a scale multiplies each gradient element first (and leaves it so), a set flag skips the update
whole (gradient included)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpunet
from gpunet.backend.generic import ArrayBackend
from gpunet.backend.numpy_backend import NumpyBackend
from gpunet.backend.numpy_fused import CHUNK
from gpunet.backend.updates import AdamHyper, SGDHyper

xps = pytest.importorskip("array_api_strict")
NP = NumpyBackend(None)
STRICT = ArrayBackend(xps, gpunet.Device("cpu"), xps._array_object.Array)
BACKENDS = pytest.mark.parametrize("backend", [NP, STRICT], ids=["numpy", "generic"])
UPDATES = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.1}),
    ("adam", {"lr": 1e-2, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 1e-2}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
]


def host(a: Any) -> np.ndarray:
    return np.asarray(np.from_dlpack(a)) if not isinstance(a, np.ndarray) else a


def run(backend: Any, kind: str, cfg: dict, bufs: list[Any], step: int, **scaling: Any) -> None:
    """One update of ``bufs`` = [p, g, state 1, state 2] in place, as step ``step`` (a count of
    step - 1 steps taken, which the update advances; momentum SGD's first step from it)."""
    p, g, s1, s2 = bufs
    count = backend.asarray(np.full(1, step - 1, np.int64))
    if kind == "sgd":
        hyper = SGDHyper(**cfg)
        buf = s1 if hyper.momentum else None
        backend.sgd_update(p, g, buf, hyper, step=count if buf is not None else None, **scaling)
    else:
        hyper = AdamHyper(**cfg, decoupled=kind == "adamw")
        backend.adam_update(p, g, s1, s2, hyper, step=count, **scaling)
    skipped = "found_inf" in scaling and host(scaling["found_inf"]).reshape(-1)[0] != 0
    assert int(host(count)[0]) == step - skipped or (kind == "sgd" and buf is None)


def buffers(backend: Any, n: int, dtype: Any, seed: int) -> list[Any]:
    r = np.random.default_rng(seed)
    p, g = (r.standard_normal(n).astype(dtype) for _ in range(2))
    state = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
    return [backend.asarray(a) for a in (p, g, *state)]


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [(NP, np.float32), (NP, np.float16), (STRICT, np.float32)],  # (strict has no float16)
    ids=["numpy-f32", "numpy-f16", "generic-f32"],
)
@pytest.mark.parametrize("n", [1000, 2 * CHUNK + 77], ids=["whole", "chunked"])
@pytest.mark.parametrize(("kind", "cfg"), UPDATES)
def test_a_scaled_update_is_the_update_of_the_premultiplied_gradient(
    backend: Any, dtype: Any, n: int, kind: str, cfg: dict
) -> None:
    """Three steps with grad_scale s equal three with g * s computed first in float32 (the
    update's precision), bit for bit; the step leaves the caller's gradient multiplied (in
    its own dtype), as PyTorch's fused optimizers leave ``p.grad`` unscaled."""
    scaled, plain = buffers(backend, n, dtype, 1), buffers(backend, n, dtype, 1)
    g0 = host(scaled[1]).copy()
    for step, s in enumerate((2.0**-16, 0.75, 3.0), start=1):
        scale = backend.asarray(np.asarray(s, np.float32))
        scaled[1] = backend.asarray(g0.copy())
        run(backend, kind, cfg, scaled, step, grad_scale=scale)
        pre = (g0.astype(np.float32) * np.float32(s)).astype(np.float32)
        np.testing.assert_array_equal(host(scaled[1]), pre.astype(dtype))
        if dtype == np.float16:  # the premultiplied gradient must stay float32: use it whole
            ref = [host(b).copy() for b in plain]
            want = _float16_reference(kind, cfg, ref, pre, step)
            plain = [backend.asarray(a) for a in want]
        else:
            plain[1] = backend.asarray(pre)
            run(backend, kind, cfg, plain, step)
        for a, b in zip(scaled, plain):
            if a is not scaled[1]:
                np.testing.assert_array_equal(host(a), host(b))


def _float16_reference(kind: str, cfg: dict, bufs: list, pre: np.ndarray, step: int) -> list:
    """A float16 step from a float32 gradient: the float32 update on widened copies, p rounded
    once to float16 (what the float16 path computes, state_dtype)."""
    p16 = bufs[0]
    work = [p16.astype(np.float32), pre, bufs[2], bufs[3]]
    run(NP, kind, cfg, work, step)
    return [work[0].astype(np.float16), bufs[1], work[2], work[3]]


@BACKENDS
@pytest.mark.parametrize(("kind", "cfg"), UPDATES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic on the generic path
def test_a_set_found_inf_leaves_parameters_and_state_untouched(
    backend: Any, kind: str, cfg: dict
) -> None:
    bufs = buffers(backend, 500, np.float32, 2)
    run(backend, kind, cfg, bufs, 1)  # state that is not zero
    g = host(bufs[1]).copy()
    g[7], g[9] = np.inf, np.nan
    bufs[1] = backend.asarray(g)
    before = [host(b).copy() for b in bufs]
    found = backend.asarray(np.ones(1, np.float32))
    scale = backend.asarray(np.asarray(0.5, np.float32))
    run(backend, kind, cfg, bufs, 2, grad_scale=scale, found_inf=found)
    before[1] = before[1] * np.float32(0.5)  # (the gradient reads unscaled, step taken or not)
    for a, b in zip(bufs, before):
        np.testing.assert_array_equal(host(a), b)
    zero = backend.asarray(np.zeros((), np.float32))  # a clear flag: the step happens
    bufs[1] = backend.asarray(np.ones(500, np.float32))
    run(backend, kind, cfg, bufs, 2, found_inf=zero)
    assert not np.array_equal(host(bufs[0]), before[0])


@BACKENDS
def test_scale_1_without_a_flag_is_todays_update(backend: Any) -> None:
    for kind, cfg in UPDATES:
        a, b = buffers(backend, 700, np.float32, 3), buffers(backend, 700, np.float32, 3)
        run(backend, kind, cfg, a, 1, grad_scale=backend.asarray(np.ones((), np.float32)))
        run(backend, kind, cfg, b, 1)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(host(x), host(y))


def test_bad_scaling_arrays_are_refused_before_any_change() -> None:
    bufs = buffers(NP, 10, np.float32, 4)
    before = host(bufs[0]).copy()
    with pytest.raises(ValueError, match=r"sgd_update: grad_scale must be a float32 array of"):
        run(NP, "sgd", {"lr": 0.1}, bufs, 1, grad_scale=np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"adam_update: found_inf must be a float32 array"):
        run(NP, "adam", {"lr": 0.1}, bufs, 1, found_inf=np.zeros((), np.float64))
    with pytest.raises(ValueError, match="grad_scale must live with the parameters"):
        run(NP, "sgd", {"lr": 0.1}, bufs, 1, grad_scale=np.float32(2.0))
    np.testing.assert_array_equal(bufs[0], before)
