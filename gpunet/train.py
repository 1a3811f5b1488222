"""The fit loop: epochs of mini-batches, validation, early stopping, history, health checks.

``fit(model, loss_fn, optimizer, train, val, epochs)`` runs forward, loss, backward and the
optimizer step per batch; after each epoch it evaluates on ``val`` under ``no_grad``, keeps
the best weights (lowest validation loss) and stops when ``early_stopping`` epochs pass
without improvement, restoring them. It warns, naming the parameter, when a gradient norm
vanishes (< 1e-7) or explodes (> 1e3), once per parameter per epoch. A NaN or inf loss (a
diverged run) and Ctrl-C stop the fit with the best weights restored; Ctrl-C lets the current
step finish first, and a second Ctrl-C stops at once.

Given a data-parallel optimizer (``gpunet.distributed.DistributedOptimizer``) over several
ranks, the same code trains every rank alike: the losses, accuracies and row counts are
summed over the ranks, and each step the ranks agree on a non-finite loss or a Ctrl-C, so
every decision (early stopping, the best epoch, stopping) is taken identically everywhere.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import amp, dtypes
from .autodiff import CaptureError, no_grad
from .backend import raise_pending_faults
from .capture import capture as capture_step
from .tensor import Tensor

log = logging.getLogger("gpunet")

VANISHING, EXPLODING = 1e-7, 1e3


@dataclass
class History:
    """Per-epoch records of a fit: losses, accuracies, learning rate, gradient norms."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[dict[str, float]] = field(default_factory=list)  # per parameter, last batch
    samples_per_second: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    interrupted: bool = False  # Ctrl-C: the history holds the complete epochs before it
    diverged: bool = False  # the training loss became NaN or inf
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> History:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def _accuracy(out: Tensor, y: Tensor) -> float | None:
    """Share of rows whose argmax is the label (classification), else None."""
    if out.ndim != 2 or y.ndim != 1 or y.dtype.kind not in "iu":
        return None
    return float((out.argmax(1) == y).numpy().mean()) if len(y) else 0.0


def evaluate(
    model: Callable[[Tensor], Tensor],
    loss_fn: Callable[..., Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    comm: Any = None,
) -> tuple[float, float | None]:
    """Mean loss (and accuracy, for labels) over the batches, under no_grad; with ``comm``
    (data parallelism), over every rank's batches: the sums are all-reduced, so every rank
    gets the same figures."""
    _check_evaluation(batches, comm, "evaluate: the loader")
    total, correct, n, classify = 0.0, 0.0, 0, True
    training = getattr(model, "training", None)
    if training is not None:
        model.eval()  # type: ignore[attr-defined]
    try:
        with no_grad():
            for x, y in batches:
                out = model(x)
                total += loss_fn(out, y).item() * len(y)
                acc = _accuracy(out, y)
                classify = classify and acc is not None
                correct += (acc or 0.0) * len(y)
                n += len(y)
    finally:
        if training:
            model.train()  # type: ignore[attr-defined]
    if comm is not None:
        total, correct, n, classify = _sum_over_ranks(comm, total, correct, n, classify)
    if n == 0:
        raise ValueError("evaluate: the batches hold no rows; there is nothing to evaluate")
    return (total / n, (correct / n) if classify else None)


def _check_evaluation(loader: Any, comm: Any, what: str) -> None:
    """A sharded evaluation loader needs its whole world to sum over (one shard alone is not
    the set), and must not pad (its repeated rows would count twice in the sums)."""
    data, replicas = getattr(loader, "dataset", None), getattr(loader, "num_replicas", 1)
    size = 1 if comm is None else comm.size
    if data is None or replicas == 1:  # (unsharded: each rank sums the whole set, alike)
        return
    if replicas != size:
        raise ValueError(
            f"{what} holds 1 shard of {replicas}, but its sums run over {size} rank(s), so its "
            "loss and accuracy would not be the set's; pass comm= (the optimizer's "
            "communicator, gpunet.distributed.init()) with every rank, or an unsharded loader"
        )
    rows = len(data)
    extra = -rows % replicas if getattr(loader, "pad", False) else 0
    if extra:
        raise ValueError(
            f"{what} pads its {rows} rows to {rows + extra} for {replicas} ranks, so its loss "
            f"and accuracy would count {extra} of them twice; pass pad=False to evaluation "
            "loaders (uneven shards are fine there)"
        )


def _sum_over_ranks(
    comm: Any, total: float, correct: float, n: int, classify: bool
) -> tuple[float, float, int, bool]:
    """(loss sum, correct, rows, every rank classifies) summed over the ranks: one all-reduce."""
    with comm.during("fit or evaluate"):
        sums = comm.host.all_reduce(np.array([total, correct, n, not classify], np.float64))
    return float(sums[0]), float(sums[1]), int(sums[2]), not sums[3]


def _named_parameters(model: Any) -> list[tuple[str, Tensor]]:
    if hasattr(model, "named_parameters"):
        return list(model.named_parameters())
    return [(f"param{i}", p) for i, p in enumerate(model.parameters())]


def _grad_norms(params: list[tuple[str, Tensor]]) -> dict[str, float]:
    """||g|| per parameter with a gradient (after a loss scaler's step, unscaled: the step
    leaves them so)."""
    out = {}
    for name, p in params:
        g = p.grad
        if g is not None:
            a = g.numpy().astype(np.float64)  # (squares of a float16 gradient overflow it)
            out[name] = float(np.sqrt(np.vdot(a, a).real))
    return out


def fit(
    model: Any,
    loss_fn: Callable[..., Tensor],
    optimizer: Any,
    train: Iterable[tuple[Tensor, Tensor]],
    val: Iterable[tuple[Tensor, Tensor]] | None = None,
    epochs: int = 10,
    early_stopping: int | None = None,
    scheduler: Any = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, History], None] | None = None,
    history: History | None = None,
    best_state: dict[str, Any] | None = None,
    capture: bool = False,
    autocast: Any = None,
    scaler: Any = None,
) -> History:
    """Train ``model`` for ``epochs`` in all and return its ``History`` (see the module
    docstring). To continue a run, pass its ``history`` and the weights of its best epoch
    (``best_state``): the epochs already in the history are not run again. ``capture``:
    record the training step once per batch shape and replay it (``gpunet.capture``); a
    step that cannot be captured warns and runs eagerly. ``autocast``: gpunet.bfloat16 or
    gpunet.float16 to run forward and loss under ``gpunet.autocast`` (the parameters stay
    float32); ``scaler``: a ``gpunet.amp.GradScaler`` for float16."""
    if epochs < 1 or (early_stopping is not None and early_stopping < 1):
        raise ValueError(
            f"fit: epochs ({epochs}) and early_stopping ({early_stopping}) must be >= 1"
        )
    if hasattr(train, "__len__") and len(train) == 0:  # type: ignore[arg-type]
        raise ValueError(
            "fit: the training loader has no batches (no rows, or drop_last with "
            "fewer rows than batch_size)"
        )
    history = History() if history is None else history
    if history.best_epoch >= 0 and best_state is None:
        raise ValueError(
            f"fit: the history passed has a best epoch ({history.best_epoch + 1}) but no "
            "best_state: pass its weights (best_state=, e.g. gpunet.train.host_state(model) "
            "taken when that epoch ended), which early stopping, a divergence or Ctrl-C "
            "restore; without them the run would end on other weights than a straight one"
        )
    history.interrupted = history.diverged = False  # they told how the previous fit ended
    first, run = len(history.train_loss), _Run(history, best_state, _communicator(optimizer))
    if history.stopped_early:  # a finished history: nothing left to run
        first = epochs
    if run.comm is not None:
        from .distributed import broadcast_parameters

        _check_shards(run.comm, train)
        # (the wrap gave every rank rank 0's values of the optimizer's parameters only: a
        # frozen part outside it, seeded apart on each rank, would differ silently)
        broadcast_parameters(model, run.comm)
    if val is not None:
        _check_evaluation(val, run.comm, "fit: the validation loader")
    bar = _progress(epochs, progress and (run.comm is None or run.comm.rank == 0), first)
    step = _Step(model, loss_fn, optimizer, capture, run, autocast, scaler)
    with _DeferredInterrupt() as interrupt:
        try:
            for epoch in range(first, epochs):
                if not _train_epoch(model, step, train, epoch, run, interrupt):
                    break
                monitored = _end_epoch(model, loss_fn, optimizer, val, history, run)
                if scheduler is not None:
                    scheduler.step(monitored) if _takes_metric(scheduler) else scheduler.step()
                run.record(model, epoch, monitored)
                bar.update(1)
                bar.set_postfix(_postfix(history))
                if on_epoch_end is not None:
                    on_epoch_end(epoch, history)
                if early_stopping is not None and run.waited >= early_stopping:
                    history.stopped_early = True
                    break
                # (ranks agree at the next step; after the last epoch nothing is left to stop,
                # and a run marked interrupted would be offered a resume with nothing to do)
                if interrupt.pending and run.comm is None and epoch + 1 < epochs:
                    history.interrupted = True
                    break
        except KeyboardInterrupt:  # a second Ctrl-C, or one raised inside a step
            if run.comm is not None:  # the other ranks wait in a collective: end them all
                raise
            history.interrupted = True
        except TypeError as e:  # (an op's dtype error cannot say how the batches were made)
            hint = _dtype_hint(model, train)
            if hint:
                e.add_note(hint)
            raise
        finally:
            bar.close()
    run.finish(model, early_stopping is not None)
    return history


def _dtype_hint(model: Any, train: Any) -> str:
    """What to do when the loader's batches and the model's parameters differ in float dtype
    (``DataLoader`` makes float32 batches unless told): '' when they do not."""
    batches = getattr(getattr(train, "x", None), "dtype", None)
    params = {p.dtype for p in model.parameters()} if hasattr(model, "parameters") else set()
    if batches is None or len(params) != 1 or dtypes.as_dtype(batches).kind != "f":
        return ""
    (param,) = params
    if dtypes.as_dtype(param) == dtypes.as_dtype(batches):
        return ""
    return (
        f"fit: the training loader gives {dtypes.as_dtype(batches)} batches to a model whose "
        f"parameters are {param}: build it with DataLoader(..., dtype=gpunet.{param}) (or "
        f"convert the model, model.to(gpunet.{dtypes.as_dtype(batches)}))"
    )


def _communicator(optimizer: Any) -> Any:
    """The communicator of a data-parallel optimizer with more than one rank, else None."""
    comm = getattr(optimizer, "communicator", None)
    return comm if comm is not None and comm.size > 1 else None


def _check_shards(comm: Any, train: Any) -> None:
    """Under data parallelism every rank must shuffle alike and take its own shard, else the
    shards overlap silently, and take the same number of steps, else one rank's all-reduce
    meets another's end-of-epoch one: refuse on every rank (they all see the same list)."""
    mine = (getattr(train, "seed", None), getattr(train, "num_replicas", None))
    every = comm.host.all_gather_object((*mine, getattr(train, "rank", None)))
    if any(e[:2] != (every[0][0], comm.size) or e[2] != r for r, e in enumerate(every)):
        raise ValueError(
            f"fit: under data parallelism over {comm.size} ranks the training loader must be "
            "DataLoader(..., seed=S, num_replicas=size, rank=rank) with the same S on every "
            f"rank; the ranks have (seed, num_replicas, rank) = {every}"
        )
    data = getattr(train, "dataset", None)
    sizes = (getattr(train, "batch_size", None), len(data) if hasattr(data, "__len__") else None)
    every_size = comm.host.all_gather_object(sizes)
    if len(set(every_size)) > 1:  # (equal steps would hide it: the step weighs ranks alike)
        raise ValueError(
            "fit: under data parallelism every rank's training loader must shard the same data "
            "in batches of one size, since the step averages the ranks' mean gradients with "
            f"equal weight; the ranks have (batch_size, rows) = {every_size}"
        )
    steps = comm.host.all_gather_object(len(train) if hasattr(train, "__len__") else None)
    if len(set(steps)) > 1:
        raise ValueError(
            f"fit: under data parallelism every rank must take the same number of steps per "
            f"epoch; the ranks' training loaders have {steps} batches (pad=False shards "
            "unevenly: keep the default pad=True for training, pad=False for evaluation)"
        )


class _Run:
    """The best epoch so far (its monitored value and weights) and the epochs since."""

    def __init__(self, history: History, best_state: dict[str, Any] | None, comm: Any) -> None:
        self.history, self.best_state, self.comm = history, best_state, comm
        h, b = history, history.best_epoch
        self.best = (h.val_loss or h.train_loss)[b] if b >= 0 else math.inf
        self.waited = len(h.train_loss) - 1 - b if b >= 0 else 0

    def record(self, model: Any, epoch: int, monitored: float) -> None:
        if monitored < self.best:
            self.best, self.waited, self.history.best_epoch = monitored, 0, epoch
            self.best_state = host_state(model)  # already copies
        else:
            self.waited += 1

    def warn(self, msg: str) -> None:
        self.history.warnings.append(msg)
        if self.comm is None or self.comm.rank == 0:  # every rank has the same to say
            log.warning("gpunet: %s", msg)

    def finish(self, model: Any, early_stopping: bool) -> None:
        """Restore the best weights after early stopping, an interrupt or a divergence."""
        h = self.history
        abnormal = h.interrupted or h.diverged
        if h.interrupted:
            self.warn(f"interrupted after {len(h.train_loss)} complete epochs")
        if self.best_state is not None and (early_stopping or abnormal):
            model.load_state_dict(self.best_state)
            if abnormal:
                self.warn(f"restored the best weights (epoch {h.best_epoch + 1})")


class _Step:
    """One training step: eager (forward, the loss read, then backward and the update, so a
    diverged loss stops before it updates), or captured (``gpunet.capture``: the whole step
    replayed, the loss read after; the best weights are restored either way)."""

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[..., Tensor],
        optimizer: Any,
        capture: bool,
        run: _Run,
        autocast: Any = None,
        scaler: Any = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.run = model, loss_fn, optimizer, run
        self.precision = amp.autocast(
            dtype=autocast or dtypes.bfloat16, enabled=autocast is not None
        )
        self.scaler = scaler
        # Data parallel: eager, so that every rank agrees on the loss and on Ctrl-C before
        # any rank starts the update's all-reduce (a capture would replay past that point).
        capture = capture and run.comm is None
        self.captured = capture_step(self._whole) if capture else None

    def _whole(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The whole step, to be captured: with a loss scaler, its scale, skip and update are
        device arrays, so a scaled step replays too."""
        self.optimizer.zero_grad()
        with self.precision:
            out = self.model(x)
            loss = self.loss_fn(out, y)
        self._backward_and_update(loss)
        return loss, out

    def _backward_and_update(self, loss: Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def __call__(self, x: Tensor, y: Tensor, interrupted: bool) -> tuple[float, Tensor, bool]:
        """(the loss, NaN where it is not finite on some rank; the model's output; whether to
        stop after this step: Ctrl-C on this or, data parallel, any rank)."""
        if self.scaler is None:
            return self._step(x, y, interrupted)
        # float16 overflows are the scaler's to find and skip: NumPy's warnings about them
        # (overflow in a cast, invalid values in a GEMM) would only be noise, as PyTorch has none
        with np.errstate(over="ignore", invalid="ignore"):
            return self._step(x, y, interrupted)

    def _step(self, x: Tensor, y: Tensor, interrupted: bool) -> tuple[float, Tensor, bool]:
        if self.captured is not None:
            try:
                loss, out = self.captured(x, y)
                return loss.item(), out, interrupted
            except CaptureError as e:
                self.captured = None
                self.run.warn(f"the training step runs eagerly: it cannot be captured ({e})")
                if e.result is not None:  # the step ran to its end: its eager result
                    loss, out = e.result
                    return loss.item(), out, interrupted
        with self.precision:
            out = self.model(x)
            loss = self.loss_fn(out, y)
        value, stop = loss.item(), interrupted
        if self.run.comm is not None:  # every rank decides alike: one small all-reduce
            value, stop = _agree(self.run.comm, value, interrupted)
        if math.isfinite(value):
            self.optimizer.zero_grad()
            self._backward_and_update(loss)
        return value, out, stop


def _train_epoch(
    model: Any,
    step: _Step,
    train: Iterable[tuple[Tensor, Tensor]],
    epoch: int,
    run: _Run,
    interrupt: _DeferredInterrupt,
) -> bool:
    """One pass over ``train``; False (nothing recorded) when the loss diverges or Ctrl-C
    comes, so the history holds complete epochs only."""
    if hasattr(model, "train"):
        model.train()
    start, seen, total, correct, classify = time.perf_counter(), 0, 0.0, 0.0, True
    comm = run.comm
    for x, y in train:
        value, out, stop = step(x, y, interrupt.pending)
        if not math.isfinite(value):
            run.history.diverged = True
            run.warn(f"epoch {epoch + 1}: the training loss became {value}; stopping")
            return False
        total += value * len(y)
        acc = _accuracy(out, y)
        classify = classify and acc is not None
        correct += (acc or 0.0) * len(y)
        seen += len(y)
        if stop:  # the step is done; stop now
            run.history.interrupted = True
            return False
    if comm is not None:
        total, correct, seen, classify = _sum_over_ranks(comm, total, correct, seen, classify)
    if seen == 0:
        raise ValueError("fit: the training loader gave no batches")
    raise_pending_faults()  # a bad label a GPU kernel recorded (backend/faults.py)
    h = run.history
    norms = _grad_norms(_named_parameters(model))
    for name, norm in norms.items():
        if step.scaler is not None and not math.isfinite(norm):
            continue  # (the scaler skipped that step: an overflow is its to handle, not a warning)
        if norm < VANISHING or norm > EXPLODING:
            kind = "vanishing" if norm < VANISHING else "exploding"
            run.warn(f"epoch {epoch + 1}: {kind} gradient in {name} (norm {norm:.3g})")
    h.grad_norm.append(norms)
    h.train_loss.append(total / seen)
    h.train_accuracy.append(correct / seen if classify else float("nan"))
    h.samples_per_second.append(seen / max(time.perf_counter() - start, 1e-9))
    return True


def _end_epoch(
    model: Any,
    loss_fn: Callable[..., Tensor],
    optimizer: Any,
    val: Iterable[tuple[Tensor, Tensor]] | None,
    history: History,
    run: _Run,
) -> float:
    """Record the learning rate and the validation figures; the value early stopping watches."""
    history.lr.append(float(optimizer.param_groups[0]["lr"]))
    if val is None:
        return history.train_loss[-1]
    vloss, vacc = evaluate(model, loss_fn, val, run.comm)
    history.val_loss.append(vloss)
    history.val_accuracy.append(vacc if vacc is not None else float("nan"))
    return vloss


def _agree(comm: Any, value: float, pending: bool) -> tuple[float, bool]:
    """(this rank's loss, or NaN when any rank's loss is not finite; whether any rank was
    interrupted): the same decisions on every rank, so no rank waits for one that stopped."""
    flags = np.array([math.isfinite(value), not pending], np.float64)
    with comm.during("fit"):  # 0 where any rank's loss or Ctrl-C says stop
        flags = comm.host.all_reduce(flags, "min")
    return (value if flags[0] else math.nan), not flags[1]


class _DeferredInterrupt:
    """Ctrl-C during ``fit``: the first lets the current step finish, then ``fit`` stops with
    the best weights; a second raises KeyboardInterrupt at once. Only installed from the main
    thread over Python's default handler (a program's own handler is left alone)."""

    def __enter__(self) -> _DeferredInterrupt:
        self.pending, self.previous = False, None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def host_state(model: Any) -> dict[str, Any]:
    """A copy of ``model.state_dict()`` as host arrays (what a snapshot of the weights needs)."""
    return {
        k: np.array(v.numpy() if isinstance(v, Tensor) else v)
        for k, v in model.state_dict().items()
    }


def _takes_metric(scheduler: Any) -> bool:
    return type(scheduler).__name__ == "ReduceLROnPlateau"


def _postfix(h: History) -> dict[str, str]:
    out = {"loss": f"{h.train_loss[-1]:.4f}", "samples/s": f"{h.samples_per_second[-1]:.0f}"}
    if h.val_loss:
        out["val_loss"] = f"{h.val_loss[-1]:.4f}"
    if h.val_accuracy and not math.isnan(h.val_accuracy[-1]):
        out["val_acc"] = f"{h.val_accuracy[-1]:.3f}"
    return out


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, values: dict[str, str]) -> None: ...
    def close(self) -> None: ...


def _progress(epochs: int, enabled: bool, done: int = 0) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still trains
        return _NoBar()
    return tqdm(total=epochs, initial=done, unit="epoch", dynamic_ncols=True)
