"""Function transforms in JAX's style, built on the tape and on forward mode.

``grad(f)(x)`` is df/dx; ``vjp(f, x)`` gives ``u -> u^T J``; ``jvp(f, x, v)`` gives ``J v``
in one forward pass; ``hvp(f, x, v)`` is ``H v`` as forward-over-reverse (jvp of grad).
Transforms nest: ``grad(grad(f))``, ``jvp(grad(f))`` and ``grad(jvp(...))`` all work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import dtypes
from . import primitives as P
from .autodiff import backprop, bind, enable_grad, forward_mode
from .creation import as_tensor
from .ops import zeros_like
from .tensor import Tensor


def _track(p: Any, what: str) -> Tensor:
    """A fresh handle on a primal for one transform: an alias recorded on the tape (so outer
    transforms still see its dependence on ``p``), marked as requiring grad."""
    p = _floating(as_tensor(p), what)
    with enable_grad():
        x = bind(P.reshape, p, shape=p.shape)
    if not x._requires_grad:
        x._requires_grad = True
    return x


def _floating(p: Tensor, what: str) -> Tensor:
    if not dtypes.is_floating(p.dtype):
        raise TypeError(
            f"gpunet.{what}: can only differentiate with respect to floating "
            f"inputs, got {p.dtype} (shape {p.shape})"
        )
    return p


def _flat(out: Any) -> tuple[list[Tensor], bool]:
    if isinstance(out, Tensor):
        return [out], True
    if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
        return list(out), False
    raise TypeError(
        f"the function must return a Tensor or a tuple of Tensors, got {type(out).__name__}"
    )


def vjp(f: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple]]:
    """(f(*primals), vjp_fn) where vjp_fn(u) = u^T J for each primal (reusable)."""
    xs = [_track(p, "vjp") for p in primals]
    with enable_grad():
        out = f(*xs)
    outs, single = _flat(out)

    def vjp_fn(cotangent: Any) -> tuple[Tensor, ...]:
        cts = [cotangent] if single else list(cotangent)
        grads = backprop(outs, cts, inputs=xs, retain_graph=True, create_graph=None)
        return tuple(grads)  # type: ignore[arg-type]

    return out, vjp_fn


def value_and_grad(
    f: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """``(f(*args), df/dargs)`` for a function returning a scalar tensor."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        for i in nums:
            args[i] = _track(args[i], "grad")
        with enable_grad():
            result = f(*args, **kwargs)
        out, aux = result if has_aux else (result, None)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError(
                "gpunet.grad: the function must return a scalar tensor, got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        grads = backprop([out], [None], inputs=[args[i] for i in nums], create_graph=None)
        value = out if any(g._requires_grad for g in grads) else out.detach()
        g = grads[0] if isinstance(argnums, int) else tuple(grads)  # type: ignore[index]
        return ((value, aux), g) if has_aux else (value, g)

    return wrapped


def grad(
    f: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """The gradient of a scalar function: ``gpunet.grad(f)(x)`` = df/dx."""
    vg = value_and_grad(f, argnums, has_aux)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        (value, g) = vg(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    return wrapped


def jvp(f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, Any]:
    """(f(*primals), J @ tangents) in one forward pass (forward-mode autodiff)."""
    primals = [_floating(as_tensor(p), "jvp") for p in primals]
    if len(tangents) != len(primals):
        raise ValueError(f"gpunet.jvp: {len(primals)} primals but {len(tangents)} tangents")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if isinstance(t, Tensor) and t.dtype != p.dtype:  # (a cast would lose digits silently)
            raise TypeError(
                f"gpunet.jvp: tangent {i} is {t.dtype}, its primal {p.dtype}; a tangent must "
                f"have its primal's dtype (as in JAX): convert it, t.to(gpunet.{p.dtype})"
            )
    tangents = [as_tensor(t, p.dtype, p.device) for p, t in zip(primals, tangents)]
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if p.shape != t.shape:
            raise ValueError(f"gpunet.jvp: tangent {i} has shape {t.shape}, its primal {p.shape}")
    with enable_grad():
        xs = [bind(P.reshape, p, shape=p.shape) for p in primals]
    with forward_mode() as mode:
        for x, t in zip(xs, tangents):
            mode.set_tangent(x, t)
        out = f(*xs)
        outs, single = _flat(out)
        touts = [mode.tangent_of(o) for o in outs]
    touts = [zeros_like(o) if t is None else t for o, t in zip(outs, touts)]
    return out, (touts[0] if single else tuple(touts))


def hvp(f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> Any:
    """Hessian-vector product H v of a scalar function, as jvp of grad (forward-over-reverse).
    Returns one tensor per primal (a single tensor for a single primal)."""
    g = grad(f, argnums=tuple(range(len(primals))))
    _, hv = jvp(lambda *xs: g(*xs), primals, tangents)
    return hv[0] if len(primals) == 1 else hv


hessian_vector_product = hvp
