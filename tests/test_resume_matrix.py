"""A run is never lost: a training run stopped and resumed from its checkpoint equals the same
run done straight, bit for bit, over a covering sample of the combinations a user meets.

The differential: the same run two ways. Straight, it trains ``STEPS`` steps; cut, it trains
``k`` steps, saves a checkpoint (``gpunet.save`` of the model, the optimizer, the generators,
and as metadata the loader's, scheduler's and scaler's states, as the README's Checkpoints
section says to do by hand), drops every object, builds fresh ones from another seed (so
nothing agrees until loaded), loads, and trains the rest. The weights, the optimizer state,
the scheduler's state and lr, the scaler's scale and the per-step losses (which see the
dropout masks and the shuffles of later epochs) must then agree bit for bit (CPU). Some
cases load instead into the same objects, after they went on (a captured step recorded).

Then the same at the level of ``fit`` (cut by SIGINT through its own Ctrl-C handler, resumed
with its history and best weights, with early stopping, ReduceLROnPlateau and a divergence
after the cut) and of ``gpunet train --resume`` (which options may differ, which are
refused); a checkpoint write cut short (the old one still loads), and a checkpoint of another
model or optimizer (one error naming every difference, nothing changed).
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpunet
import gpunet.nn.functional as F
from gpunet import nn, optim
from gpunet.checkpoint import CheckpointError
from gpunet.data import DataLoader, Dataset
from gpunet.optim import lr_scheduler
from gpunet.train import History, fit

ROWS, BATCH, EPOCHS = 40, 16, 4  # 3 batches an epoch (the last one short), 12 steps in all
STEPS_PER_EPOCH = math.ceil(ROWS / BATCH)
STEPS = EPOCHS * STEPS_PER_EPOCH


@dataclass(frozen=True)
class Case:
    """One combination: the optimizer, schedule, precision and the rest, and where it stops."""

    opt: str = "adam"
    sched: str = "none"
    precision: str = "fp32"
    capture: bool = False
    dropout: float = 0.0
    clip: bool = False
    stop: int = 4  # the step after which the cut run saves (mid-epoch unless a multiple of 3)
    fresh: bool = True  # loaded into new objects; else into the same ones, 3 steps later
    seeded: bool = True  # the loader's shuffle seeded, or drawn from gpunet's generator

    def __str__(self) -> str:
        extra = ("capture " if self.capture else "") + ("clip " if self.clip else "")
        drop = f"dropout{self.dropout} " if self.dropout else ""
        back = ("" if self.fresh else " back") + ("" if self.seeded else " unseeded")
        return f"{self.opt} {self.sched} {self.precision} {extra}{drop}stop{self.stop}{back}"


_OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.05),
    "momentum": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    "nesterov": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_wd": lambda p: optim.SGD(p, lr=0.05, weight_decay=1e-2),
    "adam": lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "adam_capturable": lambda p: optim.Adam(p, lr=1e-2, capturable=True),
    "sgd_capturable": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, capturable=True),
    "in_backward": lambda p: optim.SGD(p, lr=0.05, weight_decay=1e-2, in_backward=True),
    "adamw_groups": lambda p: optim.AdamW(_groups(p), lr=1e-2, weight_decay=1e-2),
}


def _groups(params: Any) -> list[dict[str, Any]]:
    """Two param groups: the first layer at its own lr, the rest without weight decay."""
    p = list(params)
    return [{"params": p[:2], "lr": 3e-2}, {"params": p[2:], "weight_decay": 0.0}]


_SCHEDULES = {
    "none": lambda o: None,
    "step": lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS),
    "warmup": lambda o: lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
    "plateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def _data() -> Dataset:
    r = np.random.default_rng(0)
    x = r.standard_normal((ROWS, 6)).astype(np.float32)
    return Dataset(x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64))


class _Parts:
    """Everything a run is made of, built afresh from ``seed`` (a fresh process's state)."""

    def __init__(self, case: Case, seed: int) -> None:
        gpunet.manual_seed(seed)
        self.case = case
        self.model = nn.MLP([6, 16, 16, 3], activation="gelu", dropout=case.dropout)
        self.opt = _OPTIMIZERS[case.opt](self.model.parameters())
        self.sched = _SCHEDULES[case.sched](self.opt)
        fp16 = case.precision == "fp16"
        # a start scale that overflows float16 at once: the first steps are skipped, backed off
        self.scaler = gpunet.amp.GradScaler("cpu", 2.0**20, growth_interval=2) if fp16 else None
        low = {"bf16": gpunet.bfloat16, "fp16": gpunet.float16}.get(case.precision)
        self.autocast = gpunet.autocast(dtype=low or gpunet.bfloat16, enabled=low is not None)
        self.loader = DataLoader(_data(), BATCH, shuffle=True, seed=seed if case.seeded else None)
        self.step = gpunet.capture(self._step) if case.capture else self._step
        self.losses: list[float] = []

    def _step(self, x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        self.opt.zero_grad()
        with self.autocast:
            loss = F.cross_entropy(self.model(x), y)
        if self.scaler is None:
            loss.backward()
            if self.case.clip:
                optim.clip_grad_norm_(self.model.parameters(), max_norm=0.05)
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            if self.case.clip:
                self.scaler.unscale_(self.opt)
                optim.clip_grad_norm_(self.model.parameters(), max_norm=0.05)
            self.scaler.step(self.opt)
            self.scaler.update()
        return loss

    def train(self, first: int, last: int) -> None:
        """Steps ``first`` .. ``last - 1`` (counted over the whole run), the schedule stepped at
        each epoch's end (ReduceLROnPlateau on the epoch's mean loss)."""
        step = first
        while step < last:
            for x, y in self.loader:
                with np.errstate(over="ignore", invalid="ignore"):  # (fp16's: the scaler's)
                    self.losses.append(self.step(x, y).item())
                step += 1
                if step % STEPS_PER_EPOCH == 0:
                    self._end_epoch()
                if step == last:
                    return

    def _end_epoch(self) -> None:
        if isinstance(self.sched, lr_scheduler.ReduceLROnPlateau):
            self.sched.step(float(np.mean(self.losses[-STEPS_PER_EPOCH:])))
        elif self.sched is not None:
            self.sched.step()

    def save(self, path: Path) -> None:
        extra: dict[str, Any] = {"loader": self.loader.state_dict(), "losses": self.losses}
        if self.sched is not None:
            extra["scheduler"] = self.sched.state_dict()
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        gpunet.save(path, self.model, self.opt, **extra)

    def load(self, path: Path) -> None:
        meta = gpunet.load(path, self.model, self.opt)
        self.loader.load_state_dict(meta["loader"])
        self.losses = meta["losses"]
        if self.sched is not None:
            self.sched.load_state_dict(meta["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(meta["scaler"])

    def state(self) -> dict[str, Any]:
        """What must agree: weights, optimizer buffers and counts, lr, schedule, scale, losses,
        and the generator's next draw (dropout's stream goes on alike)."""
        out: dict[str, Any] = {f"model.{k}": v.numpy() for k, v in self.model.state_dict().items()}
        sd = self.opt.state_dict()
        for i, st in sd["state"].items():
            for name, v in st.items():
                out[f"opt.{i}.{name}"] = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
        out["lr"] = [g["lr"] for g in self.opt.param_groups]
        if self.sched is not None:
            out["sched"] = json.dumps(self.sched.state_dict(), sort_keys=True)
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        out["losses"] = self.losses
        out["next_draw"] = gpunet.rand(4).numpy()
        out["loader"] = json.dumps(self.loader.state_dict(), sort_keys=True, default=str)
        return out


def _assert_same(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")
            assert got[k].dtype == want[k].dtype, f"{what}: {k}"
        else:
            assert got[k] == want[k], f"{what}: {k}"


def _straight_and_resumed(case: Case, tmp_path: Path) -> None:
    straight = _Parts(case, seed=0)
    straight.train(0, STEPS)
    want = straight.state()

    cut = _Parts(case, seed=0)
    cut.train(0, case.stop)
    cut.save(tmp_path / "ckpt.safetensors")
    if case.fresh:
        del cut
        fresh = _Parts(case, seed=7)  # other weights, shuffles and masks until loaded
    else:  # the same objects (a captured step already recorded) go on, then go back
        cut.train(case.stop, case.stop + 3)
        fresh = cut
    fresh.load(tmp_path / "ckpt.safetensors")
    fresh.train(case.stop, STEPS)
    _assert_same(fresh.state(), want, str(case))


# A covering sample: every optimizer with every schedule and precision at least once, each
# other axis on and off among them, stops mid-epoch (after steps 1, 4, 7, 11) and at an
# epoch's end (3, 6, 9).
CASES = [
    Case("sgd", "none", "fp32", stop=1, seeded=False),
    Case("sgd", "step", "bf16", dropout=0.2, stop=6),
    Case("momentum", "cosine", "fp32", clip=True, stop=4),
    Case("momentum", "plateau", "fp16", capture=True, stop=9),
    Case("nesterov", "warmup", "fp32", capture=True, dropout=0.3, stop=7),
    Case("nesterov", "step", "fp16", clip=True, stop=3),
    Case("sgd_wd", "plateau", "bf16", capture=True, stop=11),
    Case("sgd_wd", "cosine", "fp16", dropout=0.2, stop=4, seeded=False),
    Case("adam", "none", "fp16", dropout=0.2, clip=True, stop=7),
    Case("adam", "warmup", "bf16", capture=True, clip=True, stop=3),
    Case("adam", "plateau", "fp32", dropout=0.2, stop=6),
    Case("adamw", "cosine", "bf16", dropout=0.2, stop=1),
    Case("adamw", "step", "fp32", capture=True, clip=True, stop=9),
    Case("adamw", "warmup", "fp16", capture=True, stop=4),
    Case("adam_capturable", "step", "fp32", capture=True, dropout=0.2, stop=4),
    Case("adam_capturable", "warmup", "fp16", clip=True, stop=6),
    Case("sgd_capturable", "cosine", "fp32", capture=True, stop=7),
    Case("sgd_capturable", "plateau", "bf16", dropout=0.2, stop=3),
    Case("in_backward", "warmup", "fp32", dropout=0.2, stop=4),
    Case("in_backward", "cosine", "bf16", capture=True, stop=9),
    Case("adam", "cosine", "fp16", capture=True, dropout=0.2, stop=4, fresh=False, seeded=False),
    Case("momentum", "warmup", "bf16", capture=True, clip=True, stop=6, fresh=False),
    Case("adam_capturable", "plateau", "fp32", capture=True, stop=2, fresh=False),
    Case("in_backward", "step", "fp32", capture=True, dropout=0.2, stop=5, fresh=False),
    Case("in_backward", "step", "fp32", stop=11),
    Case("adamw_groups", "warmup", "fp16", capture=True, stop=5),  # (unscale_: not captured)
    Case(
        "adamw_groups", "plateau", "fp32", dropout=0.2, stop=6, fresh=False
    ),  # (a scaler refuses in_backward, by design)
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_run_resumed_from_its_checkpoint_equals_it_straight(case: Case, tmp_path: Path):
    _straight_and_resumed(case, tmp_path)


def test_the_sample_covers_every_value_of_every_axis() -> None:
    for axis in ("opt", "sched", "precision", "capture", "clip", "fresh", "seeded"):
        seen = {getattr(c, axis) for c in CASES}
        everything = {
            "opt": set(_OPTIMIZERS),
            "sched": set(_SCHEDULES),
            "precision": {"fp32", "bf16", "fp16"},
            "capture": {True, False},
            "clip": {True, False},
            "fresh": {True, False},
            "seeded": {True, False},
        }[axis]
        assert seen == everything, axis
    stops = {c.stop % STEPS_PER_EPOCH for c in CASES}
    assert stops == {0, 1, 2}  # at an epoch's end and at both places within one


def test_a_schedule_not_saved_is_what_the_readme_warns_of(tmp_path: Path) -> None:
    """The README's checkpoint example saved ``lr=warmup.get_last_lr()`` and no schedule
    state: a warmup made afresh and not loaded applies its first factor again to the loaded
    lr, and the run goes on at other lrs than the straight one. With its state it does not."""
    case = Case("adam", "warmup", stop=3)
    straight = _Parts(case, seed=0)
    straight.train(0, STEPS)
    cut = _Parts(case, seed=0)
    cut.train(0, case.stop)
    gpunet.save(tmp_path / "c.safetensors", cut.model, cut.opt, loader=cut.loader.state_dict())
    fresh = _Parts(case, seed=7)
    fresh.loader.load_state_dict(
        gpunet.load(tmp_path / "c.safetensors", fresh.model, fresh.opt)["loader"]
    )
    fresh.losses = list(cut.losses)
    fresh.train(case.stop, STEPS)
    assert fresh.opt.param_groups[0]["lr"] != straight.opt.param_groups[0]["lr"]


# ---------------------------------------------------------------- fit, stopped between epochs
@dataclass(frozen=True)
class FitCase:
    """fit() straight, or cut by Ctrl-C (SIGINT, fit's own handler) in epoch ``cut + 1`` and
    resumed from the checkpoint its ``on_epoch_end`` wrote at epoch ``cut``, as the job's is."""

    opt: str = "adam"
    sched: str = "none"
    precision: str = "fp32"
    capture: bool = False
    dropout: float = 0.0
    patience: int | None = None
    diverge_at: int | None = None  # the global step whose loss is NaN (after the cut)
    cut: int = 2

    def __str__(self) -> str:
        extra = ("capture " if self.capture else "") + (
            f"dropout{self.dropout} " if self.dropout else ""
        )
        stop = f"patience{self.patience} " if self.patience else ""
        nan = f"nan@{self.diverge_at} " if self.diverge_at is not None else ""
        return f"{self.opt} {self.sched} {self.precision} {extra}{stop}{nan}cut{self.cut}"


FIT_EPOCHS = 6


def _val_loader() -> DataLoader:
    """Labels unrelated to the inputs: the validation loss rises as the model learns the
    training set, so early stopping and ReduceLROnPlateau act within a few epochs."""
    r = np.random.default_rng(1)
    x = r.standard_normal((24, 6)).astype(np.float32)
    return DataLoader(Dataset(x, r.integers(0, 3, 24)), 24)


class _Loss:
    """Cross-entropy that counts the training steps: NaN at step ``nan_at``, SIGINT (the
    terminal's Ctrl-C, so fit's deferred-interrupt path) at step ``sigint_at``."""

    def __init__(self, nan_at: int | None, sigint_at: int | None, steps: int = 0) -> None:
        self.nan_at, self.sigint_at, self.steps = nan_at, sigint_at, steps

    def __call__(self, out: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        loss = F.cross_entropy(out, y)
        if not gpunet.is_grad_enabled():  # (validation)
            return loss
        self.steps += 1
        if self.steps == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss * math.nan if self.steps == self.nan_at else loss


def _fit(case: FitCase, seed: int, path: Path, resume: bool, sigint_at: int | None):
    parts = _Parts(Case(case.opt, case.sched, case.precision, dropout=case.dropout), seed)
    history, best, steps = None, None, 0
    if resume:
        meta = gpunet.load(path, parts.model, parts.opt)
        parts.loader.load_state_dict(meta["loader"])
        if parts.sched is not None:
            parts.sched.load_state_dict(meta["scheduler"])
        if parts.scaler is not None:
            parts.scaler.load_state_dict(meta["scaler"])
        history = History.from_dict(meta["history"])
        best = {k: np.array(v) for k, v in meta["best"].items()}
        steps = len(history.train_loss) * STEPS_PER_EPOCH
    loss = _Loss(case.diverge_at, sigint_at, steps)

    def checkpoint(epoch: int, h: History) -> None:
        extra: dict[str, Any] = {"loader": parts.loader.state_dict(), "history": h.as_dict()}
        if parts.sched is not None:
            extra["scheduler"] = parts.sched.state_dict()
        if parts.scaler is not None:
            extra["scaler"] = parts.scaler.state_dict()
        extra["best"] = {k: v.numpy().tolist() for k, v in run_best().items()}
        gpunet.save(path, parts.model, parts.opt, **extra)

    snapshots: dict[str, Any] = {"best": best}

    def run_best() -> dict[str, gpunet.Tensor]:
        return snapshots["best"]

    def on_epoch_end(epoch: int, h: History) -> None:
        if h.best_epoch == epoch:
            snapshots["best"] = {k: v.clone() for k, v in parts.model.state_dict().items()}
        checkpoint(epoch, h)
        if case.capture and sigint_at is not None and epoch + 1 == case.cut:
            # a replayed step runs no Python loss: Ctrl-C comes at the epoch's end instead
            os.kill(os.getpid(), signal.SIGINT)

    if best is not None:
        snapshots["best"] = {k: gpunet.tensor(v) for k, v in best.items()}
    low = {"bf16": gpunet.bfloat16, "fp16": gpunet.float16}.get(case.precision)
    h = fit(
        parts.model,
        loss,
        parts.opt,
        parts.loader,
        _val_loader(),
        FIT_EPOCHS,
        early_stopping=case.patience,
        scheduler=parts.sched,
        progress=False,
        on_epoch_end=on_epoch_end,
        history=history,
        best_state=best,
        capture=case.capture,
        autocast=low,
        scaler=parts.scaler,
    )
    return parts, h


def _fit_state(parts: _Parts, h: History) -> dict[str, Any]:
    out = parts.state()
    del out["losses"]
    d = h.as_dict()
    del d["samples_per_second"]
    out["history"] = json.dumps(d, sort_keys=True, default=str)
    return out


FIT_CASES = [
    FitCase("adam", "plateau", "fp32", dropout=0.2, cut=2),
    FitCase("momentum", "step", "fp16", capture=True, cut=3),
    FitCase("adamw", "cosine", "bf16", patience=3, cut=2),
    FitCase("nesterov", "warmup", "fp32", dropout=0.2, diverge_at=14, cut=3),
    FitCase("adam_capturable", "none", "fp16", patience=4, diverge_at=11, cut=2),
    FitCase("in_backward", "plateau", "fp32", patience=1, cut=1),
]


@pytest.mark.parametrize("case", FIT_CASES, ids=str)
def test_fit_cut_by_ctrl_c_and_resumed_equals_it_straight(case: FitCase, tmp_path: Path):
    want = _fit_state(*_fit(case, 0, tmp_path / "straight.safetensors", False, None))
    path = tmp_path / "cut.safetensors"
    parts, h = _fit(case, 0, path, False, sigint_at=case.cut * STEPS_PER_EPOCH + 2)
    assert h.interrupted and len(h.train_loss) == case.cut, "the cut did not happen"
    done = json.loads(want["history"])
    assert len(done["train_loss"]) > case.cut and done["diverged"] == (case.diverge_at is not None)
    del parts
    got = _fit_state(*_fit(case, 7, path, True, None))
    _assert_same(got, want, str(case))


# ---------------------------------------------------------------- the checkpoint file itself
def _snapshot(parts: _Parts) -> dict[str, Any]:
    """Weights, optimizer state and the generator's state (without drawing from it)."""
    out = {f"model.{k}": v.numpy().copy() for k, v in parts.model.state_dict().items()}
    for i, st in parts.opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"opt.{i}.{name}"] = np.array(v.numpy() if hasattr(v, "numpy") else v)
    out["lr"] = [g["lr"] for g in parts.opt.param_groups]
    out["rng"] = json.dumps(gpunet.random.default_generator.get_state(), default=str)
    return out


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_write_cut_short_leaves_the_previous_checkpoint_whole(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or any error) while a checkpoint is written, at each stage of the write: the
    previous checkpoint still loads, to the same state bit for bit, and no temporary is left."""
    case = Case("adam", "step", dropout=0.2)
    parts = _Parts(case, seed=0)
    parts.train(0, 4)
    path = tmp_path / "ckpt.safetensors"
    parts.save(path)
    want, before = _snapshot(parts), path.read_bytes()
    parts.train(4, 8)  # other weights, to be written over the old file, and cut

    def cut(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    target = {"write": (os, "fdopen"), "fsync": (os, "fsync"), "replace": (os, "replace")}[where]
    if where == "write":  # the bytes half written, then the cut
        real = os.fdopen

        class Half:
            def __init__(self, f: Any) -> None:
                self.f = f

            def __enter__(self) -> Half:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()

            def write(self, data: bytes) -> None:
                self.f.write(data[: len(data) // 2])
                raise KeyboardInterrupt

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Half(real(fd, mode)))
    else:
        monkeypatch.setattr(*target, cut)
    with pytest.raises(KeyboardInterrupt):
        parts.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    fresh = _Parts(case, seed=7)
    fresh.load(path)
    _assert_same(_snapshot(fresh), want, where)


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_naming_what_differs(
    tmp_path: Path,
) -> None:
    """Each mismatch named in one CheckpointError, raised before anything changes: weights,
    optimizer state, lr and the generator stay as they were."""
    saved = _Parts(Case("adam", dropout=0.2), seed=0)
    saved.train(0, 3)
    path = tmp_path / "ckpt.safetensors"
    saved.save(path)
    wider = nn.MLP([6, 32, 16, 3], activation="gelu", dropout=0.2)
    deeper = nn.MLP([6, 16, 16, 16, 3], activation="gelu", dropout=0.2)
    tries = [
        ("a wider layer", wider, optim.Adam(wider.parameters()), ["model.0.weight: shape"]),
        (
            "another depth",
            deeper,
            optim.Adam(deeper.parameters()),
            ["missing from the checkpoint: model.9.weight", "param group 0: 6"],
        ),
    ]
    for opt, words in [
        ("sgd", ["holds Adam state, the optimizer is SGD"]),
        ("adamw", ["holds Adam state, the optimizer is AdamW"]),
        ("in_backward", ["holds Adam state, the optimizer is SGD"]),
    ]:
        parts = _Parts(Case(opt), seed=3)
        tries.append((opt, parts.model, parts.opt, words))
    model = nn.MLP([6, 16, 16, 3], activation="gelu", dropout=0.2)
    groups = [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    tries.append(("two param groups", model, optim.Adam(groups), ["2 in the optimizer"]))
    for what, model, opt, words in tries:
        parts = _Parts(Case("adam"), seed=5)
        parts.model, parts.opt = model, opt
        parts.train(0, 1)  # state to keep: step counts, moments
        before = _snapshot(parts)
        with pytest.raises(CheckpointError) as e:
            gpunet.load(path, model, opt)
        message = str(e.value)
        assert str(path) in message, what
        for w in words:
            assert w in message, (what, message)
        _assert_same(_snapshot(parts), before, what)


@pytest.mark.parametrize(
    "saved, loaded",
    [("adam_capturable", "adam"), ("adam", "adam_capturable"), ("sgd_capturable", "momentum")]
    + [("momentum", "sgd_capturable"), ("sgd", "momentum")],
)
@pytest.mark.parametrize("capture", [False, True])
def test_a_checkpoint_loads_into_an_optimizer_made_with_other_hyperparameters(
    saved: str, loaded: str, capture: bool, tmp_path: Path
) -> None:
    """As in PyTorch, the checkpoint's hyperparameters win (capturable included, which moves
    the lr to or from the device): the run goes on as the saved optimizer's, bit for bit."""
    case = Case(saved, "step", capture=capture, stop=4)
    straight = _Parts(case, seed=0)
    straight.train(0, STEPS)
    want = straight.state()
    cut = _Parts(case, seed=0)
    cut.train(0, case.stop)
    cut.save(tmp_path / "ckpt.safetensors")
    other = _Parts(Case(loaded, "step", capture=capture), seed=7)
    other.load(tmp_path / "ckpt.safetensors")
    other.train(case.stop, STEPS)
    _assert_same(other.state(), want, f"{saved} -> {loaded}")
    assert other.opt.param_groups[0]["capturable"] == straight.opt.param_groups[0]["capturable"]


def test_an_in_backward_checkpoint_and_a_plain_optimizer_refuse_each_other(tmp_path: Path):
    """in_backward changes what backward does, not a number: refused both ways, by name."""
    for saved, loaded, was in [("momentum", "in_backward", False), ("in_backward", "sgd", True)]:
        parts = _Parts(Case(saved), seed=0)
        parts.train(0, 2)
        parts.save(tmp_path / "ckpt.safetensors")
        other = _Parts(Case(loaded), seed=7)
        before = _snapshot(other)
        with pytest.raises(
            CheckpointError, match=f"saved with in_backward={was} in the checkpoint"
        ):
            other.load(tmp_path / "ckpt.safetensors")
        _assert_same(_snapshot(other), before, f"{saved} -> {loaded}")


# ---------------------------------------------------------------- gpunet train --resume
JOB = ["--epochs", "3", "--hidden", "16", "--dropout", "0.1", "--no-progress", "--device", "cpu"]
JOB += ["--lr", "0.01", "--batch-size", "128"]  # (the digits: 10 steps an epoch)


def _job(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from gpunet.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _sigint_in_step(monkeypatch: pytest.MonkeyPatch, step: int, evaluating: bool = False) -> None:
    """The terminal's Ctrl-C in training step ``step`` (or, ``evaluating``, in the ``step``-th
    loss evaluated without gradients: validation, then the test set)."""
    real, calls = F.cross_entropy, [0]

    def loss(out: gpunet.Tensor, y: gpunet.Tensor, **kw: Any) -> gpunet.Tensor:
        if gpunet.is_grad_enabled() != evaluating:
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signal.SIGINT)
        return real(out, y, **kw)

    monkeypatch.setattr(F, "cross_entropy", loss)


def test_gpunet_train_resume_refuses_changed_options_and_continues_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cut by Ctrl-C in epoch 2 and resumed equals the run done straight, bit for bit.
    Options that say how to run (--no-progress, --no-capture) may differ; any that says what
    to run is refused in one line, exit 2, the run untouched, even when its value is the
    default or the run's own (it was ignored then: --lr 0.001 to a run made with --lr 0.01
    continued at 0.01, silently)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _job(["train", *JOB, "--out", "straight"], capsys)
    assert code == 0, err
    with monkeypatch.context() as m:
        _sigint_in_step(m, 10 + 4)
        code, out, err = _job(["train", *JOB, "--no-capture", "--out", "cut"], capsys)
    assert code == 130 and "interrupted after 1 epochs" in out, (out, err)
    ((run,), (straight,)) = (list(Path(d).iterdir()) for d in ("cut", "straight"))
    before = (run / "checkpoint.safetensors").read_bytes()
    refused = [
        (["--lr", "0.001"], "--lr"),  # the default, not the run's
        (["--lr=0.01"], "--lr"),  # the run's own value
        (["--epo", "3"], "--epochs"),  # an abbreviation
        (["--epochs", "100", "--seed", "0"], "--epochs, --seed"),
        (["--hidden", "16", "--dropout", "0.1"], "--hidden, --dropout"),
        (["--out", "runs"], "--out"),
        (["--device", "cpu"], "--device"),
        (["--precision", "fp32"], "--precision"),
        (["--data", "x.csv", "--target", "-1", "--task", "classify"], "--data, --target, --task"),
        (["--optimizer", "adam", "--weight-decay", "0", "--batch-size", "64"], "--optimizer"),
        (["--label-smoothing", "0.1", "--activation", "relu", "--patience", "10"], "--activ"),
    ]
    for extra, words in refused:
        code, out, err = _job(["train", "--resume", str(run), *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        assert "its own options; drop" in err and words in err, (extra, err)
        assert (run / "checkpoint.safetensors").read_bytes() == before
    (run / "best.safetensors").rename(tmp_path / "best")  # a run folder missing a file
    code, out, err = _job(["train", "--resume", str(run)], capsys)
    assert code == 2 and "best.safetensors is missing" in err and len(err.splitlines()) == 1
    (tmp_path / "best").rename(run / "best.safetensors")
    args = ["train", "--resume", str(run), "--no-progress", "--no-capture"]
    code, out, err = _job(args, capsys)
    assert code == 0 and "resumed after epoch 1" in out, err
    import safetensors.numpy

    want, got = (safetensors.numpy.load_file(str(r / "model.safetensors")) for r in (straight, run))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    a, b = (json.loads((r / "metrics.json").read_text())["history"] for r in (straight, run))
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "grad_norm"):
        assert a[key] == b[key], key


def test_ctrl_c_while_the_job_saves_its_results_lets_them_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the last epoch, while the test set is evaluated: the run had a checkpoint
    but no model.safetensors, metrics or curves, and --resume refused it as finished; now the
    results are written first (then exit code 130), the same as an uncut run's."""
    monkeypatch.chdir(tmp_path)
    assert _job(["train", *JOB, "--out", "straight"], capsys)[0] == 0
    with monkeypatch.context() as m:
        _sigint_in_step(m, 3 + 1, evaluating=True)  # 3 validations, then the test set
        code, out, err = _job(["train", *JOB, "--out", "late"], capsys)
    assert code == 130 and "test accuracy" in out, (out, err)
    ((late,), (straight,)) = (list(Path(d).iterdir()) for d in ("late", "straight"))
    import safetensors.numpy

    want, got = (
        safetensors.numpy.load_file(str(r / "model.safetensors")) for r in (straight, late)
    )
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (straight, late))
    assert a["test_accuracy"] == b["test_accuracy"] and not b["interrupted"]
    assert (late / "curves.png").exists()
    # Ctrl-C in the last epoch's validation: nothing is left to stop, the run ends as it
    # would have (it was marked interrupted, told to resume, and --resume said it finished)
    with monkeypatch.context() as m:
        _sigint_in_step(m, 3, evaluating=True)
        code, out, err = _job(["train", *JOB, "--out", "last"], capsys)
    assert code == 0 and "--resume" not in out, (out, err)
    (last,) = Path("last").iterdir()
    got = safetensors.numpy.load_file(str(last / "model.safetensors"))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert json.loads((last / "metrics.json").read_text())["interrupted"] is False
