"""The training job behind ``gpunet train``: the user's data prepared once (labels encoded,
features and regression targets standardized), the run folder made and checked writable
before training, checkpoints of the last complete epoch (so ``--resume`` continues exactly),
and on every way out (finished, early-stopped, diverged, Ctrl-C) the best weights saved with
what ``gpunet predict`` needs, the metrics as strict JSON, and the curves.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, amp, backends, distributed, dtypes, nn, optim
from .backend import default_device, probe_cuda
from .backend import device as find_device
from .checkpoint import load, rank_rng_state, save, write_atomically
from .cli import UsageError, _given
from .creation import zeros
from .data import DIGITS_SCALE, DataError, DataLoader, Dataset, infer_task, load_digits, split
from .distributed.comm import default_timeout
from .formatting import seconds as format_seconds
from .nn import functional as F
from .predict import Preprocess, outputs
from .random import default_generator, manual_seed
from .tensor import Tensor
from .train import History, _DeferredInterrupt, evaluate, fit, host_state

INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
_SAVED_ARGS = ["data", "target", "task", "hidden", "activation", "dropout", "label_smoothing"] + [
    "optimizer",
    "lr",
    "weight_decay",
    "batch_size",
    "epochs",
    "patience",
    "seed",
    "device",
    "precision",
]


def resolve_device(spec: str | None) -> Any:
    """The device to run on; an unusable one is a usage error, not a traceback."""
    try:
        device = find_device(spec) if spec else default_device()
        zeros(1, device=device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    return device


def check_inputs(args: argparse.Namespace) -> None:
    """What ``--nproc`` checks before it starts mpiexec, so that a misuse is one line from
    one process: the run to resume, or --out and the data (read and prepared here too: a
    second read of the file, so that what is wrong in it is one line), and a CUDA device
    (counted, no context made) when the ranks are to train on one."""
    check_environment()
    if args.resume is not None:
        args = resume_args(args)
    else:
        check_out(args.out)
        check_task_options(args, prepare(load_data(args)[0], args.task, args.seed)[0].task)
    if (args.device or "").startswith("cuda") and not (found := probe_cuda()).available:
        raise UsageError(f"--device {args.device}: no usable CUDA device ({found.reason})")


def check_task_options(args: argparse.Namespace, task: str) -> None:
    """An option only classification reads, given for a regression: refused, not ignored."""
    if task == "regress" and getattr(args, "argv", None) and "label_smoothing" in _given(args):
        why = "--task regress" if args.task else "its target has many fractional values"
        raise UsageError(
            f"--label-smoothing is for classification; this run regresses ({why}): leave it out"
        )


def data_path(args: argparse.Namespace) -> Path | None:
    """``--data`` as a readable .npz or .csv path (None: the bundled digits), with the
    ``--target`` it allows; a usage error otherwise."""
    if args.data is None:
        if args.target != -1:
            raise UsageError("--target names a column of --data FILE.csv; no --data was given")
        return None
    path = Path(args.data).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise UsageError(f"--data must be a .npz or .csv file, got {path}")
    if path.is_dir() or not path.exists():
        raise UsageError(
            f"cannot read --data {path}: {'a folder' if path.is_dir() else 'no such file'}"
        )
    if suffix == ".npz" and args.target != -1:
        raise UsageError("--target names a CSV column; a .npz gives its targets as array y")
    return path


def load_data(args: argparse.Namespace) -> tuple[Dataset, str]:
    path = data_path(args)
    if path is None:
        return load_digits(), "digits (bundled)"
    if path.suffix.lower() == ".npz":
        return Dataset.from_npz(path), str(path)
    return Dataset.from_csv(path, target=args.target), str(path)


def prepare(
    data: Dataset, task: str | None, seed: int, unit: float = 1.0
) -> tuple[Preprocess, list[Dataset]]:
    """Encode or standardize the targets, split 70/15/15 and standardize the features with
    the training split's statistics. ``unit``: what the loader divided the file's features
    by, so the saved statistics apply to the values as they are in the file."""
    task = task or infer_task(data.y)
    if task == "classify":
        data = data.as_classes()
    elif data.y.dtype.kind not in "iuf":
        raise DataError(f"--task regress needs a numeric target; it holds text ({data.y[0]!r})")
    else:  # a float target: the split is not stratified by value
        data = Dataset(data.x, data.y.astype(np.float64), None, data.features, data.target)
    parts = list(split(data, val=0.15, test=0.15, seed=seed))  # too few rows: DataError
    if data.classes is not None and len(data.classes) < 2:
        raise DataError(f"every target is {data.classes[0]}: one class, nothing to classify")
    mean, std = parts[0].x.mean(axis=0), parts[0].x.std(axis=0)
    std[std < 1e-6] = 1.0  # a constant training feature is centred, not blown up
    dtype = str(np.result_type(parts[0].x.dtype, mean.dtype))  # (saved: predict computes in it)
    for part in parts:  # standardize with the training statistics
        part.x = ((part.x - mean) / std).astype(np.float32)
    prep = Preprocess(task, (mean * unit).tolist(), (std * unit).tolist(), None, dtype=dtype)
    prep.features, prep.target = data.features, data.target
    if task == "classify":
        prep.classes = np.asarray(data.classes).tolist()
    else:
        y = parts[0].y.astype(np.float64)
        prep.target_mean, prep.target_std = float(y.mean()), float(y.std())
        if not prep.target_std > 0:
            raise DataError(f"the training target is constant ({prep.target_mean}): nothing to fit")
        for part in parts:
            part.y = ((part.y - prep.target_mean) / prep.target_std).astype(np.float32)
    return prep, parts


def _mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of the single output column against the standardized target."""
    return F.mse_loss(out.reshape(-1), y)


def check_out(out: str) -> Path:
    """``--out`` as a path that is not a file."""
    base = Path(out)
    if base.exists() and not base.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the runs")
    return base


def new_run_folder(out: str) -> Path:
    """A fresh ``out/<timestamp>`` folder, made and written to before any training."""
    base = check_out(out)
    stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), 0
    while True:
        run = base / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            run.mkdir(parents=True)
            break
        except FileExistsError:
            suffix += 1
        except OSError as e:
            raise UsageError(f"--out {out}: cannot make a run folder there ({e.strerror})") from e
    check_writable(run, f"--out {out}")
    return run


def check_writable(run: Path, what: str) -> None:
    probe = run / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{what}: cannot write in {run} ({e.strerror})") from e


def _data_hash(args: argparse.Namespace) -> str | None:
    if args.data is None:
        return None
    digest = hashlib.sha256()
    with open(args.data, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Checkpoints:
    """``fit``'s end-of-epoch callback. It keeps host copies of everything a resume needs
    (weights, optimizer state, the loader's and generator's RNG states, the history, the best
    weights) and writes them to checkpoint.safetensors and best.safetensors atomically every
    ``GPUNET_CHECKPOINT_SECONDS`` (default 30) and when training ends, however it ends: an
    fsynced write per epoch would cost as much as a digits epoch itself."""

    def __init__(
        self,
        run: Path,
        model: Any,
        opt: Any,
        loader: DataLoader,
        meta: dict,
        comm: Any,
        scaler: Any = None,
    ) -> None:
        self.run, self.model, self.opt, self.loader, self.meta = run, model, opt, loader, meta
        self.scaler = scaler  # fp16's GradScaler: its scale and clean-step count resume too
        self.every = checkpoint_seconds()
        self.last_write, self.pending = time.monotonic(), None
        # training time: the earlier runs' (a resumed run's checkpoint) and this one's since
        self.earlier, self.start = 0.0, time.perf_counter()
        self.best: dict[str, Any] | None = None
        # Under data parallelism every rank holds the same weights and rank 0 alone writes;
        # only the ranks' dropout generators differ, and travel as a list (rng_ranks).
        self.comm, self.lead = comm, comm.rank == 0

    def __call__(self, epoch: int, history: History) -> None:
        rng = default_generator.get_state()
        ranks = self.comm.all_gather_object(rng) if self.comm.size > 1 else None
        if not self.lead:
            return
        model = host_state(self.model)
        if history.best_epoch == epoch:
            self.best = model
        extra = {"history": copy.deepcopy(history.as_dict()), "loader": self.loader.state_dict()}
        extra["seconds"] = self.seconds()
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        if ranks is not None:  # every rank's streams, the device ones included
            extra["rng_ranks"] = ranks
        self.pending = (model, self.opt.state_dict(), extra, rng)
        if time.monotonic() - self.last_write >= self.every:
            self.write()

    def write(self, final: History | None = None) -> None:
        """Write what the last epoch's end held; ``final``: the history as training ended
        (stopped early, diverged or interrupted), which --resume reads."""
        if self.pending is None or not self.lead:
            return
        model, opt, extra, rng = self.pending
        if final is not None:
            extra["history"] = copy.deepcopy(final.as_dict())
        if self.best is not None:
            save(self.run / "best.safetensors", _Frozen.of(self.model, self.best))
        frozen_opt = _Frozen.of(self.opt, opt)
        path = self.run / "checkpoint.safetensors"
        save(path, _Frozen.of(self.model, model), frozen_opt, rng_state=rng, **extra, **self.meta)
        self.pending, self.last_write = None, time.monotonic()

    def restore(self) -> tuple[History, dict[str, Any] | None]:
        """Load the checkpoint into the model, optimizer, loader and generator; return the
        history and the best weights so far."""
        best = None
        if (self.run / "best.safetensors").exists():
            load(self.run / "best.safetensors", self.model)
            best = {k: np.array(v.numpy()) for k, v in self.model.state_dict().items()}
        meta = load(self.run / "checkpoint.safetensors", self.model, self.opt)
        if best is None and History.from_dict(meta["history"]).best_epoch >= 0:
            raise UsageError(
                f"--resume {self.run}: best.safetensors is missing (the best epoch's weights, "
                "which the run restores when it ends); restore it to continue"
            )
        self.loader.load_state_dict(meta["loader"])  # the epochs' permutations, as saved
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        # load restored the lead's generator, its device streams too: rank 0 of the same world
        # size keeps it; every other rank takes its own saved stream, or under another world
        # size a new one derived from them all (distinct per rank, the same on every run)
        lead = {k: v for k, v in default_generator.get_state().items() if k != "devices"}
        saved = meta.get("rng_ranks") or [lead]
        rank, size = self.comm.rank, self.comm.size
        if len(saved) != size or rank != 0:
            default_generator.set_state(rank_rng_state(saved, rank, size))
        self.earlier = float(meta.get("seconds", 0.0))
        return History.from_dict(meta["history"]), best

    def seconds(self) -> float:
        """Training time so far, the resumed runs' included."""
        return self.earlier + time.perf_counter() - self.start


def checkpoint_seconds() -> float:
    """``GPUNET_CHECKPOINT_SECONDS``: the least time between checkpoint writes (default 30)."""
    text = os.environ.get("GPUNET_CHECKPOINT_SECONDS", "30")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise UsageError(f"GPUNET_CHECKPOINT_SECONDS must be seconds >= 0, got {text!r}")
    return value


def check_environment() -> None:
    """The environment variables a run reads, checked before anything is made."""
    checkpoint_seconds()
    try:
        default_timeout()
    except ValueError as e:
        raise UsageError(str(e)) from e


def resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options a run was started with (from its checkpoint), for ``--resume RUN``."""
    run = Path(args.resume)
    file = run / "checkpoint.safetensors"
    if not file.is_file():
        raise UsageError(
            f"--resume {run}: no checkpoint.safetensors there (a run folder of gpunet train "
            "holds one once its first epoch ends)"
        )
    meta = load(file)
    h = History.from_dict(meta["history"])
    if h.stopped_early or h.diverged or len(h.train_loss) >= meta["args"]["epochs"]:
        how = "stopped early" if h.stopped_early else "diverged" if h.diverged else "ran"
        raise UsageError(f"--resume {run}: that run finished ({how}, {len(h.train_loss)} epochs)")
    saved = argparse.Namespace(
        **meta["args"],
        resume=str(run),
        no_progress=args.no_progress,
        no_capture=getattr(args, "no_capture", False),  # (how to run, not what: never saved)
    )
    if saved.data is not None and not Path(saved.data).is_file():
        raise UsageError(f"--resume {run}: its data {saved.data} is not there any more")
    if _data_hash(saved) != meta["data_sha256"]:
        raise UsageError(f"--resume {run}: {saved.data} changed since the run started")
    return saved


def _precision(name: str, device: Any) -> tuple[dict[str, Any], str]:
    """fit's ``autocast`` and ``scaler`` for ``--precision`` (TF32: set by ``_fit``), and a
    line saying what the CPU does with it (it computes in float32 whatever the precision),
    or ''."""
    low = {"bf16": dtypes.bfloat16, "fp16": dtypes.float16}.get(name)
    note = ""
    if name != "fp32" and device.type == "cpu":
        what = (
            "TF32 is for CUDA GEMMs; the CPU computes in float32"
            if name == "tf32"
            else f"GEMMs round to {low} and run through float32 arithmetic on the CPU (NumPy "
            "has no low-precision BLAS): this checks accuracy, it is not faster"
        )
        note = f"gpunet: --precision {name}: {what}"
    return {"autocast": low, "scaler": amp.GradScaler() if name == "fp16" else None}, note


def _run_folder(args: argparse.Namespace, comm: Any) -> Path:
    """The run's folder, chosen (and for --resume checked writable) by rank 0, told to all."""
    run = None
    if comm.rank == 0:
        run = Path(args.resume) if args.resume else new_run_folder(args.out)
        if args.resume:
            check_writable(run, f"--resume {run}")
    return Path(comm.broadcast_object(str(run) if run else None))


def _loss_fn(args: argparse.Namespace, task: str) -> Callable[..., Any]:
    """Cross-entropy (with the run's label smoothing) for classification, MSE for regression."""
    if task == "classify":
        return functools.partial(F.cross_entropy, label_smoothing=args.label_smoothing)
    return _mse


def train(args: argparse.Namespace) -> int:
    """Train an MLP on the user's data, report the test figures, save the run. Under
    ``mpiexec -n N`` it trains data-parallel: every rank prepares the same data, takes its
    shard of each epoch, and averages the gradients; rank 0 alone writes and prints."""
    check_environment()
    if args.resume is not None:
        args = resume_args(args)
    try:  # (under mpiexec by hand: no GPU for NCCL, or no mpi4py, is the user's setup)
        comm = distributed.init(backend=_backend_for(args.device))
    except RuntimeError as e:
        raise UsageError(str(e)) from e
    lead = comm.rank == 0
    manual_seed(args.seed + comm.rank)  # dropout masks differ by rank; the weights are rank 0's
    data, source = load_data(args)
    unit = DIGITS_SCALE if args.data is None else 1.0
    prep, (train_set, val_set, test_set) = prepare(data, args.task, args.seed, unit)
    check_task_options(args, prep.task)
    device = resolve_device(_rank_device(args.device, comm))
    out = len(prep.classes) if prep.classes is not None else 1
    sizes = [train_set.x.shape[1], *args.hidden, out]
    model, optimizer = build(args, sizes, device)
    if comm.size > 1:
        optimizer = distributed.DistributedOptimizer(optimizer, comm)
    run = _run_folder(args, comm)
    shard = {"num_replicas": comm.size, "rank": comm.rank} if comm.size > 1 else {}
    loader = DataLoader(
        train_set, args.batch_size, shuffle=True, device=device, seed=args.seed, **shard
    )
    val = DataLoader(val_set, 512, device=device, pad=False, **shard)
    test = DataLoader(test_set, 512, device=device)
    saved, meta = _run_record(args)
    precision, note = _precision(getattr(args, "precision", "fp32"), device)
    checkpoints = _Checkpoints(run, model, optimizer, loader, meta, comm, precision["scaler"])
    history, best = checkpoints.restore() if args.resume else (History(), None)
    what = "classes" if prep.task == "classify" else "regression"
    ranks = f" x {comm.size} ranks ({comm.name})" if comm.size > 1 else ""
    if lead:
        print(
            f"gpunet {__version__}: MLP {'-'.join(map(str, sizes))} ({args.activation}, "
            f"{what}), {args.optimizer} lr={args.lr}, on {device}{ranks}; data: {source}, "
            f"{len(train_set)}/{len(val_set)}/{len(test_set)} train/val/test; run: {run}/"
            + (f" (resumed after epoch {len(history.train_loss)})" if args.resume else "")
        )
        if note:
            print(note)
    checkpoints.start = time.perf_counter()
    fitting = (model, optimizer, loader, val, checkpoints, history, best)
    history = _fit(args, prep.task, precision, *fitting)
    seconds = checkpoints.seconds()
    meta = {"sizes": sizes, "activation": args.activation, "preprocess": prep.as_meta()}
    meta["dropout"] = args.dropout  # (its Dropout layers shift the Linear layers' names)
    # A Ctrl-C from here on lets the checkpoint, the model and the metrics be written first:
    # cut short, the run had no model.safetensors and --resume refused it as finished.
    with _DeferredInterrupt() as cut:
        checkpoints.write(history)
        if not lead:  # every rank holds the same weights: rank 0 tests, saves and reports them
            # (and the others do not wait for it: a long test pass would trip their time limit)
            return INTERRUPTED if history.interrupted else 1 if not history.train_loss else 0
        ranks = ranks_record(comm, args.batch_size)
        code = finish(
            run, model, history, prep, test, test_set, meta, seconds, source, device, saved, ranks
        )
    return INTERRUPTED if cut.pending else code


def _fit(
    args: argparse.Namespace,
    task: str,
    precision: dict[str, Any],
    model: Any,
    optimizer: Any,
    loader: DataLoader,
    val: DataLoader,
    checkpoints: _Checkpoints,
    history: History,
    best: dict[str, Any] | None,
) -> History:
    """fit with the run's options, TF32 on for it alone under --precision tf32: restored
    however it ends, an error included (it was left on in the calling process)."""
    tf32 = backends.allow_tf32
    backends.allow_tf32 = getattr(args, "precision", "fp32") == "tf32"
    try:
        return fit(
            model,
            _loss_fn(args, task),
            optimizer,
            loader,
            val,
            epochs=args.epochs,
            early_stopping=args.patience,
            progress=not args.no_progress,
            on_epoch_end=checkpoints,
            history=history,
            best_state=best,
            capture=not getattr(args, "no_capture", False),
            **precision,
        )
    finally:
        backends.allow_tf32 = tf32


def _run_record(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options a run saves (what --resume reads back) and the checkpoint's metadata."""
    saved = {k: getattr(args, k) for k in _SAVED_ARGS}
    if args.data is not None:  # so that --resume works from any directory
        saved["data"] = str(Path(args.data).expanduser().resolve())
    return saved, {"args": saved, "data_sha256": _data_hash(args)}


def ranks_record(comm: Any, batch_size: int) -> dict[str, Any]:
    """metrics.json's ``ranks``: how many processes trained, over which engine, and the rows
    each took a step (a step saw ``world_size`` x ``samples_per_step_per_rank``; an epoch's
    last batch may hold fewer)."""
    return {
        "world_size": comm.size,
        "engine": comm.name,  # "local" (one process), "mpi" or "nccl"
        "samples_per_step_per_rank": batch_size,
        "samples_per_step": batch_size * comm.size,
    }


def _backend_for(device: str | None) -> str | None:
    """NCCL when a multi-rank job asks for CUDA; else the default (MPI, or a world of one)."""
    if device and device.startswith("cuda") and distributed.launched_size() > 1:
        return "nccl"
    return None


def _rank_device(spec: str | None, comm: Any) -> str | None:
    """Under NCCL each rank takes its own GPU (``cuda`` -> ``cuda:<its GPU>``)."""
    if comm.name == "nccl" and spec == "cuda":
        return f"cuda:{comm.device_id}"
    return spec


def build(args: argparse.Namespace, sizes: list[int], device: Any) -> tuple[Any, Any]:
    """The MLP and its optimizer; a model too large for memory is a usage error."""
    try:
        model = nn.MLP(sizes, activation=args.activation, dropout=args.dropout, device=device)
        opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[args.optimizer]
        extra = {"momentum": 0.9} if args.optimizer == "sgd" else {}
        opt = opt_cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, **extra)
    except MemoryError as e:
        n = sum(a * b + b for a, b in itertools.pairwise(sizes))
        raise UsageError(
            f"MLP {'-'.join(map(str, sizes))} has {n:,} parameters ({n * 4 / 2**30:.1f} GiB "
            f"in float32, and {args.optimizer} keeps more per parameter): not enough memory "
            f"on {device} ({e}); try smaller --hidden sizes"
        ) from e
    return model, opt


def test_figures(
    model: Any, prep: Preprocess, test: DataLoader, test_set: Dataset, device: Any
) -> dict[str, float]:
    """Classification: loss and accuracy; regression: RMSE, MAE and R^2 in the target's units."""
    if prep.task == "classify":
        loss, acc = evaluate(model, F.cross_entropy, test)
        return {"test_loss": loss, "test_accuracy": acc or 0.0}
    assert prep.target_mean is not None and prep.target_std is not None
    pred = prep.decode(outputs(model, test_set.x, device))[0]
    truth = test_set.y.astype(np.float64) * prep.target_std + prep.target_mean
    err = pred - truth
    total = float(np.sum((truth - truth.mean()) ** 2))
    return {
        "test_rmse": float(np.sqrt(np.mean(err**2))),
        "test_mae": float(np.mean(np.abs(err))),
        "test_r2": 1.0 - float(np.sum(err**2)) / total if total > 0 else math.nan,
    }


def finish(
    run: Path,
    model: Any,
    history: History,
    prep: Preprocess,
    test: DataLoader,
    test_set: Dataset,
    meta: dict[str, Any],
    seconds: float,
    source: str,
    device: Any,
    args: dict[str, Any],
    ranks: dict[str, Any] | None = None,
) -> int:
    """Evaluate the best weights, save model, metrics and curves, and say what happened;
    ``ranks``: the data-parallel world (``ranks_record``), a world of one by default."""
    n = len(history.train_loss)
    if n == 0:
        why = "interrupted" if history.interrupted else "diverged (loss not finite)"
        if not any(run.iterdir()):  # a folder this run made and left empty
            run.rmdir()
        print(f"{why} in epoch 1, before any epoch ended: nothing saved")
        return INTERRUPTED if history.interrupted else 1
    figures = test_figures(model, prep, test, test_set, device)
    metrics = {
        **figures,
        "task": prep.task,
        "epochs": n,
        "best_epoch": history.best_epoch + 1,
        "stopped_early": history.stopped_early,
        "interrupted": history.interrupted,
        "diverged": history.diverged,
        "seconds": seconds,
        "device": str(device),
        "ranks": ranks or ranks_record(distributed.LocalComm(), args["batch_size"]),
        "sizes": meta["sizes"],
        "data": source,
        "args": args,
        "history": history.as_dict(),
    }
    save(run / "model.safetensors", model, **meta)
    write_json(run / "metrics.json", metrics)
    plot_run(history, prep, figures, run / "curves.png")
    best = f"best {history.best_epoch + 1}"
    if history.interrupted:
        print(
            f"interrupted after {n} epochs: saved the best weights (epoch {history.best_epoch + 1}"
            f", {_summary(figures)}), metrics and curves in {run}/; continue with "
            f"gpunet train --resume {run}"
        )
        return INTERRUPTED
    if history.diverged:
        print(f"warning: the training loss diverged in epoch {n + 1}; restored the {best} weights")
    print(
        f"{_summary(figures)} after {n} epochs ({best}) in {format_seconds(seconds)}; saved {run}/"
    )
    return 0


def _summary(figures: dict[str, float]) -> str:
    if "test_accuracy" in figures:
        return f"test accuracy {figures['test_accuracy']:.4f} (loss {figures['test_loss']:.4f})"
    return (
        f"test RMSE {figures['test_rmse']:.4g}, MAE {figures['test_mae']:.4g}, "
        f"R^2 {figures['test_r2']:.4f}"
    )


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None, so it is strict JSON."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, value: Any) -> None:
    """Strict JSON (NaN written as null), written atomically."""
    write_atomically(path, json.dumps(strict(value), indent=2, allow_nan=False).encode())


def plot_run(history: History, prep: Preprocess, figures: dict[str, float], path: Path) -> None:
    """Loss and accuracy per epoch (classification), or loss and RMSE per epoch with the test
    figures (regression); the best epoch dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history.train_loss, label="train")
    left.plot(epochs, history.val_loss, label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    if prep.task == "classify":
        right.plot(epochs, history.train_accuracy, label="train")
        right.plot(epochs, history.val_accuracy, label="validation")
        right.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    else:  # the loss is the MSE of the standardized target: RMSE = sqrt(loss) * std
        scale = prep.target_std or 1.0
        right.plot(epochs, np.sqrt(history.train_loss) * scale, label="train")
        right.plot(epochs, np.sqrt(history.val_loss) * scale, label="validation")
        right.set(
            xlabel="epoch",
            ylabel="RMSE (target units)",
            title=f"RMSE; test: RMSE {figures['test_rmse']:.4g}, MAE {figures['test_mae']:.4g}, "
            f"R$^2$ {figures['test_r2']:.3f}",
        )
    for ax in (left, right):
        if history.best_epoch >= 0:
            ax.axvline(history.best_epoch + 1, color="gray", linestyle=":", label="best")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Frozen:
    """A state_dict taken earlier, saved by ``save`` in place of the object it came
    from (whose class name the checkpoint header records)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    @staticmethod
    def of(source: Any, state: dict[str, Any]) -> _Frozen:
        return type(type(source).__name__, (_Frozen,), {})(state)
