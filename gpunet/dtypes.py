"""dtypes: gpunet uses NumPy's dtype objects on every backend (CuPy does too)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

float16 = np.dtype("float16")
float32 = np.dtype("float32")
float64 = np.dtype("float64")
int32 = np.dtype("int32")
int64 = np.dtype("int64")
bool_ = np.dtype("bool")
# bfloat16 (8 exponent bits, float32's range; 7 mantissa bits) is ml_dtypes' NumPy dtype, the
# one CuPy 14 uses too. Its dtype kind is "V", so kind checks go through ``kind`` below.
bfloat16 = np.dtype(ml_dtypes.bfloat16)

DEFAULT_FLOAT = float32  # Python floats become float32, as in PyTorch
DEFAULT_INT = int64

DType = Any  # anything np.dtype() accepts: np.float32, "float32", gpunet.float32


def as_dtype(dtype: DType) -> np.dtype:
    """Normalize a dtype spec; the array's own dtype object on non-NumPy namespaces passes."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).split(".")[-1].rstrip("'>"))


def kind(dtype: DType) -> str:
    """NumPy's dtype kind, with bfloat16 (kind "V" in ml_dtypes) counted as floating "f"."""
    dt = dtype if isinstance(dtype, np.dtype) else as_dtype(dtype)
    return "f" if dt == bfloat16 else dt.kind


def is_floating(dtype: DType) -> bool:
    return kind(dtype) == "f"


def is_low_precision(dtype: DType) -> bool:
    """float16 or bfloat16: storage formats whose arithmetic gpunet does in float32."""
    return dtype in (float16, bfloat16)
