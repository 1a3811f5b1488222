"""``gpunet predict``: a model that ``gpunet train`` saved, applied to new rows.

The model file carries what training did to the data (its ``preprocess`` metadata): the
features' mean and standard deviation from the training split, the task, and either the class
labels in their original values (class i is ``classes[i]``) or the target's mean and standard
deviation (regression trains on the standardized target). Predictions come back in the user's
terms: original labels with class probabilities, or values in the target's units.
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, write_atomically
from .data import DataError, Dataset, check_finite, csv_header, normalize_targets, read_csv


@dataclass
class Preprocess:
    """What training did to the data; saved in the model's metadata as ``preprocess``."""

    task: str  # "classify" or "regress"
    mean: list[float]  # per feature, from the training split
    std: list[float]
    classes: list[Any] | None = None  # classify: the original label of class i
    target_mean: float | None = None  # regress: the target's training mean and std
    target_std: float | None = None
    features: list[str] | None = None  # the CSV header's feature names, if it had one
    target: str | None = None  # the target column's name (or index)
    dtype: str | None = None  # what training standardized in (None: a run before it was kept)

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocess:
        return cls(**meta)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std in the dtype training computed it in (``job.prepare``: float32
        for a CSV or the digits, float64 for a .npz of float64 or integers), so the rows
        training saw get the same inputs, bit for bit."""
        dt = np.dtype(self.dtype or np.float32)
        mean, std = np.asarray(self.mean, dt), np.asarray(self.std, dt)
        return ((x.astype(dt) - mean) / std).astype(np.float32)

    def decode(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Model outputs -> (predictions in the user's terms, class probabilities or None)."""
        if self.task == "regress":
            assert self.target_mean is not None and self.target_std is not None
            return out[:, 0].astype(np.float64) * self.target_std + self.target_mean, None
        z = out.astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.asarray(self.classes, dtype=object)[p.argmax(axis=1)], p


def outputs(model: Any, x: np.ndarray, device: Any = None, batch: int = 4096) -> np.ndarray:
    """The model's outputs for standardized rows ``x``, in eval mode without a graph."""
    import gpunet

    model.eval()
    with gpunet.no_grad():
        parts = [
            model(gpunet.tensor(x[i : i + batch], device=device)).numpy()
            for i in range(0, len(x), batch)
        ]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def load_model(path: str | Path, device: Any = None) -> tuple[Any, Preprocess]:
    """A run folder (or its model.safetensors) -> (the MLP with its weights, its Preprocess)."""
    import gpunet
    from gpunet import nn

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".safetensors":
        raise DataError(f"{path}: no model there (give a run folder or its model.safetensors)")
    meta = gpunet.load(file)
    if "preprocess" not in meta or "sizes" not in meta:
        raise DataError(f"{file}: not a model saved by gpunet train (no preprocess metadata)")
    # Dropout layers (identity in eval mode) sit between the Linear ones and shift their
    # names; a run saved before its dropout was recorded may have them: try both layouts.
    rates = [meta["dropout"]] if "dropout" in meta else [0.0, 0.5]
    for rate in rates:
        model = nn.MLP(meta["sizes"], activation=meta["activation"], dropout=rate, device=device)
        try:
            gpunet.load(file, model)
            break
        except CheckpointError:
            if rate == rates[-1]:
                raise
    return model, Preprocess.from_meta(meta["preprocess"])


def read_features(path: str | Path, prep: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    """The features of ``path`` in the training column order, and its targets if present."""
    path = Path(path)
    n = len(prep.mean)
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                x = next(
                    archive[k] for k in ("x", "X", "images", "data", "features") if k in archive
                )
                ys = [archive[k] for k in ("y", "Y", "labels", "target") if k in archive]
        except (OSError, ValueError, StopIteration) as e:
            raise DataError(f"cannot read features x from {path}: {e!r}") from e
        x = x.reshape(len(x), -1)
        y = Dataset.from_npz(path).y if ys else None
    elif path.suffix.lower() == ".csv":
        x, y = _csv_features(path, prep, n)
    else:
        raise DataError(f"--data must be a .npz or .csv file, got {path}")
    if x.shape[1] != n:
        raise DataError(f"{path}: {x.shape[1]} feature columns, but the model takes {n}")
    check_finite(x.astype(np.float32), source=str(path))
    return x, y  # (as read, as training read it: a .npz's float64 is not rounded first)


def _csv_features(path: Path, prep: Preprocess, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    names, ncols = csv_header(path)
    if prep.features is not None and names is not None:
        has_target = prep.target in names
        table = read_csv(path, prep.target if has_target else None, header=True)
        assert table.features is not None
        missing = [f for f in prep.features if f not in table.features]
        if missing:
            raise DataError(f"{path}: no column(s) {missing} that the model was trained on")
        order = [table.features.index(f) for f in prep.features]
        return table.x[:, order], table.y
    # no names to match: the columns are taken in training order, the target where it was
    index = (
        int(prep.target) if prep.target is not None and prep.target.lstrip("-").isdigit() else -1
    )
    has_target = ncols == n + 1
    if not has_target and ncols != n:
        raise DataError(f"{path}: {ncols} columns, but the model takes {n} features (+1 target)")
    table = read_csv(path, index if has_target else None, header=names is not None)
    return table.x, table.y


def write_predictions(
    out: str | Path, predictions: np.ndarray, probabilities: np.ndarray | None, prep: Preprocess
) -> None:
    """A CSV with ``prediction`` and, for classes, ``p(<label>)`` per class, written
    atomically (``checkpoint.write_atomically``): a failure leaves no half file."""
    out = Path(out)
    header = ["prediction"]
    if probabilities is not None:
        header += [f"p({c})" for c in prep.classes or []]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    for i, value in enumerate(predictions):
        row = [repr(float(value)) if prep.task == "regress" else value]
        if probabilities is not None:
            row += [f"{p:.6g}" for p in probabilities[i]]
        w.writerow(row)
    try:
        write_atomically(out, text.getvalue().encode())
    except OSError as e:
        raise DataError(f"--out {out}: cannot write there ({e.strerror})") from e


def run_predict(args: argparse.Namespace) -> int:
    """gpunet predict RUN_OR_MODEL --data FILE [--out predictions.csv]."""
    from .job import resolve_device

    device = resolve_device(args.device)
    model, prep = load_model(args.model, device)
    x, y = read_features(args.data, prep)
    predictions, probabilities = prep.decode(outputs(model, prep.standardize(x), device))
    if Path(args.out).is_dir():
        raise DataError(f"--out {args.out} is a folder; give a file name such as predictions.csv")
    write_predictions(args.out, predictions, probabilities, prep)
    print(f"wrote {len(predictions)} predictions to {args.out}{_score(predictions, y, prep)}")
    return 0


def _score(predictions: np.ndarray, y: np.ndarray | None, prep: Preprocess) -> str:
    """The file's own targets, when it has them: accuracy, or RMSE in the target's units."""
    if y is None or len(y) == 0:
        return ""
    if prep.task == "regress":
        rmse = float(np.sqrt(np.mean((predictions - y.astype(np.float64)) ** 2)))
        return f" (RMSE {rmse:.4g} against the file's targets)"
    hits = [str(p) == str(t) for p, t in zip(predictions, normalize_targets(y))]
    return f" (accuracy {np.mean(hits):.4f} against the file's labels)"
