"""Datasets, files, splits and mini-batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gpunet
from gpunet.data import DataLoader, Dataset, load_digits, split


def test_bundled_digits() -> None:
    d = load_digits()
    assert d.x.shape == (1797, 64) and d.x.dtype == np.float32
    assert d.y.dtype == np.int64 and set(np.unique(d.y)) == set(range(10))
    assert d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert d.num_classes == 10


def test_split_is_stratified_disjoint_and_seeded() -> None:
    d = load_digits()
    train, val, test = split(d, val=0.15, test=0.15, seed=3)
    assert len(train) + len(val) + len(test) == len(d)
    counts = np.bincount(d.y) / len(d)
    for part in (train, val, test):
        np.testing.assert_allclose(np.bincount(part.y, minlength=10) / len(part), counts, atol=0.02)
    rows = {tuple(r) for r in np.round(train.x, 3)} & {tuple(r) for r in np.round(test.x, 3)}
    assert len(rows) < 10  # (a few digits are exact duplicates in the source data)
    again = split(d, val=0.15, test=0.15, seed=3)[2]
    np.testing.assert_array_equal(again.y, test.y)
    with pytest.raises(ValueError, match="fractions"):
        split(d, val=0.6, test=0.5)


def test_npz_and_csv_files(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.array([0, 1, 1, 0])
    np.savez(tmp_path / "a.npz", X=x, y=y)
    d = Dataset.from_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(d.x, x)
    np.testing.assert_array_equal(d.y, y)
    (tmp_path / "a.csv").write_text("f1,f2,label\n1,2,0\n3,4,1\n5,6,1\n")
    c = Dataset.from_csv(tmp_path / "a.csv", target="label")
    np.testing.assert_array_equal(c.x, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(c.y, [0, 1, 1])
    assert c.y.dtype == np.int64


def test_unreadable_files_raise_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        Dataset.from_npz(tmp_path / "missing.npz")
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n3,x,1\n")
    with pytest.raises(ValueError, match="number"):
        Dataset.from_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="must match"):
        Dataset(np.zeros((3, 2)), np.zeros(2))


def test_loader_batches_cover_the_data_once_per_epoch() -> None:
    d = Dataset(np.arange(10, dtype=np.float32).reshape(10, 1), np.arange(10))
    loader = DataLoader(d, batch_size=4, shuffle=True, seed=0, device="cpu")
    assert len(loader) == 3
    seen = []
    for xb, yb in loader:
        assert isinstance(xb, gpunet.Tensor) and xb.dtype == np.float32
        np.testing.assert_array_equal(xb.numpy()[:, 0], yb.numpy())
        seen.extend(yb.tolist())
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    assert len(DataLoader(d, batch_size=4, drop_last=True)) == 2
    plain = [yb.tolist() for _, yb in DataLoader(d, batch_size=4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_loader_state_resumes_the_same_shuffle() -> None:
    d = Dataset(np.zeros((8, 1), np.float32), np.arange(8))
    a = DataLoader(d, batch_size=8, shuffle=True, seed=1)
    state = a.state_dict()
    first = next(iter(a))[1].tolist()
    b = DataLoader(d, batch_size=8, shuffle=True, seed=99)
    b.load_state_dict(state)
    assert next(iter(b))[1].tolist() == first
