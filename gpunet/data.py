"""Datasets and mini-batches: arrays, ``.npz`` and ``.csv`` files, the bundled digits, splits.

A ``Dataset`` is a pair of host arrays (features ``x``, targets ``y``). Targets come as users
have them (integers such as -1/+1, strings, one-hot rows, floats); ``Dataset.as_classes()``
encodes labels as classes 0..C-1 and keeps the original values in ``classes``, and
``infer_task`` tells class labels from a continuous target. A ``DataLoader`` moves the arrays
to the device once, then slices shuffled mini-batches there: one host-to-device copy per
loader, not one per batch.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import dtypes, random
from .backend import Device, default_device, get_backend
from .tensor import Tensor

# A target with at most this many distinct integer (or text) values is taken as class labels
# when the task is not given; more distinct integers, or few distinct fractions, are ambiguous.
MAX_AUTO_CLASSES = 20
# A float target with at least this many distinct values is taken as continuous (regression).
MIN_AUTO_REGRESS = 20
DIGITS_SCALE = 16.0  # the bundled digits' pixels are 0..16; load_digits divides by this
_CHUNK_CELLS = 32768  # cells parsed per block: bounds the Python strings alive at once (~2 MB)


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file, line, column or value."""


@dataclass
class Dataset:
    """Features ``x`` (n, ...) and targets ``y`` (n,) as host arrays of one length.

    ``classes`` (after ``as_classes()``) holds the original label of each class index;
    ``features`` and ``target`` are the column names a CSV header gave, if any.
    """

    x: np.ndarray
    y: np.ndarray
    classes: np.ndarray | None = None
    features: list[str] | None = field(default=None, repr=False)
    target: str | None = None

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
        return Dataset(self.x[index], self.y[index], self.classes, self.features, self.target)

    @property
    def num_classes(self) -> int:
        """The number of classes: ``len(classes)`` once encoded, else 1 + the largest label."""
        if self.classes is not None:
            return len(self.classes)
        if self.y.dtype.kind not in "iu":
            raise TypeError(
                f"targets of dtype {self.y.dtype} are not class indices; use as_classes()"
            )
        if len(self.y) and self.y.min() < 0:
            raise DataError(
                f"labels from {self.y.min()} to {self.y.max()} are not class indices 0..C-1; "
                "use as_classes()"
            )
        return int(self.y.max()) + 1 if len(self.y) else 0

    def as_classes(self) -> Dataset:
        """The same rows with labels encoded as 0..C-1 (sorted original values in ``classes``)."""
        if self.classes is not None:
            return self
        classes, codes = encode_labels(self.y)
        return Dataset(self.x, codes, classes, self.features, self.target)

    @classmethod
    def from_npz(cls, path: str | Path, x: str | None = None, y: str | None = None) -> Dataset:
        """Load arrays ``x``/``y`` (or ``X``/``y``, ``images``/``labels``, ``data``/``target``).
        One-hot ``y`` rows become label indices; features must be finite numbers."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                xk = x or _pick(names, ("x", "X", "images", "data", "features"), path)
                yk = y or _pick(names, ("y", "Y", "labels", "target", "targets"), path)
                xs, ys = archive[xk], archive[yk]
        except (OSError, ValueError, EOFError) as e:
            hint = ""
            if "allow_pickle" in str(e):
                hint = " (an array of Python objects: save text labels as np.array(y, dtype=str))"
            raise DataError(f"cannot read {path} as a .npz archive: {e}{hint}") from e
        if xs.ndim == 0 or xs.dtype.kind not in "iufb":
            raise DataError(f"{path}: {xk} must be a numeric array (n, ...), got {xs.dtype}")
        if len(xs) != len(ys):
            raise DataError(f"{path}: {xk} has {len(xs)} rows but {yk} has {len(ys)}")
        xs = xs.reshape(len(xs), -1)
        check_finite(xs, source=str(path))
        return cls(xs, normalize_targets(_one_target_per_row(ys, f"{path}: {yk}")))

    @classmethod
    def from_csv(
        cls, path: str | Path, target: int | str = -1, header: bool | None = None
    ) -> Dataset:
        """Load a CSV: the ``target`` column (index or header name) holds the targets, every
        other column is a numeric feature. See ``read_csv`` for the header rule."""
        table = read_csv(path, target, header)
        assert table.y is not None  # a target column was asked for
        return cls(table.x, normalize_targets(table.y), None, table.features, table.target)


@dataclass
class CsvTable:
    """What ``read_csv`` read: float32 features, the raw target column (or None), names."""

    x: np.ndarray
    y: np.ndarray | None
    features: list[str] | None
    target: str | None
    columns: int


def read_csv(
    path: str | Path, target: int | str | None = -1, header: bool | None = None
) -> CsvTable:
    """Read a CSV with one target column (``None``: none) and numeric features, block by block
    (memory near the float32 result, not a list of strings per cell).

    The header: ``header=None`` takes the first row as one when any of its cells is not a
    number, or when ``target`` is a column name (a header made only of numbers, such as
    ``2019,2020,2021``, is still a header then, never a data row; an integer ``target``
    beyond the columns that matches a first-row cell is that name). A first row of numbers
    with no name asked for is data: such a header cannot be told from a row. A UTF-8
    byte-order mark is dropped; the delimiter is the first line's most frequent of ``,``, ``;``
    and tab. Numeric targets are read as float64; text targets stay text (class names), and a
    file with text targets needs a header. An unnamed first column holding 0, 1, 2, ... (the
    row index that pandas' ``to_csv`` writes) is dropped.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _parse_csv(f, path, target, header)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except csv.Error as e:
        raise DataError(f"cannot read {path} as CSV: {e}") from e


def csv_header(path: str | Path) -> tuple[list[str] | None, int]:
    """The first row's names (None when every cell is a number) and its number of columns."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    row = next(csv.reader([line], delimiter=_delimiter(line)), [])
    names = None if all(_is_number(c) for c in row) else [c.strip() for c in row]
    return names, len(row)


def _delimiter(line: str) -> str:
    counts = {d: line.count(d) for d in ",;\t"}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_csv(
    f: io.TextIOBase, path: Path, target: int | str | None, header: bool | None
) -> CsvTable:
    first_line = f.readline()
    reader = csv.reader(itertools.chain([first_line], f), delimiter=_delimiter(first_line))
    rows = ((reader.line_num, r) for r in reader if any(c.strip() for c in r))
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path} is empty")
    numeric = all(_is_number(c) for c in first[1])
    ncols = len(first[1])
    if isinstance(target, int) and not -ncols <= target < ncols and str(target) in first[1]:
        target = str(target)  # `--target 2021` on a header such as 2019,2020,2021 is a name
    if header is None:
        header = not numeric or isinstance(target, str)
    names = [c.strip() for c in first[1]] if header else None
    t = _target_column(target, names, ncols, path)
    feats = [i for i in range(ncols) if i != t]
    if not feats:
        raise DataError(f"{path}: the only column is the target; there are no feature columns")
    label = (lambda i: repr(names[i])) if names else (lambda i: f"{i}")
    block = _Block(path, ncols, feats, t, label)
    block_rows = max(16, _CHUNK_CELLS // ncols)
    for chunk in _chunks(rows if header else itertools.chain([first], rows), block_rows):
        block.parse(chunk)
    if not block.xs:
        raise DataError(f"{path} has a header but no data rows")
    block.raise_non_finite()
    x = np.concatenate(block.xs) if len(block.xs) > 1 else block.xs[0]
    block.xs.clear()
    y = None if t is None else block.targets()
    features = [n for i, n in enumerate(names) if i != t] if names else None
    if features and features[0] == "" and np.array_equal(x[:, 0], np.arange(len(x))):
        # pandas' to_csv writes the row index as an unnamed first column: row ids, not data
        x, features = x[:, 1:], features[1:]
    return CsvTable(
        x, y, features, (names[t] if names else str(t)) if t is not None else None, ncols
    )


def _target_column(
    target: int | str | None, names: list[str] | None, ncols: int, path: Path
) -> int | None:
    if target is None:
        return None
    if isinstance(target, str):
        if names is None or target.strip() not in names:
            raise DataError(f"{path}: no column named {target!r}; the header is {names}")
        if names.count(target.strip()) > 1:
            raise DataError(f"{path}: {names.count(target.strip())} columns are named {target!r}")
        return names.index(target.strip())
    if not -ncols <= target < ncols:
        raise DataError(
            f"{path}: target column {target} is outside its {ncols} columns "
            f"(0..{ncols - 1}, or -{ncols}..-1 from the end)"
        )
    return target % ncols


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class _Block:
    """Parses blocks of (line number, row) into float32 features and a target column, and
    names the line and column of the first bad cell."""

    def __init__(self, path: Path, ncols: int, feats: list[int], t: int | None, label: Any):
        self.path, self.ncols, self.feats, self.t, self.label = path, ncols, feats, t, label
        self.xs: list[np.ndarray] = []
        self.ys: list[Any] = []
        self.text: bool | None = None  # the target column holds text (class names)
        self.bad_columns: set[int] = set()
        self.bad_lines: list[int] = []

    def parse(self, chunk: list[tuple[int, list[str]]]) -> None:
        for line, r in chunk:
            if len(r) != self.ncols:
                raise DataError(
                    f"{self.path}, line {line}: {len(r)} values, but the first row has {self.ncols}"
                )
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, reported below
                x = np.array([[float(r[i]) for i in self.feats] for _, r in chunk], np.float32)
        except ValueError:
            self._raise_bad_cell(chunk)
        bad = ~np.isfinite(x)
        if bad.any():
            self.bad_columns.update(self.feats[j] for j in np.flatnonzero(bad.any(axis=0)))
            rows = np.flatnonzero(bad.any(axis=1))[:3]
            self.bad_lines += [chunk[i][0] for i in rows][: 3 - len(self.bad_lines)]
        self.xs.append(x)
        if self.t is not None:
            self.ys.append(self._targets(chunk))

    def _raise_bad_cell(self, chunk: list[tuple[int, list[str]]]) -> None:
        for line, r in chunk:
            for i in self.feats:
                if not _is_number(r[i]):
                    what = "an empty cell" if not r[i].strip() else f"{r[i]!r}"
                    raise DataError(
                        f"{self.path}, line {line}, column {self.label(i)}: {what} is not a "
                        "number (features must be numeric: encode or drop that column)"
                    )
        raise AssertionError("unreachable: a cell failed float() but each one passes")

    def _targets(self, chunk: list[tuple[int, list[str]]]) -> Any:
        t, name = self.t, self.label(self.t)
        cells = [r[t].strip() for _, r in chunk]
        if self.text is None:
            self.text = not _is_number(cells[0])
        for (line, _), cell in zip(chunk, cells):
            if not cell:
                raise DataError(f"{self.path}, line {line}: the target {name} is empty")
            if not self.text and not _is_number(cell):
                raise DataError(
                    f"{self.path}, line {line}: the target {name} is {cell!r}, not a number "
                    "like the targets above it"
                )
        if self.text:
            return cells
        y = np.array([float(c) for c in cells])
        if not np.isfinite(y).all():
            i = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(f"{self.path}, line {chunk[i][0]}: the target {name} is {y[i]}")
        return y

    def raise_non_finite(self) -> None:
        if self.bad_columns:
            columns = ", ".join(self.label(i) for i in sorted(self.bad_columns))
            lines = ", ".join(map(str, self.bad_lines))
            raise DataError(
                f"{self.path}: NaN or inf features (or beyond float32) in column(s) {columns}, "
                f"first on line(s) {lines}: fill or drop them"
            )

    def targets(self) -> np.ndarray:
        if self.text:
            return np.array([c for part in self.ys for c in part], dtype=str)
        return np.concatenate(self.ys)


def _pick(names: list[str], candidates: tuple[str, ...], path: Path) -> str:
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"{path} has arrays {names}; name the features and targets x= and y=")


def _one_target_per_row(y: np.ndarray, what: str) -> np.ndarray:
    """(n,) targets as they are; (n, 1) flattened; one-hot (n, C) rows as label indices."""
    if y.ndim == 2 and y.shape[1] == 1:
        return y[:, 0]
    if y.ndim == 2 and y.dtype.kind in "iufb" and y.shape[1] > 1:
        if np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all():
            return np.argmax(y, axis=1)
        raise DataError(
            f"{what} has shape {y.shape} but its rows are not one-hot (a single 1 per row); "
            "give one target per row"
        )
    if y.ndim != 1:
        raise DataError(f"{what} has shape {y.shape}; give one target per row, shape (n,)")
    return y


def normalize_targets(y: np.ndarray) -> np.ndarray:
    """Integral targets become int64, other numbers float64, text stays text."""
    y = np.asarray(y)
    if y.dtype.kind in "USO":
        return y.astype(str)
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        i = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DataError(f"target {i} (counting from 0) is {y[i]}: every target must be a number")
    if y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        return y.astype(np.int64)
    return y.astype(np.float64)


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, codes): the sorted distinct labels and each row's index into them, so any
    label values (-1/+1, 3/7, {0, 10^6}, strings) become classes 0..C-1."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        i = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DataError(f"label {i} (counting from 0) is {y[i]}; labels must be finite")
    classes, codes = np.unique(y, return_inverse=True)
    return classes, codes.reshape(-1).astype(np.int64)


def infer_task(y: np.ndarray) -> str:
    """'classify' for text or integer labels with at most MAX_AUTO_CLASSES distinct values,
    'regress' for fractional targets with at least MIN_AUTO_REGRESS distinct values; anything
    else is ambiguous and raises DataError asking for the task."""
    y = np.asarray(y)
    distinct = len(np.unique(y))
    if y.dtype.kind in "USOb":
        return "classify"
    integral = y.dtype.kind in "iu" or bool(np.all(np.mod(y, 1) == 0))
    if integral and distinct <= MAX_AUTO_CLASSES:
        return "classify"
    if not integral and distinct >= MIN_AUTO_REGRESS:
        return "regress"
    kind = "integer" if integral else "fractional"
    raise DataError(
        f"the target has {distinct} distinct {kind} values ({_sample(y)}): is it class labels "
        "or a quantity? Pass --task classify or --task regress"
    )


def _sample(y: np.ndarray) -> str:
    values = np.unique(y)
    shown = ", ".join(str(v) for v in values[:5])
    return shown + (", ..." if len(values) > 5 else "")


def check_finite(x: np.ndarray, source: str = "features", names: list[str] | None = None) -> None:
    """Raise DataError naming the columns and first rows where ``x`` (n, d) is NaN or inf."""
    if x.dtype.kind != "f":
        return
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    columns = np.flatnonzero(bad.reshape(len(x), -1).any(axis=0))
    rows = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))[:3]
    label = [names[c] if names else str(c) for c in columns[:10]]
    raise DataError(
        f"{source}: NaN or inf features in column(s) {', '.join(label)}"
        f"{' ...' if len(columns) > 10 else ''}, first in row(s) {', '.join(map(str, rows))} "
        "(counting from 0): fill or drop them"
    )


def load_digits() -> Dataset:
    """The bundled 8x8 handwritten digits (1,797 images, 10 classes; UCI, CC BY 4.0: see
    gpunet/_data/DIGITS.md), as 64 features scaled to [0, 1] and int64 labels."""
    with resources.files("gpunet").joinpath("_data/digits.npz").open("rb") as f:
        archive = np.load(f, allow_pickle=False)
        images, labels = archive["images"], archive["labels"]
    x = images.reshape(len(images), -1).astype(np.float32) / DIGITS_SCALE
    return Dataset(x, labels.astype(np.int64))


def split(
    data: Dataset, val: float = 0.15, test: float = 0.15, seed: int = 0, stratify: bool = True
) -> tuple[Dataset, Dataset, Dataset]:
    """Train / validation / test parts; stratified by class (each part keeps the class
    proportions) when the targets are labels. Raises DataError when a part asked for (val or
    test above 0, and always train) would be empty, naming the counts."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split: val={val} and test={test} must be fractions summing below 1")
    rng = np.random.default_rng(seed)
    labels = stratify and data.y.ndim == 1 and data.y.dtype.kind in "iuUSb"
    groups = (
        [np.flatnonzero(data.y == c) for c in np.unique(data.y)]
        if labels
        else [np.arange(len(data))]
    )
    parts: list[list[np.ndarray]] = [[], [], []]
    for idx in groups:
        idx = rng.permutation(idx)
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    counts = [sum(len(i) for i in p) for p in parts]
    if counts[0] == 0 or (val > 0 and counts[1] == 0) or (test > 0 and counts[2] == 0):
        need = next(n for n in itertools.count(2) if _split_fits(n, val, test))
        per = f" in {len(groups)} classes" if len(groups) > 1 else ""
        raise DataError(
            f"split: {len(data)} rows{per} give {counts[0]}/{counts[1]}/{counts[2]} "
            f"train/validation/test rows with val={val}, test={test}; every part needs a row: "
            f"at least {need} rows{' per class' if per else ''}"
        )
    train, valid, tst = (data.subset(rng.permutation(np.concatenate(p))) for p in parts)
    return train, valid, tst


def _split_fits(n: int, val: float, test: float) -> bool:
    n_test, n_val = round(n * test), round(n * val)
    return n - n_test - n_val >= 1 and (val == 0 or n_val >= 1) and (test == 0 or n_test >= 1)


class DataLoader:
    """Mini-batches of (x, y) tensors on a device.

    The whole dataset is copied to the device once, when the loader is made; each epoch then
    draws a permutation (``shuffle``) and gathers batches on the device. ``seed`` seeds the
    shuffle; without one it is drawn from gpunet's default generator when the loader is made,
    so ``gpunet.manual_seed`` makes the batches repeatable.

    ``num_replicas`` and ``rank`` shard the data for data parallelism, as PyTorch's
    ``DistributedSampler`` does: every rank draws the same permutation for the epoch (the
    epoch-th draw of the generator seeded by ``seed``, which every rank must share), pads it by
    wrapping around to a multiple of ``num_replicas`` (``pad``, so every rank takes the same
    number of steps; ``pad=False`` for evaluation, where uneven shards are fine) and takes
    every ``num_replicas``-th index from ``rank``. No ``set_epoch`` is needed: each epoch
    reshuffles; PyTorch's ``set_epoch(e)`` works too (the next pass is epoch e's). With
    ``num_replicas=1`` the batches are those of an unsharded loader.
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
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        pad: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        if data.y.dtype.kind in "USO":
            raise DataError(
                f"DataLoader: the targets are text ({data.y[:3].tolist()}...); encode them as "
                "classes 0..C-1 with data.as_classes()"
            )
        if num_replicas is not None or rank is not None:
            if num_replicas is None or rank is None or not 0 <= rank < num_replicas:
                raise ValueError(
                    f"DataLoader: a shard needs num_replicas >= 1 and 0 <= rank < num_replicas, "
                    f"got num_replicas={num_replicas}, rank={rank}"
                )
            if shuffle and seed is None and num_replicas > 1:
                raise ValueError(
                    "DataLoader: a sharded loader that shuffles needs seed=, the same on every "
                    "rank, so that the ranks' shards are disjoint"
                )
        self.dataset, self.batch_size = data, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank, self.pad = num_replicas or 1, rank or 0, pad
        self.backend = get_backend(default_device() if device is None else device)
        self.x = self.backend.asarray(data.x.astype(dtypes.as_dtype(dtype), copy=False))
        self.y = self.backend.asarray(data.y)
        if seed is None and shuffle:
            # as PyTorch's sampler does, an unseeded shuffle draws its seed from the default
            # generator, so that gpunet.manual_seed makes it repeatable
            seed = int(random.default_generator.host_rng.integers(2**63))
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.epoch = 0  # the passes drawn so far: the next pass is this epoch's
        # the pass under way: the state before its draw and the batches handed out, so that
        # state_dict() taken mid-epoch resumes at the next batch of the same permutation
        self._pass: tuple[dict[str, Any], int] | None = None
        self._taken, self._skip = 0, 0

    def _rows(self) -> int:
        """The rows this rank takes per epoch."""
        n, r = len(self.dataset), self.num_replicas
        return -(-n // r) if self.pad else len(range(self.rank, n, r))

    def __len__(self) -> int:
        n, b = self._rows(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _epoch_rows(self) -> np.ndarray | None:
        """This epoch's rows for this rank, in order (None: all rows in order, unsharded);
        draws the epoch's permutation."""
        n, r = len(self.dataset), self.num_replicas
        order = self.rng.permutation(n) if self.shuffle else None
        self.epoch += 1
        if r == 1:
            return order
        order = np.arange(n) if order is None else order
        if self.pad:  # wrap around: every rank the same count
            order = np.resize(order, -(-n // r) * r)
        return order[self.rank :: r]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        b, backend = self.batch_size, self.backend
        skip, self._skip = self._skip, 0
        self._pass = (copy.deepcopy(self.rng.bit_generator.state), self.epoch)
        # one small index copy per epoch; the batches are gathered on the device
        rows = self._epoch_rows()
        order = None if rows is None else backend.asarray(rows)
        for k in range(skip, len(self)):
            self._taken = k + 1
            if order is None:
                xs, ys = self.x[k * b : (k + 1) * b], self.y[k * b : (k + 1) * b]
            else:
                idx = order[k * b : (k + 1) * b]
                xs, ys = backend.take(self.x, idx, axis=0), backend.take(self.y, idx, axis=0)
            yield Tensor._wrap(xs, backend), Tensor._wrap(ys, backend)
        self._pass = None

    def set_epoch(self, epoch: int) -> None:
        """PyTorch's ``DistributedSampler.set_epoch``: the next pass draws epoch ``epoch``'s
        permutation (the epoch-th draw from ``seed``), whatever passes came before; calling
        it with the epochs in order, as a PyTorch loop does, changes nothing."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"DataLoader.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        if epoch == self.epoch:
            return
        self.rng, self.epoch = np.random.default_rng(self.seed), 0
        self._pass, self._skip = None, 0
        for _ in range(epoch if self.shuffle else 0):  # (the draws before epoch's)
            self.rng.permutation(len(self.dataset))
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator's state and the passes drawn (so a resumed run draws the
        same batches); taken within a pass, the state before that pass's draw and ``batch``,
        the batches handed out, so that the next pass after ``load_state_dict`` draws the same
        permutation and starts at the batch after them."""
        if self._pass is not None and 0 < self._taken < len(self):
            rng, epoch = self._pass
            return {"rng": copy.deepcopy(rng), "epoch": epoch, "batch": self._taken}
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batch = int(state.get("batch", 0))
        if batch and not 0 < batch < len(self):  # (another loader's: refused before any change)
            raise ValueError(
                f"DataLoader.load_state_dict: the state is {batch} batches into an epoch, but "
                f"this loader has {len(self)} an epoch: a state of a loader over other data or "
                "with another batch size"
            )
        self.rng.bit_generator.state = state["rng"]
        self.epoch = int(state.get("epoch", 0))  # (a state saved before it: unknown, 0)
        self._pass, self._skip = None, batch
