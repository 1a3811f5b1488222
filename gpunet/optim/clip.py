"""Gradient clipping, as torch.nn.utils: by the global norm, or elementwise by value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..autodiff import segment
from ..tensor import Tensor
from .flat import flat_of

Array = Any


def _with_grads(parameters: Tensor | Iterable[Tensor], op: str) -> list[Tensor]:
    """The parameters that have a gradient; an error for one updated inside backward."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    for p in params:
        step = p.in_backward
        if step is not None and step.alpha_beta() is not None:
            raise RuntimeError(
                f"{op}: a {p.dtype} {p.shape} parameter is updated inside backward "
                "(SGD(in_backward=True)), so its gradient is never stored and cannot be "
                "clipped; use SGD(in_backward=False) to clip gradients"
            )
    return [p for p in params if p.grad is not None]


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale the gradients in place so that their global ``norm_type`` norm is at most
    ``max_norm``: g *= min(1, max_norm / (norm + 1e-6)). Returns the norm before clipping.
    Gradients of parameters an optimizer packed are clipped in its flat gradient array: one
    ``grad_norm`` and one scaling pass per contiguous range (one, for a whole model)."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return _clip_grad_norm(params, max_norm, norm_type, error_if_nonfinite)


# (a step capture runs it again at each replay: the norm and the scale change every step)
@segment(lambda params, *args, **kwargs: params)
def _clip_grad_norm(
    parameters: list[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """The body of ``clip_grad_norm_``, on a list of parameters."""
    params = _with_grads(parameters, "clip_grad_norm_")
    if not params:
        from ..creation import tensor

        return tensor(0.0)
    norm_type = float(norm_type)
    chunks = _flat_chunks(params) if norm_type == 2.0 else None
    if chunks is not None:
        norms = [b.grad_norm(c) for b, c in chunks]
    else:
        chunks = [(p._backend, p.grad.data) for p in params]
        norms = [_norm(b.xp, c, norm_type) for b, c in chunks]
    backend, dtype = chunks[0][0], params[0].dtype
    if all(b is backend for b, _ in chunks):  # combined on the device: no host sync
        xp = backend.xp
        n64 = xp.stack([xp.astype(n, xp.float64) for n in norms])
        if norm_type == math.inf:
            total = xp.max(n64)
        else:
            total = xp.sum(n64**norm_type) ** (1.0 / norm_type)
    else:
        values = [float(n) for n in norms]
        if norm_type == math.inf:
            total = max(values)
        else:
            total = sum(v**norm_type for v in values) ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite; pass "
            "error_if_nonfinite=False to clip anyway"
        )
    for b, c in chunks:
        t = b.asarray(total) if isinstance(total, float) else total
        coef = b.xp.minimum(max_norm / (t + 1e-6), 1.0)
        c *= b.xp.astype(coef, c.dtype)
    out = backend.asarray(total) if isinstance(total, float) else total
    return Tensor._wrap(backend.xp.astype(out, backend.as_dtype(dtype)), backend)


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value] in place."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    _clip_grad_value(params, clip_value)


@segment(lambda params, *args, **kwargs: params)
def _clip_grad_value(params: list[Tensor], clip_value: float) -> None:
    """The body of ``clip_grad_value_``, on a list of parameters."""
    for p in _with_grads(params, "clip_grad_value_"):
        g = p.grad.data
        g[...] = p.grad._backend.xp.clip(g, -clip_value, clip_value)


def _flat_chunks(params: list[Tensor]) -> list[tuple[Any, Array]] | None:
    """(backend, flat gradient range) covering exactly ``params``' gradients, copied into
    their optimizer's flat array, or None unless an optimizer packed every one."""
    groups: dict[int, tuple[Any, list[int]]] = {}
    for p in params:
        found = flat_of(p)
        if found is None:
            return None
        groups.setdefault(id(found[0]), (found[0], []))[1].append(found[1])
    chunks = []
    for flat, indices in groups.values():
        indices.sort()
        flat.gather_grads(indices)
        spans = flat.spans(indices, [None] * len(indices))
        chunks += [(flat.backend, flat.grad[a:b]) for a, b, _ in spans]
    return chunks


def _norm(xp: Any, g: Array, norm_type: float) -> Array:
    a = xp.abs(xp.astype(xp.reshape(g, (-1,)), xp.float64))
    if norm_type == math.inf:
        return xp.max(a) if a.shape[0] else xp.asarray(0.0, dtype=xp.float64)
    return xp.sum(a**norm_type) ** (1.0 / norm_type)
