"""Devices: parsing, the scoped default, the automatic choice and its notice, GPUNET_DEVICE,
the errors for a missing GPU, ``gpunet.info()``, and the device/dtype compatibility check.

Machines without a GPU are simulated by swapping ``sys.modules["cupy"]`` and re-running the
probe; a second device is simulated by a NumPy backend registered under ``cuda:7``.
"""

from __future__ import annotations

import logging
import sys
import threading
import types

import numpy as np
import pytest

import gpunet
from gpunet import backend as gb
from gpunet.backend.numpy_backend import NumpyBackend

FAKE = gpunet.Device("cuda", 7)


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch):
    """Forget the probe and the automatic device before and after the test."""
    monkeypatch.delenv("GPUNET_DEVICE", raising=False)
    gb._reset_probe()
    yield
    gb._reset_probe()


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> NumpyBackend:
    """A second "device", cuda:7, served by NumPy: mixing devices without a GPU."""
    backend = NumpyBackend(FAKE)
    monkeypatch.setitem(gb._backends, FAKE, backend)
    return backend


def fake_cupy(count: int | None) -> types.ModuleType:
    """A stand-in CuPy module: ``count`` devices, or a driver error when None."""

    def get_device_count() -> int:
        if count is None:
            raise RuntimeError(
                "cudaErrorInsufficientDriver: CUDA driver version is "
                "insufficient for CUDA runtime version"
            )
        return count

    mod = types.ModuleType("cupy")
    mod.__version__ = "99.0.0"
    mod.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(
            getDeviceCount=get_device_count,
            getDeviceProperties=lambda i: {"name": f"Fake GPU {i}".encode()},
        )
    )
    return mod


def gpunet_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gpunet" and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------- parsing, equality
@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("cpu", gpunet.Device("cpu")),
        ("CPU", gpunet.Device("cpu")),
        ("cuda", gpunet.Device("cuda", 0)),
        ("cuda:1", gpunet.Device("cuda", 1)),
        (" cuda:12 ", gpunet.Device("cuda", 12)),
        ("gpu:2", gpunet.Device("cuda", 2)),
    ],
)
def test_device_parsing(spec, want) -> None:
    d = gpunet.device(spec)
    assert d == want and d.type == want.type and d.index == want.index
    assert gpunet.device(d) is d


@pytest.mark.parametrize(
    "spec", ["tpu", "", "cuda:", "cpu:", "cuda:x", "cuda:-1", "cuda:1:2", "cpu:0", "cuda:²", "gpu0"]
)
def test_bad_device_strings_raise_value_error(spec) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        gpunet.device(spec)


def test_non_string_device_raises_type_error() -> None:
    with pytest.raises(TypeError, match="a device is a string"):
        gpunet.device(0)


def test_device_compares_equal_to_strings() -> None:
    assert gpunet.Device("cuda", 1) == "cuda:1"
    assert gpunet.Device("cuda", 0) == "cuda"  # "cuda" means device 0
    assert gpunet.Device("cuda", 1) != "cuda:0"
    assert gpunet.Device("cpu") == "cpu" and gpunet.Device("cpu") != "cuda"
    assert gpunet.Device("cpu") != "not a device"  # no exception from ==
    assert str(gpunet.Device("cuda", 3)) == "cuda:3" and str(gpunet.Device("cpu")) == "cpu"
    assert repr(gpunet.Device("cuda", 3)) == "device('cuda:3')"
    assert len({gpunet.Device("cuda", 1), gpunet.device("cuda:1"), gpunet.Device("cpu")}) == 2


# ---------------------------------------------------------------------- scoped default
def test_use_device_cpu() -> None:
    with gpunet.use_device("cpu") as d:
        assert d == "cpu"
        assert gpunet.default_device() == "cpu"
        assert gpunet.zeros(2).device == "cpu"


def test_use_device_nests_and_restores(fake_device) -> None:
    outer = gpunet.default_device()
    with gpunet.use_device("cuda:7"):
        assert gpunet.default_device() == FAKE
        assert gpunet.ones(3).device == FAKE
        assert gpunet.randn(2).device == FAKE
        with gpunet.use_device("cpu"):
            assert gpunet.default_device() == "cpu"
            assert gpunet.ones(3).device == "cpu"
        assert gpunet.default_device() == FAKE
        assert gpunet.tensor([1.0]).device == FAKE
    assert gpunet.default_device() == outer


def test_use_device_restores_after_an_exception(fake_device) -> None:
    outer = gpunet.default_device()
    with pytest.raises(KeyError), gpunet.use_device("cuda:7"):
        raise KeyError("boom")
    assert gpunet.default_device() == outer


def test_use_device_is_per_thread(fake_device) -> None:
    seen = []
    with gpunet.use_device("cuda:7"):
        worker = threading.Thread(target=lambda: seen.append(gpunet.default_device()))
        worker.start()
        worker.join()
    assert seen and seen[0] != FAKE


def test_explicit_device_argument_beats_the_scope(fake_device) -> None:
    with gpunet.use_device("cuda:7"):
        assert gpunet.zeros(2, device="cpu").device == "cpu"
        assert gpunet.tensor([1.0], device="cpu").device == "cpu"


def test_to_moves_between_devices_and_gradients_come_back(fake_device) -> None:
    x = gpunet.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x.to("cuda:7")
    assert y.device == FAKE and y.grad_fn == "device_put"
    z = (y * y).to("cpu")
    assert z.device == "cpu"
    z.sum().backward()
    assert x.grad.device == "cpu"
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])


# ---------------------------------------------------------------------- the automatic choice
def test_auto_choice_here_is_cpu_with_one_notice(fresh_probe, caplog) -> None:
    found = gb.probe_cuda()
    if found.available:
        pytest.skip(f"this machine has a GPU: {found.reason}")
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        assert gpunet.default_device() == "cpu"
        assert gpunet.default_device() == "cpu"
        gpunet.zeros(3)
    notices = gpunet_warnings(caplog)
    assert len(notices) == 1
    message = notices[0].getMessage()
    assert "\n" not in message
    assert "CPU" in message and found.reason in message
    if "cupy" in sys.modules and sys.modules["cupy"] is not None:
        assert "CuPy" in message and "no usable CUDA driver" in message


def test_auto_choice_without_cupy(fresh_probe, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        assert gpunet.default_device() == "cpu"
        gpunet.default_device()
    notices = gpunet_warnings(caplog)
    assert len(notices) == 1
    assert "CuPy is not installed" in notices[0].getMessage()
    found = gb.probe_cuda()
    assert not found.available and found.cupy_version is None


def test_auto_choice_with_cupy_but_no_driver(fresh_probe, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(None))
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        assert gpunet.default_device() == "cpu"
    (notice,) = gpunet_warnings(caplog)
    assert "CuPy 99.0.0 found no usable CUDA driver" in notice.getMessage()
    assert "InsufficientDriver" in notice.getMessage()
    assert gb.probe_cuda().cupy_version == "99.0.0"


def test_auto_choice_with_cupy_and_no_device(fresh_probe, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(0))
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        assert gpunet.default_device() == "cpu"
    (notice,) = gpunet_warnings(caplog)
    assert "found no CUDA device" in notice.getMessage()


def test_auto_choice_with_a_gpu_is_cuda_0_silently(fresh_probe, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(2))
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        assert gpunet.default_device() == "cuda:0"
    assert gpunet_warnings(caplog) == []
    found = gb.probe_cuda()
    assert found.available and found.device_count == 2
    assert found.devices == ("Fake GPU 0", "Fake GPU 1")
    info = gpunet.info()
    assert info["cuda_available"] and info["cuda_devices"] == ["Fake GPU 0", "Fake GPU 1"]
    with pytest.raises(RuntimeError, match="does not exist: 2 CUDA device"):
        gpunet.get_backend("cuda:5")


def test_probe_runs_once(fresh_probe, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(None))
    first = gb.probe_cuda()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1))
    assert gb.probe_cuda() is first  # cached until _reset_probe
    gb._reset_probe()
    assert gb.probe_cuda().available


# ---------------------------------------------------------------------- GPUNET_DEVICE
def test_env_override_cpu_skips_the_probe(fresh_probe, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GPUNET_DEVICE", "cpu")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1))  # would pick cuda:0 if consulted
    with caplog.at_level(logging.WARNING, logger="gpunet"):
        assert gpunet.default_device() == "cpu"
        assert gpunet.zeros(1).device == "cpu"
    assert gpunet_warnings(caplog) == []


def test_env_override_names_a_cuda_device(fresh_probe, monkeypatch) -> None:
    monkeypatch.setenv("GPUNET_DEVICE", "cuda:1")
    assert gpunet.default_device() == gpunet.Device("cuda", 1)
    with gpunet.use_device("cpu"):  # a scope still wins over the environment
        assert gpunet.default_device() == "cpu"


def test_env_override_bad_value_raises(fresh_probe, monkeypatch) -> None:
    monkeypatch.setenv("GPUNET_DEVICE", "tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        gpunet.default_device()


def test_env_override_is_read_once(fresh_probe, monkeypatch) -> None:
    monkeypatch.setenv("GPUNET_DEVICE", "cpu")
    assert gpunet.default_device() == "cpu"
    monkeypatch.setenv("GPUNET_DEVICE", "cuda:3")
    assert gpunet.default_device() == "cpu"  # chosen once, until reset
    gb._reset_probe()
    assert gpunet.default_device() == "cuda:3"


# ---------------------------------------------------------------------- no GPU: clear errors
@pytest.fixture
def no_gpu(fresh_probe, monkeypatch):
    """A machine with CuPy but no driver, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(None))


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpunet.zeros(2, device="cuda"),
        lambda: gpunet.tensor([1.0], device="cuda:0"),
        lambda: gpunet.randn(2, device="cuda"),
        lambda: gpunet.get_backend("cuda"),
        lambda: gpunet.tensor([1.0]).to("cuda"),
        lambda: gpunet.tensor([1.0]).cuda(),
    ],
)
def test_requesting_cuda_without_a_gpu_says_why_and_what_to_do(no_gpu, make) -> None:
    with pytest.raises(RuntimeError) as err:
        make()
    message = str(err.value)
    assert "not usable" in message
    assert "no usable CUDA driver" in message  # why
    assert "device='cpu'" in message and "pip install" in message  # what to do


def test_use_device_cuda_fails_at_the_with_line(no_gpu) -> None:
    before = gpunet.default_device()
    with pytest.raises(RuntimeError, match="not usable"), gpunet.use_device("cuda"):
        pytest.fail("the block must not run")
    assert gpunet.default_device() == before


def test_info_reports_versions_and_reason(no_gpu) -> None:
    info = gpunet.info()
    assert info["gpunet"] == gpunet.__version__
    assert info["numpy"] == np.__version__
    assert info["python"].count(".") == 2 and info["scipy"]
    assert info["cupy"] == "99.0.0"
    assert info["cuda_available"] is False and info["cuda_devices"] == []
    assert "no usable CUDA driver" in info["why"]
    assert info["default_device"] == "cpu"
    assert info["GPUNET_DEVICE"] is None


def test_info_on_this_machine(fresh_probe) -> None:
    info = gpunet.info()
    found = gb.probe_cuda()
    assert info["why"] == found.reason and info["cuda_available"] == found.available
    assert info["default_device"] == str(gpunet.default_device())


# ---------------------------------------------------------------------- mixing devices / dtypes
def test_mixing_devices_raises_naming_both(fake_device) -> None:
    x = gpunet.tensor(np.ones(3, np.float32), requires_grad=True)
    y = gpunet.Tensor._wrap(np.ones(3, np.float32), fake_device)
    with pytest.raises(RuntimeError) as err:
        x + y
    message = str(err.value)
    assert "gpunet.add" in message
    assert "cpu" in message and "cuda:7" in message
    assert "(3,)" in message and "float32" in message
    assert ".to(" in message
    assert x.grad is None and x._node is None


@pytest.mark.parametrize(
    "op",
    [
        lambda x, y: x * y,
        lambda x, y: x @ y,
        lambda x, y: gpunet.where(x > 0, x, y),
        lambda x, y: gpunet.concatenate([x, y]),
        lambda x, y: gpunet.maximum(x, y),
    ],
)
def test_mixing_devices_in_other_ops(fake_device, op) -> None:
    x = gpunet.tensor(np.ones(3, np.float32), requires_grad=True)
    y = gpunet.Tensor._wrap(np.ones(3, np.float32), fake_device)
    with pytest.raises(RuntimeError, match=r"different devices.*cuda:7.*\.to\("):
        op(x, y)


def test_indices_on_another_device_raise(fake_device) -> None:
    x = gpunet.zeros(4)
    idx = gpunet.Tensor._wrap(np.array([0, 1]), fake_device)
    with pytest.raises(RuntimeError, match="cuda:7"):
        x[idx]


@pytest.mark.parametrize(
    "op",
    [
        lambda x, w: x + w,
        lambda x, w: w - x,
        lambda x, w: x * w,
        lambda x, w: x @ w,
        lambda x, w: gpunet.maximum(x, w),
        lambda x, w: gpunet.concatenate([x, w]),
        lambda x, w: gpunet.where(x > 0, x, w),
    ],
)
def test_mixing_dtypes_raises_before_anything_changes(op) -> None:
    x = gpunet.tensor(np.ones(3, np.float32), requires_grad=True)
    w = gpunet.tensor(np.ones(3, np.float64), requires_grad=True)
    h = x * 2.0  # a non-leaf input whose node must not change either
    node = h._node
    with pytest.raises(TypeError) as err:
        op(h, w)
    message = str(err.value)
    assert "float32" in message and "float64" in message and ".to(" in message
    assert "promote" in message
    assert x.grad is None and w.grad is None
    assert x._node is None and w._node is None and h._node is node
    h.sum().backward()  # the graph is untouched and still works
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_mixing_dtypes_in_a_broadcast_op() -> None:
    x = gpunet.tensor(np.ones((2, 3), np.float32), requires_grad=True)
    w = gpunet.tensor(np.ones(3, np.float64), requires_grad=True)
    with pytest.raises(TypeError, match=r"float32.*float64"):
        x + w
    assert x.grad is None and w.grad is None and x._node is None and w._node is None


def test_check_compatible_directly(fake_device) -> None:
    from gpunet.autodiff import check_compatible

    a = gpunet.zeros(2)
    b = gpunet.Tensor._wrap(np.zeros(2, np.float32), fake_device)
    with pytest.raises(RuntimeError, match=r"x\.to\('cpu'\) or x\.to\('cuda:7'\)"):
        check_compatible(gpunet.primitives.add, [a, b])
    # the mask of ``where`` is exempt from the dtype rule
    check_compatible(gpunet.primitives.where, [gpunet.zeros(2) > 0, a, a])
    with pytest.raises(TypeError, match="bool"):
        check_compatible(gpunet.primitives.add, [gpunet.zeros(2) > 0, a])


def test_device_tensors_do_not_convert_implicitly(fake_device) -> None:
    y = gpunet.Tensor._wrap(np.ones(2, np.float32), fake_device)
    with pytest.raises(TypeError, match=r"cuda:7.*\.numpy\(\)"):
        np.asarray(y)
    assert y.numpy().tolist() == [1.0, 1.0]  # explicit copies to the host are fine
    assert "device='cuda:7'" in repr(y)
