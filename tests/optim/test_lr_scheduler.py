"""LR schedules: hand-computed values, PyTorch's sequences (when torch is installed), and
state_dict round trips."""

from __future__ import annotations

import math

import pytest

import gpunet as gn
from gpunet import optim
from gpunet.optim import lr_scheduler as sched


def make_opt(lr=1.0, groups=1):
    params = [gn.zeros((2,), requires_grad=True) for _ in range(groups)]
    return optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)])


def lrs(scheduler, n):
    out = [scheduler.get_last_lr()[0]]
    for _ in range(n):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def test_step_lr_by_hand():
    s = sched.StepLR(make_opt(1.0), step_size=2, gamma=0.5)
    assert lrs(s, 5) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_linear_warmup_by_hand():
    s = sched.LinearLR(make_opt(1.0), start_factor=0.25, total_iters=3)
    assert lrs(s, 5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-12)


def test_cosine_by_hand():
    s = sched.CosineAnnealingLR(make_opt(1.0), T_max=4, eta_min=0.1)
    want = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert lrs(s, 4) == pytest.approx(want, rel=1e-12)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_plateau_by_hand():
    opt = make_opt(1.0)
    s = sched.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1, min_lr=0.2)
    seen = []
    for metric in [5, 4, 4, 4, 4, 4, 4, 4, 4]:
        s.step(metric)
        seen.append(s.get_last_lr()[0])
    # bad epochs: 4 (1), 4 (2 > patience: halve, cooldown), then cooldown, 1, 2: halve...
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    for _ in range(5):
        s.step(4)
    assert s.get_last_lr()[0] == 0.2  # min_lr
    with pytest.raises(ValueError, match="factor"):
        sched.ReduceLROnPlateau(opt, factor=1.0)


def test_state_dict_resumes():
    opt = make_opt(1.0)
    s = sched.CosineAnnealingLR(opt, T_max=10)
    lrs(s, 3)
    state = s.state_dict()
    assert "optimizer" not in state and state["last_epoch"] == 3
    opt2 = make_opt(1.0)
    opt2.load_state_dict(opt.state_dict())
    s2 = sched.CosineAnnealingLR(opt2, T_max=10)
    s2.load_state_dict(state)
    assert lrs(s, 4) == lrs(s2, 4)


def test_resuming_needs_initial_lr():
    with pytest.raises(KeyError, match="initial_lr"):
        sched.StepLR(make_opt(), step_size=1, last_epoch=3)


# ---------------------------------------------------------------- against torch
CASES = [
    ("StepLR", dict(step_size=3, gamma=0.3)),
    ("LinearLR", dict(start_factor=0.1, end_factor=0.9, total_iters=6)),
    ("LinearLR", dict(start_factor=1.0, end_factor=0.0, total_iters=4)),
    ("CosineAnnealingLR", dict(T_max=5, eta_min=0.01)),
]


@pytest.mark.parametrize("name, kwargs", CASES)
def test_matches_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    ours = getattr(sched, name)(make_opt(0.5, groups=2), **kwargs)
    tparams = [torch.zeros(2, requires_grad=True) for _ in range(2)]
    topt = torch.optim.SGD([{"params": [p], "lr": 0.5 * (i + 1)} for i, p in enumerate(tparams)])
    theirs = getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
    for _ in range(14):  # past T_max: the cosine turns back up
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-13, abs=1e-15)
        ours.optimizer.step()
        topt.step()
        ours.step()
        theirs.step()


def test_chained_schedules_match_torch():
    torch = pytest.importorskip("torch")
    opt = make_opt(1.0)
    ours = [sched.LinearLR(opt, 0.1, total_iters=3), sched.StepLR(opt, 2, 0.5)]
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
    tl = torch.optim.lr_scheduler
    theirs = [tl.LinearLR(topt, 0.1, total_iters=3), tl.StepLR(topt, 2, 0.5)]
    for _ in range(8):
        opt.step()
        topt.step()
        for a, b in zip(ours, theirs):
            a.step()
            b.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(topt.param_groups[0]["lr"], rel=1e-13)


def test_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    metrics = [1.0, 0.9, 0.9, 0.95, 0.9, 0.91, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    for kwargs in [
        dict(patience=1),
        dict(mode="max", patience=0, factor=0.5, cooldown=2),
        dict(threshold=0.05, threshold_mode="abs", patience=1, min_lr=0.02),
    ]:
        ours = sched.ReduceLROnPlateau(make_opt(1.0), **kwargs)
        topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
        theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
        for m in metrics:
            ours.step(m)
            theirs.step(m)
            assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-13)
