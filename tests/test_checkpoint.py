"""Checkpoints: round trips of a model and its optimizer, metadata, atomic writes, and one
error listing every mismatch before anything changes."""

from __future__ import annotations

import json
import os

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
