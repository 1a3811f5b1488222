"""``gpunet train`` and ``gpunet predict`` against the same work written in Python with the
public pieces (the README's "same pieces from Python", with the job's standardization): over a
covering sample of the options, the saved weights, the history and the test figures agree bit
for bit, and predict's file holds what ``model(x)`` gives on the same rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

import gpunet
import gpunet.nn.functional as F
from gpunet import amp, nn, optim
from gpunet.cli import main
from gpunet.data import DataLoader, Dataset, load_digits, split
from gpunet.job import strict
from gpunet.train import evaluate, fit
from tests.covering import covering

AXES = {
    "data": ("csv-classify", "npz-classify", "csv-regress"),
    "hidden": ((8,), (6, 5)),
    "activation": ("relu", "gelu", "sigmoid", "elu"),  # fused and unfused (nn tests: all)
    "optimizer": ("adam", "adamw", "sgd"),
    "weight_decay": (0.0, 0.01),
    "batch_size": (7, 32),
    "precision": ("fp32", "bf16", "fp16", "tf32"),
    "dropout": (0.0, 0.3),
    "capture": (True, False),
    "seed": (0, 3),
    "patience": (1, 5),
}
CASES = covering(AXES, lambda case: True, seed=1)
# the bundled digits (features scaled by 1/16 in training, predict reading the raw values)
CASES.append({**CASES[0], "data": "digits", "precision": "fp32", "batch_size": 128})


def _data(folder: Path, kind: str) -> Path:
    """Three blobs in 4 features (labels 2/5/9), or a noisy linear target: 60 rows."""
    if kind == "digits":  # (trained on the bundled copy; this file is for predict)
        digits = np.load(Path(gpunet.__file__).parent / "_data" / "digits.npz")
        np.savez(folder / "digits.npz", x=digits["images"], y=digits["labels"])
        return folder / "digits.npz"
    r = np.random.default_rng(7)
    k = r.integers(0, 3, 60)
    x = np.round(r.standard_normal((60, 4)) + k[:, None] * 1.5, 4)
    if kind == "npz-classify":
        path = folder / "blobs.npz"
        np.savez(path, x=x, y=np.array([2, 5, 9])[k])
        return path
    y = np.array([2, 5, 9])[k] if kind == "csv-classify" else np.round(x @ [1, -2, 0.5, 3], 4)
    path = folder / f"{kind}.csv"
    rows = [",".join(map(str, [*row, t])) for row, t in zip(x, y)]
    path.write_text("a,b,c,d,target\n" + "\n".join(rows) + "\n")
    return path


def _cli_args(case: dict[str, Any], data: Path, out: Path) -> list[str]:
    args = ["train", "--hidden", ",".join(map(str, case["hidden"]))]
    args += [] if case["data"] == "digits" else ["--data", str(data)]
    for name in ("activation", "optimizer", "weight_decay", "batch_size", "precision"):
        args += [f"--{name.replace('_', '-')}", str(case[name])]
    args += ["--dropout", str(case["dropout"]), "--seed", str(case["seed"]), "--lr", "0.01"]
    args += ["--patience", str(case["patience"]), "--epochs", "3", "--device", "cpu"]
    args += ["--no-progress", "--out", str(out)] + ([] if case["capture"] else ["--no-capture"])
    return args


def _twin(case: dict[str, Any], data: Path) -> dict[str, Any]:
    """The run in Python: the job's split, standardization, model, optimizer and fit."""
    seed, regress = case["seed"], case["data"] == "csv-regress"
    gpunet.manual_seed(seed)
    if case["data"] == "digits":
        ds = load_digits()
    elif data.suffix == ".npz":
        ds = Dataset.from_npz(data)
    else:
        ds = Dataset.from_csv(data, target=-1)
    if regress:
        ds = Dataset(ds.x, ds.y.astype(np.float64), None, ds.features, ds.target)
    else:
        ds = ds.as_classes()
    parts = list(split(ds, val=0.15, test=0.15, seed=seed))
    mean, std = parts[0].x.mean(axis=0), parts[0].x.std(axis=0)
    std[std < 1e-6] = 1.0
    for part in parts:
        part.x = ((part.x - mean) / std).astype(np.float32)
    y_mean, y_std = float(parts[0].y.mean()), float(parts[0].y.std())
    if regress:
        for part in parts:
            part.y = ((part.y - y_mean) / y_std).astype(np.float32)
    sizes = [ds.x.shape[1], *case["hidden"], 1 if regress else len(ds.classes)]
    model = nn.MLP(sizes, case["activation"], dropout=case["dropout"], device="cpu")
    opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[case["optimizer"]]
    extra = {"momentum": 0.9} if case["optimizer"] == "sgd" else {}
    opt = opt_cls(model.parameters(), lr=0.01, weight_decay=case["weight_decay"], **extra)
    loader = DataLoader(parts[0], case["batch_size"], shuffle=True, device="cpu", seed=seed)
    val = DataLoader(parts[1], 512, device="cpu", pad=False)

    def loss(z: gpunet.Tensor, y: gpunet.Tensor) -> gpunet.Tensor:
        if regress:
            return F.mse_loss(z.reshape(-1), y)
        return F.cross_entropy(z, y, label_smoothing=0.1)

    low = {"bf16": gpunet.bfloat16, "fp16": gpunet.float16}.get(case["precision"])
    scaler = amp.GradScaler() if case["precision"] == "fp16" else None
    history = fit(
        model, loss, opt, loader, val, epochs=3, early_stopping=case["patience"],
        progress=False, capture=case["capture"], autocast=low, scaler=scaler,
    )  # fmt: skip
    if regress:
        model.eval()
        with gpunet.no_grad():
            pred = model(gpunet.tensor(parts[2].x)).numpy()[:, 0].astype(np.float64)
        truth = parts[2].y.astype(np.float64) * y_std + y_mean
        err = pred * y_std + y_mean - truth
        figures = {"test_rmse": float(np.sqrt(np.mean(err**2)))}
        figures["test_mae"] = float(np.mean(np.abs(err)))
        figures["test_r2"] = 1 - float(np.sum(err**2)) / float(np.sum((truth - truth.mean()) ** 2))
    else:
        test_loss, acc = evaluate(model, F.cross_entropy, DataLoader(parts[2], 512))
        figures = {"test_loss": test_loss, "test_accuracy": acc}
    stats = {"ds": ds, "mean": mean, "std": std, "target": (y_mean, y_std)}
    return {"model": model, "history": history, "figures": figures, **stats}


def _same_history(saved: dict[str, Any], history: Any) -> None:
    want = strict(history.as_dict())  # (metrics.json is strict JSON: NaN written as null)
    for key in want.keys() - {"samples_per_second"}:  # (a rate: the only timing)
        assert saved[key] == want[key], key


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_train_and_predict_equal_the_same_work_in_python(
    case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _data(tmp_path, case["data"])
    assert main(_cli_args(case, data, tmp_path / "runs")) == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    twin = _twin(case, data)
    saved = safetensors.numpy.load_file(str(run / "model.safetensors"))
    weights = {k.removeprefix("model."): v for k, v in saved.items()}
    state = {k: v.numpy() for k, v in twin["model"].state_dict().items()}
    assert weights.keys() == state.keys()
    for k in state:  # the best epoch's weights, bit for bit
        np.testing.assert_array_equal(weights[k], state[k], err_msg=k, strict=True)
    metrics = json.loads((run / "metrics.json").read_text())
    _same_history(metrics["history"], twin["history"])
    for key, value in twin["figures"].items():
        assert metrics[key] == value, key

    # predict on every row of the file against model(x) on the same rows, standardized
    assert main(["predict", str(run), "--data", str(data), "--device", "cpu"]) == 0
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    model, ds = twin["model"].eval(), twin["ds"]
    x = ((ds.x - twin["mean"]) / twin["std"]).astype(np.float32)
    with gpunet.no_grad():
        z = model(gpunet.tensor(x)).numpy()
    if case["data"] == "csv-regress":
        y_mean, y_std = twin["target"]
        want = [repr(float(v)) for v in z[:, 0].astype(np.float64) * y_std + y_mean]
        assert [r[0] for r in rows] == want
    else:
        p = np.exp(z.astype(np.float64) - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        labels = np.asarray(ds.classes)[p.argmax(1)]
        assert [r[0] for r in rows] == [str(v) for v in labels]
        assert [r[1:] for r in rows] == [[f"{q:.6g}" for q in row] for row in p]


RESUME_CASES = [  # a cut run resumed: its own options, then the same files as a straight run
    {**CASES[0], "data": "csv-regress", "optimizer": "sgd", "precision": "fp16", "dropout": 0.3},
    {**CASES[1], "data": "npz-classify", "optimizer": "adamw", "precision": "bf16", "patience": 5},
]


@pytest.mark.parametrize("case", RESUME_CASES, ids=lambda c: f"{c['data']}-{c['precision']}")
def test_resume_after_a_cut_equals_the_straight_run(
    case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _data(tmp_path, case["data"])
    assert main(_cli_args(case, data, tmp_path / "straight")) == 0
    name = "mse_loss" if case["data"] == "csv-regress" else "cross_entropy"
    real, calls = getattr(F, name), [0]

    def cut(*args: Any, **kwargs: Any) -> gpunet.Tensor:
        if gpunet.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 2 * -(-44 // case["batch_size"]) + 1:  # epoch 3's first step
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(F, name, cut)
        # cut eagerly (a replayed step calls no Python), resumed as the case says
        assert main(_cli_args({**case, "capture": False}, data, tmp_path / "cut")) == 130
    (straight,) = (tmp_path / "straight").iterdir()
    (run,) = (tmp_path / "cut").iterdir()
    resume = ["train", "--resume", str(run), "--no-progress"]
    assert main(resume + ([] if case["capture"] else ["--no-capture"])) == 0
    want = safetensors.numpy.load_file(str(straight / "model.safetensors"))
    got = safetensors.numpy.load_file(str(run / "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k, strict=True)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (straight, run))
    for key in a.keys() - {"seconds", "history", "data"}:
        assert a[key] == b[key], key
    # (the warnings are the run's log: the resumed one says it was interrupted, truly)
    for key in a["history"].keys() - {"samples_per_second", "warnings"}:
        assert a["history"][key] == b["history"][key], key
    assert b["history"]["warnings"][0] == "interrupted after 2 complete epochs"
    assert (run / "curves.png").read_bytes() == (straight / "curves.png").read_bytes()


@pytest.mark.parametrize("task", [["--task", "regress"], []])
def test_label_smoothing_given_for_a_regression_is_refused(
    task: list[str], tmp_path: Path, capsys: Any
) -> None:
    """It was ignored without a word (a regression has no labels to smooth)."""
    data = _data(tmp_path, "csv-regress" if not task else "csv-classify")
    args = ["train", "--data", str(data), *task, "--label-smoothing", "0.2"]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--label-smoothing is for classification" in err, err
    assert not (tmp_path / "runs").exists()  # (refused before the run folder is made)


def test_a_failed_tf32_run_leaves_tf32_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A run that ended in an error inside fit (here a DataError) left backends.allow_tf32
    on in the calling process: every later CUDA GEMM in it ran in TF32."""
    import gpunet.job
    from gpunet import backends
    from gpunet.data import DataError

    def fails(*args: Any, **kwargs: Any) -> None:
        raise DataError("a batch it cannot use")

    monkeypatch.setattr(gpunet.job, "fit", fails)
    data = _data(tmp_path, "csv-classify")
    args = ["train", "--data", str(data), "--precision", "tf32", "--out", str(tmp_path)]
    assert backends.allow_tf32 is False
    assert main([*args, "--device", "cpu", "--no-progress"]) == 2
    assert backends.allow_tf32 is False
