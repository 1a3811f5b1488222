"""The float32 GEMM precision setting that the CUDA backend applies to cuBLAS per call.

``gpunet.backends.allow_tf32`` (the user's name, as ``torch.backends.cuda.matmul.allow_tf32``)
writes ``MATMUL.allow_tf32`` here, below the backends, which read it before each float32 GEMM.
"""

from __future__ import annotations


class MatmulPrecision:
    """allow_tf32: float32 GEMMs on CUDA may round their inputs to TF32 (10 mantissa bits) on
    the tensor cores and accumulate in float32. Off by default, as in PyTorch since 1.12."""

    __slots__ = ("allow_tf32",)

    def __init__(self) -> None:
        self.allow_tf32 = False


MATMUL = MatmulPrecision()
