"""The gpunet command: the training job on a tiny budget, info, and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpunet
from gpunet.backend import probe_cuda
from gpunet.cli import main

FAST = ["--epochs", "5", "--hidden", "64", "--lr", "3e-3", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without --out goes to ./runs: here, not into the checkout."""
    monkeypatch.chdir(tmp_path)


def test_info_prints_versions_and_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "why" in out and "default_device" in out


def test_train_on_the_digits_saves_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["train", *FAST, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.85 and metrics["epochs"] == 5
    assert len(metrics["history"]["val_loss"]) == 5
    want = {"world_size": 1, "engine": "local", "samples_per_step_per_rank": 64}
    assert metrics["ranks"] == {**want, "samples_per_step": 64}  # (mpiexec: test_data_parallel)
    assert (run / "model.safetensors").stat().st_size > 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_the_main_jobs_model_trains(tmp_path: Path, optimizer: str) -> None:
    """`make train`'s model as it is (64-256-128-10: 50,826 parameters, one flat buffer) with
    each optimizer, for two epochs: what the `--hidden 64` runs above do not reach."""
    args = ["train", "--epochs", "2", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    lr = "0.05" if optimizer == "sgd" else "1e-3"
    assert main([*args, "--optimizer", optimizer, "--lr", lr]) == 0
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["test_accuracy"] > 0.5


def test_train_on_a_users_csv(tmp_path: Path) -> None:
    r = np.random.default_rng(0)
    y = r.integers(0, 2, 200)
    x = r.standard_normal((200, 3)) + y[:, None] * 2.0
    rows = "\n".join(",".join(map(str, (*a, b))) for a, b in zip(x, y))
    (tmp_path / "d.csv").write_text("a,b,c,label\n" + rows + "\n")
    args = ["train", *FAST, "--data", str(tmp_path / "d.csv"), "--target", "label"]
    assert main([*args, "--out", str(tmp_path / "runs"), "--optimizer", "sgd"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nowhere.npz"], "cannot read"),
        (["--data", "data.txt"], ".npz or .csv"),
        (["--hidden", "a,b"], "--hidden"),
        (["--optimizer", "lbfgs"], "invalid choice"),
        (["--epochs", "many"], "invalid int"),
        (["--label-smoothing", "1.5"], "--label-smoothing must be in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["train", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # argparse adds a usage line


@pytest.mark.skipif(probe_cuda().available, reason="a CUDA device is present here")
def test_an_unusable_device_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--epochs", "1", "--device", "cuda:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpunet train: error:") and "not usable" in err


# ---------------------------------------------------------------- users' own files and habits
def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(args) -> (exit code, stdout, stderr), argparse's SystemExit included."""
    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _csv(path: Path, header: str, rows: list[tuple]) -> Path:
    path.write_text(header + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _blobs_csv(path: Path, labels: tuple = (0, 1), n: int = 120, header: bool = True) -> Path:
    """Two separable blobs in 3 features; the last column holds the given label values."""
    r = np.random.default_rng(0)
    k = r.integers(0, len(labels), n)
    x = r.standard_normal((n, 3)) + k[:, None] * 3.0
    rows = [(*np.round(a, 4), labels[c]) for a, c in zip(x, k)]
    return _csv(path, "a,b,c,label\n" if header else "", rows)


def _metrics(out: Path) -> dict:
    (run,) = out.iterdir()
    text = (run / "metrics.json").read_text()
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def _one_line_exit_2(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "test accuracy" not in out  # refused before training
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", "0"], ["--epochs must be >= 1", "0"]),
        (["--epochs", "-1"], ["--epochs must be >= 1"]),
        (["--patience", "0"], ["--patience must be >= 1"]),
        (["--patience", "-3"], ["--patience must be >= 1"]),
        (["--lr", "nan"], ["--lr must be a finite number > 0", "nan"]),
        (["--lr", "inf"], ["--lr must be a finite number > 0", "inf"]),
        (["--lr", "0"], ["--lr must be"]),
        (["--lr", "-0.1"], ["--lr must be"]),
        (["--weight-decay", "-1"], ["--weight-decay"]),
        (["--dropout", "1"], ["--dropout must be in [0, 1)"]),
        (["--batch-size", "0"], ["--batch-size must be >= 1"]),
        (["--hidden", "10,,10"], ["--hidden", "'10,,10'"]),
        (["--hidden", "10,0"], ["--hidden"]),
        (["--hidden", ""], ["--hidden"]),
        (["--task", "cluster"], ["invalid choice"]),
        (["--target", "label"], ["no --data was given"]),
        (["--seed", "-1"], ["--seed must be >= 0"]),
        (["--out", ""], ["--out is empty"]),
        (["--hidden", "1000000000000", "--out", "/tmp/gpunet-never"], ["not enough memory"]),
    ],
)
def test_meaningless_numbers_are_refused(
    args: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_exit_2(*_run(["train", *args], capsys), *words)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == "gpunet 0.1.0"


@pytest.mark.parametrize("target, words", [("3", ["target column 3", "3 columns"]), ("-4", ["-4"])])
def test_a_target_outside_the_table_is_refused(
    tmp_path: Path, target: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to wrap (target % ncols): column 3 of 3 became column 0, the ages."""
    data = _csv(tmp_path / "d.csv", "age,income,label\n", [(30 + i, i, i % 2) for i in range(40)])
    args = ["train", *FAST, "--data", str(data), "--target", target, "--out", str(tmp_path)]
    _one_line_exit_2(*_run(args, capsys), *words)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD_FILES = {
    "nan feature": ("a,b,label\n1,2,0\nnan,3,1\n4,inf,0\n" + "1,2,1\n" * 20, ["'a', 'b'", "3, 4"]),
    "header only": ("a,b,label\n", ["header but no data rows"]),
    "only a label": ("label\n0\n1\n0\n1\n", ["no feature columns"]),
    "one row": ("a,b,label\n1,2,0\n", ["1 rows", "1/0/0"]),
    "five rows": ("a,b,label\n" + "1,2,0\n3,4,1\n" * 2 + "5,6,0\n", ["5 rows", "need"]),
    "nan label": ("a,b,label\n1,2,0\n3,4,nan\n", ["line 3", "nan"]),
    "empty label": ("a,b,label\n1,2,0\n3,4,\n", ["line 3", "empty"]),
    "short row": ("a,b,label\n1,2,0\n3,4\n5,6,1\n", ["line 3", "2 values", "3"]),
    "text feature": ("a,city,label\n1,Paris,0\n", ["line 2", "'city'", "'Paris'"]),
    "one class": ("a,b,label\n" + "1,2,7\n" * 30, ["one class", "7"]),
    "empty": ("", ["empty"]),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", ["UTF-8"]),
    "ages": ("a,age\n" + "".join(f"{i % 7},{i}\n" for i in range(80)), ["80 distinct", "--task"]),
    "label not a number": ("a,label\n" + "1,0\n" * 10 + "2,NA\n", ["line 12", "'NA'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_data_it_cannot_use_is_one_line_and_exit_2(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text, words = BAD_FILES[case]
    data = _write(tmp_path / "d.csv", text)
    args = ["train", *FAST, "--data", str(data), "--out", str(tmp_path / "runs")]
    _one_line_exit_2(*_run(args, capsys), *words)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_numeric_header_is_a_header_when_the_target_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`2019,2020,2021` as a header: `--target 2021` is past the 3 columns, so it names a
    column, and the first row is the header, never a data row."""
    rows = [(i % 5, i % 3, i % 2) for i in range(60)]
    data = _csv(tmp_path / "n.csv", "2019,2020,2021\n", rows)
    args = ["train", *FAST, "--data", str(data), "--out", str(tmp_path / "r")]
    code, out, err = _run([*args, "--target", "2021"], capsys)
    parts = re.search(r"(\d+)/(\d+)/(\d+) train/val/test", out)
    assert code == 0 and parts is not None, err
    assert sum(map(int, parts.groups())) == 60  # not 61: the header is not a row
    code, out, err = _run([*args, "--target", "x"], capsys)
    _one_line_exit_2(code, out, err, "no column named 'x'", "['2019', '2020', '2021']")


@pytest.mark.parametrize(
    "labels, classes",
    [((-1, 1), [-1, 1]), ((3, 7), [3, 7]), ((0, 1000000), [0, 1000000]), (("cat", "dog"), None)],
)
def test_labels_as_users_have_them(
    tmp_path: Path, labels: tuple, classes: list | None, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _blobs_csv(tmp_path / "d.csv", labels)
    args = ["train", *FAST, "--data", str(data), "--target", "label", "--out", str(tmp_path / "r")]
    code, _out, err = _run(args, capsys)
    assert code == 0, err
    metrics = _metrics(tmp_path / "r")
    assert metrics["sizes"][-1] == 2 and metrics["test_accuracy"] > 0.9  # not 1,000,001 classes
    (run,) = (tmp_path / "r").iterdir()
    prep = gpunet.load(run / "model.safetensors")["preprocess"]
    assert prep["classes"] == (classes or list(labels)) and prep["task"] == "classify"


def test_a_bom_csv_finds_its_label_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    plain = _blobs_csv(tmp_path / "d.csv")
    bom = _write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + plain.read_bytes())
    code, _, err = _run(["train", *FAST, "--data", str(bom), "--target", "label"], capsys)
    assert code == 0, err


def test_semicolons_and_crlf_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text = _blobs_csv(tmp_path / "d.csv").read_text().replace(",", ";").replace("\n", "\r\n")
    data = _write(tmp_path / "semi.csv", text)
    code, _, err = _run(["train", *FAST, "--data", str(data), "--target", "label"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("kind", ["onehot", "strings", "column"])
def test_npz_targets_one_hot_text_or_a_column(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = np.random.default_rng(0)
    k = r.integers(0, 3, 150)
    x = r.standard_normal((150, 4)) + k[:, None] * 3.0
    y = {"onehot": np.eye(3)[k], "strings": np.array(["a", "b", "c"])[k], "column": k[:, None]}
    np.savez(tmp_path / "d.npz", x=x, y=y[kind])
    args = ["train", *FAST, "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "r")]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    assert _metrics(tmp_path / "r")["sizes"][-1] == 3


def test_npz_that_cannot_be_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "o.npz", x=np.zeros((10, 2)), y=np.array([None] * 10, dtype=object))
    code, out, err = _run(["train", *FAST, "--data", str(tmp_path / "o.npz")], capsys)
    _one_line_exit_2(code, out, err, "dtype=str")
    np.savez(tmp_path / "s.npz", x=np.zeros((10, 2)), y=np.zeros((10, 3)))
    code, out, err = _run(["train", *FAST, "--data", str(tmp_path / "s.npz")], capsys)
    _one_line_exit_2(code, out, err, "not one-hot")
    x = np.ones((40, 2))
    x[5, 1] = np.nan
    np.savez(tmp_path / "n.npz", x=x, y=np.arange(40) % 2)
    code, out, err = _run(["train", *FAST, "--data", str(tmp_path / "n.npz")], capsys)
    _one_line_exit_2(code, out, err, "NaN or inf", "column(s) 1", "row(s) 5")
    code, out, err = _run(
        ["train", *FAST, "--data", str(tmp_path / "n.npz"), "--target", "y"], capsys
    )
    _one_line_exit_2(code, out, err, "--target")


@pytest.mark.parametrize("where", ["a file", "a folder", "missing"])
def test_data_that_is_not_a_file(tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]):
    path = {"a file": tmp_path / "d.tsv", "a folder": tmp_path, "missing": tmp_path / "no.csv"}
    (tmp_path / "d.tsv").write_text("1\t2\n")
    data = str(path[where]) + ("/x.csv" if where == "a folder" else "")
    if where == "a folder":
        (tmp_path / "x.csv").mkdir()
    code, out, err = _run(["train", *FAST, "--data", data], capsys)
    _one_line_exit_2(
        code,
        out,
        err,
        {"a file": ".npz or .csv", "a folder": "a folder"}.get(where, "no such file"),
    )


def test_a_bad_out_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("")
    code, out, err = _run(["train", *FAST, "--out", str(tmp_path / "file")], capsys)
    _one_line_exit_2(code, out, err, "is a file")
    code, out, err = _run(["train", *FAST, "--out", str(tmp_path / "file" / "runs")], capsys)
    _one_line_exit_2(code, out, err, "cannot make a run folder")

    def refuse(self: Path, data: bytes) -> int:  # an unwritable folder (tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    code, out, err = _run(["train", *FAST, "--out", str(tmp_path / "ro")], capsys)
    _one_line_exit_2(code, out, err, "cannot write", "Permission denied")


def test_a_programming_error_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only UsageError, DataError and CheckpointError are one line; a TypeError is a bug."""
    import gpunet.job

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug inside train")

    monkeypatch.setattr(gpunet.job, "fit", broken)
    with pytest.raises(TypeError, match="a bug inside train"):
        main(["train", *FAST, "--out", str(tmp_path)])


def test_regression_from_a_continuous_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    r = np.random.default_rng(1)
    x = r.standard_normal((300, 3))
    price = 1000.0 + 300.0 * x[:, 0] - 100.0 * x[:, 1] + r.standard_normal(300)
    data = _csv(tmp_path / "d.csv", "a,b,c,price\n", [(*a, p) for a, p in zip(x, price)])
    args = ["train", *FAST, "--epochs", "60", "--data", str(data), "--target", "price"]
    code, out, err = _run([*args, "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "regression" in out and "test RMSE" in out, err
    m = _metrics(tmp_path / "r")
    assert m["task"] == "regress" and m["sizes"][-1] == 1
    assert m["test_r2"] > 0.9 and 0 < m["test_mae"] <= m["test_rmse"] < 100  # in dollars
    # an integer target with many values is refused until the task is given
    ages = _csv(tmp_path / "a.csv", "a,age\n", [(i % 7, i) for i in range(200)])
    code, out, err = _run(["train", *FAST, "--data", str(ages), "--target", "age"], capsys)
    _one_line_exit_2(code, out, err, "--task classify or --task regress")
    code, out, err = _run(["train", *FAST, "--data", str(ages), "--task", "regress"], capsys)
    assert code == 0 and "test RMSE" in out, err
    flat = _csv(tmp_path / "f.csv", "a,y\n", [(i, 2.5) for i in range(50)])
    code, out, err = _run(["train", *FAST, "--data", str(flat), "--task", "regress"], capsys)
    _one_line_exit_2(code, out, err, "constant (2.5)")
    text = _csv(tmp_path / "t.csv", "a,l\n", [(i, "ab"[i % 2]) for i in range(50)])
    code, out, err = _run(["train", *FAST, "--data", str(text), "--task", "regress"], capsys)
    _one_line_exit_2(code, out, err, "numeric target")


def test_a_diverged_run_restores_the_best_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's run: test accuracy 0.1004 (loss inf) was saved; epoch 1 had 0.535."""
    args = ["train", "--activation", "elu", "--optimizer", "sgd", "--lr", "0.6", "--epochs", "40"]
    code, out, err = _run(
        [*args, "--no-progress", "--device", "cpu", "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    assert "diverged" in out and "restored the best" in out
    warned = [r.getMessage() for r in caplog.records if "gradient in" in r.getMessage()]
    assert warned and len(warned) == len(set(warned))  # once per parameter per epoch
    assert not any("epoch 0" in w for w in warned)  # epochs count from 1, as everywhere else
    assert "gradient in" not in out  # not printed a second time at the end
    m = _metrics(tmp_path)
    assert m["diverged"] and m["test_accuracy"] > 0.4 and math.isfinite(m["test_loss"])
    assert m["history"]["val_accuracy"][m["best_epoch"] - 1] > 0.4


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C arrives in training step `step` (counted from 1, evaluation not counted): in
    the loss function, so the run needs --no-capture (a replayed step calls no Python)."""
    import gpunet.nn.functional as F

    real, calls = F.cross_entropy, [0]

    def loss(out: gpunet.Tensor, y: gpunet.Tensor, **kw: object) -> gpunet.Tensor:
        if gpunet.is_grad_enabled():
            calls[0] += 1
            if calls[0] == step:
                raise KeyboardInterrupt
        return real(out, y, **kw)

    monkeypatch.setattr(F, "cross_entropy", loss)


RESUME = ["--epochs", "4", "--hidden", "32", "--no-progress", "--device", "cpu", "--dropout", "0.2"]


def test_ctrl_c_saves_the_run_and_resume_continues_it_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout on: the generator's state is in the checkpoint, so the masks match too."""
    code, _, err = _run(["train", *RESUME, "--out", str(tmp_path / "straight")], capsys)
    assert code == 0, err
    (straight,) = (tmp_path / "straight").iterdir()

    with monkeypatch.context() as m:
        _interrupt_at(m, step=20 * 2 + 5)  # digits: 20 steps an epoch; in epoch 3
        # cut eagerly, resumed captured: the same weights as the straight captured run
        args = ["train", *RESUME, "--no-capture", "--out", str(tmp_path / "cut")]
        code, out, err = _run(args, capsys)
    (cut,) = (tmp_path / "cut").iterdir()
    assert code == 130 and "Traceback" not in err
    assert out.splitlines()[-1].startswith("interrupted after 2 epochs: saved the best weights")
    assert f"gpunet train --resume {cut}" in out
    metrics = _metrics(tmp_path / "cut")
    assert metrics["interrupted"] and metrics["epochs"] == 2 and metrics["test_accuracy"] > 0.5
    assert (cut / "curves.png").exists() and (cut / "model.safetensors").exists()

    code, out, err = _run(["train", "--resume", str(cut), "--no-progress"], capsys)
    assert code == 0 and "resumed after epoch 2" in out, err
    want, got = _weights(straight), _weights(cut)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (straight, cut))
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]
    code, out, err = _run(["train", "--resume", str(cut)], capsys)
    _one_line_exit_2(code, out, err, "finished")
    code, out, err = _run(["train", "--resume", str(cut), "--no-capture"], capsys)
    _one_line_exit_2(code, out, err, "finished")  # (how to run: allowed with --resume)
    code, out, err = _run(["train", "--resume", str(cut), "--epochs", "9", "--lr", "1"], capsys)
    _one_line_exit_2(code, out, err, "its own options; drop --lr, --epochs")
    code, out, err = _run(["train", "--resume", str(tmp_path)], capsys)
    _one_line_exit_2(code, out, err, "no checkpoint.safetensors")


def _weights(run: Path) -> dict[str, np.ndarray]:
    import safetensors.numpy

    return safetensors.numpy.load_file(str(run / "model.safetensors"))


def test_ctrl_c_in_the_first_epoch_saves_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupt_at(monkeypatch, step=3)
    code, out, err = _run(["train", *FAST, "--no-capture", "--out", str(tmp_path)], capsys)
    assert code == 130 and "nothing saved" in out and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigint_in_a_real_process_exits_130_with_the_run_saved(tmp_path: Path) -> None:
    """The terminal's Ctrl-C: SIGINT once training has started; the step finishes first."""
    cmd = [sys.executable, "-c", "import sys; from gpunet.cli import main; sys.exit(main())"]
    args = ["train", "--epochs", "1000", "--patience", "1000", "--hidden", "32", "--device", "cpu"]
    env = {**os.environ, "GPUNET_CHECKPOINT_SECONDS": "0"}  # a checkpoint every epoch
    proc = subprocess.Popen(
        [*cmd, *args, "--no-progress", "--out", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the header line: training starts now
    (run,) = tmp_path.iterdir()
    while not (run / "checkpoint.safetensors").exists():  # let one epoch end
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert out.strip().startswith("interrupted after") and str(run) in out
    assert json.loads((run / "metrics.json").read_text())["interrupted"] is True


def test_resume_refuses_data_that_changed_or_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _blobs_csv(tmp_path / "d.csv", n=400)
    with monkeypatch.context() as m:
        _interrupt_at(m, step=8)  # 280 training rows, 64 a batch: 5 steps an epoch
        args = ["train", *FAST, "--no-capture", "--data", str(data), "--out", str(tmp_path / "r")]
        assert _run(args, capsys)[0] == 130
    (run,) = (tmp_path / "r").iterdir()
    monkeypatch.chdir(run)  # the run keeps the data's absolute path
    data.write_text(data.read_text() + "1,2,3,0\n")
    _one_line_exit_2(*_run(["train", "--resume", str(run)], capsys), "changed since the run")
    data.unlink()
    _one_line_exit_2(*_run(["train", "--resume", str(run)], capsys), "is not there any more")


def test_resume_of_a_run_that_stopped_early_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _blobs_csv(tmp_path / "d.csv")
    args = ["train", *FAST, "--data", str(data), "--epochs", "200", "--patience", "1"]
    assert _run([*args, "--lr", "0.5", "--out", str(tmp_path / "r")], capsys)[0] == 0
    assert _metrics(tmp_path / "r")["stopped_early"]
    (run,) = (tmp_path / "r").iterdir()
    _one_line_exit_2(*_run(["train", "--resume", str(run)], capsys), "finished (stopped early")


def test_precisions_reach_fp32s_accuracy_on_the_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 steps (10 epochs of 20 batches) from one seed: bf16 and fp16 (with the loss
    scaler) within 1 point of fp32's test accuracy; the CPU says what it does with them."""
    acc = {}
    for precision in ("fp32", "bf16", "fp16", "tf32"):
        out = tmp_path / precision
        args = ["--epochs", "10", "--hidden", "64", "--lr", "3e-3", "--no-progress"]
        assert (
            main(["train", *args, "--device", "cpu", "--precision", precision, "--out", str(out)])
            == 0
        )
        printed = capsys.readouterr().out
        (run,) = out.iterdir()
        metrics = json.loads((run / "metrics.json").read_text())
        assert len(metrics["history"]["train_loss"]) == 10
        acc[precision] = metrics["test_accuracy"]
        if precision != "fp32":
            assert f"--precision {precision}: " in printed and "float32" in printed
    assert acc["fp32"] > 0.9
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.01 and abs(acc["fp16"] - acc["fp32"]) <= 0.01
    assert acc["tf32"] == acc["fp32"]  # (a no-op on the CPU)
    assert gpunet.backends.allow_tf32 is False  # (the run's setting does not outlive it)
    with pytest.raises(SystemExit) as e:
        main(["train", "--precision", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_usage_error_from_the_job_is_one_line_under_python_m(tmp_path: Path) -> None:
    """``python -m gpunet.cli`` (what ``--nproc`` starts on each rank) loads cli.py as
    ``__main__``: a UsageError raised in job.py (an unusable --resume) was gpunet.cli's
    class, not the one main catches, and came out as a traceback with exit 1."""
    done = subprocess.run(
        [sys.executable, "-m", "gpunet.cli", "train", "--resume", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GPUNET_DEVICE": "cpu"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "gpunet train: error: --resume" in done.stderr


def test_resume_of_an_fp16_run_continues_the_loss_scale_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--precision fp16: the GradScaler's scale and clean-step count are in the checkpoint, so
    a resumed run skips and scales the steps an uninterrupted one does (a fresh scaler at
    2**16 gave other weights). The scale grows every 7 clean steps here, so it moves."""
    import functools

    monkeypatch.setattr(
        gpunet.amp, "GradScaler", functools.partial(gpunet.amp.GradScaler, growth_interval=7)
    )
    fp16 = [*RESUME, "--precision", "fp16", "--no-capture"]  # (Ctrl-C comes from the loss)
    code, _, err = _run(["train", *fp16, "--out", str(tmp_path / "straight")], capsys)
    assert code == 0, err
    (straight,) = (tmp_path / "straight").iterdir()
    with monkeypatch.context() as m:
        _interrupt_at(m, step=20 * 2 + 5)
        code, out, err = _run(["train", *fp16, "--out", str(tmp_path / "cut")], capsys)
    assert code == 130, err
    (cut,) = (tmp_path / "cut").iterdir()
    code, out, err = _run(["train", "--resume", str(cut), "--no-progress"], capsys)
    assert code == 0 and "resumed after epoch 2" in out, err
    want, got = _weights(straight), _weights(cut)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", "0"], ["--epochs must be >= 1"]),
        (["--data", "missing.csv"], ["cannot read --data", "no such file"]),
        (["--data", "x.npz", "--target", "2"], ["--target names a CSV column"]),
        (["--resume", "nowhere"], ["no checkpoint.safetensors"]),
        (["--out", "x.npz"], ["--out x.npz is a file"]),
        (["--data", "one.csv"], ["one.csv has a header but no data rows"]),
    ],
)
def test_nproc_refuses_a_misuse_before_it_starts_mpiexec(
    args: list[str],
    words: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--nproc 2`` with a bad option printed the error once per rank (and MPI_Abort's own
    line); it is now checked before mpiexec starts: one line, exit 2, no process started."""
    (tmp_path / "x.npz").write_bytes(b"")
    (tmp_path / "one.csv").write_text("a,b,label\n")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"started {a}"))
    code, out, err = _run(["train", "--nproc", "2", *args], capsys)
    _one_line_exit_2(code, out, err, *words)


def test_resume_under_another_world_size_passes_nproc_to_mpiexec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--resume RUN --nproc 2`` (a run of one process continued on two) is how to run, not
    what: allowed, its checkpoint checked here, the ranks started with ``--resume RUN``."""
    with monkeypatch.context() as m:
        _interrupt_at(m, step=20 + 3)  # in epoch 2
        code, _, err = _run(["train", *RESUME, "--no-capture", "--out", str(tmp_path)], capsys)
    assert code == 130, err
    (run,) = tmp_path.iterdir()
    started: list[list[str]] = []

    class Proc:
        def __init__(self, argv: list[str], env: dict[str, str]) -> None:
            started.append(argv)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Proc)
    assert main(["train", "--resume", str(run), "--nproc", "2"]) == 0
    assert started[0][-2:] == ["--resume", str(run)]


def test_nproc_on_cuda_without_a_device_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--nproc 2 --device cuda`` without a usable GPU was a traceback from init on every
    rank (exit 1), where one process says one line; now one line and exit 2 before mpiexec,
    and under mpiexec by hand init's refusal is each rank's one line."""
    import gpunet.distributed
    import gpunet.job
    from gpunet.backend import CudaProbe

    monkeypatch.setattr(gpunet.job, "probe_cuda", lambda: CudaProbe(False, "no driver here"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"started {a}"))
    code, out, err = _run(["train", "--nproc", "2", "--device", "cuda"], capsys)
    _one_line_exit_2(code, out, err, "--device cuda: no usable CUDA device (no driver here)")

    def refuse(backend: str | None = None) -> None:
        raise RuntimeError("init(backend='nccl'): no CUDA device (no driver here)")

    monkeypatch.setattr(gpunet.distributed, "init", refuse)
    code, out, err = _run(["train", "--device", "cuda", "--no-progress"], capsys)
    _one_line_exit_2(code, out, err, "init(backend='nccl'): no CUDA device")


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("GPUNET_CHECKPOINT_SECONDS", "abc", ["GPUNET_CHECKPOINT_SECONDS", "'abc'"]),
        ("GPUNET_CHECKPOINT_SECONDS", "-1", ["GPUNET_CHECKPOINT_SECONDS", "'-1'"]),
        ("GPUNET_DIST_TIMEOUT", "abc", ["GPUNET_DIST_TIMEOUT", "'abc'"]),
    ],
)
@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_a_bad_environment_variable_is_one_line_before_anything_is_made(
    name: str,
    value: str,
    words: list[str],
    nproc: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad GPUNET_CHECKPOINT_SECONDS was a float() traceback after the run folder was made
    (left empty), a bad GPUNET_DIST_TIMEOUT a traceback on every rank."""
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"started {a}"))
    code, out, err = _run(["train", *nproc, "--out", str(tmp_path / "runs"), *FAST], capsys)
    _one_line_exit_2(code, out, err, *words)
    assert not (tmp_path / "runs").exists()


def test_a_resumed_runs_seconds_count_the_epochs_before_the_cut(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run said 'after 4 epochs ... in 3 s' and wrote that to metrics.json with the
    time of its own epochs only; the checkpoint now carries the training time so far. (A
    clock that advances 100 s per read makes the sums exact to check.)"""
    import types

    import gpunet.job as job

    clock = iter(range(0, 10**6, 100))
    fake = types.SimpleNamespace(**{k: getattr(job.time, k) for k in ("monotonic", "strftime")})
    fake.perf_counter = lambda: float(next(clock))
    monkeypatch.setattr(job, "time", fake)
    with monkeypatch.context() as m:
        _interrupt_at(m, step=20 * 2 + 5)  # in epoch 3
        code, _, err = _run(["train", *RESUME, "--no-capture", "--out", str(tmp_path)], capsys)
    assert code == 130, err
    (run,) = tmp_path.iterdir()
    before = gpunet.load(run / "checkpoint.safetensors")["seconds"]
    assert before >= 100
    code, _, err = _run(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert _metrics(tmp_path)["seconds"] >= before + 100
