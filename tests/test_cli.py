"""The gpunet command."""

from __future__ import annotations

import pytest

from gpunet.backend import probe_cuda
from gpunet.cli import main


def test_info_prints_versions_and_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "why" in out and "default_device" in out


def test_train_runs_and_lowers_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--steps", "300", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    first, last = (float(v) for v in out.split("loss ")[-1].split(" (")[0].split(" -> "))
    assert last < first / 5


@pytest.mark.skipif(probe_cuda().available, reason="a CUDA device is present here")
def test_an_unusable_device_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--steps", "1", "--device", "cuda:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpunet train:") and "not usable" in err


def test_bad_options_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--steps", "many"])
    assert info.value.code == 2
