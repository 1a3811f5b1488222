"""Backend settings users set, in PyTorch's words: ``gpunet.backends.allow_tf32 = True`` (as
``torch.backends.cuda.matmul.allow_tf32``) or ``gpunet.set_float32_matmul_precision("high")``.

TF32 applies to float32 GEMMs on CUDA (cuBLAS rounds their inputs to 10 mantissa bits on the
tensor cores and accumulates in float32). The CPU computes float32 GEMMs in float32 whatever
the setting: there it is a no-op, and ``gpunet info`` says so.
"""

from __future__ import annotations

import sys
import types

from .backend.precision import MATMUL

_PRECISIONS = {"highest": False, "high": True, "medium": True}


def set_float32_matmul_precision(precision: str) -> None:
    """ "highest": float32 GEMMs in float32 (the default); "high" or "medium": TF32 on CUDA
    (PyTorch's "medium" may use bfloat16; gpunet's means TF32 too)."""
    if precision not in _PRECISIONS:
        raise ValueError(
            f"set_float32_matmul_precision: precision must be one of {sorted(_PRECISIONS)}, "
            f"got {precision!r}"
        )
    MATMUL.allow_tf32 = _PRECISIONS[precision]


def get_float32_matmul_precision() -> str:
    return "high" if MATMUL.allow_tf32 else "highest"


class _Settings(types.ModuleType):
    """This module, with ``allow_tf32`` an attribute that writes the backends' setting."""

    @property
    def allow_tf32(self) -> bool:
        return MATMUL.allow_tf32

    @allow_tf32.setter
    def allow_tf32(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"gpunet.backends.allow_tf32 must be True or False, got {on!r}")
        MATMUL.allow_tf32 = on


sys.modules[__name__].__class__ = _Settings
