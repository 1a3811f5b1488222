"""Per-example gradients from one batched backward pass (for DP-SGD and gradient statistics).

A parameter enters a batch computation in one of two ways, and each has a batched formula
for its per-example gradients, read off the tape:

- as the right operand of a matmul, Y = X W (or ``linear_activation``'s weight): the gradient
  of example i is the outer product x_i^T dY_i, all of them at once as one batched matmul
  (B, in, 1) @ (B, 1, out);
- broadcast along the batch, as a bias (``linear_activation``'s, or added by hand) or an
  elementwise scale: the gradient of example i is row i of the cotangent of the broadcast,
  before the VJP sums over the batch.

No Python loop over examples: one forward, one backward, then one product per use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ops
from . import primitives as P
from .autodiff import Node, backprop, bind, enable_grad, no_grad, saved_values
from .tensor import Tensor


def _uses(root: Node, params: list[Tensor]) -> list[tuple[Node, int, int]]:
    """(node, input position, parameter index) for every recorded use of a parameter."""
    ids = {id(p): k for k, p in enumerate(params)}
    uses, seen, stack = [], {root}, [root]
    while stack:
        node = stack.pop()
        for i, parent in enumerate(node.parents):
            if type(parent) is Node:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
            elif parent is not None and id(parent) in ids:
                uses.append((node, i, ids[id(parent)]))
    return uses


def _per_example(node: Node, i: int, g: Tensor, batch: int, shape: tuple[int, ...]) -> Tensor:
    name = node.prim.name
    saved = saved_values(node, g._backend)
    if node.prim.vjp_pre is not None:  # the hook saw dL/dy; the rules start from dL/dz
        g = node.prim.vjp_pre(g, *saved, **node.params)
    if name == "linear_activation" and i == 2:
        return g  # (B, out): dY_i
    if (name == "linear_activation" and i == 1) or (
        name == "matmul" and i == 1 and not node.params["ty"] and not node.params["tx"]
    ):
        x = saved[0]  # (B, in): the layer's input
        if x.ndim != 2 or x.shape[0] != batch:
            raise ValueError(
                f"per_example_grads: a matmul input of shape {x.shape} is not a "
                f"batch of {batch} rows"
            )
        rows = bind(P.matmul, ops.unsqueeze(x, 2), ops.unsqueeze(g, 1), tx=False, ty=False)
        return rows  # (B, in, out): x_i^T dY_i
    if name == "broadcast_to":
        if g.shape[0] != batch or len(g.shape) != len(shape) + 1:
            raise ValueError(
                f"per_example_grads: a parameter of shape {shape} is broadcast to "
                f"{g.shape}, not along one leading batch axis of {batch}"
            )
        stretched = tuple(k + 1 for k, n in enumerate(shape) if n == 1 and g.shape[k + 1] != 1)
        return ops.sum(g, stretched, keepdims=True) if stretched else g
    raise NotImplementedError(
        f"per_example_grads: a parameter of shape {shape} is used by '{name}' (input {i}); "
        "supported uses are the right operand of x @ W and a broadcast along the batch"
    )


def per_example_grads(
    loss_fn: Callable[[Any, Any], Tensor],
    model: Any,
    inputs: Tensor,
    targets: Any,
    clip_per_example: float | None = None,
) -> dict[str, Tensor]:
    """For every parameter, the (batch, *shape) gradients of each example's own loss.

    ``loss_fn(model(inputs), targets)`` must return one loss per example (shape (batch,), e.g.
    ``F.cross_entropy(..., reduction="none")``). With ``clip_per_example=C``, each example's
    gradients (all parameters together) are scaled to an L2 norm of at most C, as DP-SGD does.
    """
    named = list(model.named_parameters())
    params = [p for _, p in named]
    batch = inputs.shape[0]
    with enable_grad():
        losses = loss_fn(model(inputs), targets)
    if losses.shape != (batch,):
        raise ValueError(
            f"per_example_grads: loss_fn must return one loss per example, shape "
            f"({batch},), got {losses.shape}; use reduction='none'"
        )
    if losses._node is None:
        raise ValueError("per_example_grads: the loss does not depend on any parameter")
    captured: dict[Node, Tensor] = {}
    uses = _uses(losses._node, params)
    for node in {u[0] for u in uses}:
        node._hooks = [*(node._hooks or ()), lambda g, node=node: captured.__setitem__(node, g)]
    with no_grad():
        backprop([losses], [ops.ones_like(losses)], inputs=params, retain_graph=True)
        grads: list[Tensor | None] = [None] * len(params)
        for node, i, k in uses:
            part = _per_example(node, i, captured[node], batch, params[k].shape)
            part = ops.reshape(part, (batch, *params[k].shape))
            grads[k] = part if grads[k] is None else grads[k] + part
        out = {
            name: g
            if g is not None
            else ops.zeros_like(p).unsqueeze(0).broadcast_to((batch, *p.shape))
            for (name, p), g in zip(named, grads)
        }
        if clip_per_example is not None:
            total = None
            for g in out.values():
                sq = ops.sum(g * g, tuple(range(1, g.ndim))) if g.ndim > 1 else g * g
                total = sq if total is None else total + sq
            scale = ops.minimum(clip_per_example / (ops.sqrt(total) + 1e-12), 1.0)
            out = {
                name: g * ops.reshape(scale, (batch,) + (1,) * (g.ndim - 1))
                for name, g in out.items()
            }
    return out
