"""The ``gpunet`` command: ``gpunet train`` (the main job), ``gpunet predict``, ``gpunet bench``
and ``gpunet info``.

Misuse (a bad option, a file it cannot use) is one line on stderr and exit code 2; Ctrl-C is one
line and exit code 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """The command was given something it cannot use: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (argparse's own convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _info(_: argparse.Namespace) -> int:
    from .backend import info
    from .distributed import engines

    for key, value in info().items():
        print(f"{key:>16}: {value}")
    for key, value in engines().items():  # the data-parallel engines (gpunet.distributed)
        print(f"{key:>16}: {value}")
    return 0


def _hidden(text: str) -> list[int]:
    pieces = [v.strip() for v in text.split(",")]
    if not all(re.fullmatch(r"\d+", v) and int(v) >= 1 for v in pieces):
        raise argparse.ArgumentTypeError(
            f"--hidden takes positive sizes like 256,128 (no empty or zero sizes), not {text!r}"
        )
    return [int(v) for v in pieces]


def _target(text: str) -> int | str:
    """A column index (``3``, ``-1``) or a header name."""
    return int(text) if re.fullmatch(r"\s*-?\d+\s*", text) else text


def check_train_args(args: argparse.Namespace) -> None:
    """Refuse numbers that cannot mean anything, before any data is read."""
    checks = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.patience >= 1, f"--patience must be >= 1, got {args.patience}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.out.strip() != "", "--out is empty; give a folder for the runs (default runs)"),
        (
            math.isfinite(args.lr) and args.lr > 0,
            f"--lr must be a finite number > 0, got {args.lr}",
        ),
        (
            math.isfinite(args.weight_decay) and args.weight_decay >= 0,
            f"--weight-decay must be a finite number >= 0, got {args.weight_decay}",
        ),
        (0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (
            0.0 <= args.label_smoothing < 1.0,
            f"--label-smoothing must be in [0, 1), got {args.label_smoothing}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _train(args: argparse.Namespace) -> int:
    from .job import check_inputs, train

    if args.resume is None:
        check_train_args(args)
    else:  # the run's own options are used: refuse others rather than ignore them
        how = ("resume", "no_progress", "no_capture", "nproc")  # how to run, not what: allowed
        given = [f"--{k.replace('_', '-')}" for k in _given(args) if k not in how]
        if given:
            raise UsageError(
                f"--resume continues a run with its own options; drop {', '.join(given)}"
            )
    if args.nproc is not None:  # (checked here once, not on every rank: one line, exit 2)
        check_inputs(args)
        return _launch(args)
    return train(args)


def _given(args: argparse.Namespace) -> list[str]:
    """The train options on the command line, by name, whatever their values: one given
    equal to its default (``--lr 0.001`` to a run made with ``--lr 0.01``) is given too."""
    sub = _Parser(prog="gpunet").add_subparsers(dest="command", parser_class=_Parser)
    _train_parser(sub)
    train = sub.choices["train"]
    # without defaults, the namespace holds only what the command line gave (abbreviations too)
    for action in train._actions:  # (set_defaults would put SUPPRESS itself in the namespace)
        action.default = argparse.SUPPRESS
    given = vars(train.parse_args(args.argv))
    return [a.dest for a in train._actions if a.dest in given]  # (in --help's order)


def _launch(args: argparse.Namespace) -> int:
    """``gpunet train --nproc N ...``: run the same command under this environment's mpiexec
    (the one the ``mpi`` extra installs), with N ranks; its exit code is ours."""
    import os
    import shutil
    import signal
    import subprocess

    from .distributed import launched_size

    if launched_size() > 1:
        raise UsageError("--nproc starts mpiexec itself; under mpiexec, leave it out")
    beside = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        raise UsageError(
            f"--nproc {args.nproc} needs mpiexec and mpi4py: pip install 'gpunet[mpi]'"
        )
    rest, skip = [], False
    for a in args.argv:  # the same options, less --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    command = [mpiexec, "-n", str(args.nproc), sys.executable, "-m", "gpunet.cli", "train"]
    # the cores shared out: N ranks each with all the cores' BLAS threads would fight
    threads = str(max(1, (os.cpu_count() or 1) // args.nproc))
    env = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, **os.environ}
    proc = subprocess.Popen([*command, *rest], env=env)
    # Ctrl-C reaches mpiexec too, which lets the ranks finish the step and save: wait for it
    # (subprocess.call would kill mpiexec, and the ranks with it, at the first Ctrl-C).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    return run_predict(args)


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
            raise UsageError(f"--suite {args.suite} takes {want} in --sizes, got {args.sizes}")
        overrides.update(
            suites=tuple(s for s in suites if (names if s == "mlp" else counts)),
            mlp_sizes=names,
            op_sizes=counts,
        )
    if args.device == "cuda" and not probe_cuda().available:
        raise UsageError(f"no CUDA device to benchmark on: {probe_cuda().reason}")
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
    precisions = report.precision_table(results, markdown=args.markdown)
    if precisions:  # (the MLP suite ran)
        print(f"\n{precisions}")
    for line in report.notes(results):
        print(line)
    print(f"saved {out}/results.json, results.md, bench.png")
    return 0


def _train_parser(sub: Any) -> None:
    from .nn.layers import ACTIVATIONS

    t = sub.add_parser(
        "train",
        help="train an MLP classifier or regressor (default: the bundled digits)",
        description="Train an MLP, print its test figures, and save model.safetensors, "
        "metrics.json and curves.png under --out/<timestamp>/ (made before training starts).",
    )
    t.add_argument("--data", help="a .npz (arrays x/y) or .csv file; default: bundled digits")
    t.add_argument(
        "--target", type=_target, default=-1, help="CSV target column, index or name (default -1)"
    )
    t.add_argument(
        "--task",
        choices=["classify", "regress"],
        default=None,
        help="default: from the target (few integer or text labels classify; many distinct "
        "fractional values regress)",
    )
    t.add_argument(
        "--hidden", type=_hidden, default=[256, 128], help="hidden sizes (default 256,128)"
    )
    t.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS), help="default relu")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout rate (default 0)")
    t.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="classification: training targets (1 - eps) onehot + eps / classes (default "
        "0.1); test loss is plain cross-entropy",
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
    t.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "tf32", "bf16", "fp16"],
        help="fp32 (default); tf32: float32 GEMMs on CUDA tensor cores; bf16/fp16: autocast "
        "with float32 master weights (fp16 with a loss scaler)",
    )
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--out", default="runs", help="where runs are saved (default runs/)")
    t.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue an interrupted run folder with its own options",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--no-capture",
        action="store_true",
        help="run each training step eagerly (default: recorded once, then replayed)",
    )
    t.add_argument(
        "--nproc",
        type=_positive,
        default=None,
        help="train data-parallel on N processes: starts mpiexec -n N (the mpi extra's); "
        "under mpiexec -n N itself, leave it out",
    )


def _predict_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="predict with a model that gpunet train saved",
        description="Apply a trained model (a run folder or its model.safetensors) to --data: "
        "the saved standardization, then labels in their original values with class "
        "probabilities, or values in the target's units.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="a run folder or a .safetensors file")
    p.add_argument("--data", required=True, help="a .csv or .npz file with the same features")
    p.add_argument("--out", default="predictions.csv", help="default predictions.csv")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the best)")


def _bench_parser(sub: Any) -> None:
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


def _parser() -> _Parser:
    from . import __version__

    parser = _Parser(prog="gpunet", description="gpunet: MLPs on NumPy and CuPy.")
    parser.add_argument("--version", action="version", version=f"gpunet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, devices, and why the GPU is or is not used")
    _train_parser(sub)
    _predict_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError

    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    commands = {"info": _info, "train": _train, "predict": _predict, "bench": _bench}
    try:
        return commands[args.command](args)
    except (UsageError, DataError, CheckpointError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message's layout
        print(f"gpunet {args.command}: error: {message}", file=sys.stderr)
        _end_every_rank(2)
        return 2
    except KeyboardInterrupt:  # training handles its own Ctrl-C; this is any other moment
        print(f"gpunet {args.command}: interrupted", file=sys.stderr)
        _end_every_rank(130)
        return 130


def _end_every_rank(code: int) -> None:
    """Under mpiexec, a rank that stops must stop them all (the others would wait for it)."""
    if "gpunet.distributed" in sys.modules:
        sys.modules["gpunet.distributed"].fail(code)


if __name__ == "__main__":  # (python -m gpunet.cli, as --nproc starts each rank)
    # The package's own module, not this __main__ copy: job.py raises gpunet.cli.UsageError,
    # which a main() of __main__ would not catch (two classes of one name).
    from gpunet.cli import main as package_main

    sys.exit(package_main())
