"""The ``gpunet`` command: ``gpunet train`` (the main job) and ``gpunet info``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (argparse's own convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _info(_: argparse.Namespace) -> int:
    from .backend import info

    for key, value in info().items():
        print(f"{key:>16}: {value}")
    return 0


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden takes sizes like 256,128, not {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    from .data import Dataset, load_digits

    if args.data is None:
        return load_digits(), "digits (bundled)"
    path = Path(args.data)
    if path.suffix == ".npz":
        return Dataset.from_npz(path), str(path)
    if path.suffix == ".csv":
        target: int | str = int(args.target) if args.target.lstrip("-").isdigit() else args.target
        return Dataset.from_csv(path, target=target), str(path)
    raise ValueError(f"--data must be a .npz or .csv file, got {path}")


def _plot(history: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history.train_loss, label="train")
    left.plot(epochs, history.val_loss, label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    right.plot(epochs, history.train_accuracy, label="train")
    right.plot(epochs, history.val_accuracy, label="validation")
    right.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (left, right):
        ax.axvline(history.best_epoch + 1, color="gray", linestyle=":", label="best")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _train(args: argparse.Namespace) -> int:
    """Train an MLP classifier, report test accuracy, save the run."""
    import gpunet
    import gpunet.nn.functional as F
    from gpunet import nn, optim
    from gpunet.data import DataLoader, split
    from gpunet.train import evaluate, fit

    gpunet.manual_seed(args.seed)
    data, source = _load(args)
    if data.y.dtype.kind not in "iu":
        raise ValueError(f"{source}: targets must be integer class labels for classification")
    train_set, val_set, test_set = split(data, val=0.15, test=0.15, seed=args.seed)
    mean, std = train_set.x.mean(axis=0), train_set.x.std(axis=0)
    std[std < 1e-6] = 1.0  # a constant training feature is centred, not blown up
    for part in (train_set, val_set, test_set):  # standardize with the training statistics
        part.x = ((part.x - mean) / std).astype(np.float32)
    device = gpunet.device(args.device) if args.device else gpunet.default_device()
    sizes = [data.x.shape[1], *args.hidden, data.num_classes]
    model = nn.MLP(sizes, activation=args.activation, dropout=args.dropout, device=device)
    opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[args.optimizer]
    extra = {"momentum": 0.9} if args.optimizer == "sgd" else {}
    optimizer = opt_cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, **extra)
    train = DataLoader(train_set, args.batch_size, shuffle=True, device=device, seed=args.seed)
    val = DataLoader(val_set, 512, device=device)
    test = DataLoader(test_set, 512, device=device)
    print(
        f"gpunet {gpunet.__version__}: MLP {'-'.join(map(str, sizes))} ({args.activation}), "
        f"{args.optimizer} lr={args.lr}, on {device}; data: {source}, "
        f"{len(train_set)}/{len(val_set)}/{len(test_set)} train/val/test"
    )
    start = time.perf_counter()
    history = fit(
        model,
        F.cross_entropy,
        optimizer,
        train,
        val,
        epochs=args.epochs,
        early_stopping=args.patience,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, F.cross_entropy, test)
    run = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while run.exists():
        run = run.with_name(f"{run.name.split('_')[0]}_{suffix}")
        suffix += 1
    run.mkdir(parents=True)
    metrics = {
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "epochs": len(history.train_loss),
        "best_epoch": history.best_epoch + 1,
        "stopped_early": history.stopped_early,
        "seconds": seconds,
        "device": str(device),
        "sizes": sizes,
        "data": source,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "history": history.as_dict(),
    }
    gpunet.save(
        run / "model.safetensors",
        model,
        optimizer,
        sizes=sizes,
        activation=args.activation,
        mean=mean.tolist(),
        std=std.tolist(),
    )
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    _plot(history, run / "curves.png")
    print(
        f"test accuracy {test_acc:.4f} (loss {test_loss:.4f}) after {len(history.train_loss)} "
        f"epochs (best {history.best_epoch + 1}) in {seconds:.1f} s; saved {run}/"
    )
    for warning in history.warnings:
        print(f"warning: {warning}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .nn.layers import ACTIVATIONS

    parser = _Parser(prog="gpunet", description="gpunet: MLPs on NumPy and CuPy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, devices, and why the GPU is or is not used")
    t = sub.add_parser(
        "train",
        help="train an MLP classifier (default: the bundled digits)",
        description="Train an MLP classifier, print its test accuracy, and save "
        "model.safetensors, metrics.json and curves.png under --out/<timestamp>/.",
    )
    t.add_argument("--data", help="a .npz (arrays x/y) or .csv file; default: bundled digits")
    t.add_argument("--target", default="-1", help="CSV label column, index or name (default -1)")
    t.add_argument(
        "--hidden",
        type=_hidden,
        default=[256, 128],
        help="hidden layer sizes, comma separated (default 256,128)",
    )
    t.add_argument(
        "--activation",
        default="relu",
        choices=sorted(ACTIVATIONS),
        help="hidden activation (default relu)",
    )
    t.add_argument("--dropout", type=float, default=0.0, help="dropout rate (default 0)")
    t.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "adamw", "sgd"],
        help="optimizer (default adam; sgd uses momentum 0.9)",
    )
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    t.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    t.add_argument("--epochs", type=int, default=100, help="maximum epochs (default 100)")
    t.add_argument(
        "--patience",
        type=int,
        default=10,
        help="early stopping: epochs without validation improvement (default 10)",
    )
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the best)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--out", default="runs", help="where runs are saved (default runs/)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        return {"info": _info, "train": _train}[args.command](args)
    except (ValueError, RuntimeError, OSError, TypeError) as e:
        print(f"gpunet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
