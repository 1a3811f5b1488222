"""Matrix products: the heart of every layer's forward and backward.

For Y = X W: dX = dY W^T and dW = X^T dY, both GEMMs over the whole batch.
"""

from __future__ import annotations

from .. import ops
from .card import primitive

matmul = primitive(
    "matmul",
    "x @ y over the last two axes; d/dx: g @ y^T, d/dy: x^T @ g",
    vjp=(
        lambda g, x, y: ops.matmul(g, ops.swapaxes(y, -1, -2)),
        lambda g, x, y: ops.matmul(ops.swapaxes(x, -1, -2), g),
    ),
    jvp=(lambda t, out, x, y: ops.matmul(t, y), lambda t, out, x, y: ops.matmul(x, t)),
)
