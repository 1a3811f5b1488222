"""gpunet bench: the quick run's outputs, the peers' equal work, the timers, bad options."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpunet.backend import probe_cuda
from gpunet.bench import report, run, timing
from gpunet.bench import workloads as W
from gpunet.cli import main

SMALL = W.mlp_state([20, 16, 16, 5], 8)  # three layers: every code path, fast


# ---------------------------------------------------------------------- the command
def test_quick_run_prints_the_table_and_writes_json_md_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["bench", "--quick", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x floor" in text and "gpunet/this" in text and "GEMMs only" in text
    assert "mlp tiny" in text and "relu fwd+bwd" in text and "matmul" in text

    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("gpunet bench --quick")
    assert {"versions", "blas", "machine", "rows", "config", "skipped"} <= set(data)
    assert data["skipped"] == []  # numpy and gpunet run everywhere
    assert data["versions"]["numpy"] == np.__version__ and data["machine"]["cpu"]
    assert data["machine"]["cores"] >= 1 and "OPENBLAS_CORETYPE" in data["machine"]["env"]
    rows = data["rows"]
    groups = {(r["workload"], r["size"]) for r in rows}
    assert len(groups) == len(W.OPS) * 2 + 2  # two op sizes, two MLP sizes
    for r in rows:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["median_s"] > 0, r
        assert r["check"] == "ok", r
        if r["framework"] in ("gemm-floor", "numpy") and r["label"] != "numpy (hand-written)":
            assert r["ratios"]["x_floor"] == pytest.approx(1.0)
        if r["framework"] == "gpunet":
            assert r["ratios"]["gpunet_over"] == pytest.approx(1.0)
    models = [r["modelled_H100_s"] for r in rows if r["framework"] == "gpunet"]
    if importlib.util.find_spec("gpunet.profiler") is not None:  # the roofline column
        assert any(m and m > 0 for m in models), models
    assert all(
        r["modelled_H100_s"] is None for r in rows if not r["framework"].startswith("gpunet")
    )
    for way in ("gpunet-in-backward", "gpunet-captured"):  # (captured: priced at a replay)
        ms = [r["modelled_H100_s"] for r in rows if r["framework"] == way]
        assert ms and all(m and m > 0 for m in ms), (way, ms)
    step = next(r for r in rows if r["workload"] == "mlp tiny" and r["framework"] == "gpunet")
    floor = next(r for r in rows if r["workload"] == "mlp tiny" and r["framework"] == "gemm-floor")
    assert step["ratios"]["x_floor"] == pytest.approx(step["median_s"] / floor["median_s"])

    md = (out / "results.md").read_text()
    assert "| workload | size |" in md and "gpunet bench --quick" in md
    # the step in each precision, modelled (the same numbers as the profiler's, exactly)
    from gpunet.profiler import precision_times

    assert text.count("precision columns are modelled only") == 1 and "H100 bf16 (model)" in text
    model = data["modelled_H100_precisions_s"]
    assert list(model) == ["mlp tiny", "mlp small"]
    assert model["mlp tiny"] == precision_times(*W.MLP_SIZES["tiny"], "H100")
    assert model["mlp tiny"]["fp16"] > model["mlp tiny"]["fp32"] > 0  # (launch-bound: casts)
    assert "| gpunet cpu (measured) | H100 fp32 (model) | H100 tf32 (model) |" in md
    png = (out / "bench.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000


def test_markdown_table_and_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--quick", "--suite", "all", "--sizes", "tiny,1e3", "--markdown"]
    assert main([*args, "--device", "cpu", "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| mlp tiny | 64-32-10 batch 32 | gpunet |" in text
    assert "10^3" in text and "mlp small" not in text and "10^4" not in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "gpu"], "invalid choice"),
        (["--sizes", "huge"], "--sizes"),
        (["--sizes", "0.5"], "--sizes"),
        (["--repeats", "0"], "positive"),
        (["--device", "tpu"], "invalid choice"),
        (["--suite", "ops", "--sizes", "tiny"], "element counts"),
        (["--suite", "mlp", "--sizes", "1000"], "MLP size names"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    try:
        code = main(["bench", *args, "--out", str(tmp_path)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(probe_cuda().available, reason="a GPU is present")
def test_cuda_without_a_gpu_says_why(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and probe_cuda().reason in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------- equal work
def _run(factory: Any, steps: int = 3) -> tuple[list[float], list[np.ndarray]]:
    try:
        wl = factory(SMALL)
    except W.Unavailable as e:
        pytest.skip(str(e))
    losses = [float(W.to_numpy(wl.step())) for _ in range(steps)]
    return losses, wl.weights()


@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "autograd", "gpunet-tensors"])
def test_every_step_computes_gpunets_losses_and_weights(name: str) -> None:
    """From the same weights, three steps of each give gpunet's losses and weights (1e-4)."""
    want_loss, want_w = _run(W.gpunet_step)
    factory = W.gpunet_tensors_step if name == "gpunet-tensors" else W.MLP_IMPLS[name]
    got_loss, got_w = _run(factory)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-4)
    assert want_loss[2] < want_loss[0]  # the steps did learn
    assert len(got_w) == len(SMALL.initial()) == 6
    for got, want, start in zip(got_w, want_w, SMALL.initial()):
        assert got.dtype == np.float32
        assert np.abs(want - start).max() > 1e-4  # every parameter moved
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_gemm_floor_runs_the_steps_gemms() -> None:
    """Its outputs are the forward products and dW = A^T G, dA = G W^T (G = ones)."""
    wl = W.gemm_floor(SMALL)
    assert wl.step() is None and wl.weights is None
    flops = W.flops_per_step(SMALL.sizes, SMALL.batch)
    assert flops == 2 * 8 * (3 * (20 * 16 + 16 * 16 + 16 * 5) - 20 * 16)
    assert W.parameter_count([3, 2]) == 8


@pytest.mark.parametrize("op", W.OPS)
def test_every_op_implementation_agrees_with_numpy(op: str) -> None:
    want = W.to_numpy(W.numpy_op(op, 1000).step())
    for name in ("gpunet", *W.OP_PEERS):
        try:
            got = W.to_numpy(W.OP_IMPLS[name](op, 1000).step())
        except W.Unavailable:
            continue
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{op}: {name}")


def test_a_missing_peer_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "autograd", None)  # import autograd -> ImportError
    config = run.Config.quick(suites=("mlp",), mlp_sizes=("tiny",), peers=True)
    results = run.run(config, progress=False)
    skipped = {s["framework"]: s["reason"] for s in results.skipped}
    assert "not installed" in skipped["autograd"] and "gpunet[bench]" in skipped["autograd"]
    assert {r.framework for r in results.rows} >= {"gemm-floor", "numpy", "gpunet"}
    assert "skipped autograd on cpu" in "\n".join(report.notes(results))


def test_gpu_workloads_without_a_gpu_are_unavailable() -> None:
    with pytest.raises(W.Unavailable, match="CPU"):
        W.autograd_step(SMALL, "cuda")
    if not probe_cuda().available:
        for factory in (W.gpunet_step, W.numpy_step, W.gemm_floor):
            with pytest.raises(W.Unavailable, match="no CUDA device"):
                factory(SMALL, "cuda")


# ---------------------------------------------------------------------- timers
def test_samples_are_interleaved_and_loops_calibrated() -> None:
    log: list[str] = []
    steps = [lambda: log.append("a"), lambda: log.append("b")]
    timer = timing.CpuTimer()
    tims = [timing.prepare(s, timer, warmup=1, min_sample_s=0.0)[0] for s in steps]
    log.clear()
    timing.sample(steps, [timer, timer], tims, repeats=3)
    assert log == ["a", "b"] * 3
    assert all(len(t.samples) == 3 and t.min_s <= t.median_s <= t.max_s for t in tims)
    assert timing.calibrate(2**-20, 2**-10) == 1024 and timing.calibrate(1.0, 1e-3) == 1
    assert timing.calibrate(float("nan"), 1.0) == 1 and timing.calibrate(1e-12, 1.0) == 10_000


def test_prepare_times_the_cold_call_apart() -> None:
    calls = []

    def step() -> int:
        if not calls:
            time.sleep(0.02)  # a first call that compiles
        calls.append(1)
        return len(calls)

    t, first = timing.prepare(step, timing.CpuTimer(), warmup=2, min_sample_s=0.0)
    assert first == 1 and len(calls) == 3
    assert t.cold_s >= 0.02 and t.samples == []


class _FakeCupy:
    """Enough of CuPy for CudaTimer: events read a clock, a pool that grows on demand."""

    def __init__(self) -> None:
        fake = self

        class Event:
            def record(self) -> None:
                self.t = time.perf_counter()

            def synchronize(self) -> None:
                fake.synced += 1

        class Pool:
            held = 1000

            def total_bytes(self) -> int:
                return self.held

            def free_all_blocks(self) -> None:
                self.held = 100

        class Device:
            def synchronize(self) -> None:
                pass

        self.synced = 0
        self.pool = Pool()
        self.cuda = type(
            "cuda",
            (),
            {
                "Event": Event,
                "Device": Device,
                "get_elapsed_time": staticmethod(lambda a, b: (b.t - a.t) * 1e3),
            },
        )

    def get_default_memory_pool(self) -> Any:
        return self.pool


def test_the_cuda_timer_reads_events_and_pool_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCupy()
    monkeypatch.setattr(timing, "require_cuda", lambda: fake)
    timer = timing.timer_for("cuda")
    assert isinstance(timer, timing.CudaTimer)
    timer.memory_mark()
    fake.pool.held += 4096  # the workload allocates
    seconds = timer.time(lambda: time.sleep(0.01), loops=2)
    assert 0.009 < seconds < 0.5 and fake.synced == 1  # waited for the end event
    assert timer.memory_peak() == 4096


def test_timer_selection() -> None:
    assert isinstance(timing.timer_for("cpu"), timing.CpuTimer)
    with pytest.raises(ValueError, match="unknown device"):
        timing.timer_for("tpu")
    if not probe_cuda().available:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            timing.timer_for("cuda")


@pytest.mark.parametrize(
    "batches, cpu, gpu, want",
    [
        ([1, 4, 16, 64], [1, 2, 4, 8], [5, 5, 3, 4], 16),
        ([64, 1, 16, 4], [8, 1, 4, 2], [4, 5, 3, 5], 16),  # any order
        ([1, 4, 16, 64], [1, 2, 4, 8], [5, 1, 5, 4], 64),  # a noisy win below does not count
        ([1, 4, 16], [1, 2, 3], [2, 3, 4], None),  # never
        ([1, 4], [5, 5], [1, 1], 1),  # always
    ],
)
def test_crossover_batch(batches: list[int], cpu: list, gpu: list, want: int | None) -> None:
    assert timing.crossover(batches, cpu, gpu) == want


# ---------------------------------------------------------------------- report
def _row(workload: str, framework: str, median: float, device: str = "cpu") -> run.Row:
    t = timing.Timing(samples=[median * 0.9, median, median * 1.2])
    return run.Row("mlp", workload, "s", 10, 100, framework, device, t)


def test_ratios_are_within_a_group_and_device() -> None:
    rows = [
        _row("mlp a", "gemm-floor", 1.0),
        _row("mlp a", "gpunet", 3.0),
        _row("mlp a", "torch", 6.0),
        _row("mlp b", "gpunet", 5.0),  # no floor in this group
        _row("mlp a", "gpunet", 2.0, "cuda"),
        _row("mlp a", "gemm-floor", 0.5, "cuda"),
    ]
    r = report.ratios(rows)
    assert r[1] == {"x_floor": 3.0, "gpunet_over": 1.0}
    assert r[2] == {"x_floor": 6.0, "gpunet_over": 0.5}
    assert r[3]["x_floor"] is None
    assert r[4] == {"x_floor": 4.0, "gpunet_over": 1.0}
    assert report.label(rows[5]) == "GEMMs only:cuda"
    assert report.seconds(0.0123) == "12.3 ms" and report.seconds(4e-8) == "40 ns"


def test_crossover_is_reported_and_plotted(tmp_path: Path) -> None:
    results = run.Results(run.Config.quick(), rows=[_row("mlp a", "gpunet", 1.0)])
    results.crossover = {
        "model": "784-128-10",
        "batches": [16, 256],
        "cpu_median_s": [1e-3, 1e-2],
        "cuda_median_s": [2e-3, 1e-3],
        "batch": 256,
    }
    assert "GPU overtakes CPU" in "\n".join(report.notes(results))
    data = report.write(results, tmp_path, "gpunet bench test")
    assert data["crossover"]["batch"] == 256
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_summary_table_puts_implementations_side_by_side() -> None:
    rows = [
        _row("mlp a", "gemm-floor", 1.0),
        _row("mlp a", "numpy", 2.0),
        _row("mlp a", "gpunet", 3.0),
        _row("mlp a", "torch", 6.0),
        _row("mlp b", "gpunet", 5.0),
    ]
    text = report.summary_table(run.Results(run.Config(), rows=rows), "mlp")
    head, rule, a, b = text.splitlines()
    assert head == (
        "| workload | size | GEMMs only | numpy (hand-written) | gpunet | torch "
        "| gpunet x floor | gpunet/numpy | gpunet/torch |"
    )
    assert a == "| mlp a | s | 1 s | 2 s | 3 s | 6 s | 3.00x | 1.50x | 0.50x |"
    assert b == "| mlp b | s | - | - | 5 s | - | - | - | - |"
    assert rule.count("---") == 9
    assert report.summary_table(run.Results(run.Config(), rows=rows), "ops") == ""


def test_the_precision_table_sits_beside_the_measured_rows_on_each_device() -> None:
    rows = [_row("mlp a", "gpunet", 3.0), _row("mlp a", "gpunet", 0.5, "cuda")]
    rows += [_row("mlp a", "torch", 9.0), _row("relu fwd", "gpunet", 1.0)]
    model = {"fp32": 2e-3, "tf32": 1e-3, "bf16": 5e-4, "fp16": 6e-4}
    results = run.Results(run.Config(devices=("cpu", "cuda")), rows=rows)
    results.precisions = {"mlp a": model, "mlp b": {"error": "ValueError: no"}}
    head, _, a, b = report.precision_table(results, markdown=True).splitlines()
    assert head == (
        "| workload | size | gpunet cpu (measured) | gpunet cuda (measured) | H100 fp32 (model) "
        "| H100 tf32 (model) | H100 bf16 (model) | H100 fp16 (model) |"
    )
    assert a == "| mlp a | s | 3 s | 500 ms | 2 ms | 1 ms | 500 us | 600 us |"
    assert b == "| mlp b |  | - | - | - | - | - | - |"
    assert report.precision_note(results) == "the precision model failed for mlp b: ValueError: no"
    results.precisions.pop("mlp b")
    assert "measured cuda column is float32" in "\n".join(report.notes(results))
    results.config = run.Config(devices=("cpu",))
    assert report.precision_note(results).startswith("precision columns are modelled only")
    results.precisions = {}
    assert report.precision_table(results) == "" and report.precision_note(results) is None


def test_crossover_sweep_plumbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU sweep's bookkeeping, with the CPU standing in for the GPU."""
    monkeypatch.setattr(W, "gpunet_step", lambda s, device: W.numpy_step(s, "cpu"))
    timers = {"cpu": timing.CpuTimer(), "cuda": timing.CpuTimer()}
    ticks: list[int] = []
    config = run.Config.quick(crossover_batches=(2, 8))
    c = run.run_crossover(config, timers, ticks.append)
    assert c["model"] == "784-128-10" and c["batches"] == [2, 8] and ticks == [1, 1]
    assert len(c["cpu_median_s"]) == len(c["cuda_median_s"]) == 2
    assert c["batch"] in (None, 2, 8)


def test_the_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    config = run.Config.quick(suites=("ops",), op_sizes=(1000,), ops=("sum",))
    results = run.run(config, progress=True)
    assert [r.framework for r in results.rows] == ["numpy", "gpunet"]
    assert "gpunet bench" in capsys.readouterr().err
