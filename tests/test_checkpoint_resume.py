"""Resuming from a checkpoint continues training exactly as if uninterrupted (CPU, bit for bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gpunet
import gpunet.nn.functional as F
from gpunet import nn, optim
from gpunet.data import DataLoader, Dataset
from gpunet.train import fit


def _setup() -> tuple[nn.MLP, optim.Adam, DataLoader]:
    gpunet.manual_seed(0)
    r = np.random.default_rng(0)
    data = Dataset(r.standard_normal((96, 6)).astype(np.float32), r.integers(0, 3, 96))
    model = nn.MLP([6, 16, 3])
    opt = optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, DataLoader(data, batch_size=16, shuffle=True, seed=0)


def test_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    model, opt, loader = _setup()
    straight = fit(model, F.cross_entropy, opt, loader, epochs=4, progress=False)
    want = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    model, opt, loader = _setup()
    first = fit(model, F.cross_entropy, opt, loader, epochs=2, progress=False)
    gpunet.save(tmp_path / "ckpt.safetensors", model, opt, loader=loader.state_dict())
    del model, opt

    model, opt, loader = _setup()  # fresh objects, different state until loaded
    meta = gpunet.load(tmp_path / "ckpt.safetensors", model, opt)
    loader.load_state_dict(meta["loader"])
    second = fit(model, F.cross_entropy, opt, loader, epochs=2, progress=False)

    assert first.train_loss + second.train_loss == straight.train_loss
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), want[k], err_msg=k)
