"""Checking derivatives against finite differences (public: use it on your own functions).

``check_grads(f, args)`` checks forward mode (J v) and reverse mode (u^T J) along random
directions against central differences, then recursively checks the derivative functions
themselves up to ``order`` (so order=2 checks Hessian-vector products too).
``gradcheck(f, inputs)`` compares full Jacobians, PyTorch style. Use float64 inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .creation import as_tensor
from .tensor import Tensor
from .transforms import jvp, vjp


class GradcheckError(AssertionError):
    """A derivative disagrees with finite differences."""


def _outputs(out: Any) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else list(out)


def _like(rng: np.random.Generator, t: Tensor) -> Tensor:
    return as_tensor(rng.standard_normal(t.shape).astype(t.dtype), device=t.device)


def _inner(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    return float(sum(np.vdot(x.numpy(), y.numpy()) for x, y in zip(xs, ys)))


def _numerical_jvp(
    f: Callable[..., Any], args: Sequence[Tensor], dirs: Sequence[Tensor], eps: float
) -> list[np.ndarray]:
    plus = _outputs(f(*[a + d * eps for a, d in zip(args, dirs)]))
    minus = _outputs(f(*[a - d * eps for a, d in zip(args, dirs)]))
    return [(p.numpy() - m.numpy()) / (2 * eps) for p, m in zip(plus, minus)]


def _close(name: str, got: Any, want: Any, atol: float, rtol: float) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if not np.allclose(got, want, atol=atol, rtol=rtol):
        err = np.max(np.abs(got - want)) if got.size else 0.0
        raise GradcheckError(
            f"{name}: derivative {got} differs from the finite-difference "
            f"estimate {want} (max abs error {err:.3g}, atol={atol}, "
            f"rtol={rtol})"
        )


def check_grads(
    f: Callable[..., Any],
    args: Sequence[Any],
    order: int = 2,
    modes: Sequence[str] = ("rev", "fwd"),
    eps: float = 1e-6,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> None:
    """Raise ``GradcheckError`` unless f's derivatives up to ``order`` match central
    differences along random directions, in each mode of ``modes`` ("rev", "fwd")."""
    args = [as_tensor(a) for a in args]
    double = all(a.dtype == np.float64 for a in args)
    atol = atol if atol is not None else (1e-6 if double else 1e-2)
    rtol = rtol if rtol is not None else (1e-5 if double else 1e-2)
    eps = eps if double else max(eps, 1e-3)
    rng = np.random.default_rng(seed)
    _check(f, args, order, tuple(modes), eps, atol, rtol, rng)


def _check(
    f: Callable[..., Any],
    args: list[Tensor],
    order: int,
    modes: tuple[str, ...],
    eps: float,
    atol: float,
    rtol: float,
    rng: np.random.Generator,
) -> None:
    dirs = [_like(rng, a) for a in args]
    numeric = _numerical_jvp(f, args, dirs, eps)
    if "fwd" in modes:
        _, tangent = jvp(f, args, dirs)
        for k, (t, n) in enumerate(zip(_outputs(tangent), numeric)):
            _close(f"forward mode (J v), output {k}", t.numpy(), n, atol, rtol)
        if order > 1:
            _check(lambda *xs: jvp(f, xs, dirs)[1], args, order - 1, modes, eps, atol, rtol, rng)
    if "rev" in modes:
        out, pullback = vjp(f, *args)
        us = [_like(rng, o) for o in _outputs(out)]
        cotangents = pullback(us[0] if isinstance(out, Tensor) else us)
        lhs = _inner(cotangents, dirs)  # <J^T u, v>
        rhs = float(sum(np.vdot(u.numpy(), n) for u, n in zip(us, numeric)))  # <u, J v>
        _close("reverse mode <J^T u, v> vs <u, J v>", lhs, rhs, atol, rtol)
        if order > 1:
            u = us[0] if isinstance(out, Tensor) else us
            _check(lambda *xs: vjp(f, *xs)[1](u), args, order - 1, modes, eps, atol, rtol, rng)


def gradcheck(
    f: Callable[..., Any],
    inputs: Sequence[Any],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    raise_exception: bool = True,
) -> bool:
    """Compare f's full Jacobian from reverse mode with central differences, one input
    coordinate at a time (PyTorch's ``gradcheck``). Inputs should be float64."""
    inputs = [as_tensor(a) for a in inputs]
    out, pullback = vjp(f, *inputs)
    outs = _outputs(out)
    try:
        for k, o in enumerate(outs):
            for j in range(o.numel()):
                basis = [np.zeros(p.shape, p.dtype) for p in outs]
                basis[k].reshape(-1)[j] = 1.0
                us = [as_tensor(b, device=p.device) for b, p in zip(basis, outs)]
                rows = pullback(us[0] if isinstance(out, Tensor) else us)
                for i, (x, row) in enumerate(zip(inputs, rows)):
                    numeric = np.empty(x.numel())
                    for c in range(x.numel()):
                        e = np.zeros(x.shape, x.dtype)
                        e.reshape(-1)[c] = 1.0
                        dirs = [
                            as_tensor(e if m == i else np.zeros(a.shape, a.dtype), device=a.device)
                            for m, a in enumerate(inputs)
                        ]
                        numeric[c] = _numerical_jvp(f, inputs, dirs, eps)[k].reshape(-1)[j]
                    _close(
                        f"d output {k}[{j}] / d input {i}",
                        row.numpy().reshape(-1),
                        numeric,
                        atol,
                        rtol,
                    )
    except GradcheckError:
        if raise_exception:
            raise
        return False
    return True
