"""Shape primitives: broadcasting, reshaping, permuting, indexing and joining.

All are linear, so each JVP is the op itself applied to the tangent, and each VJP is the
transposed op: broadcast <-> sum, slice <-> slice_transpose, take <-> scatter_add.
"""

from __future__ import annotations

import builtins

import gpunet  # the layer above (gpunet.ops, gpunet.autodiff), called by rules at call time

from .card import LINEAR, NONDIFF, primitive
from .reduce import sum as P_sum


def _unbroadcast(g, shape):  # type: ignore[no-untyped-def]
    """Sum g over the axes broadcast_to added or stretched: the one unbroadcast rule."""
    lead = g.ndim - len(shape)
    if lead:  # new leading axes go away without keepdims: no reshape, no view
        g = gpunet.autodiff.apply(P_sum, (g,), {"axis": tuple(range(lead)), "keepdims": False})
    stretched = 1 in shape and tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = gpunet.autodiff.bind(P_sum, g, axis=stretched, keepdims=True)
    return g


broadcast_to = primitive(
    "broadcast_to",
    "x repeated along new or size-1 axes; the VJP sums them back",
    save=lambda out, x, shape: (x.shape,),
    vjp=(lambda g, src, shape: _unbroadcast(g, src),),
    jvp=LINEAR,
)

reshape = primitive(
    "reshape",
    "the same elements in a new shape",
    save=lambda out, x, shape: (x.shape,),
    vjp=(lambda g, src, shape: gpunet.ops.reshape(g, src),),
    jvp=LINEAR,
)

transpose = primitive(
    "transpose",
    "axes permuted: out.shape[i] = x.shape[perm[i]]",
    save=lambda out, x, perm: (),
    vjp=(lambda g, perm: gpunet.ops.permute(g, gpunet.ops.inverse_permutation(perm)),),
    jvp=LINEAR,
)

slice = primitive(
    "slice",
    "x[key] for a basic key (ints, slices, None, Ellipsis)",
    save=lambda out, x, key: (x.shape,),
    vjp=(lambda g, shape, key: gpunet.ops.bind_slice_transpose(g, key, shape),),
    jvp=LINEAR,
)

slice_transpose = primitive(
    "slice_transpose",
    "zeros of a shape with g placed at key (the transpose of slice)",
    save=lambda out, g, key, shape: (),
    vjp=(lambda g, key, shape: gpunet.ops.bind_slice(g, key),),
    jvp=LINEAR,
)

take = primitive(
    "take",
    "x gathered at integer indices along axis",
    save=lambda out, x, idx, axis: (idx, x.shape[axis]),
    vjp=(lambda g, idx, size, axis: gpunet.ops.scatter_add(g, idx, axis, size), NONDIFF),
    jvp=LINEAR,
)

scatter_add = primitive(
    "scatter_add",
    "zeros with g added at integer indices along axis (repeats accumulate)",
    save=lambda out, g, idx, axis, size: (idx,),
    vjp=(lambda g, idx, axis, size: gpunet.ops.take(g, idx, axis), NONDIFF),
    jvp=LINEAR,
)


def _concat_vjp(i, g, sizes, axis):  # type: ignore[no-untyped-def]
    start = 0
    for n in sizes[:i]:
        start += n
    key = (builtins.slice(None),) * axis + (builtins.slice(start, start + sizes[i]),)
    return gpunet.ops.bind_slice(g, key)


concatenate = primitive(
    "concatenate",
    "inputs joined along an existing axis; the VJP slices g apart",
    save=lambda out, *xs, axis: (tuple(x.shape[axis] for x in xs),),
    vjp=_concat_vjp,
    jvp=LINEAR,
    variadic=True,
)
