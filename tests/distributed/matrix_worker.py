"""Run under ``mpiexec -n 2`` by test_dp_matrix.py: the same training done by a
``DistributedOptimizer`` on 2 ranks (each on its half of every batch) and by one process on
the whole batch (on every rank, from rank 0's weights), compared after every step, over a
covering design of ``AXES`` (every pair of axis values a valid loop can hold is in some case).

After each step: the parameters, ``p.grad`` (the average over the ranks against the whole
batch's gradient), the optimizer state, the groups' lrs, the clipped norm and the loss scale
against the one-process run (``TOL``); ``p.grad`` bit for bit the ranks' own gradients
summed and scaled by 1/N; and the parameters, gradients and optimizer state bit-identical
across the ranks. Dropout draws from each rank's own stream, so those cases have no
one-process twin and hold the other two. ``fit`` on a sharded loader is held to ``fit`` in
one process (``FITS``), and the refusals by design to their messages (``REFUSALS``).

    PYTHONPATH=tests mpiexec -n 2 python tests/distributed/matrix_worker.py OUT [SEED]

Rank 0 writes ``{name: [ok, [each rank's detail]], "design": ...}`` as JSON to OUT; SEED
(0) picks the covering design."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from covering import covering, pairs

import gpunet
import gpunet.distributed as dist
import gpunet.nn.functional as F
from gpunet import nn, optim
from gpunet.amp import GradScaler
from gpunet.data import DataLoader, Dataset
from gpunet.optim import lr_scheduler

COMM = dist.init()
R, N = COMM.rank, COMM.size

AXES: dict[str, tuple] = {
    "opt": ("sgd", "momentum", "nesterov", "dampening", "weight_decay", "adam", "adamw"),
    "capturable": (False, True),
    "groups": (1, 2),  # two param groups with different lrs
    # the first layer's bias: requires_grad=False (in the optimizer), or until UNFREEZE_STEP
    # (unfrozen), or then also added to the optimizer by add_param_group (added), or from
    # UNFREEZE_STEP on (later)
    "frozen": ("no", "always", "unfrozen", "added", "later"),
    "extra": ("never", "one_rank", "some_steps"),  # where the extra layer enters the loss
    "schedule": ("none", "steplr", "cosine"),
    "set_to_none": (True, False),
    "zero_grad_by": ("optimizer", "model"),
    "accumulate": (1, 3),  # micro-batches per step
    "no_sync": (True, False),  # all micro-batches but the last under no_sync()
    "closure": (False, True),  # opt.step(closure), the closure zeroing and backpropagating
    "optimizers": (1, 2),  # 2: the extra layer has an Adam of its own, wrapped on its own
    "clip": (False, True),  # synchronize() (or scaler.unscale_) then clip_grad_norm_
    # at SKIP_STEP: synchronize() (or scaler.unscale_), the norm read, no step (by choice)
    "skip": (False, True),
    "precision": ("fp32", "bf16", "fp16"),  # autocast; fp16 with a GradScaler
    "dropout": (0.0, 0.3),
    "norm": (None, "layernorm"),  # (LayerNorm's gradients come as arrays of their own)
    # mid-run, new objects given the state by state_dicts or a checkpoint rank 0 saved
    "reload": ("no", "state_dict", "checkpoint"),
    "dtype": ("float32", "float64", "mixed"),  # mixed: the extra layer float64
}
STEPS, ROWS, FEATURES, CLASSES = 5, 16, 6, 3
RELOAD_STEP = 2  # reload: before this step
UNFREEZE_STEP = 3  # frozen: the bias trains from this step on, or stops (later)
SKIP_STEP = 2  # skip: the step the loop leaves out after reading the averaged gradient
INF_STEP = 1  # fp16: rank 1's half of this step's first micro-batch holds an inf
MAX_NORM = 0.05  # small enough that every step clips
# (DP against one process: float64 and float32 to their rounding; under autocast the
# low-precision GEMMs round the halves' and the whole batch's gradient sums apart by up to
# an ulp, 2^-8 in bfloat16 and 2^-11 in float16, relative: a missed or doubled average
# is still far outside)
TOL = {"float64": 1e-12, "float32": 1e-6, "mixed": 1e-6, "bf16": 1e-2, "fp16": 2e-3}


def valid(case: dict[str, Any]) -> bool:
    """A loop a user could write: autocast on a float32 model; a closure that does all the
    step's backward work (one micro-batch, no scaler, no clipping or skipping)."""
    if case["closure"] and (
        case["accumulate"] > 1
        or case["precision"] == "fp16"
        or case["clip"]
        or case["skip"]
        or case["optimizers"] > 1
    ):
        return False
    return case["precision"] == "fp32" or case["dtype"] == "float32"


JUDGED = (
    "precision",
    "dtype",
    "closure",
    "accumulate",
    "clip",
    "skip",
    "optimizers",
)  # what valid() reads


def name(case: dict[str, Any]) -> str:
    """The case's values that differ from each axis's first, joined."""
    return "-".join(f"{k}={v}" for k, v in case.items() if v != AXES[k][0]) or "defaults"


# ------------------------------------------------------------------------------ one run
class Net(nn.Module):
    """An MLP and an extra layer that enters the loss only where ``extra`` says (float64 in
    a "mixed" model: a second flat buffer, a second all-reduce)."""

    def __init__(self, case: dict[str, Any]) -> None:
        super().__init__()
        body = "float32" if case["dtype"] == "mixed" else case["dtype"]
        extra = "float64" if case["dtype"] == "mixed" else case["dtype"]
        self.body = nn.MLP(
            [FEATURES, 8, CLASSES], "tanh", dropout=case["dropout"], norm=case["norm"], dtype=body
        )
        self.extra = nn.Linear(FEATURES, 1, dtype=extra)

    def bias(self) -> gpunet.Tensor:
        """The parameter that ``frozen`` freezes: the first layer's bias."""
        return list(self.body.parameters())[1]


def make_optimizers(case: dict[str, Any], model: Net) -> list[optim.Optimizer]:
    body = list(model.body.parameters())
    if case["frozen"] == "added":  # (the bias joins at UNFREEZE_STEP, as a group of its own)
        body = [p for p in body if p is not model.bias()]
    extra = list(model.extra.parameters())
    first, rest = body[: len(body) - 2], body[-2:] + (extra if case["optimizers"] == 1 else [])
    groups: list = [{"params": first + rest}]
    if case["groups"] == 2:
        groups = [{"params": first}, {"params": rest, "lr": 0.3 * LR[case["opt"]]}]
    kw = {"lr": LR[case["opt"]], "capturable": case["capturable"]}
    second = [optim.Adam(extra, lr=1e-2)] if case["optimizers"] == 2 else []
    return [OPTIMIZERS[case["opt"]](groups, **kw), *second]


LR = {"adam": 1e-2, "adamw": 1e-2}
OPTIMIZERS: dict[str, Callable[..., optim.Optimizer]] = {
    "sgd": optim.SGD,
    "momentum": lambda g, **kw: optim.SGD(g, momentum=0.9, **kw),
    "nesterov": lambda g, **kw: optim.SGD(g, momentum=0.9, nesterov=True, **kw),
    "dampening": lambda g, **kw: optim.SGD(g, momentum=0.9, dampening=0.3, **kw),
    "weight_decay": lambda g, **kw: optim.SGD(g, momentum=0.5, weight_decay=0.1, **kw),
    "adam": lambda g, **kw: optim.Adam(g, weight_decay=0.01, **kw),
    "adamw": lambda g, **kw: optim.AdamW(g, weight_decay=0.1, **kw),
}
for _k in OPTIMIZERS:
    LR.setdefault(_k, 0.2)
SCHEDULES: dict[str, Callable[[optim.Optimizer], Any]] = {
    "steplr": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
}


class Run:
    """A model, its optimizer (data-parallel or not), schedule and scaler."""

    def __init__(self, case: dict[str, Any], parallel: bool, seed: int) -> None:
        self.case, self.parallel = case, parallel
        gpunet.manual_seed(seed)
        self.model = Net(case)
        if case["frozen"] in ("always", "unfrozen", "added"):
            self.model.bias().requires_grad = False
        self.opts = make_optimizers(case, self.model)
        if parallel:
            self.opts = [dist.DistributedOptimizer(o) for o in self.opts]
            if case["frozen"] == "added":  # (outside the optimizer: the README's call)
                dist.broadcast_parameters(self.model)
        self.opt = self.opts[0]  # (the one the schedule, add_param_group and closure see)
        make = SCHEDULES.get(case["schedule"])
        self.schedule = make(self.opt) if make else None
        fp16 = case["precision"] == "fp16"
        self.scaler = GradScaler(init_scale=2.0**10, growth_interval=2) if fp16 else None
        self.norm: float | None = None
        self.local: list | None = None  # this rank's own gradients before the update
        self.unscale = 1.0  # what the update multiplies them by: 1/scale under a scaler

    def rows(self) -> np.ndarray:
        """The global row indices this run takes of each batch."""
        return np.arange(R * ROWS // N, (R + 1) * ROWS // N) if self.parallel else np.arange(ROWS)

    def loss(self, x: np.ndarray, y: np.ndarray, step: int) -> gpunet.Tensor:
        """Cross-entropy over the rows, plus the extra layer's term on the rows ``extra``
        picks, divided by the rows taken (so the ranks' mean is the whole batch's loss)."""
        rows = self.rows()
        xs, ys = x[rows], y[rows]
        loss = F.cross_entropy(self.model.body(gpunet.tensor(xs)), gpunet.tensor(ys))
        use = {
            "never": np.zeros(len(rows), bool),
            "one_rank": rows >= ROWS // 2,  # rank 1's rows only
            "some_steps": np.full(len(rows), step % 2 == 0),  # every rank, even steps
        }[self.case["extra"]]
        if use.any():
            inputs = gpunet.tensor(xs[use].astype(self.model.extra.weight.dtype.name))
            extra = self.model.extra  # (used twice: its gradients summed in backward)
            term = ((extra(inputs) ** 2).sum() + extra(inputs * 0.5).sum()) / len(rows)
            loss = loss + term.to(loss.dtype)
        return loss / self.case["accumulate"]

    def precision(self) -> Any:
        dtype = {"bf16": gpunet.bfloat16, "fp16": gpunet.float16}.get(self.case["precision"])
        return gpunet.autocast(dtype=dtype or gpunet.bfloat16, enabled=dtype is not None)

    def step(self, step: int) -> None:
        """zero_grad, ``accumulate`` micro-batches (no_sync but the last, with ``no_sync``),
        the update; or the same inside a closure handed to step()."""
        case = self.case
        if step == UNFREEZE_STEP:
            self.unfreeze()
        if case["closure"]:  # (one optimizer: valid() pairs a closure with no second)
            self.local = None  # (formed inside step(): not seen before the average)
            self.opt.step(lambda: self.backward(step))
        else:
            self.backward(step)
            self.update(skip=case["skip"] and step == SKIP_STEP)
        if self.schedule is not None:
            self.schedule.step()

    def backward(self, step: int) -> gpunet.Tensor:
        case = self.case
        for zeroed in self.opts if case["zero_grad_by"] == "optimizer" else [self.model]:
            zeroed.zero_grad(set_to_none=case["set_to_none"])
        for k in range(case["accumulate"]):
            x, y = batch(case["dtype"], step, k)
            if case["precision"] == "fp16" and step == INF_STEP and k == 0:
                x[ROWS - 3, 0] = np.inf  # (rank 1's row: rank 0's half stays finite)
            last = k == case["accumulate"] - 1
            quiet = self.parallel and not last and case["no_sync"]
            with contextlib.ExitStack() as stack, self.precision():
                for o in self.opts if quiet else []:
                    stack.enter_context(o.no_sync())
                with np.errstate(over="ignore", invalid="ignore"):
                    loss = self.loss(x, y, step)
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                if quiet and step == 0:
                    refused_inside_no_sync(self)
        return loss

    def update(self, skip: bool) -> None:
        """The step: clipped after the average (synchronize() or unscale_) with ``clip``;
        with ``skip``, the averaged norm read and no step (as a loop skipping a bad one)."""
        params = list(self.model.parameters())
        clip = self.case["clip"]
        self.local = [None if p.grad is None else p.grad.numpy().copy() for p in params]
        self.unscale = 1.0 if self.scaler is None else 1.0 / self.scaler.get_scale()
        with np.errstate(over="ignore", invalid="ignore"):
            if self.scaler is not None:
                if clip or skip:
                    for o in self.opts:
                        self.scaler.unscale_(o)
                    limit = MAX_NORM if clip else np.inf
                    self.norm = float(optim.clip_grad_norm_(params, limit))
                for o in [] if skip else self.opts:
                    self.scaler.step(o)
                self.scaler.update()
                return
            if clip or skip:
                for o in self.opts if self.parallel else []:
                    o.synchronize()
                self.norm = float(optim.clip_grad_norm_(params, MAX_NORM if clip else np.inf))
            for o in [] if skip else self.opts:
                o.step()

    def unfreeze(self) -> None:
        """``frozen`` "unfrozen": requires_grad again; "added": and into a group of its own;
        "later": requires_grad=False from now on (its .grad left as zero_grad leaves it)."""
        bias, frozen = self.model.bias(), self.case["frozen"]
        if frozen in ("unfrozen", "added", "later"):
            bias.requires_grad = frozen != "later"
        if frozen == "added":
            self.opt.add_param_group({"params": [bias], "lr": 0.5 * LR[self.case["opt"]]})

    def reload(self) -> Run:
        """A new run (each rank its own initial weights) given this one's state: the
        state_dicts, or a checkpoint rank 0 saved (``gpunet.save``, loaded on every rank)."""
        schedule, scaler = self.schedule, self.scaler
        new = Run(self.case, self.parallel, seed=77 + R)
        if self.case["reload"] == "checkpoint" and self.parallel:
            from gpunet.checkpoint import load, save

            path = Path(sys.argv[1]).parent / "run.safetensors"  # (the test's folder)
            if R == 0:
                save(path, self.model, self.opt)
            COMM.barrier()
            load(path, new.model, new.opt)
            COMM.barrier()  # (before rank 0 saves over it in the next case)
        else:
            new.model.load_state_dict(
                {k: v.numpy().copy() for k, v in self.model.state_dict().items()}
            )
            new.opt.load_state_dict(self.opt.state_dict())
        for o, mine in zip(new.opts[1:], self.opts[1:]):  # (gpunet.save takes one optimizer)
            o.load_state_dict(mine.state_dict())
        if schedule is not None:
            new.schedule.load_state_dict(schedule.state_dict())
        if scaler is not None:
            new.scaler.load_state_dict(scaler.state_dict())
        return new


def batch(dtype: str, step: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Micro-batch ``k`` of step ``step``: every row of it (each rank takes its half)."""
    rng = np.random.default_rng(1000 * step + k)
    x = rng.standard_normal((ROWS, FEATURES)).astype("float32" if dtype == "mixed" else dtype)
    return x, rng.integers(0, CLASSES, ROWS)


def refused_inside_no_sync(run: Run) -> None:
    """step() and synchronize() inside no_sync() are refused by design, naming why, and
    change nothing."""
    before = snapshot(run)
    for call in (run.opt.step, run.opt.synchronize):
        try:
            call()
        except RuntimeError as e:
            assert "inside no_sync()" in str(e) and "drift apart" in str(e), e
        else:
            raise AssertionError(f"{call.__name__}() inside no_sync() was accepted")
    assert digest(snapshot(run)) == digest(before), "a refused call changed something"


# ------------------------------------------------------------------------------ comparing
def _host(v: Any) -> Any:
    if isinstance(v, gpunet.Tensor):
        v = v.data
    if isinstance(v, np.ndarray):
        return v.astype(np.float64) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
    return v


def snapshot(run: Run) -> dict[str, Any]:
    """Parameters, gradients (None or values), optimizer state and lrs, the norm, the scale."""
    params = list(run.model.parameters())
    states = [o.state_dict()["state"] for o in run.opts]
    return {
        "params": [p.numpy().copy() for p in params],
        "grads": [None if p.grad is None else p.grad.numpy().copy() for p in params],
        "state": [
            {i: {k: _host(v) for k, v in st.items()} for i, st in sorted(state.items())}
            for state in states
        ],
        "lrs": [float(g["lr"]) for o in run.opts for g in o.param_groups],
        "norm": run.norm,
        "scale": None if run.scaler is None else run.scaler.get_scale(),
    }


def digest(snap: dict[str, Any]) -> str:
    """A hash of the snapshot's bits (arrays by their bytes)."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, np.ndarray):
            h.update(np.ascontiguousarray(v).tobytes() + str(v.dtype).encode())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, list):
            for x in v:
                feed(x)
        else:
            h.update(repr(v).encode())

    feed(snap)
    return h.hexdigest()


def differences(dp: Any, one: Any, tol: float, where: str) -> list[str]:
    """Where ``dp`` and ``one`` differ beyond ``tol`` (relative to the values' size, at least
    1), or in structure (a gradient None in one only, a state key missing)."""
    if isinstance(dp, dict) or isinstance(one, dict):
        if not (isinstance(dp, dict) and isinstance(one, dict)) or dp.keys() != one.keys():
            return [
                f"{where}: keys {sorted(dp) if isinstance(dp, dict) else dp} against "
                f"{sorted(one) if isinstance(one, dict) else one}"
            ]
        return [d for k in dp for d in differences(dp[k], one[k], tol, f"{where}[{k}]")]
    if isinstance(dp, list) and isinstance(one, list) and len(dp) == len(one):
        return [
            d
            for i, (a, b) in enumerate(zip(dp, one))
            for d in differences(a, b, tol, f"{where}[{i}]")
        ]
    if dp is None or one is None or isinstance(dp, (str, bool)):
        return [] if dp == one else [f"{where}: {dp!r} against {one!r}"]
    a, b = np.asarray(dp, np.float64), np.asarray(one, np.float64)
    if a.shape != b.shape:
        return [f"{where}: shape {a.shape} against {b.shape}"]
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return [f"{where}: non-finite values differ"]
    fin = np.isfinite(b)
    size = max(1.0, float(np.max(np.abs(b[fin]), initial=0.0)))
    diff = float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))
    return [] if diff <= tol * size else [f"{where}: max |dp - one| {diff:.3g} > {tol * size:.3g}"]


def tolerance(case: dict[str, Any]) -> float:
    return TOL[case["dtype"] if case["precision"] == "fp32" else case["precision"]]


def train_case(case: dict[str, Any]) -> str:
    """The case's STEPS steps, data-parallel and in one process, compared after each."""
    dp, one = Run(case, True, seed=1 + 100 * R), Run(case, False, seed=1)
    alone = case["dropout"] == 0.0  # (dropout: each rank its own mask, no one-process twin)
    worst = 0.0
    for step in range(STEPS):
        if case["reload"] != "no" and step == RELOAD_STEP:
            dp = dp.reload()
        dp.step(step)
        mine = snapshot(dp)
        every = COMM.all_gather_object((digest(mine), dp.local))
        assert len({d for d, _ in every}) == 1, f"step {step}: the ranks' states differ"
        if dp.local is not None and not case["clip"]:
            averaged(mine["grads"], [local for _, local in every], dp.unscale, step)
        if alone:
            one.step(step)
            theirs = snapshot(one)
            bad = differences(mine, theirs, tolerance(case), f"step {step}")
            assert not bad, "\n".join(bad[:8])
            worst = max(worst, max_diff(mine["params"], theirs["params"]))
    return f"{name(case)}: " + (f"max param diff {worst:.2g}" if alone else "ranks identical")


def averaged(grads: list, local: list[list], unscale: float, step: int) -> None:
    """``p.grad`` after the step is, bit for bit, the ranks' gradients before it summed and
    scaled by 1/N in their dtype (a rank without one counts zeros; None where none has), and
    under a scaler unscaled (``unscale``, 1/scale), as PyTorch leaves it."""
    for i, got in enumerate(grads):
        theirs = [rank[i] for rank in local if rank[i] is not None]
        if not theirs:
            assert got is None, f"step {step}: parameter {i} given a gradient no rank formed"
            continue
        want = theirs[0].copy()
        for g in theirs[1:]:
            want += g
        want *= want.dtype.type(1.0 / N)
        if unscale != 1.0:
            want *= want.dtype.type(unscale)
        same = np.array_equal(got, want, equal_nan=True)  # (NaN: rank 1's inf step)
        assert same, f"step {step}: parameter {i}'s gradient is not the ranks' average"


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ fit
FITS: dict[str, dict[str, Any]] = {
    "sgd_momentum_steplr_float64_val": {"opt": "momentum", "schedule": "steplr", "val": True},
    "adam_fp16_scaler_val": {"opt": "adam", "dtype": "float32", "precision": "fp16", "val": True},
    "adamw_bf16_capture_requested": {
        "opt": "adamw",
        "dtype": "float32",
        "precision": "bf16",
        "capture": True,
        "val": True,
    },
    "nesterov_float32_no_val": {"opt": "nesterov", "dtype": "float32", "schedule": "cosine"},
    "head_only_float64": {"opt": "adam", "head_only": True, "val": True},
    # 60 rows: the last batch 4 rows in one process, 2 on each rank
    "uneven_last_batch_plateau": {
        "opt": "momentum",
        "rows": 60,
        "schedule": "plateau",
        "val": True,
    },
    "drop_last": {"opt": "adamw", "rows": 60, "drop_last": True, "val": True},
    "resumed_after_3_epochs": {"opt": "adam", "resume": 3, "val": True},
    "diverges": {"opt": "sgd", "dtype": "float32", "inf_row": True},
    "adam_fp16_scaler_capture_requested_plateau": {
        "opt": "adam",
        "dtype": "float32",
        "precision": "fp16",
        "capture": True,
        "schedule": "plateau",
        "val": True,
    },
}
HISTORY = (
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "lr",
    "grad_norm",
    "best_epoch",
    "stopped_early",
    "diverged",
    "warnings",
)
FIT_SCHEDULES = {
    **SCHEDULES,
    "plateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def one_fit(kw: dict[str, Any], parallel: bool) -> tuple[dict[str, Any], list[np.ndarray]]:
    """fit for up to 12 epochs with early stopping on noise labels (it overfits): the
    data-parallel run on its shards of 4 rows, or one process on batches of 8."""
    from gpunet.train import fit

    dtype, precision = kw.get("dtype", "float64"), kw.get("precision", "fp32")
    train, val = fit_data(kw, parallel)
    gpunet.manual_seed(5 + 100 * R if parallel else 5)
    model = nn.MLP([FEATURES, 16, CLASSES], "tanh", dtype=dtype)
    trained = list(model.parameters())
    if kw.get("head_only"):  # (a frozen backbone: the optimizer holds the last layer only)
        for p in trained[:-2]:
            p.requires_grad = False
        trained = trained[-2:]
    opt = OPTIMIZERS[kw["opt"]](trained, lr=LR[kw["opt"]])
    opt = dist.DistributedOptimizer(opt) if parallel else opt
    make = FIT_SCHEDULES.get(kw.get("schedule", "none"))
    autocast = {"bf16": gpunet.bfloat16, "fp16": gpunet.float16}.get(precision)
    common = dict(
        early_stopping=2,
        scheduler=make(opt) if make else None,
        progress=False,
        capture=kw.get("capture", False),
        autocast=autocast,
        scaler=GradScaler() if precision == "fp16" else None,
    )
    h, best = None, [None]
    fit_args = (model, F.cross_entropy, opt, train, val)
    if "resume" in kw:  # (a first fit stops; a second one continues its history and best)

        def keep(epoch: int, history: Any) -> None:
            if history.best_epoch == epoch:
                best[0] = model.state_dict()

        h = fit(*fit_args, epochs=kw["resume"], on_epoch_end=keep, **common)
    with np.errstate(over="ignore", invalid="ignore"):
        h = fit(*fit_args, epochs=12, history=h, best_state=best[0], **common)
    return {k: getattr(h, k) for k in HISTORY}, [p.numpy().copy() for p in model.parameters()]


def fit_data(kw: dict[str, Any], parallel: bool) -> tuple[Any, Any]:
    """The training loader (8 rows a step: 4 on each rank) and the validation one (13 rows,
    sharded unpadded), or None."""
    dtype = kw.get("dtype", "float64")
    rng = np.random.default_rng(9)
    rows = kw.get("rows", 64)
    x, y = rng.standard_normal((rows, FEATURES)).astype(dtype), rng.integers(0, CLASSES, rows)
    vx, vy = rng.standard_normal((13, FEATURES)).astype(dtype), rng.integers(0, CLASSES, 13)
    if kw.get("inf_row"):  # (a row whose loss is inf: the run diverges when it meets it)
        x[17, 0] = np.inf
    shard = {"num_replicas": N, "rank": R} if parallel else {}
    batch = 8 // (N if parallel else 1)
    drop = kw.get("drop_last", False)
    train = DataLoader(
        Dataset(x, y), batch, shuffle=True, seed=0, dtype=dtype, drop_last=drop, **shard
    )
    val = DataLoader(Dataset(vx, vy), 5, pad=False, dtype=dtype, **shard) if kw.get("val") else None
    return train, val


def fit_case(kw: dict[str, Any]) -> str:
    """fit with a sharded loader against fit in one process: the same history (losses,
    accuracies, lrs, gradient norms, best epoch, early stop) and final weights."""
    mine, weights = one_fit(kw, parallel=True)
    theirs, ref = one_fit(kw, parallel=False)
    every = COMM.all_gather_object(digest({"h": repr(mine), "w": weights}))
    assert len(set(every)) == 1, "the ranks' histories or weights differ"
    tol = TOL[
        kw.get("dtype", "float64") if kw.get("precision", "fp32") == "fp32" else kw["precision"]
    ]
    bad = differences({**mine, "weights": weights}, {**theirs, "weights": ref}, tol, "fit")
    assert not bad, "\n".join(bad[:8])
    epochs = len(mine["train_loss"])
    return f"{epochs} epochs, best {mine['best_epoch'] + 1}, early stop {mine['stopped_early']}"


# ------------------------------------------------------------------------------ refusals
def capture_of_the_step_is_refused() -> str:
    """gpunet.capture of a data-parallel step: refused by design, naming the step and what
    to do, with the weights and optimizer state as they were."""
    run = Run(dict(name_defaults(), opt="adam"), True, seed=1 + 100 * R)
    run.step(0)
    before = snapshot(run)

    @gpunet.capture
    def captured(x: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        run.opt.zero_grad()
        loss = F.cross_entropy(run.model.body(x), y)
        loss.backward()
        run.opt.step()
        return loss

    x, y = batch("float32", 1, 0)
    try:
        captured(gpunet.tensor(x[run.rows()]), gpunet.tensor(y[run.rows()]))
    except gpunet.CaptureError as e:
        assert "DistributedOptimizer.step is not capturable yet" in str(e), e
        assert "without capture" in str(e), e
    else:
        raise AssertionError("a captured data-parallel step was accepted")
    after = snapshot(run)
    assert digest([after["params"], after["state"]]) == digest([before["params"], before["state"]])
    return "refused, nothing stepped"


def sgd_in_backward_is_refused_at_the_wrap() -> str:
    model = nn.MLP([FEATURES, 8, CLASSES])
    try:
        dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1, in_backward=True))
    except ValueError as e:
        assert "in_backward" in str(e) and "drift apart" in str(e), e
        return "refused"
    raise AssertionError("SGD(in_backward=True) was accepted")


def wrapping_twice_is_refused() -> str:
    run = Run(name_defaults(), True, seed=1 + 100 * R)
    try:
        dist.DistributedOptimizer(run.opt)
    except ValueError as e:
        assert "already data-parallel" in str(e), e
        return "refused"
    raise AssertionError("a second wrap was accepted")


def name_defaults() -> dict[str, Any]:
    return {k: v[0] for k, v in AXES.items()}


REFUSALS = [
    capture_of_the_step_is_refused,
    sgd_in_backward_is_refused_at_the_wrap,
    wrapping_twice_is_refused,
]


# ------------------------------------------------------------------------------ main
# The covering design's seed; others give other designs (a wider search, run by hand:
# matrix_worker.py OUT SEED)
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 0
CASES = covering(AXES, valid, seed=SEED, candidates=100)


def checks() -> Iterator[tuple[str, Callable[[], str]]]:
    for case in CASES:
        yield f"case {name(case)}", lambda case=case: train_case(case)
    for label, kw in FITS.items():
        yield f"fit {label}", lambda kw=kw: fit_case(kw)
    for fn in REFUSALS:
        yield fn.__name__, fn


def design() -> dict[str, Any]:
    """The design's size, and the pairs of axis values that a valid case could hold and no
    case does (none, or the greedy search missed some)."""
    held = set().union(*(pairs(AXES, c) for c in CASES))
    judged = [dict(zip(JUDGED, values)) for values in itertools.product(*map(AXES.get, JUDGED))]
    missed = []
    for a, b in itertools.combinations(AXES, 2):
        for u, v in itertools.product(AXES[a], AXES[b]):
            holds = (valid({**name_defaults(), **j, a: u, b: v}) for j in judged)
            if ((a, u), (b, v)) not in held and any(holds):
                missed.append(f"{a}={u} {b}={v}")
    return {"cases": len(CASES), "fits": len(FITS), "uncovered": missed}


def main() -> None:
    results: dict[str, Any] = {"design": design()}
    for label, fn in checks():
        try:
            detail, ok = fn(), True
        except Exception:
            detail, ok = traceback.format_exc(), False
        every = COMM.all_gather_object((ok, detail))
        results[label] = [all(o for o, _ in every), [d for _, d in every]]
    if R == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
