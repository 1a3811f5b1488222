"""Fused losses: one forward pass and one backward pass where the composition would take many.

cross_entropy(z, y) = -log softmax(z)[y] = logsumexp(z) - z[y], per row, then reduced.
Its gradient is (softmax(z) - onehot(y)) * g (/ n for the mean): computed in one fused backend
pass when nothing differentiates the backward, and composed from gpunet ops otherwise, so
second derivatives stay exact.
"""

from __future__ import annotations

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), called by rules at call time

from .card import NONDIFF, primitive


def _row_scale(g, logits, reduction):  # type: ignore[no-untyped-def]
    """The upstream gradient per row, as a (n, 1) column or a scalar."""
    if reduction == "none":
        return gpunet.ops.reshape(g, (logits.shape[0], 1))
    return g * (1.0 / logits.shape[0]) if reduction == "mean" else g


def _ce_vjp(g, logits, labels, reduction):  # type: ignore[no-untyped-def]
    if not gpunet.autodiff.differentiating(g, logits):
        return gpunet.autodiff.apply(
            cross_entropy_backward, (g, logits, labels), {"reduction": reduction}
        )
    onehot = gpunet.ops.cast(
        gpunet.ops.compare(
            gpunet.ops.reshape(labels, (-1, 1)),
            gpunet.ops.arange_like(logits, logits.shape[1]),
            "eq",
        ),
        logits.dtype,
    )
    return (gpunet.ops.softmax(logits, -1) - onehot) * _row_scale(g, logits, reduction)


def _ce_jvp(t, out, logits, labels, reduction):  # type: ignore[no-untyped-def]
    per_row = gpunet.ops.sum(t * gpunet.ops.softmax(logits, -1), 1) - gpunet.ops.take_rows(
        t, labels
    )
    if reduction == "none":
        return per_row
    total = gpunet.ops.sum(per_row)
    return total * (1.0 / logits.shape[0]) if reduction == "mean" else total


cross_entropy = primitive(
    "cross_entropy",
    "mean (or sum, or per row) of logsumexp(z) - z[y] for logits z (n, c) and labels y (n,); "
    "d/dz = softmax(z) - onehot(y)",
    save=lambda out, logits, labels, reduction: (logits, labels),
    vjp=(_ce_vjp, NONDIFF),
    jvp=(_ce_jvp, NONDIFF),
)

cross_entropy_backward = primitive(
    "cross_entropy_backward",
    "(softmax(z) - onehot(y)) * g per row (/ n for the mean): cross_entropy's fused VJP, used "
    "when nothing differentiates the backward pass",
    differentiable=False,
    nondiff=(2,),  # (no VJP tuple to mark it in: the labels are exempt from the dtype check)
)
