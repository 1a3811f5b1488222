"""The ``gpunet`` command: ``gpunet train`` (the main job), ``gpunet bench`` and ``gpunet info``."""

from __future__ import annotations

import argparse
import functools
import json
import math
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

    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
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
        functools.partial(F.cross_entropy, label_smoothing=args.label_smoothing),
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


def _bench_sizes(text: str) -> list[str | int]:
    """--sizes: MLP size names (tiny, small, ...) and op element counts (1000, 1e6)."""
    from .bench.workloads import MLP_SIZES

    sizes: list[str | int] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item in MLP_SIZES:
            sizes.append(item)
            continue
        try:
            n = float(item)
        except ValueError:
            n = math.nan
        if not (n >= 1 and n == int(n)):
            raise argparse.ArgumentTypeError(
                f"--sizes takes MLP sizes ({', '.join(MLP_SIZES)}) and element counts "
                f"like 1000 or 1e6, not {item!r}"
            )
        sizes.append(int(n))
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes is empty")
    return sizes


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _bench(args: argparse.Namespace) -> int:
    """Time gpunet against the floors (and peers), print the table, save the run."""
    from .backend import probe_cuda
    from .bench import report
    from .bench.run import Config, run

    suites = ("ops", "mlp") if args.suite == "all" else (args.suite,)
    overrides: dict[str, Any] = {"suites": suites, "peers": args.peers}
    if args.sizes is not None:
        names = tuple(s for s in args.sizes if isinstance(s, str))
        counts = tuple(s for s in args.sizes if isinstance(s, int))
        if len(suites) == 1 and not (names if suites == ("mlp",) else counts):
            want = "MLP size names" if suites == ("mlp",) else "element counts"
            raise ValueError(f"--suite {args.suite} takes {want} in --sizes, got {args.sizes}")
        overrides.update(
            suites=tuple(s for s in suites if (names if s == "mlp" else counts)),
            mlp_sizes=names,
            op_sizes=counts,
        )
    if args.device is not None:
        overrides["devices"] = (args.device,)
    elif probe_cuda().available:
        overrides["devices"] = ("cpu", "cuda")
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.threads is not None:
        overrides["threads"] = args.threads
    config = Config.quick(**overrides) if args.quick else Config(**overrides)
    out = Path(args.out or time.strftime("runs/bench-%Y%m%d-%H%M%S"))
    command = "gpunet bench " + " ".join(args.argv)
    results = run(config, progress=None if not args.no_progress else False)
    data = report.write(results, out, command.strip())
    print(f"{command.strip()}: {report.machine_line(data['machine'], data['blas'])}")
    print(report.format_table(results, markdown=args.markdown))
    for line in report.notes(results):
        print(line)
    print(f"saved {out}/results.json, results.md, bench.png")
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
        "--label-smoothing",
        type=float,
        default=0.1,
        help="training targets (1 - eps) onehot + eps / classes (default 0.1); test loss is "
        "plain cross-entropy",
    )
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
    b = sub.add_parser(
        "bench",
        help="time gpunet against hand-written NumPy, its GEMMs, and peer frameworks",
        description="Time MLP training steps and single ops: gpunet against the floors "
        "(hand-written NumPy, the GEMMs alone) and, with --peers, PyTorch, JAX and HIPS "
        "autograd where installed. Prints a table and saves results.json, results.md and "
        "bench.png under --out.",
    )
    b.add_argument("--suite", default="all", choices=["ops", "mlp", "all"], help="default all")
    b.add_argument(
        "--sizes",
        type=_bench_sizes,
        default=None,
        help="comma separated: MLP sizes (tiny, small, medium, large) and/or op element "
        "counts (1e3 ... 1e7); a suite given none of its sizes is left out; default all",
    )
    b.add_argument("--peers", action="store_true", help="also time PyTorch, JAX, autograd")
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: the CPU, and the GPU too when one answers",
    )
    b.add_argument("--out", default=None, help="output folder (default runs/bench-<timestamp>)")
    b.add_argument("--repeats", type=_positive, default=None, help="samples per median (7)")
    b.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="CPU threads for every framework (default: each one's own default)",
    )
    b.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    try:
        return {"info": _info, "train": _train, "bench": _bench}[args.command](args)
    except (ValueError, RuntimeError, OSError, TypeError) as e:
        print(f"gpunet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
