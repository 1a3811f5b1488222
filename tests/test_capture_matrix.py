"""gpunet.capture against eager over the combinations a user meets: the same training loop
run eagerly and captured, compared bit for bit after every call (the loss and what the step
returns, parameters, gradients, optimizer state, the groups' lrs, the scaler's state), over
a covering design of ``AXES`` (every pair of axis values that a valid loop can hold is in
some case; two designs, about 110 loops of 14 calls). A combination refused by design is held
to its refusal's message instead, and to having changed nothing: NumPy arrays as arguments,
``scaler.unscale_`` then clipping. ``fit(capture=True)`` is held to ``fit(capture=False)``
on a few. Other seeds of ``covering`` give other designs (a wider search, run by hand)."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from covering import covering, pairs

import gpunet
import gpunet.nn.functional as F
from gpunet import CaptureError, nn, optim
from gpunet.amp import GradScaler
from gpunet.optim import lr_scheduler

# (the batches with an inf, the scaler's skipped steps, make NumPy warn: by design here)
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered")

AXES: dict[str, tuple] = {
    "opt": (
        "sgd",
        "momentum",
        "nesterov",
        "dampening",
        "weight_decay",
        "in_backward",
        "adam",
        "adamw",
    ),
    "capturable": (False, True),
    "fold": (False, True),
    "scaling": ("none", "scaler"),
    "clip": (False, True),
    "autocast": ("none", "bf16", "fp16"),
    "autocast_at": ("inside", "around"),
    "set_to_none": (True, False),
    "zero_grad_by": ("optimizer", "model"),
    "zero_grad_at": ("start", "end"),
    "schedule": ("none", "steplr", "warmup_inside", "cosine", "by_hand"),
    "groups": (1, 2),
    "frozen": (False, True),
    "extra": ("none", "unused", "sometimes"),
    "activation": ("relu", "tanh", "gelu"),
    "norm": (None, "layernorm"),
    "dropout": (0.0, 0.3),
    "eval_toggle": (False, True),
    "dtype": ("float32", "float64"),
    "inputs": ("same", "last_shape", "shape_and_back", "numpy"),
    "returns": ("loss", "loss_and_logits"),
    "reload": (None, "optimizer", "model", "both"),
}
STEPS = 14
ROWS, FEATURES, CLASSES = 8, 12, 5
# The loop's events, at calls chosen so that each signature replays: its usual one at calls
# 0-4 and 9-13 around a window (5-8) where the mode, the shape or the extra parameter's use
# differ, each of those a signature of its own.
WINDOW = (5, 6, 7, 8)  # model.eval() (eval_toggle); extra unused ("sometimes"); 5 rows
INF_STEPS = (0, 4, 7, 11)  # batches holding an inf under a scaler: those steps are skipped
SAVE_STEP, LOAD_STEP = 3, 10  # reload: state_dicts saved before call 3, loaded before call 10
LR_STEP = 9  # schedule="by_hand": the lrs scaled by 0.3 before this call
NUMPY_STEP = 4  # inputs="numpy": this call passes NumPy arrays (refused, nothing changes)
FOLDABLE = ("sgd", "weight_decay")  # fold_sgd applies to plain SGD (momentum 0) only


def valid(case: dict[str, Any]) -> bool:
    """A loop a user could write: fold_sgd where plain SGD runs, float16 with a scaler (the
    README's pairing), a step inside backward with no scaler (its update runs before any
    ``scaler.step``) and no clipping (it keeps no gradient), and autocast's placement only
    where there is an autocast. Clipping under a scaler (``unscale_``) is eager only by
    design: ``test_unscale_and_clipping_are_refused_before_anything_changes``."""
    if case["fold"] and case["opt"] not in FOLDABLE:
        return False
    if case["autocast"] == "fp16" and case["scaling"] == "none":
        return False
    if case["opt"] == "in_backward" and (case["scaling"] != "none" or case["clip"]):
        return False
    if case["clip"] and case["scaling"] != "none":
        return False
    return case["autocast"] != "none" or case["autocast_at"] == "inside"


def _pairs(case: dict[str, Any]) -> set:
    return pairs(AXES, case)


def _name(case: dict[str, Any]) -> str:
    """The case's values that differ from each axis's first, joined (a readable test id)."""
    return "-".join(f"{k}={v}" for k, v in case.items() if v != AXES[k][0]) or "defaults"


CASES = covering(AXES, valid, seed=0) + covering(
    AXES, valid, seed=1
)  # two designs: each pair in two loops, mostly


# ------------------------------------------------------------------------------ one loop
def _optimizer(case: dict[str, Any], groups: list) -> optim.Optimizer:
    kind, cap = case["opt"], {"capturable": case["capturable"]}
    if kind in ("adam", "adamw"):
        cls = optim.Adam if kind == "adam" else optim.AdamW
        return cls(groups, lr=1e-2, weight_decay=0.05, **cap)
    sgd = {
        "sgd": {},
        "momentum": {"momentum": 0.9},
        "nesterov": {"momentum": 0.9, "nesterov": True},
        "dampening": {"momentum": 0.9, "dampening": 0.3},
        "weight_decay": {"weight_decay": 0.01},
        "in_backward": {"in_backward": True, "weight_decay": 0.01},
    }[kind]
    return optim.SGD(groups, lr=0.1, **sgd, **cap)


def _build(case: dict[str, Any]) -> dict[str, Any]:
    """A fresh model, optimizer, scaler, schedule and step function (the same seed each time)."""
    gpunet.manual_seed(0)
    dtype = getattr(gpunet, case["dtype"])
    model = nn.MLP(
        [FEATURES, 16, 16, CLASSES],
        activation=case["activation"],
        dropout=case["dropout"],
        norm=case["norm"],
    ).to(dtype)
    params = list(model.parameters())
    extra = nn.Parameter(gpunet.zeros(CLASSES).to(dtype) + 0.25)
    if case["frozen"]:
        params[1].requires_grad = False  # the first layer's bias: held by the optimizer, frozen
    members = params + ([extra] if case["extra"] != "none" else [])
    if case["extra"] != "none":
        model.extra = extra  # (so that model.zero_grad() sees it too)
    groups: list = [{"params": members}]
    if case["groups"] == 2:
        groups = [{"params": members[:2], "lr": 0.03}, {"params": members[2:]}]
    opt = _optimizer(case, groups)
    scaler = None
    if case["scaling"] == "scaler":
        scaler = GradScaler(init_scale=2.0**10, growth_interval=2)
    sched: Any = None
    if case["schedule"] == "steplr":
        sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    elif case["schedule"] == "warmup_inside":
        sched = lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3)
    elif case["schedule"] == "cosine":
        sched = lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    low = {"none": None, "bf16": gpunet.bfloat16, "fp16": gpunet.float16}[case["autocast"]]

    def autocast() -> Any:
        return contextlib.nullcontext() if low is None else gpunet.autocast(dtype=low)

    def zero_grad() -> None:
        (opt if case["zero_grad_by"] == "optimizer" else model).zero_grad(case["set_to_none"])

    def step(x: gpunet.Tensor, y: gpunet.Tensor, use_extra: bool) -> Any:
        if case["zero_grad_at"] == "start":
            zero_grad()
        with autocast() if case["autocast_at"] == "inside" else contextlib.nullcontext():
            out = model(x)
            loss = F.cross_entropy(out + extra if use_extra else out, y)
        if scaler is None:
            loss.backward()
            if case["clip"]:
                optim.clip_grad_norm_(members, 1.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            if case["clip"]:  # (eager only: a captured call is refused here)
                scaler.unscale_(opt)
                optim.clip_grad_norm_(members, 1.0)
            scaler.step(opt)
            scaler.update()
        if case["schedule"] == "warmup_inside":
            sched.step()
        if case["zero_grad_at"] == "end":
            zero_grad()
        return loss if case["returns"] == "loss" else (loss, out)

    return dict(
        model=model, opt=opt, scaler=scaler, sched=sched, step=step, autocast=autocast,
        members=members,
    )  # fmt: skip


def _batches(case: dict[str, Any]) -> Iterator[tuple[int, gpunet.Tensor, gpunet.Tensor]]:
    r = np.random.default_rng(1)
    dtype = np.float64 if case["dtype"] == "float64" else np.float32
    for i in range(STEPS):
        other = {"last_shape": i == STEPS - 1, "shape_and_back": i in WINDOW}
        rows = ROWS - 3 if other.get(case["inputs"]) else ROWS
        x = r.standard_normal((rows, FEATURES)).astype(dtype)
        if case["scaling"] != "none" and i in INF_STEPS:
            x[1, 2] = np.inf
        yield i, gpunet.tensor(x), gpunet.tensor(r.integers(0, CLASSES, rows))


def _bits(a: Any) -> tuple:
    """An array's dtype, shape and bytes: equal exactly when the arrays are equal bit for bit
    (NaNs and signed zeros included)."""
    a = np.ascontiguousarray(np.asarray(a))
    return (str(a.dtype), a.shape, a.tobytes())


def _value(v: Any) -> Any:
    if isinstance(v, tuple):
        return tuple(_value(u) for u in v)
    if isinstance(v, gpunet.Tensor):
        return _bits(v.numpy())
    if isinstance(v, np.ndarray) or type(v).__module__ == "numpy":
        return _bits(v)
    return v


def _snapshot(run: dict[str, Any], loss: Any, case: dict[str, Any]) -> dict[str, Any]:
    """What a user can read after a step, as bytes: the loss, every parameter and (unless SGD
    is folded, where ``p.grad`` reads NaN by design) its gradient, the optimizer's state and
    its groups' lrs, and the scaler's state."""
    members, opt = run["members"], run["opt"]
    snap: dict[str, Any] = {"loss": _value(loss)}
    snap["params"] = [_bits(p.numpy()) for p in members]
    if not case["fold"]:
        snap["grads"] = [None if p.grad is None else _bits(p.grad.numpy()) for p in members]
    snap["state"] = [
        {k: _value(v) for k, v in sorted(opt.state.get(p, {}).items())} for p in members
    ]
    snap["lrs"] = [g["lr"] for g in opt.param_groups]
    if run["scaler"] is not None:
        snap["scaler"] = {k: _value(v) for k, v in run["scaler"].state_dict().items()}
    return snap


def train(case: dict[str, Any], captured: bool) -> tuple[list[Any], int]:
    """The loop, eagerly or captured: after each step its snapshot, or the refusal's message
    where the captured call raised (then the loop goes on with the next batch, as a user
    whose call was refused would); and how many calls replayed."""
    run = _build(case)
    model, opt, step = run["model"], run["opt"], run["step"]
    call: Callable = gpunet.capture(step, fold_sgd=case["fold"]) if captured else step
    trace: list[Any] = []
    for i, x, y in _batches(case):
        if case["eval_toggle"]:
            model.train(i not in WINDOW)
        if case["schedule"] == "by_hand" and i == LR_STEP:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.3
        if case["reload"] and i == SAVE_STEP:
            saved = (_copy_state(model.state_dict()), _copy_state(opt.state_dict()))
        if case["reload"] and i == LOAD_STEP:
            if case["reload"] in ("model", "both"):
                model.load_state_dict(saved[0])
            if case["reload"] in ("optimizer", "both"):
                opt.load_state_dict(saved[1])
        use_extra = case["extra"] == "sometimes" and i not in WINDOW
        args = (x, y)
        if case["inputs"] == "numpy" and i == NUMPY_STEP:
            if not captured:  # eager never sees this call: the captured one must refuse it
                trace.append(None)
                continue
            args = (x.numpy(), y.numpy())
        before = _snapshot(run, None, case)
        try:
            with run["autocast"]() if case["autocast_at"] == "around" else contextlib.nullcontext():
                loss = call(*args, use_extra)
        except CaptureError as e:
            if not captured:
                raise
            trace.append(str(e))
            # a refusal changes nothing a user reads but the gradients the recording made
            assert _without_grads(_snapshot(run, None, case)) == _without_grads(before), (
                f"step {i}: the refused call changed state"
            )
            continue
        if case["schedule"] in ("steplr", "cosine"):
            run["sched"].step()
        trace.append(_snapshot(run, loss, case))
    return trace, getattr(call, "replays", 0)


def _copy_state(state: Any) -> Any:
    """A state_dict's own copy (its arrays and tensors cloned): what a checkpoint holds."""
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copy_state(v) for v in state]
    if isinstance(state, gpunet.Tensor):
        return state.clone()
    return state.copy() if isinstance(state, np.ndarray) else state


def _without_grads(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if k != "grads"}


REFUSALS = {
    "unscale_clip": r"GradScaler\.unscale_.* is not capturable; scaler\.step\(opt\) alone is",
    "numpy": r"argument 0 \('x'\) is a numpy\.ndarray .*gpunet\.tensor",
}


def _first_difference(eager: dict[str, Any], captured: dict[str, Any]) -> str:
    for key in eager:
        a, b = eager[key], captured.get(key)
        if a != b:
            if isinstance(a, list):
                which = next(j for j, (u, v) in enumerate(zip(a, b)) if u != v)
                return f"{key}[{which}]"
            return key
    return "nothing"


@pytest.mark.parametrize("case", CASES, ids=[f"{i}:{_name(c)}" for i, c in enumerate(CASES)])
def test_a_captured_loop_equals_the_eager_loop_bit_for_bit(case: dict[str, Any]) -> None:
    (eager, _), (captured, replays) = train(case, False), train(case, True)
    assert len(eager) == len(captured) == STEPS and replays >= 3  # (else: eager vs eager)
    for i, (e, c) in enumerate(zip(eager, captured)):
        if isinstance(c, str):  # the one refusal by design here: NumPy arrays as arguments
            assert e is None and re.search(REFUSALS["numpy"], c), f"step {i}: {c}"
            continue
        assert e == c, f"step {i}: {_first_difference(e, c)} differs"
    done = [e for e in eager if e is not None]
    assert done[0]["params"] != done[-1]["params"]  # training moved the weights


def test_the_design_holds_every_pair_a_valid_loop_can_hold() -> None:
    """Every value of every axis, and every pair of values of two axes that some valid loop
    holds (found by trying 2,000 random valid loops), is in some case."""
    for axis, values in AXES.items():
        assert {repr(c[axis]) for c in CASES} == {repr(v) for v in values}, axis
    held = set().union(*map(_pairs, CASES))
    rng = random.Random(7)
    tries = ({n: rng.choice(v) for n, v in AXES.items()} for _ in range(2000))
    assert set().union(*(_pairs(c) for c in tries if valid(c))) <= held


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("autocast", ["none", "fp16"])
def test_unscale_and_clipping_are_refused_before_anything_changes(opt: str, autocast: str) -> None:
    """``scaler.unscale_(opt)`` then clipping is eager only (the README's Mixed precision):
    every captured call is refused with the documented message, and nothing a user reads but
    the gradients has changed (``train`` checks that at each refusal); the eager loop trains."""
    case = {k: v[0] for k, v in AXES.items()}
    case.update(opt=opt, autocast=autocast, scaling="scaler", clip=True)
    (eager, _), (captured, _) = train(case, False), train(case, True)
    assert all(re.search(REFUSALS["unscale_clip"], c) for c in captured), captured[0]
    assert eager[0]["params"] != eager[-1]["params"]


FITS = {
    "adam, fp16 with a scaler, dropout": dict(opt="adam", autocast="fp16", dropout=0.3),
    "sgd, bf16, StepLR per epoch": dict(opt="sgd", autocast="bf16", schedule="steplr"),
    "nesterov, plateau, tanh": dict(opt="nesterov", schedule="plateau", activation="tanh"),
    "adamw capturable, layernorm, cosine": dict(
        opt="adamw", capturable=True, norm="layernorm", schedule="cosine"
    ),
    "in_backward, gelu, validation": dict(opt="in_backward", activation="gelu", val=True),
}


def _fit(kw: dict[str, Any], capture: bool) -> tuple[Any, list[tuple]]:
    """``fit`` over 150 float32 rows in batches of 32 (a last batch of 22: a second
    signature), eagerly or captured: its history and the weights, as bytes."""
    from gpunet.data import DataLoader, Dataset
    from gpunet.train import fit

    r = np.random.default_rng(0)
    y = r.integers(0, 3, 150)
    x = (np.eye(3)[y] @ r.standard_normal((3, 6)) + r.standard_normal((150, 6))).astype("f4")
    case = {**{k: v[0] for k, v in AXES.items()}, **kw}
    gpunet.manual_seed(0)
    model = nn.MLP(
        [6, 16, 3], activation=case["activation"], dropout=case["dropout"], norm=case["norm"]
    )
    opt = _optimizer(case, model.parameters())
    sched = {
        "none": lambda: None,
        "steplr": lambda: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        "cosine": lambda: lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        "plateau": lambda: lr_scheduler.ReduceLROnPlateau(opt, patience=0),
    }[case["schedule"]]()
    low = {"none": None, "bf16": gpunet.bfloat16, "fp16": gpunet.float16}[case["autocast"]]
    history = fit(
        model,
        F.cross_entropy,
        opt,
        DataLoader(Dataset(x, y), batch_size=32, shuffle=True, seed=0),
        val=DataLoader(Dataset(x[:40], y[:40]), batch_size=16) if kw.get("val") else None,
        epochs=4,
        scheduler=sched,
        progress=False,
        capture=capture,
        autocast=low,
        scaler=GradScaler(init_scale=2.0**10, growth_interval=3) if low is gpunet.float16 else None,
    )
    return history, [_bits(p.numpy()) for p in model.parameters()]


@pytest.mark.parametrize("kw", list(FITS.values()), ids=list(FITS))
def test_fit_with_capture_equals_fit_without_bit_for_bit(kw: dict[str, Any]) -> None:
    (eager, we), (captured, wc) = _fit(kw, False), _fit(kw, True)
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "grad_norm"):
        assert getattr(eager, name) == getattr(captured, name), name
    assert we == wc
    assert eager.warnings == captured.warnings
    assert eager.train_loss[0] != eager.train_loss[-1]
