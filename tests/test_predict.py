"""gpunet predict: what gpunet train saved, applied to new rows in the user's own terms."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from gpunet.cli import main
from gpunet.predict import load_model

FAST = ["--epochs", "20", "--hidden", "16", "--lr", "1e-2", "--no-progress", "--device", "cpu"]


def _table(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def _blobs(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    k = r.integers(0, 2, n)
    return np.round(r.standard_normal((n, 3)) + k[:, None] * 4.0, 4), k


def _train(tmp_path: Path, data: Path, *extra: str) -> Path:
    assert main(["train", *FAST, "--data", str(data), *extra, "--out", str(tmp_path / "r")]) == 0
    (run,) = (tmp_path / "r").iterdir()
    return run


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_labels_come_back_in_their_own_values_with_probabilities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, k = _blobs()
    labels = np.array([-1, 1])[k]
    data = _table(
        tmp_path / "d.csv", ["a", "b", "c", "label"], [(*r, y) for r, y in zip(x, labels)]
    )
    run = _train(tmp_path, data, "--target", "label")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(data), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 200 predictions" in said and "accuracy" in said
    rows = _read(out)
    assert list(rows[0]) == ["prediction", "p(-1)", "p(1)"]
    predicted = np.array([int(r["prediction"]) for r in rows])
    assert set(predicted) <= {-1, 1} and np.mean(predicted == labels) > 0.95
    p = np.array([[float(r["p(-1)"]), float(r["p(1)"])] for r in rows])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((p[:, 1] > 0.5) == (predicted == 1))
    assert out.stat().st_mode & 0o777 == 0o644  # an ordinary file, not mkstemp's private one
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp left


def test_new_rows_without_the_target_in_another_column_order(tmp_path: Path) -> None:
    x, k = _blobs()
    names = np.array(["cat", "dog"])[k]
    data = _table(
        tmp_path / "d.csv", ["a", "b", "c", "animal"], [(*r, y) for r, y in zip(x, names)]
    )
    run = _train(tmp_path, data, "--target", "animal")
    new = _table(tmp_path / "new.csv", ["c", "a", "b"], [(r[2], r[0], r[1]) for r in x[:10]])
    out = tmp_path / "p.csv"
    assert (
        main(["predict", str(run / "model.safetensors"), "--data", str(new), "--out", str(out)])
        == 0
    )
    assert [r["prediction"] for r in _read(out)] == list(names[:10])


def test_regression_predictions_are_in_the_targets_units(tmp_path: Path) -> None:
    r = np.random.default_rng(2)
    x = r.standard_normal((300, 2))
    price = 5000.0 + 800.0 * x[:, 0] + r.standard_normal(300)
    data = _table(tmp_path / "d.csv", ["a", "b", "price"], [(*a, p) for a, p in zip(x, price)])
    run = _train(tmp_path, data, "--target", "price", "--epochs", "80")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(data), "--out", str(out)]) == 0
    rows = _read(out)
    assert list(rows[0]) == ["prediction"]
    predicted = np.array([float(r["prediction"]) for r in rows])
    assert np.sqrt(np.mean((predicted - price) ** 2)) < 200  # dollars, not standard units
    _, prep = load_model(run)
    assert prep.task == "regress" and abs(prep.target_mean - price.mean()) < 100


def test_a_headerless_file_takes_the_training_column_order(tmp_path: Path) -> None:
    x, k = _blobs()
    data = _table(tmp_path / "d.csv", [], [(*r, y) for r, y in zip(x, k)])
    run = _train(tmp_path, data)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(data), "--out", str(out)]) == 0
    features_only = _table(tmp_path / "f.csv", [], [tuple(r) for r in x])
    assert main(["predict", str(run), "--data", str(features_only), "--out", str(out)]) == 0
    assert np.mean([int(r["prediction"]) for r in _read(out)] == k) > 0.95


def test_npz_rows(tmp_path: Path) -> None:
    x, k = _blobs()
    np.savez(tmp_path / "d.npz", x=x, y=np.eye(2)[k])
    run = _train(tmp_path, tmp_path / "d.npz")
    np.savez(tmp_path / "new.npz", x=x[:5])
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(tmp_path / "new.npz"), "--out", str(out)]) == 0
    assert [int(r["prediction"]) for r in _read(out)] == list(k[:5])


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing column", ["no column(s) ['b']"]),
        ("wrong width", ["5 columns", "3 features"]),
        ("nan", ["NaN or inf"]),
        ("not a run", ["no model there"]),
        ("not a model", ["not a gpunet checkpoint"]),
        ("metrics.json", ["no model there"]),
        ("out is a folder", ["is a folder"]),
    ],
)
def test_what_predict_cannot_use_is_one_line_and_exit_2(
    tmp_path: Path, case: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    x, k = _blobs(60)
    data = _table(tmp_path / "d.csv", ["a", "b", "c", "label"], [(*r, y) for r, y in zip(x, k)])
    run = _train(tmp_path, data)
    capsys.readouterr()
    model, new, out = str(run), tmp_path / "new.csv", str(tmp_path / "p.csv")
    if case == "missing column":
        _table(new, ["a", "c"], [(r[0], r[2]) for r in x])
    elif case == "wrong width":
        _table(new, [], [(*r, 1, 2) for r in x])
    elif case == "nan":
        _table(new, ["a", "b", "c"], [(np.nan, 1, 2)])
    else:
        _table(new, ["a", "b", "c"], [tuple(r) for r in x])
    if case == "not a run":
        model = str(tmp_path)
    elif case == "not a model":
        (tmp_path / "m.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        model = str(tmp_path / "m.safetensors")
    elif case == "metrics.json":
        model = str(run / "metrics.json")
    elif case == "out is a folder":
        out = str(tmp_path)
    code = main(["predict", model, "--data", str(new), "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_the_digits_model_predicts_the_bundled_files_raw_images(tmp_path: Path) -> None:
    """`make train`'s model: the saved statistics are in the file's pixel units (0..16)."""
    from importlib import resources

    fast = ["--epochs", "5", "--hidden", "64", "--lr", "3e-3", "--no-progress", "--device", "cpu"]
    assert main(["train", *fast, "--out", str(tmp_path / "r")]) == 0
    (run,) = (tmp_path / "r").iterdir()
    with resources.files("gpunet").joinpath("_data/digits.npz").open("rb") as f:
        archive = np.load(f)
        np.savez(tmp_path / "new.npz", images=archive["images"][:300])
        labels = archive["labels"][:300]
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(tmp_path / "new.npz"), "--out", str(out)]) == 0
    predicted = np.array([int(r["prediction"]) for r in _read(out)])
    assert np.mean(predicted == labels) > 0.9


def test_a_model_trained_with_dropout_predicts_as_the_run_tested_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--dropout`` puts Dropout layers between the Linear ones, and predict built the MLP
    without them: every such run failed to load ('missing from the checkpoint: model.2.weight').
    Now the run saves its dropout and predict builds the same layers (identity in eval mode),
    reproducing the run's own test accuracy."""
    x, k = _blobs()
    data = _table(tmp_path / "d.csv", ["a", "b", "c", "label"], [(*r, y) for r, y in zip(x, k)])
    run = _train(tmp_path, data, "--dropout", "0.3", "--hidden", "16,8")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", str(data), "--out", str(out)]) == 0
    predicted = np.array([int(r["prediction"]) for r in _read(out)])
    assert np.mean(predicted == k) > 0.95
    model, _ = load_model(run)
    assert sum(type(m).__name__ == "Dropout" for m in model.modules()) == 2
    import gpunet

    meta = gpunet.load(run / "model.safetensors")
    assert meta.pop("dropout") == 0.3
    gpunet.save(run / "model.safetensors", model, **meta)  # as a run saved before the fix
    older, _ = load_model(run)
    for a, b in zip(model.parameters(), older.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
