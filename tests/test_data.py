"""Datasets, files, splits and mini-batches."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import gpunet
from gpunet.data import (
    DataError,
    DataLoader,
    Dataset,
    encode_labels,
    infer_task,
    load_digits,
    split,
)


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


def test_loader_state_taken_mid_epoch_resumes_at_the_next_batch() -> None:
    """Before: a state taken after 2 of an epoch's 4 batches was the generator's after that
    epoch's draw, so a loader loading it skipped the epoch's last 2 batches and went on with
    the next epoch's: a resumed run saw other data than a straight one, silently."""
    d = Dataset(np.zeros((14, 1), np.float32), np.arange(14))

    def batches(loader: DataLoader, n: int) -> list[list[int]]:
        got = []
        while len(got) < n:
            for _, yb in loader:
                got.append(yb.tolist())
                if len(got) == n:
                    break
        return got

    straight = batches(DataLoader(d, batch_size=4, shuffle=True, seed=1), 10)
    a = DataLoader(d, batch_size=4, shuffle=True, seed=1)
    it = iter(a)
    cut = [next(it)[1].tolist() for _ in range(2)]
    state = a.state_dict()
    assert state["batch"] == 2 and state["epoch"] == 0
    b = DataLoader(d, batch_size=4, shuffle=True, seed=99)
    b.load_state_dict(state)
    assert cut + batches(b, 8) == straight
    # b stopped 2 batches into the third epoch: its state says so
    assert (b.state_dict()["epoch"], b.state_dict()["batch"]) == (2, 2)
    next(it), next(it)  # every batch of the cut loader's epoch handed out: a whole epoch again
    assert a.state_dict() == {"rng": a.rng.bit_generator.state, "epoch": 1}
    c = DataLoader(d, batch_size=7, shuffle=True, seed=5)  # 2 batches an epoch
    before = c.state_dict()
    with pytest.raises(ValueError, match="state is 2 batches into an epoch, but this loader has 2"):
        c.load_state_dict(state)
    assert c.state_dict() == before
    empty = DataLoader(d, batch_size=20, drop_last=True)  # no batches: an epoch's state loads
    empty.load_state_dict(before)
    assert empty.epoch == 0 and list(empty) == []


def _epochs(loader: DataLoader, n: int = 2) -> list[list[int]]:
    return [[v for _, yb in loader for v in yb.tolist()] for _ in range(n)]


def test_manual_seed_makes_unseeded_shuffles_repeatable() -> None:
    """Before: an unseeded loader drew fresh OS entropy, so two runs after
    ``gpunet.manual_seed(0)`` shuffled differently. A loader's own seed keeps precedence."""
    d = Dataset(np.zeros((50, 1), np.float32), np.arange(50))
    gpunet.manual_seed(0)
    first = _epochs(DataLoader(d, batch_size=7, shuffle=True))
    gpunet.manual_seed(0)
    again = _epochs(DataLoader(d, batch_size=7, shuffle=True))
    assert first == again and first[0] != first[1]  # repeatable, and a new order per epoch
    gpunet.manual_seed(1)
    assert _epochs(DataLoader(d, batch_size=7, shuffle=True)) != first
    seeded = [_epochs(DataLoader(d, batch_size=7, shuffle=True, seed=5)) for _ in range(2)]
    gpunet.manual_seed(0)
    assert seeded[0] == seeded[1] == _epochs(DataLoader(d, batch_size=7, shuffle=True, seed=5))
    assert seeded[0] != first


# ------------------------------------------------------------------ files as users have them
def _file(tmp_path: Path, text: str | bytes, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_bom_is_dropped_and_the_label_column_found(tmp_path: Path) -> None:
    d = Dataset.from_csv(_file(tmp_path, b"\xef\xbb\xbfa,label\n1,0\n2,1\n"), target="label")
    assert d.features == ["a"] and d.target == "label" and d.y.tolist() == [0, 1]


@pytest.mark.parametrize(
    "text, target, words",
    [
        ("a,label\n1,0\n2,nan\n", "label", ["line 3", "nan"]),
        ("a,label\n1,0\n\n2,inf\n", "label", ["line 4", "inf"]),  # blank lines keep numbering
        ("a,b,label\n1,2,0\n3,4\n", "label", ["line 3", "2 values", "first row has 3"]),
        ("a,b,label\n1,2,0\n3,4,5,6\n", "label", ["line 3", "4 values"]),
        ("a,b,label\n", "label", ["header but no data rows"]),
        ("label\n1\n", "label", ["no feature columns"]),
        ("\n\n", -1, ["empty"]),
        ("a,b\n1,2\n", 2, ["target column 2 is outside its 2 columns"]),
        ("a,b\n1,2\n", -3, ["-3"]),
        ("a,b\n1,2\n", "c", ["no column named 'c'", "['a', 'b']"]),
        ("a,a,b\n1,2,0\n", "a", ["2 columns are named 'a'"]),
        ("a,b,label\n1,,0\n", "label", ["line 2", "column 'b'", "empty cell"]),
        ("a,label\n1,0\n1,x\n", "label", ["line 3", "'x'", "not a number"]),
        ("a,b,label\nnan,1,0\n1,inf,1\n1e39,1,0\n2,2,1\n", "label", ["'a', 'b'", "2, 3, 4"]),
    ],
)
def test_csv_problems_name_the_line_and_column(
    tmp_path: Path, text: str, target: int | str, words: list[str]
) -> None:
    with pytest.raises(DataError) as e:
        Dataset.from_csv(_file(tmp_path, text), target=target)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_text_labels_and_header_rules(tmp_path: Path) -> None:
    d = Dataset.from_csv(_file(tmp_path, "x;label\n1;cat\n2;dog\n3;cat\n"), target="label")
    assert d.y.tolist() == ["cat", "dog", "cat"]
    c = d.as_classes()
    assert c.classes.tolist() == ["cat", "dog"] and c.y.tolist() == [0, 1, 0] and c.num_classes == 2
    # a first row of numbers is data unless a column is named
    assert len(Dataset.from_csv(_file(tmp_path, "1,2,0\n3,4,1\n"))) == 2
    assert len(Dataset.from_csv(_file(tmp_path, "1,2,0\n3,4,1\n"), target="0")) == 1
    assert len(Dataset.from_csv(_file(tmp_path, "1,2,0\n3,4,1\n"), header=True)) == 1


def test_any_label_values_become_classes_0_to_c_minus_1() -> None:
    for labels, classes in [
        ([-1, 1, 1], [-1, 1]),
        ([7, 3, 7], [3, 7]),
        ([0, 10**6, 0], [0, 10**6]),
    ]:
        d = Dataset(np.zeros((3, 1), np.float32), np.array(labels)).as_classes()
        assert d.classes.tolist() == classes and d.num_classes == 2
        np.testing.assert_array_equal(d.classes[d.y], labels)  # the mapping is kept
    with pytest.raises(DataError, match=r"label 1 .* nan"):
        encode_labels(np.array([0.0, np.nan]))


def test_infer_task_classifies_labels_and_regresses_quantities() -> None:
    assert infer_task(np.array([-1, 1, 1])) == "classify"
    assert infer_task(np.array(["a", "b"])) == "classify"
    assert infer_task(np.array([0.0, 1.0, 2.0])) == "classify"  # integral floats
    assert infer_task(np.linspace(0, 1, 50)) == "regress"
    with pytest.raises(DataError, match=r"80 distinct integer values.*--task classify"):
        infer_task(np.arange(80))
    with pytest.raises(DataError, match="3 distinct fractional values"):
        infer_task(np.array([0.5, 1.5, 2.5] * 10))


def test_npz_targets(tmp_path: Path) -> None:
    x = np.arange(8.0).reshape(4, 2)
    np.savez(tmp_path / "a.npz", x=x, y=np.eye(3)[[0, 2, 1, 2]])
    assert Dataset.from_npz(tmp_path / "a.npz").y.tolist() == [0, 2, 1, 2]
    np.savez(tmp_path / "b.npz", x=x, y=np.array(["no", "yes", "no", "no"]))
    assert Dataset.from_npz(tmp_path / "b.npz").as_classes().y.tolist() == [0, 1, 0, 0]
    np.savez(tmp_path / "c.npz", x=x, y=np.array([[0.5, 0.5]] * 4))
    with pytest.raises(DataError, match="not one-hot"):
        Dataset.from_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(3))
    with pytest.raises(DataError, match="4 rows but y has 3"):
        Dataset.from_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=np.array(["a"] * 4), y=np.zeros(4))
    with pytest.raises(DataError, match="numeric array"):
        Dataset.from_npz(tmp_path / "e.npz")


@pytest.mark.parametrize(
    "n, counts", [(5, "5 rows in 2 classes give 5/0/0"), (1, "1 rows give 1/0/0"), (2, "2/0/0")]
)
def test_split_of_too_few_rows_names_the_counts(n: int, counts: str) -> None:
    d = Dataset(np.zeros((n, 1), np.float32), np.arange(n) % 2 if n == 5 else np.zeros(n))
    with pytest.raises(DataError, match=f"{counts}.*at least 4 rows"):
        split(d)
    assert [len(p) for p in split(d, val=0.0, test=0.0)] == [n, 0, 0]  # asked for: fine
    assert [len(p) for p in split(Dataset(np.zeros((4, 1)), np.zeros(4)))] == [2, 1, 1]


def test_from_csv_memory_stays_near_the_result(tmp_path: Path) -> None:
    """A 2 MB file: the peak is a small multiple of the file, not ~11x (a list per row)."""
    r = np.random.default_rng(0)
    rows = "\n".join(",".join(f"{v:.6f}" for v in row) + ",1" for row in r.random((10_000, 20)))
    path = _file(tmp_path, "\n".join([",".join(f"f{i}" for i in range(20)) + ",label", rows]))
    tracemalloc.start()
    try:
        d = Dataset.from_csv(path, target="label")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert d.x.shape == (10_000, 20) and d.x.dtype == np.float32
    assert peak < 3 * path.stat().st_size, peak / path.stat().st_size


def test_a_pandas_index_column_is_not_a_feature(tmp_path: Path) -> None:
    d = Dataset.from_csv(_file(tmp_path, ",a,label\n0,5,1\n1,6,0\n2,7,1\n"), target="label")
    assert d.features == ["a"] and d.x[:, 0].tolist() == [5, 6, 7]
    kept = Dataset.from_csv(_file(tmp_path, ",a,label\n3,5,1\n1,6,0\n"), target="label")
    assert kept.features == ["", "a"]  # not 0, 1, 2, ...: data, kept


def test_raw_labels_point_to_as_classes() -> None:
    d = Dataset(np.zeros((3, 1), np.float32), np.array([-1, 1, 1]))
    with pytest.raises(DataError, match=r"labels from -1 to 1 .* as_classes\(\)"):
        _ = d.num_classes
    text = Dataset(np.zeros((2, 1), np.float32), np.array(["cat", "dog"]))
    with pytest.raises(DataError, match=r"targets are text .*as_classes\(\)"):
        DataLoader(text)
    assert len(list(DataLoader(text.as_classes()))) == 1


def test_set_epoch_is_pytorchs_and_in_order_changes_nothing() -> None:
    """``set_epoch(e)``: the next pass draws epoch e's permutation (the e-th draw from the
    seed), whatever came before; called with the epochs in order it changes nothing."""
    data = Dataset(np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 3)

    def passes(loader: DataLoader, n: int, set_epoch: bool = False) -> list[np.ndarray]:
        out = []
        for e in range(n):
            if set_epoch:
                loader.set_epoch(e)
            out.append(np.concatenate([y.numpy() for _, y in loader]))
        return out

    def make() -> DataLoader:
        return DataLoader(data, 6, shuffle=True, seed=3, num_replicas=2, rank=1)

    plain = passes(make(), 5)
    assert all(not np.array_equal(plain[0], p) for p in plain[1:])  # (each epoch reshuffles)
    for a, b in zip(plain, passes(make(), 5, set_epoch=True)):
        np.testing.assert_array_equal(a, b)
    jump = make()
    jump.set_epoch(3)
    np.testing.assert_array_equal(passes(jump, 1)[0], plain[3])
    again = make()
    passes(again, 4)
    again.set_epoch(1)
    np.testing.assert_array_equal(passes(again, 1)[0], plain[1])
    with pytest.raises(ValueError, match="set_epoch: epoch must be an int >= 0, got -1"):
        again.set_epoch(-1)
