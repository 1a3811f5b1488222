"""Matrix products: the heart of every layer's forward and backward.

For Y = X W: dX = dY W^T and dW = X^T dY, both GEMMs over the whole batch.
"""

from __future__ import annotations

from ..autodiff import bind
from .card import primitive
from .shape import transpose


def _mT(x):  # type: ignore[no-untyped-def]
    """x with its last two axes swapped (a view on every backend)."""
    perm = (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2)
    return bind(transpose, x, perm=perm)


matmul = primitive(
    "matmul",
    "x @ y over the last two axes; d/dx: g @ y^T, d/dy: x^T @ g",
    vjp=(
        lambda g, x, y: bind(matmul, g, _mT(y)),
        lambda g, x, y: bind(matmul, _mT(x), g),
    ),
    jvp=(lambda t, out, x, y: bind(matmul, t, y), lambda t, out, x, y: bind(matmul, x, t)),
)
