"""Bad class labels and indices, refused with the op, the value, its index and the bound.

On the CPU the labels are checked before the op runs: one max reduction over them, viewed as
unsigned (a negative label becomes a huge one), so the check costs one pass over n integers;
``gpunet.take``'s indices likewise (a min and a max). A CUDA kernel cannot raise: it records
the first bad value it meets in a small device buffer ``fault = (op code, index, value,
bound)`` (see kernels/losses.cu), and the host raises the same error the next time data
reaches it (``Tensor.item()``, ``.numpy()``, ``fit``'s epoch end), so a GPU run is never
silent and never left with a NaN or a wrapped index alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# the op codes the kernels write into fault[0] (0 means no fault)
FAULT_OPS = {1: "cross_entropy", 2: "gpunet.take"}
FAULT_CODES = {name: code for code, name in FAULT_OPS.items()}
PYTORCH_IGNORE_INDEX = -100


class LabelError(IndexError, ValueError):
    """A class label outside [0, classes). An IndexError, as in PyTorch ("Target -1 is out
    of bounds"), and a ValueError, as bad input is everywhere else in gpunet."""


def label_error(op: str, index: int, value: int, classes: int, where: str = "") -> LabelError:
    """The one message for a bad label, on every device."""
    hint = (
        " gpunet has no ignore_index: drop the rows labelled -100 instead."
        if value == PYTORCH_IGNORE_INDEX
        else f" Map the labels to 0..{classes - 1} first (one class per distinct value)."
    )
    return LabelError(
        f"{op}: label {value} at index {index} is not a class: the logits have {classes} "
        f"classes, so labels must be in [0, {classes}).{hint}{where}"
    )


# the unsigned dtype of each signed integer dtype: the view that makes negatives huge
_UNSIGNED = {np.dtype(f"i{n}"): np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def check_labels(labels: np.ndarray, classes: int, op: str) -> None:
    """Raise ``label_error`` for the first label outside [0, classes) of a host array: about
    2 us for a batch of 32 (benchmarks/bench_overhead.py's tiny step takes about 115 us)."""
    unsigned = labels.view(_UNSIGNED.get(labels.dtype, labels.dtype))
    if labels.size == 0 or np.maximum.reduce(unsigned, axis=None) < classes:
        return
    flat = labels.reshape(-1)
    index = int(np.flatnonzero((flat < 0) | (flat >= classes))[0])
    raise label_error(op, index, int(flat[index]), classes)


def index_error(op: str, position: int, value: int, size: int, where: str = "") -> IndexError:
    return IndexError(
        f"{op}: index {value} at position {position} is out of range for an axis of size "
        f"{size}: indices must be in [{-size}, {size}){where}"
    )


def check_indices(indices: np.ndarray, size: int, op: str) -> None:
    """Raise for the first index outside [-size, size) (NumPy's range) of a host array, so
    that a too-negative index is refused rather than wrapped twice."""
    if indices.size == 0:
        return
    if (
        -size <= np.minimum.reduce(indices, axis=None)
        and np.maximum.reduce(indices, axis=None) < size
    ):
        return
    flat = indices.reshape(-1)
    position = int(np.flatnonzero((flat < -size) | (flat >= size))[0])
    raise index_error(op, position, int(flat[position]), size)


def fault_error(fault: Any, device: Any) -> IndexError:
    """The error for a fault buffer a kernel wrote: (op code, index, value, bound)."""
    code, index, value, bound = (int(v) for v in fault)
    op = FAULT_OPS.get(code, f"op {code}")
    where = (
        f" (found on {device} by the {op} kernel; a GPU kernel cannot raise, so it is raised "
        "at the next read to the host)"
    )
    if op == "gpunet.take":
        return index_error(op, index, value, bound, where)
    return label_error(op, index, value, bound, where)
