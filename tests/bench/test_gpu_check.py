"""``make gpu-check`` (gpunet/bench/gpu_check.py), here where no GPU is: the no-device exit,
and, with the device and the stage commands replaced by stand-ins, that the one report is
written with every stage's result and that no stage outlives its limit or the budget."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from gpunet.backend import CudaProbe
from gpunet.bench import gpu_check

FAKE_DEVICE = {
    "name": "NVIDIA Stand-in 80GB",
    "memory GiB": 80.0,
    "free GiB": 79.0,
    "driver": "12.4",
    "CUDA runtime": "12.4",
    "CuPy": "14.2.0",
}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_without_a_device_it_exits_at_once_with_the_reason(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(
        "gpunet.backend.probe_cuda", lambda: CudaProbe(False, "CuPy found no CUDA device")
    )
    start = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert time.perf_counter() - start < 2
    err = capsys.readouterr().err
    assert "no CUDA device, nothing checked: CuPy found no CUDA device" in err
    assert list(tmp_path.iterdir()) == []  # no report: nothing was checked


def _fake_machine(monkeypatch, stand_ins) -> None:
    monkeypatch.setattr("gpunet.backend.probe_cuda", lambda: CudaProbe(True, "1 device", 1))
    monkeypatch.setattr(gpu_check, "device_info", lambda: dict(FAKE_DEVICE))
    monkeypatch.setattr(gpu_check, "stages", lambda python, free, bench_out: stand_ins(bench_out))


def test_the_report_names_the_device_and_every_stage(monkeypatch, tmp_path, capsys):
    def stand_ins(bench_out: Path) -> list[gpu_check.Stage]:
        table = "| workload | median |\\n| --- | ---: |\\n| mlp medium | 1.23 ms |\\n"
        write = (
            f"import pathlib; pathlib.Path({str(bench_out)!r}, 'results.md').write_text('{table}')"
        )
        return [
            gpu_check.Stage("gpu tests", _python("print('12 passed in 3.1s')"), 30),
            gpu_check.Stage("kernels", _python("import sys; print('1 failed'); sys.exit(1)"), 30),
            gpu_check.Stage("cublas gemm", _python("import time; time.sleep(30)"), 1),
            gpu_check.Stage("bench", _python(write), 30),
        ]

    _fake_machine(monkeypatch, stand_ins)
    start = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path)]) == 1  # a stage failed
    assert time.perf_counter() - start < 20  # the sleeping stage was killed at its 1 s limit
    (report,) = tmp_path.iterdir()  # one file
    assert report.name.startswith("gpu-check-") and report.suffix == ".md"
    text = report.read_text()
    assert "**FAIL**" in text
    for value in FAKE_DEVICE.values():
        assert str(value) in text
    assert "| gpu tests | pass |" in text and "12 passed in 3.1s" in text
    assert "| kernels | fail |" in text and "1 failed" in text
    assert "| cublas gemm | timeout |" in text and "killed at its time limit" in text
    assert "| bench | pass |" in text and "| mlp medium | 1.23 ms |" in text
    assert f"report: {report}" in capsys.readouterr().out


def test_all_passing_stages_exit_0(monkeypatch, tmp_path):
    _fake_machine(monkeypatch, lambda out: [gpu_check.Stage("gpu tests", _python("pass"), 30)])
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "**PASS**" in next(tmp_path.iterdir()).read_text()


def test_the_budget_bounds_the_whole_run(monkeypatch, tmp_path):
    """A stage gets at most what is left of the budget; with too little left, the rest are
    reported as not run (timeout), not started."""

    def stand_ins(bench_out: Path) -> list[gpu_check.Stage]:
        sleep = _python("import time; time.sleep(60)")
        return [gpu_check.Stage(f"stage {i}", sleep, 60) for i in range(3)]

    _fake_machine(monkeypatch, stand_ins)
    start = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "7"]) == 1
    assert time.perf_counter() - start < 12
    text = next(tmp_path.iterdir()).read_text()
    assert text.count("| timeout |") == 3 and "no time left" in text


def test_the_real_stages_fit_the_budget_and_run_what_needs_a_gpu():
    stages = gpu_check.stages(sys.executable, 8 * 2**30, Path("out"))
    names = ["gpu tests", "kernels", "cublas gemm", "cuda graph", "bench"]
    assert [s.name for s in stages] == names
    assert sum(s.limit_s for s in stages) <= gpu_check.BUDGET_S <= 8 * 60
    argv = {s.name: " ".join(s.argv) for s in stages}
    assert "-m gpu" in argv["gpu tests"] and "--ignore" in argv["gpu tests"]
    assert argv["kernels"].endswith("test_kernels_gpu.py")
    assert "--gemm-only" in argv["cublas gemm"]
    assert "--precisions medium,large" in argv["cublas gemm"]
    assert "--graph-only" in argv["cuda graph"] and "test_cuda_graph.py" in argv["gpu tests"]
    assert "--device cuda" in argv["bench"] and "tiny,small,medium,large" in argv["bench"]


@pytest.mark.parametrize(
    ("free_gib", "want"),
    [(0, []), (0.05, ["tiny", "small"]), (8, ["tiny", "small", "medium", "large"])],
)
def test_mlp_sizes_that_fit(free_gib: float, want: list[str]):
    assert gpu_check.mlp_sizes_that_fit(free_gib * 2**30) == want


@pytest.mark.gpu
def test_each_precision_times_a_training_step():
    table = gpu_check.time_precisions(["small"], steps=2)
    assert table.startswith("| MLP, batch | fp32 | tf32 | bf16 | fp16 |") and "error" not in table


@pytest.mark.gpu
def test_cublas_alpha_beta_gemm_matches_numpy():
    assert "scaled GEMMs match float64 NumPy" in gpu_check.check_gemm()
