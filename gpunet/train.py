"""The fit loop: epochs of mini-batches, validation, early stopping, history, health checks.

``fit(model, loss_fn, optimizer, train, val, epochs)`` runs forward, loss, backward and the
optimizer step per batch; after each epoch it evaluates on ``val`` under ``no_grad``, keeps
the best weights (lowest validation loss) and stops when ``early_stopping`` epochs pass
without improvement, restoring them. It warns, naming the parameter, when a gradient norm
vanishes (< 1e-7) or explodes (> 1e3), and stops when the loss becomes NaN.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .autodiff import no_grad
from .backend import raise_pending_faults
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
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _accuracy(out: Tensor, y: Tensor) -> float | None:
    """Share of rows whose argmax is the label (classification), else None."""
    if out.ndim != 2 or y.ndim != 1 or y.dtype.kind not in "iu":
        return None
    return float((out.argmax(1) == y).numpy().mean()) if len(y) else 0.0


def evaluate(
    model: Callable[[Tensor], Tensor],
    loss_fn: Callable[..., Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
) -> tuple[float, float | None]:
    """Mean loss (and accuracy, for labels) over the batches, under no_grad."""
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
    return (total / max(n, 1), (correct / max(n, 1)) if classify else None)


def _named_parameters(model: Any) -> list[tuple[str, Tensor]]:
    if hasattr(model, "named_parameters"):
        return list(model.named_parameters())
    return [(f"param{i}", p) for i, p in enumerate(model.parameters())]


def _grad_norms(params: list[tuple[str, Tensor]]) -> dict[str, float]:
    out = {}
    for name, p in params:
        g = p.grad
        if g is not None:
            a = g.numpy()
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
) -> History:
    """Train ``model`` and return its ``History`` (see the module docstring)."""
    history = History()
    params = _named_parameters(model)
    best, best_state, waited = math.inf, None, 0
    bar = _progress(epochs, progress)
    for epoch in range(epochs):
        if hasattr(model, "train"):
            model.train()
        start, seen, total, correct, classify = time.perf_counter(), 0, 0.0, 0.0, True
        for x, y in train:
            out = model(x)
            loss = loss_fn(out, y)
            value = loss.item()
            if not math.isfinite(value):
                msg = f"epoch {epoch}: the training loss became {value}; stopping"
                history.warnings.append(msg)
                log.warning("gpunet: %s", msg)
                bar.close()
                return history
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += value * len(y)
            acc = _accuracy(out, y)
            classify = classify and acc is not None
            correct += (acc or 0.0) * len(y)
            seen += len(y)
        raise_pending_faults()  # a bad label a GPU kernel recorded (backend/faults.py)
        norms = _grad_norms(params)
        for name, norm in norms.items():
            if norm < VANISHING or norm > EXPLODING:
                kind = "vanishing" if norm < VANISHING else "exploding"
                msg = f"epoch {epoch}: {kind} gradient in {name} (norm {norm:.3g})"
                history.warnings.append(msg)
                log.warning("gpunet: %s", msg)
        history.grad_norm.append(norms)
        history.train_loss.append(total / max(seen, 1))
        history.train_accuracy.append(correct / max(seen, 1) if classify else float("nan"))
        history.samples_per_second.append(seen / max(time.perf_counter() - start, 1e-9))
        history.lr.append(float(optimizer.param_groups[0]["lr"]))
        monitored = history.train_loss[-1]
        if val is not None:
            vloss, vacc = evaluate(model, loss_fn, val)
            history.val_loss.append(vloss)
            history.val_accuracy.append(vacc if vacc is not None else float("nan"))
            monitored = vloss
        if scheduler is not None:
            scheduler.step(monitored) if _takes_metric(scheduler) else scheduler.step()
        if monitored < best:
            best, waited, history.best_epoch = monitored, 0, epoch
            if early_stopping is not None:
                best_state = copy.deepcopy(_host_state(model))
        else:
            waited += 1
        bar.update(1)
        bar.set_postfix(_postfix(history))
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
        if early_stopping is not None and waited >= early_stopping:
            history.stopped_early = True
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def _host_state(model: Any) -> dict[str, Any]:
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


def _progress(epochs: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still trains
        return _NoBar()
    return tqdm(total=epochs, unit="epoch", dynamic_ncols=True)
