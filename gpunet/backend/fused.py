"""Fused elementwise ops, written once against the array API: activations (forward, backward
``dx = g * f'``, bias + activation) and the optimizer updates over flat buffers.

``kernels/activations.cuh`` is the source of truth for the formulas; every ``_f_*`` (f),
``_df_*`` (f' from x) and ``_dfy_*`` (f' from the output y) below is the same expression,
operation for operation, in the same stable form, and ``FusedOps.FORMULAS`` (at the end of
the class) lists them per activation: ``activation`` and ``activation_backward`` call them
from that table. This generic version runs on array-api-strict (so it calls nothing
NumPy-only) and is CuPy's fallback for dtypes without a kernel; NumPy overrides the formulas
with in-place versions and a table of its own (``numpy_fused.py``), CuPy the public ops with
kernel launches (``kernels.py``).

An activation is named by its kernel name (``ACTIVATIONS``) and one scalar ``alpha``: the
negative slope of leaky_relu, ELU's alpha, softplus's beta; the others ignore it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .updates import (
    AdamHyper,
    SGDHyper,
    check_adam_update,
    check_sgd_update,
    state_dtype,
)

Array = Any

ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "elu",
    "sigmoid",
    "tanh",
    "softplus",
    "silu",
    "gelu",
    "gelu_tanh",
)
FROM_OUTPUT = frozenset({"relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus"})  # f'(y)

# The constants exactly as activations.cuh spells them (so both round them alike).
NEG_SQRT1_2 = -0.70710678118654752440  # -1/sqrt(2)
INV_SQRT_2PI = 0.39894228040143267794  # 1/sqrt(2 pi)
TWO_K = 2 * 0.79788456080286535588  # 2 sqrt(2/pi)
GELU_C = 0.044715
THREE_C = 3 * 0.044715


@dataclass(frozen=True)
class Formulas:
    """One activation's formulas on raw arrays, as methods of its backend class (called as
    ``f(backend, x, a)``): f, f' from the input x, and f' from the output y = f(x) where it
    has a form in it (``dfy``; None otherwise)."""

    f: Callable[..., Array]
    df: Callable[..., Array]
    dfy: Callable[..., Array] | None = None


def check_activation(name: str, from_output: bool = False) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    if from_output and name not in FROM_OUTPUT:
        raise ValueError(
            f"{name} has no derivative in terms of its output; pass its input "
            f"(from_output=False). From the output: {', '.join(sorted(FROM_OUTPUT))}"
        )


def gelu_name(approximate: str) -> str:
    """The activation behind ``gelu(x, approximate=...)``: "none" (exact, erf) or "tanh"."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


# Craig's formula erfc(u) = (2/pi) int_0^(pi/2) exp(-u^2 / sin^2 t) dt: the integrand is flat
# at both ends, so the midpoint rule converges geometrically (96 nodes: < 2e-14 relative for
# u >= 0.5, to the end of the double range).
_CRAIG_WEIGHTS = tuple(-1.0 / math.sin((k + 0.5) * (math.pi / 2) / 96) ** 2 for k in range(96))


class FusedOps:
    """Activations and optimizer updates through ``self.xp`` (mixed into ArrayBackend)."""

    xp: Any

    # ---------------------------------------------------------------- primitive forwards
    # Each calls ``activation`` with the name by position: by keyword, relu at 10^3 elements
    # on NumPy took 17,307 instructions a call, by position 15,640 (valgrind), as many as
    # calling its formula straight away.
    def relu(self, x: Array) -> Array:
        """relu(x) = max(x, 0); NaN propagates."""
        return self.activation(x, "relu")

    def sigmoid(self, x: Array) -> Array:
        """sigmoid(x) = exp(min(x, 0)) / (1 + exp(-|x|)): no exponent is ever positive."""
        if getattr(x.dtype, "kind", "f") in "biu":  # NumPy's float for ints, as tanh's (i8: f8)
            x = x.astype(np.result_type(x.dtype, np.float16))
        return self.activation(x, "sigmoid")

    def leaky_relu(self, x: Array, *, negative_slope: float) -> Array:
        return self.activation(x, "leaky_relu", negative_slope)

    def elu(self, x: Array, *, alpha: float) -> Array:
        return self.activation(x, "elu", alpha)

    def softplus(self, x: Array, *, beta: float) -> Array:
        return self.activation(x, "softplus", beta)

    def silu(self, x: Array) -> Array:
        return self.activation(x, "silu")

    def gelu(self, x: Array, *, approximate: str) -> Array:
        return self.activation(x, gelu_name(approximate))

    def erf(self, x: Array) -> Array:
        """erf(x): a series for |x| < 1/2, 1 - erfc(|x|) (Craig's formula) beyond."""
        xp = self.xp
        tail = self._erfc_tail(xp.abs(x))
        small = self._erf_series(x)
        return xp.where(xp.abs(x) < 0.5, small, xp.sign(x) * (1.0 - tail))

    # ---------------------------------------------------------------- the fused ops
    def activation(self, x: Array, name: str, alpha: float = 0.0) -> Array:
        """f(x) for the activation ``name`` (kernels/activations.cuh), one pass on CUDA."""
        return self.formulas(name).f(self, x, alpha)

    def activation_backward(
        self,
        g: Array,
        saved: Array,
        *,
        name: str,
        alpha: float = 0.0,
        from_output: bool = False,
        out: Array | None = None,
    ) -> Array:
        """dx = g * f'(x) from the input x, or from the output y = f(x) when
        ``from_output``; one pass on CUDA. ``out`` may be ``g`` (in place) or a fresh array."""
        dx = g * self.derivative(name, from_output)(self, saved, alpha)
        if out is None:
            return dx
        out[...] = dx
        return out

    def bias_activation(
        self,
        x: Array,
        b: Array,
        *,
        name: str,
        alpha: float = 0.0,
        keep_preactivation: bool = False,
    ) -> tuple[Array, Array | None]:
        """(f(x + b), x + b or None) for x of shape (batch, features), b of shape (features,):
        one pass on CUDA. Keep the pre-activation only when the backward needs it (it does
        for the activations without a derivative from the output)."""
        check_activation(name)
        if x.ndim != 2 or b.shape != (x.shape[1],):
            raise ValueError(
                f"bias_activation: x must be (batch, features) and b (features,), got "
                f"{x.shape} and {b.shape}"
            )
        pre = x + b
        return self.activation(pre, name=name, alpha=alpha), pre if keep_preactivation else None

    def sgd_update(
        self,
        param: Array,
        grad: Array,
        momentum_buf: Array | None,
        hyper: SGDHyper,
        *,
        first_step: bool = False,
        step: Array | None = None,
        grad_scale: Array | None = None,
        found_inf: Array | None = None,
        lowp: Array | None = None,
    ) -> None:
        """One SGD step in place, as torch.optim.SGD (``SGDHyper`` has the math);
        ``momentum_buf`` may be None without momentum. In ``state_dtype``; one kernel over
        the flat buffers on CUDA (float16 and float32). ``grad_scale`` multiplies g first
        (g is left so, even on a skip) and a nonzero ``found_inf`` skips the step (``_scaled``
        says how). With ``step`` (the span's step counts, advanced here unless skipped), the
        first step is the one whose count becomes 1, a fact of the device; else
        ``first_step`` says. ``lowp`` (bfloat16 or float16) receives the updated p rounded
        (``updates``: master weights)."""
        check_sgd_update(param, grad, momentum_buf, hyper, step, grad_scale, found_inf, lowp)
        h = hyper
        count = self._advance(step, found_inf)
        with self._scaled(found_inf, param, momentum_buf):
            p, g = self._in_state_dtype(param), self._scale_grad(grad, grad_scale)
            s = self._scalars(p)
            d = g
            if h.weight_decay != 0.0:
                d = p * s(h.weight_decay)
                d += g
            if h.momentum != 0.0:
                later = momentum_buf * s(h.momentum) + (s(1.0) - s(h.dampening)) * d
                if count is not None:  # (a select on the device: no host read of the count)
                    momentum_buf[...] = self.xp.where(count == 1, d, later)
                else:
                    momentum_buf[...] = d if first_step else later
                d = d + s(h.momentum) * momentum_buf if h.nesterov else momentum_buf
            p -= self._lr_scalar(h.lr, p) * d
            if p is not param:
                param[...] = self.xp.astype(p, param.dtype)
        if lowp is not None:  # (after a skipped step's restore: the cast of the final p)
            lowp[...] = self.xp.astype(param, lowp.dtype)

    def adam_update(
        self,
        param: Array,
        grad: Array,
        m: Array,
        v: Array,
        hyper: AdamHyper,
        *,
        step: Array,
        grad_scale: Array | None = None,
        found_inf: Array | None = None,
        lowp: Array | None = None,
    ) -> None:
        """One Adam (L2 added to the gradient) or AdamW (``hyper.decoupled``) step in place,
        as torch.optim (``AdamHyper`` has the math), at the span's step counts ``step``
        (advanced here unless skipped). In ``state_dtype``; one kernel over the flat buffers
        on CUDA (float16 and float32). ``grad_scale`` multiplies g first (g is left so, even
        on a skip) and a nonzero ``found_inf`` skips the step. The bias corrections come from
        the count on the device, in float64 (``_adam_scalars``). ``lowp`` receives the
        updated p rounded."""
        check_adam_update(param, grad, m, v, hyper, step, grad_scale, found_inf, lowp)
        count = self._advance(step, found_inf)
        with self._scaled(found_inf, param, m, v):
            p, g = self._in_state_dtype(param), self._scale_grad(grad, grad_scale)
            s = self._scalars(p)
            l2, decay, step_size, bc2_sqrt = self._adam_scalars(hyper, count, p.dtype)
            one, b1, b2 = s(1.0), s(hyper.beta1), s(hyper.beta2)
            gi = g
            if hyper.weight_decay != 0.0 and not hyper.decoupled:
                gi = p * l2
                gi += g
            if hyper.weight_decay != 0.0 and hyper.decoupled:
                p *= decay
            m *= b1
            m += (one - b1) * gi
            t = (one - b2) * gi
            t *= gi
            v *= b2
            v += t
            denom = self.xp.sqrt(v)
            denom /= bc2_sqrt
            denom += s(hyper.eps)
            t = m / denom
            t *= step_size
            p -= t
            if p is not param:
                param[...] = self.xp.astype(p, param.dtype)
        if lowp is not None:  # (after a skipped step's restore: the cast of the final p)
            lowp[...] = self.xp.astype(param, lowp.dtype)

    def grad_norm(self, x: Array) -> Array:
        """The global L2 norm of a flat buffer, a 0-d array of its dtype (summed in float64;
        a two-stage reduction on CUDA)."""
        xp = self.xp
        x64 = xp.astype(xp.reshape(x, (-1,)), xp.float64)
        return xp.astype(xp.sqrt(xp.sum(x64 * x64)), x.dtype)

    def warmup(self) -> None:
        """Compile the fused kernels ahead of their first use (nothing to do off CUDA)."""

    # ---------------------------------------------------------------- helpers
    def formulas(self, name: str) -> Formulas:
        """This backend's formulas for activation ``name`` (a clear error for an unknown one)."""
        formulas = self.FORMULAS.get(name)
        if formulas is None:
            check_activation(name)  # raises
        return formulas  # type: ignore[return-value]

    def derivative(self, name: str, from_output: bool) -> Callable[..., Array]:
        """f' of activation ``name``, from its output y or its input x (a clear error where f'
        has no form in y)."""
        formulas = self.FORMULAS.get(name) or self.formulas(name)
        df = formulas.dfy if from_output else formulas.df
        if df is None:
            check_activation(name, from_output)  # raises
        return df  # type: ignore[return-value]

    def _scalars(self, like: Array) -> Any:
        """A maker of 0-d arrays of ``like``'s dtype: the kernels compute their scalar
        expressions (1 - beta1, ...) in the buffer's precision, and so must we."""
        xp, dtype = self.xp, like.dtype
        return lambda value: xp.asarray(value, dtype=dtype)

    def _advance(self, step: Array | None, found_inf: Array | None) -> Array | None:
        """Add one to the step counts unless ``found_inf`` is set (on the device); the
        count the update uses, a 0-d int64 array (None without counts)."""
        if step is None:
            return None
        xp = self.xp
        inc = 1 if found_inf is None else xp.astype(xp.reshape(found_inf, ()) == 0, step.dtype)
        step[...] = step + inc
        return xp.reshape(step, (-1,))[0]

    def _lr_scalar(self, lr: float | Array, like: Array) -> Array:
        """The lr as a 0-d array of ``like``'s dtype: a float, or a device array's element
        rounded on the device (never read on the host)."""
        if isinstance(lr, (int, float)):
            return self._scalars(like)(lr)
        return self.xp.astype(self.xp.reshape(lr, ()), like.dtype)

    def _adam_scalars(self, hyper: AdamHyper, count: Array, dtype: Any) -> tuple[Array, ...]:
        """``AdamHyper.scalars`` on the device from the advanced count (t < 1 only on a
        skipped first step, which is undone: taken as 1 so nothing divides by 0): (l2, decay,
        step_size, bc2_sqrt) computed in float64 and rounded to ``dtype``."""
        xp = self.xp
        f64 = xp.float64
        t = xp.astype(xp.maximum(count, xp.ones_like(count)), f64)
        lr = xp.astype(xp.reshape(xp.asarray(hyper.lr, dtype=f64), ()), f64)
        wd = xp.asarray(hyper.weight_decay, dtype=f64)
        one = xp.asarray(1.0, dtype=f64)
        step_size = lr / (one - xp.asarray(hyper.beta1, dtype=f64) ** t)
        bc2_sqrt = xp.sqrt(one - xp.asarray(hyper.beta2, dtype=f64) ** t)
        decay = one - lr * wd if hyper.decoupled else one
        l2 = xp.zeros((), dtype=f64) if hyper.decoupled else wd
        return tuple(xp.astype(x, dtype) for x in (l2, decay, step_size, bc2_sqrt))

    def _scale_grad(self, grad: Array, grad_scale: Array | None) -> Array:
        """The gradient in ``state_dtype``, times ``grad_scale`` when given, and written so
        into ``grad``, the step taken or not: the step leaves the gradient it used (unscaled,
        or averaged over ranks), as PyTorch's optimizers under a GradScaler do."""
        g = self._in_state_dtype(grad)
        if grad_scale is None:
            return g
        xp = self.xp
        g = g * xp.astype(xp.reshape(grad_scale, ()), g.dtype)
        grad[...] = xp.astype(g, grad.dtype)
        return g

    @contextlib.contextmanager
    def _scaled(self, found_inf: Array | None, *buffers: Array | None) -> Iterator[None]:
        """Run an update on ``buffers`` in place, then put them back where ``found_inf`` is
        nonzero: a select on the device, never a host read (the kernels skip instead)."""
        if found_inf is None:
            yield
            return
        xp = self.xp
        kept = [(b, xp.asarray(b, copy=True)) for b in buffers if b is not None]
        yield
        skip = xp.reshape(found_inf, ()) != 0
        for b, before in kept:
            b[...] = xp.where(skip, before, b)

    def _in_state_dtype(self, x: Array) -> Array:
        """x itself, or (float16) a copy in ``state_dtype``: the precision of the update."""
        want = state_dtype(x.dtype)
        return x if want is x.dtype else self.xp.astype(x, want)

    def _max0(self, x: Array) -> Array:
        return self.xp.maximum(x, self.xp.zeros((), dtype=x.dtype))

    def _min0(self, x: Array) -> Array:
        return self.xp.minimum(x, self.xp.zeros((), dtype=x.dtype))

    def _pos(self, x: Array) -> Array:
        return self.xp.astype(x > 0, x.dtype)

    def _nonpos(self, x: Array) -> Array:
        return self.xp.astype(x <= 0, x.dtype)

    def _erf_series(self, x: Array) -> Array:
        """erf(x) = 2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1)), for |x| <= 1/2 (x clipped)."""
        xp = self.xp
        x = xp.clip(x, -0.5, 0.5)
        x2 = x * x
        power, total = x, x
        for n in range(1, 20):
            power = power * x2 * (-1.0 / n)
            total = total + power * (1.0 / (2 * n + 1))
        return total * 1.1283791670955126  # 2/sqrt(pi)

    def _erfc_tail(self, u: Array) -> Array:
        """erfc(u) for u >= 1/2 (u raised to 1/2 below), by Craig's formula."""
        xp = self.xp
        u2 = xp.maximum(u, xp.full((), 0.5, dtype=u.dtype))
        u2 = u2 * u2
        total = xp.zeros_like(u2)
        for w in _CRAIG_WEIGHTS:
            total = total + xp.exp(u2 * w)
        return total * (1.0 / len(_CRAIG_WEIGHTS))

    def _erfc(self, x: Array) -> Array:
        """erfc(x) without cancellation: Craig's formula for |x| >= 1/2, 1 - series within."""
        xp = self.xp
        tail = self._erfc_tail(xp.abs(x))
        inner = 1.0 - self._erf_series(x)
        return xp.where(x >= 0.5, tail, xp.where(x <= -0.5, 2.0 - tail, inner))

    # ---------------------------------------------------------------- the formulas
    # f, f' and f' from y for each activation; activations.cuh has the reasoning.
    def _f_relu(self, x: Array, a: float) -> Array:
        return self._max0(x)

    def _df_relu(self, x: Array, a: float) -> Array:
        return self._pos(x)

    def _dfy_relu(self, y: Array, a: float) -> Array:
        return self._pos(y)

    def _f_leaky_relu(self, x: Array, a: float) -> Array:
        return self._max0(x) + a * self._min0(x)

    def _df_leaky_relu(self, x: Array, a: float) -> Array:
        p = self._pos(x)
        return p + a * (1.0 - p)

    def _f_elu(self, x: Array, a: float) -> Array:
        return self._max0(x) + a * self.xp.expm1(self._min0(x))

    def _df_elu(self, x: Array, a: float) -> Array:
        return self._pos(x) + self._nonpos(x) * (a * self.xp.exp(self._min0(x)))

    def _dfy_elu(self, y: Array, a: float) -> Array:
        return self._pos(y) + self._nonpos(y) * (self._min0(y) + a)

    def _f_sigmoid(self, x: Array, a: float) -> Array:
        xp = self.xp
        z = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, xp.ones_like(z), z) / (1.0 + z)

    def _df_sigmoid(self, x: Array, a: float) -> Array:
        xp = self.xp
        z = xp.exp(-xp.abs(x))
        d = 1.0 + z
        return z / (d * d)

    def _dfy_sigmoid(self, y: Array, a: float) -> Array:
        return y * (1.0 - y)

    def _f_tanh(self, x: Array, a: float) -> Array:
        return self.xp.tanh(x)

    def _df_tanh(self, x: Array, a: float) -> Array:
        t = self.xp.tanh(x)
        return 1.0 - t * t

    def _dfy_tanh(self, y: Array, a: float) -> Array:
        return 1.0 - y * y

    def _f_softplus(self, x: Array, a: float) -> Array:
        xp = self.xp
        u = a * x
        return (self._max0(u) + xp.log1p(xp.exp(-xp.abs(u)))) / a

    def _df_softplus(self, x: Array, a: float) -> Array:
        return self._f_sigmoid(a * x, a)

    def _dfy_softplus(self, y: Array, a: float) -> Array:
        return -self.xp.expm1(-a * y)

    def _f_silu(self, x: Array, a: float) -> Array:
        return x * self._f_sigmoid(x, a)

    def _df_silu(self, x: Array, a: float) -> Array:
        return self._x_sigmoid_grad(x, x, None)

    def _x_sigmoid_grad(self, x: Array, v: Array, dv: Array | None) -> Array:
        """d/dx [x sigmoid(v)] = s + x s'(v) v' (silu: v = x, v' = 1; tanh-GELU: v = 2u)."""
        xp = self.xp
        z = xp.exp(-xp.abs(v))
        d = 1.0 + z
        s = xp.where(v >= 0, xp.ones_like(z), z) / d
        q = x * (z / (d * d))
        return s + (q if dv is None else q * dv)

    def _f_gelu(self, x: Array, a: float) -> Array:
        return x * (0.5 * self._erfc(x * NEG_SQRT1_2))

    def _df_gelu(self, x: Array, a: float) -> Array:
        cdf = 0.5 * self._erfc(x * NEG_SQRT1_2)
        pdf = INV_SQRT_2PI * self.xp.exp(-0.5 * x * x)
        return cdf + x * pdf

    def _gelu_tanh_u2(self, x: Array) -> Array:
        return TWO_K * (x + GELU_C * x * x * x)

    def _f_gelu_tanh(self, x: Array, a: float) -> Array:
        return x * self._f_sigmoid(self._gelu_tanh_u2(x), a)

    def _df_gelu_tanh(self, x: Array, a: float) -> Array:
        du2 = TWO_K * (1.0 + THREE_C * x * x)
        return self._x_sigmoid_grad(x, self._gelu_tanh_u2(x), du2)

    # f' from y equals f' from x for leaky_relu when a >= 0 (the sign of y is that of x)
    FORMULAS: ClassVar[dict[str, Formulas]] = {
        "relu": Formulas(f=_f_relu, df=_df_relu, dfy=_dfy_relu),
        "leaky_relu": Formulas(f=_f_leaky_relu, df=_df_leaky_relu, dfy=_df_leaky_relu),
        "elu": Formulas(f=_f_elu, df=_df_elu, dfy=_dfy_elu),
        "sigmoid": Formulas(f=_f_sigmoid, df=_df_sigmoid, dfy=_dfy_sigmoid),
        "tanh": Formulas(f=_f_tanh, df=_df_tanh, dfy=_dfy_tanh),
        "softplus": Formulas(f=_f_softplus, df=_df_softplus, dfy=_dfy_softplus),
        "silu": Formulas(f=_f_silu, df=_df_silu),
        "gelu": Formulas(f=_f_gelu, df=_df_gelu),
        "gelu_tanh": Formulas(f=_f_gelu_tanh, df=_df_gelu_tanh),
    }
