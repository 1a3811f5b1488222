"""The ``gpunet`` command: ``gpunet info`` and ``gpunet train``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _info(_: argparse.Namespace) -> int:
    from .backend import info

    for key, value in info().items():
        print(f"{key:>16}: {value}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """A two-layer MLP written with raw tensors, fit to a synthetic regression by SGD.

    This is the core's end-to-end job; the full trainer (gpunet.nn, optimizers, datasets,
    checkpoints) replaces it as the main job when it lands.
    """
    import gpunet

    gpunet.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    X = rng.uniform(-1, 1, (1024, 8)).astype(np.float32)
    true_w = rng.standard_normal((8, 1)).astype(np.float32)
    Y = np.sin(X @ true_w) + 0.1 * (X**2).sum(axis=1, keepdims=True)
    dev = args.device
    x, y = gpunet.tensor(X, device=dev), gpunet.tensor(Y.astype(np.float32), device=dev)
    w1 = (gpunet.randn(8, args.hidden, device=dev) * (2 / 8) ** 0.5).requires_grad_()
    b1 = gpunet.zeros(args.hidden, device=dev, requires_grad=True)
    w2 = (gpunet.randn(args.hidden, 1, device=dev) * (1 / args.hidden) ** 0.5).requires_grad_()
    b2 = gpunet.zeros(1, device=dev, requires_grad=True)
    params = [w1, b1, w2, b2]
    print(
        f"gpunet {gpunet.__version__}: fitting a 8-{args.hidden}-1 MLP on "
        f"{x.device} for {args.steps} SGD steps"
    )
    start, first = time.perf_counter(), None
    for step in range(args.steps + 1):
        loss = (((x @ w1 + b1).tanh() @ w2 + b2 - y) ** 2).mean()
        first = first if first is not None else loss.item()
        if step % max(1, args.steps // 10) == 0:
            print(f"  step {step:5d}  loss {loss.item():.6f}")
        if step == args.steps:
            break
        loss.backward()
        with gpunet.no_grad():
            for p in params:
                p -= args.lr * p.grad
                p.grad = None
    last = loss.item()
    print(
        f"loss {first:.4f} -> {last:.6f} ({first / last:.0f}x lower) in "
        f"{time.perf_counter() - start:.2f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpunet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and why the GPU is or is not used")
    train = sub.add_parser("train", help="fit a small MLP written with raw tensors")
    train.add_argument("--steps", type=int, default=2000, help="SGD steps (default 2000)")
    train.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    train.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: auto)")
    args = parser.parse_args(argv)
    try:
        return {"info": _info, "train": _train}[args.command](args)
    except (RuntimeError, ValueError) as e:
        print(f"gpunet {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
