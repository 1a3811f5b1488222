"""Reductions over axes: sum and max (mean, min, var, logsumexp compose from them)."""

from __future__ import annotations

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), called by rules at call time

from .card import LINEAR, primitive


def _restore(g, shape, axis, keepdims):  # type: ignore[no-untyped-def]
    """Broadcast a reduced gradient back over the input's shape."""
    if not keepdims:
        g = gpunet.ops.reshape(g, gpunet.ops.keepdims_shape(shape, axis))
    return gpunet.ops.broadcast_to(g, shape)


sum = primitive(
    "sum",
    "sum of x over axis; d/dx is 1 everywhere, so g is broadcast back",
    save=lambda out, x, axis, keepdims: (x.shape,),
    vjp=(lambda g, shape, axis, keepdims: _restore(g, shape, axis, keepdims),),
    jvp=LINEAR,
)


def _max_weights(out, x, axis, keepdims):  # type: ignore[no-untyped-def]
    """1/k at each of the k maximal entries of a slice, 0 elsewhere (ties share)."""
    peak = out if keepdims else gpunet.ops.reshape(out, gpunet.ops.keepdims_shape(x.shape, axis))
    hit = gpunet.ops.cast(gpunet.ops.stop_gradient(x) == gpunet.ops.stop_gradient(peak), x.dtype)
    return hit / gpunet.ops.sum(hit, axis, keepdims=True)


max = primitive(
    "max",
    "max of x over axis; d/dx is 1 at the maximum (split evenly among ties)",
    save=lambda out, x, axis, keepdims: (_max_weights(out, x, axis, keepdims),),
    vjp=(lambda g, w, axis, keepdims: _restore(g, w.shape, axis, keepdims) * w,),
    jvp=(
        lambda t, out, x, axis, keepdims: gpunet.ops.sum(
            t * _max_weights(out, x, axis, keepdims), axis, keepdims
        ),
    ),
)


def _softmax_weights(x, out, axis, keepdims):  # type: ignore[no-untyped-def]
    """exp(x - logsumexp(x)): the softmax, the derivative of logsumexp."""
    if not keepdims:
        out = gpunet.ops.reshape(out, gpunet.ops.keepdims_shape(x.shape, axis))
    return gpunet.ops.exp(x - out)


logsumexp = primitive(
    "logsumexp",
    "log(sum(exp(x))) over axis, computed stably; d/dx = softmax(x)",
    save=lambda out, x, axis, keepdims: (x, out),
    vjp=(
        lambda g, x, out, axis, keepdims: (
            _restore(g, x.shape, axis, keepdims) * _softmax_weights(x, out, axis, keepdims)
        ),
    ),
    jvp=(
        lambda t, out, x, axis, keepdims: gpunet.ops.sum(
            t * _softmax_weights(x, out, axis, keepdims), axis, keepdims
        ),
    ),
)
