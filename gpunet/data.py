"""Datasets and mini-batches: arrays, ``.npz`` and ``.csv`` files, the bundled digits, splits.

A ``Dataset`` is a pair of host arrays (features ``x``, targets ``y``). A ``DataLoader`` moves
them to the device once, then slices shuffled mini-batches there: one host-to-device copy per
loader, not one per batch.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import dtypes, random
from .backend import Device, default_device, get_backend
from .tensor import Tensor


@dataclass
class Dataset:
    """Features ``x`` (n, ...) and targets ``y`` (n,) as host arrays of one length."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        self.x, self.y = np.asarray(self.x), np.asarray(self.y)
        if len(self.x) != len(self.y):
            raise ValueError(
                f"Dataset: {len(self.x)} feature rows but {len(self.y)} targets; they must match"
            )

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.x[index], self.y[index]

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.x[index], self.y[index])

    @property
    def num_classes(self) -> int:
        """1 + the largest integer target (for classification data)."""
        if self.y.dtype.kind not in "iu":
            raise TypeError(f"targets of dtype {self.y.dtype} are not class labels")
        return int(self.y.max()) + 1 if len(self.y) else 0

    @classmethod
    def from_npz(cls, path: str | Path, x: str | None = None, y: str | None = None) -> Dataset:
        """Load arrays ``x``/``y`` (or ``X``/``y``, ``images``/``labels``, ``data``/``target``)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                xk = x or _pick(names, ("x", "X", "images", "data", "features"), path)
                yk = y or _pick(names, ("y", "Y", "labels", "target", "targets"), path)
                xs, ys = archive[xk], archive[yk]
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} as a .npz archive: {e}") from e
        return cls(xs.reshape(len(xs), -1), _labels(ys))

    @classmethod
    def from_csv(cls, path: str | Path, target: int | str = -1) -> Dataset:
        """Load a numeric CSV; the ``target`` column (index or header name) holds the labels.
        A first row that is not numeric is taken as the header."""
        path = Path(path)
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if r]
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        if not rows:
            raise ValueError(f"{path} is empty")
        header = None
        try:
            [float(v) for v in rows[0]]
        except ValueError:
            header, rows = rows[0], rows[1:]
        if isinstance(target, str):
            if header is None or target not in header:
                raise ValueError(f"{path}: no column named {target!r} (header: {header})")
            target = header.index(target)
        try:
            table = np.array(rows, dtype=np.float64)
        except ValueError as e:
            raise ValueError(f"{path}: every value must be a number ({e})") from e
        target = target % table.shape[1]
        xs = np.delete(table, target, axis=1).astype(np.float32)
        return cls(xs, _labels(table[:, target]))


def _pick(names: list[str], candidates: tuple[str, ...], path: Path) -> str:
    for name in candidates:
        if name in names:
            return name
    raise ValueError(f"{path} has arrays {names}; name the features and targets x= and y=")


def _labels(y: np.ndarray) -> np.ndarray:
    """Integral targets become int64 class labels; anything else float32."""
    y = np.asarray(y)
    if y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        return y.astype(np.int64)
    return y.astype(np.float32)


def load_digits() -> Dataset:
    """The bundled 8x8 handwritten digits (1,797 images, 10 classes; UCI, CC BY 4.0: see
    gpunet/_data/DIGITS.md), as 64 features scaled to [0, 1] and int64 labels."""
    with resources.files("gpunet").joinpath("_data/digits.npz").open("rb") as f:
        archive = np.load(f, allow_pickle=False)
        images, labels = archive["images"], archive["labels"]
    x = images.reshape(len(images), -1).astype(np.float32) / 16.0
    return Dataset(x, labels.astype(np.int64))


def split(
    data: Dataset, val: float = 0.15, test: float = 0.15, seed: int = 0, stratify: bool = True
) -> tuple[Dataset, Dataset, Dataset]:
    """Train / validation / test parts; stratified by class (each part keeps the class
    proportions) when the targets are labels."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split: val={val} and test={test} must be fractions summing below 1")
    rng = np.random.default_rng(seed)
    groups = (
        [np.flatnonzero(data.y == c) for c in np.unique(data.y)]
        if stratify and data.y.dtype.kind in "iu"
        else [np.arange(len(data))]
    )
    parts: list[list[np.ndarray]] = [[], [], []]
    for idx in groups:
        idx = rng.permutation(idx)
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    train, valid, tst = (data.subset(rng.permutation(np.concatenate(p))) for p in parts)
    return train, valid, tst


class DataLoader:
    """Mini-batches of (x, y) tensors on a device.

    The whole dataset is copied to the device once, when the loader is made; each epoch then
    draws a permutation (``shuffle``) and gathers batches on the device. ``seed`` seeds the
    shuffle; without one it is drawn from gpunet's default generator when the loader is made,
    so ``gpunet.manual_seed`` makes the batches repeatable.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        device: str | Device | None = None,
        seed: int | None = None,
        dtype: Any = dtypes.float32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = data, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.backend = get_backend(default_device() if device is None else device)
        self.x = self.backend.asarray(data.x.astype(dtypes.as_dtype(dtype), copy=False))
        self.y = self.backend.asarray(data.y)
        if seed is None and shuffle:
            # as PyTorch's sampler does, an unseeded shuffle draws its seed from the default
            # generator, so that gpunet.manual_seed makes it repeatable
            seed = int(random.default_generator.host_rng.integers(2**63))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, b, backend = len(self.dataset), self.batch_size, self.backend
        # one small index copy per epoch; the batches are gathered on the device
        order = backend.asarray(self.rng.permutation(n)) if self.shuffle else None
        for k in range(len(self)):
            if order is None:
                xs, ys = self.x[k * b : (k + 1) * b], self.y[k * b : (k + 1) * b]
            else:
                idx = order[k * b : (k + 1) * b]
                xs, ys = backend.take(self.x, idx, axis=0), backend.take(self.y, idx, axis=0)
            yield Tensor._wrap(xs, backend), Tensor._wrap(ys, backend)

    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator's state (so a resumed run draws the same batches)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
