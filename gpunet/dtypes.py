"""dtypes: gpunet uses NumPy's dtype objects on every backend (CuPy does too)."""

from __future__ import annotations

from typing import Any

import numpy as np

float16 = np.dtype("float16")
float32 = np.dtype("float32")
float64 = np.dtype("float64")
int32 = np.dtype("int32")
int64 = np.dtype("int64")
bool_ = np.dtype("bool")

DEFAULT_FLOAT = float32  # Python floats become float32, as in PyTorch
DEFAULT_INT = int64

DType = Any  # anything np.dtype() accepts: np.float32, "float32", gpunet.float32


def as_dtype(dtype: DType) -> np.dtype:
    """Normalize a dtype spec; the array's own dtype object on non-NumPy namespaces passes."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).split(".")[-1].rstrip("'>"))


def is_floating(dtype: DType) -> bool:
    return as_dtype(dtype).kind == "f"
