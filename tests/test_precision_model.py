"""The roofline model's precisions: bfloat16 GEMMs at the tensor-core peak, autocast's casts
priced as they run."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

import gpunet
from gpunet import profiler
from gpunet.bench.workloads import MLP_SIZES
from gpunet.profiler import (
    PRECISIONS,
    main,
    mlp_step_report,
    precision_report,
    precision_times,
    profile_mlp_step,
)
from gpunet.roofline import gpu


def test_bfloat16_gemms_run_at_the_half_precision_tensor_core_peak() -> None:
    h100 = gpu("H100")
    assert h100.peak_flops("bfloat16", gemm=True) == h100.peak_flops("float16", gemm=True)
    assert h100.peak_flops("bfloat16", gemm=True) > 10 * h100.peak_flops("float32", gemm=True)
    assert h100.peak_flops("bfloat16", gemm=False) == h100.peak_flops("float32", gemm=False)


def test_an_autocast_step_profiles_bfloat16_gemms_and_the_casts() -> None:
    p, _ = profile_mlp_step([8, 16, 4], 4, autocast=gpunet.bfloat16)
    gemms = {r.dtype for r in p.records if r.name in ("matmul", "linear_activation")}
    assert gemms == {"bfloat16"}
    assert any(r.name == "cast" for r in p.records)
    assert {r.dtype for r in p.records if r.name == "cross_entropy"} == {"float32"}
    table = precision_report([([8, 16, 4], 4)])
    assert "| 8-16-4, batch 4 |" in table and "fp16 (autocast, scaler)" in table


README = Path(__file__).resolve().parent.parent / "README.md"


_PROFILES: dict[tuple, tuple] = {}


@pytest.fixture
def profiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step profiled once for the README tables (the large MLP's fp32 step, seconds on a
    2-core VM, serves both): profile_mlp_step is deterministic (it seeds 0)."""
    real = profiler.profile_mlp_step

    def once(*args: Any, **kwargs: Any) -> tuple:
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(tuple(v) if isinstance(v, list) else v for v in bound.arguments.values())
        if key not in _PROFILES:
            _PROFILES[key] = real(*args, **kwargs)
        return _PROFILES[key]

    monkeypatch.setattr(profiler, "profile_mlp_step", once)


def test_the_readme_precision_table_is_the_models(profiled: None) -> None:
    """README, Mixed precision: the table `main(['--precisions'])` prints, row for row, the
    large MLP's included."""
    text = README.read_text()
    head = "| MLP, batch | fp32 | tf32 | bf16 (autocast) | fp16 (autocast, scaler) | bf16 / fp32 |"
    start = text.index(head)
    table = text[start:].split("\n\n", 1)[0]
    assert len(table.splitlines()) == 2 + len(MLP_SIZES)
    assert precision_report() == table


def test_the_readme_data_parallel_table_is_the_models(profiled: None) -> None:
    """README, Data parallelism: `main(['--data-parallel'])`'s title and table, as printed."""
    assert profiler.data_parallel_report() in README.read_text()


def test_the_profilers_report_prices_a_step_at_a_chosen_precision(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = [([8, 16, 4], 4)]
    rows = {p: mlp_step_report(config, precision=p)[0] for p in PRECISIONS}
    times = {p: r.estimate.total_s for p, r in rows.items()}
    assert times == precision_times([8, 16, 4], 4)  # the table's numbers, one report each
    assert rows["fp16"].estimate.launches == rows["bf16"].estimate.launches + 9  # the scaler
    assert rows["tf32"].summary.flops == rows["fp32"].summary.flops
    with pytest.raises(SystemExit):  # (argparse's choices: a valid one runs every MLP size)
        main(["--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, fp16"):
        mlp_step_report(config, precision="int8")


def test_the_loss_scalers_kernels_by_hand() -> None:
    """The inf/NaN check reads the gradient once (fused) and writes the 4-byte flag; the
    scale's arithmetic and a fill are one small kernel each."""
    from gpunet import costs

    g, flag = costs.Operand((1000,), 4, 4000), costs.Operand((), 4, 4)
    fused, unfused = costs.cost_of("amp_found_inf", [g], flag, {})
    assert (fused.flops, fused.bytes_read, fused.bytes_written, fused.launches) == (
        1000,
        4004,
        4,
        1,
    )
    assert unfused.launches == 5 and unfused.bytes_read > fused.bytes_read
    fill, _ = costs.cost_of("fill", [flag], None, {})
    assert (fill.bytes_read, fill.bytes_written, fill.launches) == (0, 4, 1)
    inverse, _ = costs.cost_of("amp_inverse_scale", [flag], flag, {})
    assert (inverse.bytes_read, inverse.bytes_written, inverse.launches) == (4, 4, 1)
