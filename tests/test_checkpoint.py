"""Checkpoints: round trips of a model and its optimizer, metadata, atomic writes, and one
error listing every mismatch before anything changes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import gpunet as gn
from gpunet import optim
from gpunet.checkpoint import CheckpointError


class Tiny:
    """A stand-in model: the duck-typed interface ``save`` and ``load`` use."""

    def __init__(self, sizes=((3, 2), (2,)), seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            name: gn.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)
            for name, s in zip(("w", "b"), sizes)
        }

    def parameters(self):
        return list(self.params.values())

    def state_dict(self):
        return {k: p.detach() for k, p in self.params.items()}

    def load_state_dict(self, state):
        for k, p in self.params.items():
            p.data[...] = np.asarray(state[k])


def trained(seed=0, steps=2):
    model = Tiny(seed=seed)
    opt = optim.Adam(model.parameters(), lr=0.1)
    for step in range(steps):
        for p in model.parameters():
            p.grad = gn.ones_like(p) * float(step + 1)
        opt.step()
    return model, opt


def test_round_trip_model_optimizer_and_metadata(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, model, opt, epoch=3, sizes=[3, 2], note="hi")
    model2 = Tiny(seed=1)
    opt2 = optim.Adam(model2.parameters(), lr=0.5)
    meta = gn.load(path, model2, opt2)
    assert meta == {"epoch": 3, "sizes": [3, 2], "note": "hi"}
    for p, q in zip(model.parameters(), model2.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert opt2.state[q]["step"] == 2
        np.testing.assert_array_equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    # training continues identically
    for o, m in ((opt, model), (opt2, model2)):
        for p in m.parameters():
            p.grad = gn.ones_like(p)
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_file_is_plain_safetensors(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, model, opt, epoch=1)
    tensors = safetensors.numpy.load_file(str(path))
    assert set(tensors) == {
        "model.w",
        "model.b",
        "optimizer.0.exp_avg",
        "optimizer.0.exp_avg_sq",
        "optimizer.1.exp_avg",
        "optimizer.1.exp_avg_sq",
    }
    np.testing.assert_array_equal(tensors["model.w"], model.params["w"].numpy())
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"]["epoch"] == "1"
    assert json.loads(header["__metadata__"]["gpunet.optimizer"])["state"]["0"] == {"step": 2}


def test_model_only_and_sgd_without_momentum(tmp_path):
    model = Tiny()
    opt = optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = gn.ones_like(p)
    opt.step()
    gn.save(tmp_path / "a.safetensors", model, opt)
    opt2 = optim.SGD(Tiny().parameters(), lr=1.0)
    gn.load(tmp_path / "a.safetensors", optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 0.1
    gn.save(tmp_path / "b.safetensors", model)
    assert gn.load(tmp_path / "b.safetensors", Tiny(seed=3)) == {}
    with pytest.raises(CheckpointError, match="no optimizer state"):
        gn.load(tmp_path / "b.safetensors", Tiny(), opt2)


def test_every_mismatch_is_listed_and_nothing_changes(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, model, opt)
    other = Tiny(sizes=((4, 2), (2,)), seed=5)
    other.params["extra"] = gn.zeros((1,), requires_grad=True)
    before = {k: p.numpy().copy() for k, p in other.params.items()}
    other_opt = optim.Adam(other.parameters())
    with pytest.raises(CheckpointError) as info:
        gn.load(path, other, other_opt)
    msg = str(info.value)
    assert "model.w: shape (3, 2) in the checkpoint, (4, 2) in the model" in msg
    assert "missing from the checkpoint: model.extra" in msg
    assert "param group 0: 2 parameters in the checkpoint, 3 in the optimizer" in msg
    for k, p in other.params.items():
        np.testing.assert_array_equal(p.numpy(), before[k])
    assert other_opt.state == {}


def test_not_a_checkpoint_and_reserved_keys(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a gpunet checkpoint"):
        gn.load(path, Tiny())
    with pytest.raises(ValueError, match="reserved"):
        gn.save(path, Tiny(), **{"gpunet.format": "x"})


def test_a_crash_mid_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, Tiny(seed=0), epoch=1)
    old = path.read_bytes()

    def crash(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk on fire"):
        gn.save(path, Tiny(seed=1), epoch=2)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    monkeypatch.undo()
    assert gn.load(path, Tiny()) == {"epoch": 1}


def test_overwrite_keeps_the_files_mode(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, Tiny())
    assert path.stat().st_mode & 0o777 == 0o644
    os.chmod(path, 0o640)
    gn.save(path, Tiny(seed=2))
    assert path.stat().st_mode & 0o777 == 0o640


def test_with_a_gpunet_module(tmp_path):
    nn = pytest.importorskip("gpunet.nn")
    import gpunet.nn.functional as F

    gn.manual_seed(0)
    model = nn.MLP([4, 8, 3])
    opt = optim.AdamW(model.parameters(), lr=0.01)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = gn.randn(16, 4), gn.tensor(np.arange(16) % 3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    path = tmp_path / "m.safetensors"
    gn.save(path, model, opt, scheduler=sched.state_dict())
    gn.manual_seed(1)
    model2 = nn.MLP([4, 8, 3])
    opt2 = optim.AdamW(model2.parameters(), lr=0.01)
    sched2 = optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    sched2.load_state_dict(gn.load(path, model2, opt2)["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.01 / 8]
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)
        assert np.shares_memory(q.data, opt2._flats[0].data)  # still packed after load


# ---------------------------------------------------------------- unreadable files
def _valid_bytes(tmp_path):
    path = tmp_path / "good.safetensors"
    gn.save(path, Tiny(), epoch=1)
    return path.read_bytes()


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, w=np.zeros(3))
    return buffer.getvalue()


def _header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


UNREADABLE = {
    "missing": (None, "no such file"),
    "directory": (None, "is a directory, not a checkpoint file"),
    "empty": (lambda d: b"", r"is empty \(0 bytes\): not a checkpoint"),
    "five bytes": (lambda d: d[:5], "is 5 bytes, too short for a safetensors header"),
    "header cut": (lambda d: d[:40], r"is truncated: its header needs \d+ bytes, the file has 40"),
    "tensors cut": (lambda d: d[:-3], r"is truncated: its tensors need \d+ bytes, the file has"),
    "corrupt header": (
        lambda d: d[:8] + b"{" + b"#" * (_header_length(d) - 1) + d[8 + _header_length(d) :],
        r"has a corrupt header \(JSONDecodeError",
    ),
    "header without offsets": (
        lambda d: (
            (h := b'{"a": {"dtype": "F32", "shape": [2]}}').__len__().to_bytes(8, "little") + h
        ),
        r"has a corrupt header \(KeyError: 'data_offsets'\)",
    ),
    "a .npz": (lambda d: _npz_bytes(), r"is not a safetensors file \(it starts b'PK\\x03\\x04"),
    "text": (lambda d: b"epoch,loss\n1,0.5\n", r"is not a safetensors file \(it starts b'epoch,lo"),
    "json metadata": (
        lambda d: d.replace(b'"epoch":"1"', b'"epoch":"{"'),
        "the header's 'epoch' is not JSON",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_every_unreadable_file_is_a_checkpoint_error_naming_it(tmp_path, case):
    """Before: safetensors' own error, naming neither the file nor CheckpointError."""
    make, message = UNREADABLE[case]
    path = tmp_path / "model.safetensors"
    if case == "directory":
        path.mkdir()
    elif make is not None:
        data = make(_valid_bytes(tmp_path))
        path.write_bytes(data)
    model = Tiny(seed=1)
    before = [p.numpy().copy() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=message) as e:
        gn.load(path, model)
    assert str(path) in str(e.value)
    shown = e.value.__cause__ or (None if e.value.__suppress_context__ else e.value.__context__)
    assert shown is None  # no chained traceback of safetensors' or the OS's error
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)  # nothing changed


def test_the_metadata_fixture_matches_what_save_writes(tmp_path):
    """The "json metadata" case edits the header text: it must find what it edits."""
    assert b'"epoch":"1"' in _valid_bytes(tmp_path)


def test_safetensors_refusing_the_data_is_a_checkpoint_error(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, Tiny())

    def refuse(name):
        raise RuntimeError("Error while deserializing header: InvalidOffset")

    monkeypatch.setattr(safetensors.numpy, "load_file", refuse)
    with pytest.raises(CheckpointError, match=r"unreadable safetensors data .*InvalidOffset"):
        gn.load(path, Tiny())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_mode_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    gn.save(path, Tiny())
    path.chmod(0)
    with pytest.raises(CheckpointError, match=r"cannot read .*: Permission denied"):
        gn.load(path, Tiny())


# ---------------------------------------------------------------- random generator state
def test_the_generator_state_is_saved_and_restored(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    gn.manual_seed(3)
    gn.rand(5)
    gn.save(path, Tiny())
    want = gn.rand(4).numpy()
    gn.manual_seed(99)
    gn.load(path, Tiny())
    np.testing.assert_array_equal(gn.rand(4).numpy(), want)
    assert gn.random.default_generator.initial_seed() == 3
    gn.manual_seed(99)
    gn.load(path, Tiny(), rng=False)  # leaves the generator alone
    assert not np.array_equal(gn.rand(4).numpy(), want)


def test_an_old_checkpoint_without_generator_state_loads(tmp_path):
    """Written as checkpoints were before the RNG state was saved: loads, the generator is
    left as it was."""
    path = tmp_path / "old.safetensors"
    model = Tiny()
    tensors = {f"model.{k}": v.numpy() for k, v in model.state_dict().items()}
    header = {"gpunet.format": "gpunet-checkpoint-1", "epoch": "7"}
    safetensors.numpy.save_file(tensors, str(path), metadata=header)
    gn.manual_seed(5)
    want = gn.rand(3).numpy()
    gn.manual_seed(5)
    fresh = Tiny(seed=4)
    assert gn.load(path, fresh) == {"epoch": 7}
    np.testing.assert_array_equal(fresh.params["w"].numpy(), model.params["w"].numpy())
    np.testing.assert_array_equal(gn.rand(3).numpy(), want)


class _DeviceStandIn:
    """A backend with a device generator (CupyBackend's three hooks), on the host."""

    def __init__(self, nbytes: int = 16) -> None:
        self.device = gn.backend.Device("cuda", 0)
        self.nbytes = nbytes

    def _new_rng(self, seed: int):
        return np.random.default_rng(seed)

    def _rng_state(self, rng) -> np.ndarray:
        return np.frombuffer(json.dumps(rng.bit_generator.state).encode(), np.int8).copy()

    def _set_rng_state(self, rng, state: np.ndarray) -> None:
        rng.bit_generator.state = json.loads(state.tobytes())


def test_device_generator_states_travel_through_the_checkpoint(tmp_path):
    """A device stream's state is saved as an ``rng.cuda:0`` tensor and restored at the
    device's first use after ``load`` (so a checkpoint loads on a machine without it too)."""
    path = tmp_path / "ckpt.safetensors"
    dev = _DeviceStandIn()
    gen = gn.random.default_generator
    gn.manual_seed(1)
    gen.device_rng(dev).random(7)
    gn.save(path, Tiny())
    with safetensors.safe_open(str(path), "np") as f:
        assert "rng.cuda:0" in f.keys()  # noqa: SIM118
    want = gen.device_rng(dev).random(3)
    gn.manual_seed(2)
    gn.load(path, Tiny())
    assert gen.get_state()["devices"].keys() == {"cuda:0"}  # pending until first use
    np.testing.assert_array_equal(gen.device_rng(dev).random(3), want)
    gn.manual_seed(0)  # forget the stand-in device


def test_cupy_backend_copies_the_curand_states(caplog):
    """CupyBackend's hooks over a stand-in bit generator (NumPy arrays for CuPy's): the
    bytes go out and back; a state of another size (another GPU model) is refused with a
    warning and the fresh stream kept."""
    from types import SimpleNamespace

    from gpunet.backend.cupy_backend import CupyBackend
    from gpunet.backend.generic import ArrayBackend

    backend = object.__new__(CupyBackend)
    ArrayBackend.__init__(backend, np, gn.backend.Device("cuda", 0), np.ndarray)
    backend.cupy = SimpleNamespace(asnumpy=np.array, asarray=np.asarray)
    backend._cuda_device = contextlib.nullcontext()
    rng = SimpleNamespace(bit_generator=SimpleNamespace(_state=np.arange(48, dtype=np.int8)))
    saved = backend._rng_state(rng)
    rng.bit_generator._state[:] = 0
    backend._set_rng_state(rng, saved)
    np.testing.assert_array_equal(rng.bit_generator._state, np.arange(48))
    backend._set_rng_state(rng, np.zeros(40, np.int8))
    np.testing.assert_array_equal(rng.bit_generator._state, np.arange(48))
    assert "has 40 bytes, this GPU's 48; the device stream is reseeded" in caplog.text


# ---------------------------------------------------------------- exact resume with dropout
STEPS, SPLIT = 6, 2


def _dropout_setup(seed: int):
    from gpunet import nn

    gn.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    return model, optim.Adam(model.parameters(), lr=1e-2)


def _dropout_steps(model, opt, start: int, stop: int) -> None:
    import gpunet.nn.functional as F

    for step in range(start, stop):
        r = np.random.default_rng(step)  # the data of each step is fixed; dropout draws
        x = gn.tensor(r.standard_normal((8, 6)).astype(np.float32))
        loss = F.cross_entropy(model(x), r.integers(0, 3, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _resume_in_this_process(ckpt: str, out: str, rng: bool = True) -> None:
    model, opt = _dropout_setup(seed=123)  # other weights and generator state until loaded
    gn.load(ckpt, model, opt, rng=rng)
    _dropout_steps(model, opt, SPLIT, STEPS)
    np.savez(out, **{k: v.numpy() for k, v in model.state_dict().items()})


def test_resume_in_a_fresh_process_is_exact_with_dropout(tmp_path):
    """k steps, save, then n - k steps in a new Python process after ``load``: the weights
    equal n uninterrupted steps bit for bit (the dropout masks continue the same stream)."""
    model, opt = _dropout_setup(seed=0)
    _dropout_steps(model, opt, 0, STEPS)
    want = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    model, opt = _dropout_setup(seed=0)
    _dropout_steps(model, opt, 0, SPLIT)
    ckpt, out = tmp_path / "ckpt.safetensors", tmp_path / "resumed.npz"
    gn.save(ckpt, model, opt)
    code = f"import test_checkpoint as t; t._resume_in_this_process({str(ckpt)!r}, {str(out)!r})"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "GPUNET_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with np.load(out) as got:
        assert sorted(got.files) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)

    # the same resume without the generator state draws other masks: the test can fail
    _resume_in_this_process(str(ckpt), str(out), rng=False)
    with np.load(out) as got:
        assert any(not np.array_equal(got[k], v) for k, v in want.items())


@pytest.mark.gpu
def test_resume_on_a_gpu_is_exact_with_dropout(tmp_path):
    """The device generator's cuRAND states are saved and restored (CuPy draws dropout)."""
    with gn.backend.use_device("cuda"):
        model, opt = _dropout_setup(seed=0)
        _dropout_steps(model, opt, 0, STEPS)
        want = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        model, opt = _dropout_setup(seed=0)
        _dropout_steps(model, opt, 0, SPLIT)
        gn.save(tmp_path / "ckpt.safetensors", model, opt)
        _dropout_steps(model, opt, SPLIT, STEPS)  # moves the streams on
        model, opt = _dropout_setup(seed=123)
        gn.load(tmp_path / "ckpt.safetensors", model, opt)
        _dropout_steps(model, opt, SPLIT, STEPS)
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), want[k], err_msg=k)


def test_a_checkpoint_of_an_optimizer_with_a_tensor_lr_round_trips(tmp_path) -> None:
    """A capturable optimizer's lr may be a Tensor (as in PyTorch); ``gn.save`` failed on it
    with "Object of type Tensor is not JSON serializable". It is saved as its value, and loading
    writes that value into the group's tensor (the user's handle keeps working)."""
    model = gn.nn.MLP([4, 3])
    lr = gn.tensor(0.01, dtype=gn.float64)
    opt = optim.Adam(model.parameters(), lr=lr, capturable=True)
    gn.save(tmp_path / "run.safetensors", model, opt)
    with gn.no_grad():
        lr *= 0.5  # (changed after saving: loading brings the saved value back)
    gn.load(tmp_path / "run.safetensors", model, opt)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.01


def test_saving_into_a_folder_that_is_not_there_names_the_file(tmp_path):
    """The error named the temporary file (``.ckpt.safetensors.x8f2k.tmp``), not the file."""
    target = tmp_path / "missing" / "ckpt.safetensors"
    with pytest.raises(FileNotFoundError, match=f"cannot write {target}: no such folder"):
        gn.save(target, Tiny())
    assert not (tmp_path / "missing").exists()
