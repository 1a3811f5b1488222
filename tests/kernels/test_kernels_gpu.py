"""The fused kernels on a real GPU, against golden float64 outputs
(tests/kernels/golden/kernels.npz).

The goldens are the NumPy backend's results in float64 on fixed-seed inputs. The GPU tests
(marked ``gpu``: they skip, with the reason, where no CUDA device answers) run every
activation, bias + activation, the optimizer updates and the gradient norm through
CupyBackend in float32, float64 and float16, and compare. ``test_goldens_are_current`` (no
GPU needed) recomputes the goldens with the NumPy backend, so they never drift from the
formulas. After changing a formula on purpose, regenerate them:

    .venv/bin/python tests/kernels/test_kernels_gpu.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kernel_tools import emulated_cupy_backend, emulated_kernels

import gpunet
from gpunet.backend import kernels as K
from gpunet.backend import probe_cuda
from gpunet.backend.fused import ACTIVATIONS, FROM_OUTPUT
from gpunet.backend.numpy_backend import NumpyBackend
from gpunet.backend.updates import AdamHyper, SGDHyper, state_dtype

GOLDEN = Path(__file__).parent / "golden" / "kernels.npz"
ALPHA = {"leaky_relu": 0.1, "elu": 1.0, "softplus": 0.7}
STEPS = 10
# (rtol, atol per unit of |g|) of a device result against the float64 golden
TOLERANCE = {np.float64: (1e-12, 1e-13), np.float32: (2e-5, 2e-6), np.float16: (4e-3, 4e-3)}
OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    "adam": ("adam", {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}),
    "adamw": (
        "adamw",
        {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1},
    ),
}


def golden_inputs() -> dict[str, np.ndarray]:
    """Fixed-seed inputs, away from denormal results (the GPU flushes them to zero)."""
    r = np.random.default_rng(20240601)
    return {
        "x": np.concatenate([r.uniform(-8, 8, 290), [-20.0, -3.0, -0.5, 0.0, 0.5, 3.0, 20.0]]),
        "g": r.standard_normal(297),
        "X": r.uniform(-5, 5, (12, 25)),
        "b": r.uniform(-1, 1, 25),
        "p": r.standard_normal(300),
        "target": r.standard_normal(300),
        "noise": r.standard_normal((STEPS, 300)) * 0.1,
    }


def compute(backend: Any, dtype: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every fused op on ``backend`` with inputs cast to ``dtype``; results as NumPy arrays."""
    put = lambda a: backend.asarray(np.array(a, dtype=dtype))  # a copy: updates are in place
    host = backend.to_numpy
    x, g, X, b = (put(arrays[k]) for k in ("x", "g", "X", "b"))
    out: dict[str, np.ndarray] = {}
    for act in ACTIVATIONS:
        a = ALPHA.get(act, 0.0)
        y = backend.activation(x, name=act, alpha=a)
        out[f"{act}/fwd"] = host(y)
        out[f"{act}/bwd"] = host(backend.activation_backward(g, x, name=act, alpha=a))
        if act in FROM_OUTPUT:
            dy = backend.activation_backward(g, y, name=act, alpha=a, from_output=True)
            out[f"{act}/bwd_from_y"] = host(dy)
        yb, pre = backend.bias_activation(X, b, name=act, alpha=a, keep_preactivation=True)
        out[f"{act}/bias"], out[f"{act}/bias_pre"] = host(yb), host(pre)
    zeros = np.zeros(arrays["p"].shape, state_dtype(np.dtype(dtype)))  # float16: float32 state
    for key, (kind, cfg) in OPTIMIZERS.items():
        p = put(arrays["p"])
        state = [backend.asarray(zeros.copy()), backend.asarray(zeros.copy())]
        count = backend.asarray(np.zeros(1, np.int64))  # (each update advances it)
        for step in range(1, STEPS + 1):
            grad = put(host(p).astype(np.float64) - arrays["target"] + arrays["noise"][step - 1])
            if kind == "sgd":
                backend.sgd_update(p, grad, state[0], SGDHyper(**cfg), step=count)
            else:
                hyper = AdamHyper(**cfg, decoupled=kind == "adamw")
                backend.adam_update(p, grad, *state, hyper, step=count)
        out[f"{key}/param"] = host(p)
    out["grad_norm"] = host(backend.grad_norm(put(arrays["p"])))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def load_golden() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(GOLDEN) as data:
        inputs = {k.removeprefix("in/"): data[k] for k in data.files if k.startswith("in/")}
        outputs = {k.removeprefix("out/"): data[k] for k in data.files if k.startswith("out/")}
    return inputs, outputs


def test_goldens_are_current() -> None:
    inputs, outputs = load_golden()
    for k, v in golden_inputs().items():
        np.testing.assert_array_equal(inputs[k], v, err_msg=f"golden input {k}")
    fresh = compute(NumpyBackend(None), np.float64, inputs)
    assert sorted(fresh) == sorted(outputs)
    for k in fresh:
        np.testing.assert_allclose(fresh[k], outputs[k], rtol=1e-12, atol=1e-300, err_msg=k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_golden_comparison_under_host_emulation(dtype: Any) -> None:
    """The GPU test's own comparison, run on the g++ build of the kernels: checks the test
    and its tolerances here, where no GPU is."""
    backend = emulated_cupy_backend(emulated_kernels())
    inputs, outputs = load_golden()
    check_against_golden(compute(backend, dtype, inputs), outputs, inputs, dtype)
    assert backend._kernels.launches, "the kernels ran"


def check_against_golden(got: dict, outputs: dict, inputs: dict, dtype: Any) -> None:
    rtol, atol = TOLERANCE[dtype]
    activations = {k for k in outputs if k.split("/")[0] in ACTIVATIONS}
    assert activations <= set(got) <= set(outputs)
    for k, v in got.items():
        want = outputs[k]
        scale = np.abs(inputs["g"]) if "/bwd" in k else 1.0  # g * f': error ~ |g|
        err = np.abs(v - want)
        bad = np.flatnonzero(~(err <= rtol * np.abs(want) + atol * scale))
        assert bad.size == 0, f"{k} ({np.dtype(dtype)}): {v.flat[bad[:4]]} vs {want.flat[bad[:4]]}"


def test_warmup_is_a_quiet_no_op_without_a_gpu(monkeypatch) -> None:
    if probe_cuda().available:
        pytest.skip("a GPU answers here: test_warmup_compiles_every_kernel covers it")
    assert gpunet.warmup() is False
    assert gpunet.warmup("cpu") is False


# ---------------------------------------------------------------------- on a GPU
_probe = probe_cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not _probe.available, reason=f"no CUDA device: {_probe.reason}")
class TestOnGPU:
    @pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
    def test_fused_ops_match_goldens(self, dtype: Any) -> None:
        inputs, outputs = load_golden()
        got = compute(gpunet.get_backend("cuda"), dtype, inputs)
        check_against_golden(got, outputs, inputs, dtype)

    def test_warmup_compiles_every_kernel(self) -> None:
        assert gpunet.warmup() is True
        backend = gpunet.get_backend("cuda")
        assert set(backend.kernels._modules) == set(K.SOURCES)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_cross_entropy_row_kernels_match_numpy(self, reduction: str) -> None:
        rng = np.random.default_rng(1)
        z = (rng.standard_normal((300, 10)) * 30).astype(np.float32)
        y = rng.integers(0, 10, 300)
        g = np.float32(1.5) if reduction != "none" else rng.uniform(0.5, 2, 300).astype(np.float32)
        cpu, gpu = NumpyBackend(None), gpunet.get_backend("cuda")
        loss = gpu.cross_entropy(gpu.asarray(z), gpu.asarray(y), reduction=reduction)
        dz = gpu.cross_entropy_backward(
            gpu.asarray(np.asarray(g)), gpu.asarray(z), gpu.asarray(y), reduction=reduction
        )
        np.testing.assert_allclose(
            gpu.to_numpy(loss), cpu.cross_entropy(z, y, reduction=reduction), rtol=2e-5
        )
        want = cpu.cross_entropy_backward(np.asarray(g), z, y, reduction=reduction)
        np.testing.assert_allclose(gpu.to_numpy(dz), want, rtol=2e-5, atol=1e-7)

    def test_nothing_is_launched_for_empty_arrays(self) -> None:
        backend = gpunet.get_backend("cuda")
        empty = backend.zeros((0,), np.float32)
        assert backend.activation(empty, name="gelu").shape == (0,)
        assert float(backend.grad_norm(empty)) == 0.0

    def test_gpu_flushes_denormals(self) -> None:
        """-ftz=true: sigmoid(-100) = 3.7e-44 is a float32 denormal; the GPU returns 0."""
        backend = gpunet.get_backend("cuda")
        x = backend.asarray(np.array([-100.0], np.float32))
        assert float(backend.to_numpy(backend.activation(x, name="sigmoid"))[0]) == 0.0
        cpu = NumpyBackend(None).activation(np.array([-100.0], np.float32), name="sigmoid")
        assert 0.0 < cpu[0] < np.finfo(np.float32).tiny

    def test_autodiff_uses_the_fused_backward(self) -> None:
        rng = np.random.default_rng(0)
        raw = rng.standard_normal((64, 33)).astype(np.float32)
        grads = {}
        for dev in ("cpu", "cuda"):
            x = gpunet.tensor(raw, device=dev, requires_grad=True)
            loss = (gpunet.gelu(x) * gpunet.silu(x) + gpunet.elu(x).tanh()).sum()
            loss.backward()
            grads[dev] = x.grad.numpy()
        np.testing.assert_allclose(grads["cuda"], grads["cpu"], rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("on_device", [False, True], ids=["lr", "lr_ptr"])
    def test_adam_bias_corrections_from_the_device_count_equal_the_host_s(
        self, on_device: bool
    ) -> None:
        """The kernel's step_size and sqrt(1 - beta2^t), computed from the count in double
        (CUDA's pow), against the host's (glibc's) at counts 1-300 and up to 2^31: a first
        step from zero state with g = 1 and eps = 0 makes p = -step_size * (1 - beta1) /
        (sqrt(1 - beta2) / bc2_sqrt), whose every operation is exact or IEEE-rounded alike on
        both sides (adding 0 to an FMA's product rounds it once), so equal bits here mean
        equal scalars."""
        cpu, gpu = NumpyBackend(None), gpunet.get_backend("cuda")
        counts = [*range(1, 301), 1000, 4096, 12345, 99999, 10**6, 2**31 + 5]
        for decoupled in (False, True):
            lr = 3e-4
            hyper = AdamHyper(lr, 0.9, 0.999, eps=0.0, decoupled=decoupled)
            device_hyper = AdamHyper(
                gpu.asarray(np.asarray(lr)) if on_device else lr, 0.9, 0.999, 0.0, 0.0, decoupled
            )
            want, got = [], []
            for t in counts:
                zeros = [np.zeros(8, np.float32) for _ in range(3)]
                cpu.adam_update(
                    zeros[0],
                    np.ones(8, np.float32),
                    zeros[1],
                    zeros[2],
                    hyper,
                    step=np.full(1, t - 1, np.int64),
                )
                want.append(zeros[0][0])
                p, m, v = (gpu.asarray(np.zeros(8, np.float32)) for _ in range(3))
                count = gpu.asarray(np.full(1, t - 1, np.int64))
                gpu.adam_update(
                    p, gpu.asarray(np.ones(8, np.float32)), m, v, device_hyper, step=count
                )
                got.append(gpu.to_numpy(p)[0])
                assert int(gpu.to_numpy(count)[0]) == t
            np.testing.assert_array_equal(np.array(got), np.array(want))

    @pytest.mark.parametrize("dtype", [np.float32, np.float16])
    def test_scaled_updates_read_the_scale_and_flag_on_the_device(self, dtype: Any) -> None:
        """grad_scale and found_inf as device arrays: the kernel's scaled Adam step matches
        NumPy's, and a set flag leaves p and the state untouched (no host read)."""
        rng = np.random.default_rng(2)
        p0, g = (rng.standard_normal(4099).astype(dtype) for _ in range(2))
        hyper = AdamHyper(1e-2, 0.9, 0.999, 1e-8)
        cpu, gpu = NumpyBackend(None), gpunet.get_backend("cuda")
        scale = np.asarray(1.0 / 3.0, np.float32)
        want = [p0.copy(), np.zeros(4099, np.float32), np.zeros(4099, np.float32)]
        count = np.zeros(1, np.int64)
        want_g = g.copy()  # (the update leaves g * scale in it)
        cpu.adam_update(want[0], want_g, want[1], want[2], hyper, step=count, grad_scale=scale)
        count = gpu.asarray(np.zeros(1, np.int64))
        got = [gpu.asarray(a) for a in (p0, np.zeros(4099, np.float32), np.zeros(4099, np.float32))]
        flag = gpu.asarray(np.zeros(1, np.float32))
        got_g = gpu.asarray(g)
        gpu.adam_update(
            got[0],
            got_g,
            got[1],
            got[2],
            hyper,
            step=count,
            grad_scale=gpu.asarray(scale),
            found_inf=flag,
        )
        for a, b in zip(got, want):
            np.testing.assert_allclose(gpu.to_numpy(a).astype(np.float32), b, rtol=1e-3, atol=1e-6)
        np.testing.assert_array_equal(gpu.to_numpy(got_g), want_g)
        before = [gpu.to_numpy(a).copy() for a in got]
        flag[...] = 1.0
        gpu.adam_update(got[0], gpu.asarray(g), got[1], got[2], hyper, step=count, found_inf=flag)
        for a, b in zip(got, before):
            np.testing.assert_array_equal(gpu.to_numpy(a), b)
        assert int(gpu.to_numpy(count)[0]) == 1  # (the skipped step did not count)

    @pytest.mark.parametrize("low", ["float16", "bfloat16"])
    def test_updates_write_the_low_precision_copy_as_the_cast_of_p(self, low: str) -> None:
        """lowp= on the device: the copy is the round-to-nearest-even cast of the updated p,
        bit for bit, for SGD with momentum and Adam; a skipped step writes the old p's cast."""
        gpu, dtype = gpunet.get_backend("cuda"), np.dtype(getattr(gpunet, low))
        rng = np.random.default_rng(3)
        p0, g = (rng.standard_normal(4099).astype(np.float32) for _ in range(2))
        for flag in (0.0, 1.0):
            for update in ("sgd", "adam"):
                zeros = np.zeros_like(p0)
                p, m, v = (gpu.asarray(a.copy()) for a in (p0, zeros, zeros))
                copy = gpu.asarray(np.zeros(4099, dtype))
                count, found = gpu.asarray(np.zeros(1, np.int64)), gpu.asarray(np.full(1, flag))
                kw = {"step": count, "found_inf": found.astype(np.float32), "lowp": copy}
                if update == "sgd":
                    gpu.sgd_update(p, gpu.asarray(g), m, SGDHyper(0.1, momentum=0.9), **kw)
                else:
                    gpu.adam_update(p, gpu.asarray(g), m, v, AdamHyper(1e-2), **kw)
                host = gpu.to_numpy(p)
                assert gpu.to_numpy(copy).tobytes() == host.astype(dtype).tobytes()
                assert (host.tobytes() == p0.tobytes()) == (flag == 1.0)


if __name__ == "__main__":
    arrays = golden_inputs()
    results = compute(NumpyBackend(None), np.float64, arrays)
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(
        GOLDEN,
        **{f"in/{k}": v for k, v in arrays.items()},
        **{f"out/{k}": v for k, v in results.items()},
    )
    print(f"wrote {GOLDEN}: {len(results)} outputs")
