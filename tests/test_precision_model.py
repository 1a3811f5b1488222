"""The roofline model's precisions: bfloat16 GEMMs at the tensor-core peak, autocast's casts
priced as they run."""

from __future__ import annotations

import gpunet
from gpunet.profiler import precision_report, profile_mlp_step
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
    assert "| 8-16-4, batch 4 |" in table and "bf16 (autocast)" in table
