"""Bugs helper K found in files another helper owns (checkpoint.py): strict xfails, so the
fix turns them into failures to be removed."""

from __future__ import annotations

from typing import Any

import pytest

import gpunet
from gpunet import nn, optim


@pytest.mark.xfail(strict=True, raises=TypeError, reason="gpunet.save puts a Tensor lr in JSON")
def test_a_checkpoint_of_an_optimizer_with_a_tensor_lr_round_trips(tmp_path: Any) -> None:
    """A capturable optimizer's lr may be a Tensor (as in PyTorch); ``gpunet.save`` writes the
    hyperparameters as JSON and fails on it with "Object of type Tensor is not JSON
    serializable" (torch.save keeps the tensor)."""
    model = nn.MLP([4, 3])
    lr = gpunet.tensor(0.01, dtype=gpunet.float64)
    opt = optim.Adam(model.parameters(), lr=lr, capturable=True)
    gpunet.save(tmp_path / "run.safetensors", model, opt)
    gpunet.load(tmp_path / "run.safetensors", model, opt)
    assert float(gpunet.tensor(opt.param_groups[0]["lr"]).item()) == 0.01
