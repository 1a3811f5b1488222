"""The primitive card and the registry of all primitives.

A primitive is declared once, with everything autodiff needs side by side:

- its forward: the backend method of the same name, on raw arrays;
- what it keeps for backward (``save``: only what the rule needs, staged at forward time;
  the output, where kept, last);
- its VJP rule per input: ``vjp[i](g, *saved, **params)`` -> cotangent of input ``i``,
  after ``vjp_pre(g, *saved, **params)`` if the card has one: a map of g shared by every
  input's rule, run once per node (a fused activation's dZ = g f'(y));
- optionally, per input, a VJP rule that writes into a given array (``vjp_into[i](out,
  alpha, beta, g, *saved, **params)``: out <- alpha (cotangent of input i) + beta out, BLAS's
  convention, beta = 0 meaning out is not read): used for a leaf with a ``grad_buffer`` when
  the sweep is not recorded, so a weight gradient's GEMM lands in the optimizer's flat
  buffer, and for SGD in backward, where out is the weight itself (alpha = -lr). Such a
  rule must not read input i (it may be the array written); ``vjp_into_independent`` says
  that none reads any input with such a rule, so backward may step all of them;
- its JVP rule per input: ``jvp[i](t, out, *inputs, **params)`` -> tangent of the output, or
  ``LINEAR`` for ops linear in their differentiable inputs (the JVP is the op on the tangents).

Rules are written with gpunet ops, so the backward pass is itself differentiable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REGISTRY: dict[str, Primitive] = {}


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


LINEAR = _Marker("LINEAR")  # JVP of a linear op: apply the op to the tangents
NONDIFF = _Marker("NONDIFF")  # an input that carries no gradient (a mask, indices)


@dataclass(eq=False)
class Primitive:
    """One differentiable (or explicitly non-differentiable) operation."""

    name: str
    doc: str
    vjp: tuple[Any, ...] | Callable[..., Any] | None = None
    jvp: tuple[Any, ...] | Callable[..., Any] | _Marker | None = None
    vjp_pre: Callable[..., Any] | None = None
    vjp_into: tuple[Callable[..., None] | None, ...] | None = None
    vjp_into_independent: bool = False  # no vjp_into rule reads an input that has one
    save: Callable[..., tuple[Any, ...]] | None = None
    differentiable: bool = True
    variadic: bool = False  # takes any number of inputs; rules get the input's position first
    # inputs exempt from grads: those marked NONDIFF in ``vjp`` (set by ``primitive``)
    nondiff: frozenset[int] = field(default_factory=frozenset)
    transfers: bool = False  # output lives on params["device"], not on the inputs' device

    # ``rules[i]``: the cotangent rule for input ``i`` (``vjp``, or for a variadic card its
    # one rule bound to ``i``), so the sweep indexes every card the same way
    rules: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rules = _Positional(self.vjp) if self.variadic else self.vjp

    def __repr__(self) -> str:
        return f"<primitive {self.name}>"


class _Positional:
    """A variadic card's rules: ``rules[i]`` is its one rule with input ``i``'s position."""

    def __init__(self, rule: Callable[..., Any]) -> None:
        self.rule = rule

    def __getitem__(self, i: int) -> Callable[..., Any]:
        return functools.partial(self.rule, i)


def primitive(name: str, doc: str, **card: Any) -> Primitive:
    """Declare a primitive and add it to the registry (names are unique)."""
    if name in REGISTRY:
        raise ValueError(f"primitive {name!r} is already registered")
    # Inputs marked NONDIFF in the VJP tuple carry no gradient; a card without a VJP tuple
    # (a non-differentiable kernel) may still name them with ``nondiff=``.
    marked = card.get("vjp") if isinstance(card.get("vjp"), tuple) else ()
    card["nondiff"] = frozenset(card.get("nondiff", ())) | {
        i for i, rule in enumerate(marked) if rule is NONDIFF
    }
    prim = REGISTRY[name] = Primitive(name, doc, **card)
    return prim
