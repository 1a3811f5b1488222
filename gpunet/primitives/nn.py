"""Activation primitives with fused rules: one forward kernel, one backward pass.

Each keeps its output and computes f'(x) from it (``kernels/activations.cuh`` holds the same
formulas for the GPU).
"""

from __future__ import annotations

from .. import ops
from .card import primitive

sigmoid = primitive(
    "sigmoid",
    "sigmoid(x) = 1 / (1 + exp(-x)); d/dx = y (1 - y)",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: g * y * (1.0 - y),),
    jvp=(lambda t, y, x: t * y * (1.0 - y),),
)

relu = primitive(
    "relu",
    "relu(x) = max(x, 0); d/dx = 1 where y > 0, else 0",
    save=lambda out, x: (out,),
    vjp=(lambda g, y: ops.where(y > 0.0, g, 0.0),),
    jvp=(lambda t, y, x: ops.where(y > 0.0, t, 0.0),),
)
