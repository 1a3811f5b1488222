"""The gpunet command: the training job on a tiny budget, info, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpunet.backend import probe_cuda
from gpunet.cli import main

FAST = ["--epochs", "5", "--hidden", "64", "--lr", "3e-3", "--no-progress", "--device", "cpu"]


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
