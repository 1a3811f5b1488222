"""The fused activation ops on NumPy: kernels/activations.cuh, formula for formula, in place.

Each formula is the CUDA one, operation for operation and in the same order, so the CPU and
the GPU compute the same floating-point expression (the kernel tests hold the g++-compiled
kernels to these bit for bit where the math is exact, to 1e-6 where libm differs). Every
array here is fresh (``out=``, then in place): inputs are never written, and a backward
``dx = g * f'`` allocates f' once and multiplies g into it. Selects on the sign of x are
``np.maximum``/``np.minimum``/comparisons, never ``np.where`` (a select on a random mask
costs ten passes). Where a parameter allows a cheaper exact rewrite (leaky_relu and elu with
0 <= alpha <= 1) it is taken: the same values in fewer passes.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import scipy.special

from . import erfc32
from .fused import (
    GELU_C,
    INV_SQRT_2PI,
    NEG_SQRT1_2,
    THREE_C,
    TWO_K,
    Formulas,
    FusedOps,
)
from .updates import (
    AdamHyper,
    SGDHyper,
    check_adam_update,
    check_sgd_update,
    lr_value,
    state_dtype,
)

Array = Any
# Large arrays go through the longer formulas CHUNK elements at a time, so that their
# several passes run over temporaries that stay in cache (1.2-1.5x at 10^6 elements); short
# ones (a few passes) would only pay the Python loop.
CHUNK = 1 << 15
LONG = frozenset({"elu", "sigmoid", "softplus", "silu", "gelu", "gelu_tanh"})  # f and f'(x)


def _new(x: np.ndarray) -> np.ndarray:
    return np.empty_like(x)  # out= into it keeps 0-d results arrays


def _erfc(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """erfc(z): erfc32's vectorized fit for float32 (3x SciPy's scalar cephes, within 1e-7
    relative), SciPy for float64 (the gradient checks need every double digit) and the rest."""
    if z.dtype == np.float32:
        return erfc32.erfc(z, out=out)
    return scipy.special.erfc(z, out=out)


def _pieces(*arrays: Array | None) -> Any:
    """Aligned CHUNK-element slices of equally long C-contiguous arrays (None stays None),
    flattened: the one chunk loop of this module."""
    flats = [None if a is None else a.reshape(-1) for a in arrays]
    for start in range(0, arrays[0].size, CHUNK):
        yield [None if f is None else f[start : start + CHUNK] for f in flats]


def _chunks(*buffers: Array | None, grad_scale: Array | None = None) -> Any:
    """``_pieces_with_scratch``, with its common case for a small model first: one piece in
    the buffers' own dtype, unscaled, handed over as a list (no generator: 1.35 -> 0.74 us a
    step, about 1% of the tiny MLP's)."""
    first = buffers[0]
    if grad_scale is None and first.size < 2 * CHUNK and state_dtype(first.dtype) is first.dtype:
        scratch = np.empty((2, *first.shape), first.dtype)
        return [(scratch[0, ...], scratch[1, ...], *buffers)]  # (views, 0-d ones too)
    return _pieces_with_scratch(*buffers, grad_scale=grad_scale)


def _pieces_with_scratch(*buffers: Array | None, grad_scale: Array | None = None) -> Any:
    """Optimizer buffers (the parameter, its gradient, its state) CHUNK elements at a time
    when all are long and contiguous: the ten or so passes of an Adam update then stay in
    cache (1.5x at 10^6 float32), as a flat buffer holding a whole model would otherwise
    spill it; else the buffers whole, once. Each piece comes with two scratch arrays of its
    shape, ``(t, u, *pieces)``, cut from one allocation as long as the longest piece, for the
    update's temporaries. A float16 parameter and gradient come as float32 copies (the update
    computes in ``state_dtype``), and the parameter's piece is rounded back when the caller
    asks for the next one. With ``grad_scale``, the gradient comes multiplied by it (in
    ``state_dtype``) and is written so into the caller's gradient: the step leaves the gradient
    it used (unscaled, or averaged over ranks), as PyTorch's optimizers under a scaler do."""
    first = buffers[0]
    dtype = state_dtype(first.dtype)
    half = dtype is not first.dtype  # float16: two more rows, for the float32 p and g
    scale = None if grad_scale is None else dtype.type(grad_scale.reshape(-1)[0])
    whole = first.size < 2 * CHUNK or not all(
        b is None or (b.flags.c_contiguous and b.shape == first.shape) for b in buffers
    )
    rows = 4 if half else 2
    scratch = np.empty((rows, first.size if whole else CHUNK), dtype)
    for pieces in [buffers] if whole else _pieces(*buffers):
        k = pieces[0].size
        t, u = scratch[0, :k], scratch[1, :k]
        if whole:
            t, u = t.reshape(first.shape), u.reshape(first.shape)
        if not half and scale is None:
            yield t, u, *pieces
            continue
        p = scratch[2, :k].reshape(t.shape) if half else pieces[0]
        g = scratch[3, :k].reshape(t.shape) if half else pieces[1]
        if half:
            np.copyto(p, pieces[0])
            np.copyto(g, pieces[1])
        if scale is not None:  # (written back while in cache: p.grad reads what the step used)
            g *= scale
            if half:
                np.copyto(pieces[1], g, casting="unsafe")
        yield t, u, p, g, *pieces[2:]
        if half:
            np.copyto(pieces[0], p)  # the one rounding to float16


def _begin(
    op: str,
    param: Array,
    grad: Array,
    step: Array | None,
    grad_scale: Array | None,
    found_inf: Array | None,
    lowp: Array | None,
) -> Any:
    """The count this update uses (0 without counts), its step counts advanced; None when a
    loss scaler's found-inf flag skips the step: counts untouched, the low-precision copy the
    cast of the unchanged weights, the gradient times ``grad_scale`` all the same (it reads
    unscaled after every scaled step). (Host memory here: reading the flag and counts is
    free.)"""
    count = 0 if step is None else int(step.reshape(-1)[0])
    if count < 0:
        raise ValueError(f"{op}: step counts the steps taken (from 0), got {count}")
    if found_inf is not None and found_inf.reshape(-1)[0] != 0:
        if lowp is not None:  # (the cast of the old p: the copy is current after a skip)
            np.copyto(lowp, param, casting="unsafe")
        if grad_scale is not None:
            dtype = state_dtype(grad.dtype)
            product = grad.astype(dtype) * dtype.type(grad_scale.reshape(-1)[0])
            np.copyto(grad, product, casting="unsafe")
        return None
    if step is None:
        return 0
    step += 1
    return count + 1


class NumpyFusedOps(FusedOps):
    """NumPy overrides of the generic fused ops (mixed into NumpyBackend)."""

    def erf(self, x: Array) -> Array:
        return scipy.special.erf(x, out=_new(x))

    def activation(self, x: Array, name: str, alpha: float = 0.0) -> Array:
        # the lookup inline, ``formulas`` only for the error: one Python frame fewer on every
        # activation (relu at 10^3 elements costs as much in Python as in NumPy)
        if x.dtype.char in "eE":  # float16 too: the kernels compute in float, round once
            return through_float32(self.activation, x, name, alpha)
        f = (self.FORMULAS.get(name) or self.formulas(name)).f
        if name not in LONG or x.size < 2 * CHUNK or not x.flags.c_contiguous:
            return f(self, x, alpha)
        out = np.empty_like(x)
        for x_, out_ in _pieces(x, out):
            out_[...] = f(self, x_, alpha)
        return out

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
        if g.dtype.char in "eE":
            dx = through_float32(
                self.activation_backward, g, saved, name=name, alpha=alpha, from_output=from_output
            )
            if out is None:
                return dx
            out[...] = dx
            return out
        df = self.derivative(name, from_output)
        contiguous = g.flags.c_contiguous and saved.flags.c_contiguous
        long = name in LONG and not from_output and g.size >= 2 * CHUNK
        if not long or not contiguous or (out is not None and out is not g):
            d = df(self, saved, alpha)
            return np.multiply(d, g, out=d if out is None else out)
        dx = np.empty_like(g) if out is None else out
        for g_, saved_, dx_ in _pieces(g, saved, dx):
            np.multiply(df(self, saved_, alpha), g_, out=dx_)
        return dx

    def bias_activation(
        self,
        x: Array,
        b: Array,
        *,
        name: str,
        alpha: float = 0.0,
        keep_preactivation: bool = False,
    ) -> tuple[Array, Array | None]:
        if x.dtype.char in "eE":  # the kernels apply f to x + b in float: round once, after f
            return through_float32(
                super().bias_activation,
                x,
                b,
                name=name,
                alpha=alpha,
                keep_preactivation=keep_preactivation,
            )
        return super().bias_activation(
            x, b, name=name, alpha=alpha, keep_preactivation=keep_preactivation
        )

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
        check_sgd_update(param, grad, momentum_buf, hyper, step, grad_scale, found_inf, lowp)
        h = hyper
        count = _begin("sgd_update", param, grad, step, grad_scale, found_inf, lowp)
        if count is None:
            return
        first_step = count == 1 if step is not None else first_step
        dt = state_dtype(param.dtype).type  # the scalars in the update's precision, as CUDA's
        lr, wd = dt(lr_value(h.lr)), dt(h.weight_decay)
        mu, keep = dt(h.momentum), dt(1) - dt(h.dampening)
        chunks = _chunks(param, grad, momentum_buf, lowp, grad_scale=grad_scale)
        for t, u, p, g, buf, low in chunks:
            # FusedOps.sgd_update's expression, operation for operation (the same bits), on
            # two cache-sized scratch rows instead of fresh temporaries
            d = g
            if h.weight_decay != 0.0:
                d = np.multiply(p, wd, out=t)
                d += g
            if h.momentum != 0.0:
                if first_step:
                    buf[...] = d
                else:
                    buf *= mu
                    buf += np.multiply(d, keep, out=u)
                d = np.add(d, np.multiply(buf, mu, out=u), out=u) if h.nesterov else buf
            p -= np.multiply(d, lr, out=t)
            if low is not None:  # (while the piece is in cache: the same pass)
                np.copyto(low, p, casting="unsafe")

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
        check_adam_update(param, grad, m, v, hyper, step, grad_scale, found_inf, lowp)
        count = _begin("adam_update", param, grad, step, grad_scale, found_inf, lowp)
        if count is None:
            return
        l2, decay, step_size, bc2_sqrt = hyper.scalars(count)
        dt = state_dtype(param.dtype).type  # the scalars in the update's precision, as CUDA's
        b1, b2, one = dt(hyper.beta1), dt(hyper.beta2), dt(1.0)
        c1, c2 = one - b1, one - b2
        l2_, decay_, ss, bc2, eps = dt(l2), dt(decay), dt(step_size), dt(bc2_sqrt), dt(hyper.eps)
        for t, u, p, g, m_, v_, low in _chunks(param, grad, m, v, lowp, grad_scale=grad_scale):
            # FusedOps.adam_update's expression, operation for operation (the same bits),
            # on two cache-sized scratch rows instead of fresh temporaries
            gi = g
            if l2 != 0.0:
                gi = np.multiply(p, l2_, out=t)
                gi += g
            if decay != 1.0:
                p *= decay_
            m_ *= b1
            m_ += np.multiply(c1, gi, out=u)
            sq = np.multiply(c2, gi, out=u)
            sq *= gi
            v_ *= b2
            v_ += sq
            q = np.sqrt(v_, out=u)
            q /= bc2
            q += eps
            q = np.divide(m_, q, out=u)
            q *= ss
            p -= q
            if low is not None:  # (while the piece is in cache: the same pass)
                np.copyto(low, p, casting="unsafe")

    def grad_norm(self, x: Array) -> Array:
        flat = x.reshape(-1)
        total, chunk = 0.0, 1 << 16  # float64 squares, one chunk at a time
        for start in range(0, flat.size, chunk):
            part = flat[start : start + chunk].astype(np.float64)
            total += float(np.dot(part, part))
        return np.asarray(math.sqrt(total), dtype=x.dtype)

    # ---------------------------------------------------------------- the formulas
    def _f_relu(self, x: Array, a: float) -> Array:
        return np.maximum(x, 0, out=_new(x))

    def _df_relu(self, x: Array, a: float) -> Array:
        return np.greater(x, 0, out=_new(x))

    def _dfy_relu(self, y: Array, a: float) -> Array:
        return np.greater(y, 0, out=_new(y))

    def _f_leaky_relu(self, x: Array, a: float) -> Array:
        out = np.minimum(x, 0, out=_new(x))
        out *= a
        out += np.maximum(x, 0)
        return out

    def _df_leaky_relu(self, x: Array, a: float) -> Array:
        if 0.0 <= a <= 1.0:  # p + a (1 - p) = max(p, a) exactly: two passes, not four
            return np.maximum(x > 0, x.dtype.type(a), out=_new(x))
        p = np.greater(x, 0, out=_new(x))
        out = np.subtract(1, p, out=_new(x))
        out *= a
        out += p
        return out

    def _f_elu(self, x: Array, a: float) -> Array:
        out = np.minimum(x, 0, out=_new(x))
        np.expm1(out, out=out)
        out *= a
        out += np.maximum(x, 0)
        return out

    def _df_elu(self, x: Array, a: float) -> Array:
        out = np.minimum(x, 0, out=_new(x))
        np.exp(out, out=out)
        out *= a
        step = np.less_equal(x, 0, out=_new(x))
        out *= step
        out += np.greater(x, 0, out=step)
        return out

    def _dfy_elu(self, y: Array, a: float) -> Array:
        out = np.minimum(y, 0, out=_new(y))
        out += a
        if a == 1.0:  # pos + nonpos (min0 + 1) = min0 + 1 exactly
            return out
        if 0.0 <= a < 1.0:  # ... = max(min0 + a, pos) exactly, as y >= -a
            return np.maximum(out, y > 0, out=out)
        step = np.less_equal(y, 0, out=_new(y))
        out *= step
        out += np.greater(y, 0, out=step)
        return out

    def _f_sigmoid(self, x: Array, a: float) -> Array:
        z = np.abs(x, out=_new(x))
        np.negative(z, out=z)
        np.exp(z, out=z)
        d = np.add(z, 1, out=_new(x))
        np.maximum(z, x >= 0, out=z)  # the numerator: 1 for x >= 0, else z (branch-free)
        z /= d
        return z

    def _df_sigmoid(self, x: Array, a: float) -> Array:
        z = np.abs(x, out=_new(x))
        np.negative(z, out=z)
        np.exp(z, out=z)
        d = np.add(z, 1, out=_new(x))
        d *= d
        z /= d
        return z

    def _dfy_sigmoid(self, y: Array, a: float) -> Array:
        out = np.subtract(1, y, out=_new(y))
        out *= y
        return out

    def _f_tanh(self, x: Array, a: float) -> Array:
        return np.tanh(x, out=_new(x))

    def _df_tanh(self, x: Array, a: float) -> Array:
        t = np.tanh(x, out=_new(x))
        np.multiply(t, t, out=t)
        return np.subtract(1, t, out=t)

    def _dfy_tanh(self, y: Array, a: float) -> Array:
        t = np.multiply(y, y, out=_new(y))
        return np.subtract(1, t, out=t)

    def _f_softplus(self, x: Array, a: float) -> Array:
        u = np.multiply(x, a, out=_new(x))
        t = np.abs(u, out=_new(x))
        np.negative(t, out=t)
        np.exp(t, out=t)
        np.log1p(t, out=t)
        np.maximum(u, 0, out=u)
        u += t
        u /= a
        return u

    def _df_softplus(self, x: Array, a: float) -> Array:
        return self._f_sigmoid(np.multiply(x, a, out=_new(x)), a)

    def _dfy_softplus(self, y: Array, a: float) -> Array:
        out = np.multiply(y, -a, out=_new(y))
        np.expm1(out, out=out)
        return np.negative(out, out=out)

    def _f_silu(self, x: Array, a: float) -> Array:
        out = self._f_sigmoid(x, a)
        out *= x
        return out

    def _df_silu(self, x: Array, a: float) -> Array:
        return self._x_sigmoid_grad(x, x, None)

    def _f_gelu(self, x: Array, a: float) -> Array:
        out = np.multiply(x, NEG_SQRT1_2, out=_new(x))
        _erfc(out, out=out)
        out *= 0.5
        out *= x
        return out

    def _df_gelu(self, x: Array, a: float) -> Array:
        cdf = np.multiply(x, NEG_SQRT1_2, out=_new(x))
        _erfc(cdf, out=cdf)
        cdf *= 0.5
        pdf = np.multiply(x, -0.5, out=_new(x))
        pdf *= x
        np.exp(pdf, out=pdf)
        pdf *= INV_SQRT_2PI
        pdf *= x
        cdf += pdf
        return cdf

    def _gelu_tanh_u2(self, x: Array) -> Array:
        u2 = np.multiply(x, GELU_C, out=_new(x))
        u2 *= x
        u2 *= x
        u2 += x
        u2 *= TWO_K
        return u2

    def _f_gelu_tanh(self, x: Array, a: float) -> Array:
        out = self._f_sigmoid(self._gelu_tanh_u2(x), a)
        out *= x
        return out

    def _df_gelu_tanh(self, x: Array, a: float) -> Array:
        du2 = np.multiply(x, THREE_C, out=_new(x))
        du2 *= x
        du2 += 1
        du2 *= TWO_K
        return self._x_sigmoid_grad(x, self._gelu_tanh_u2(x), du2)

    def _x_sigmoid_grad(self, x: Array, v: Array, dv: Array | None) -> Array:
        """d/dx [x sigmoid(v)] = s + x s'(v) v', s' = z / (1 + z)^2 (silu: v = x, v' = 1;
        tanh-GELU: v = 2u)."""
        s = np.greater_equal(v, 0, out=_new(v))
        z = np.abs(v, out=_new(v) if v is x else v)  # v's last use: reuse it if ours
        np.negative(z, out=z)
        np.exp(z, out=z)
        d = np.add(z, 1, out=_new(z))
        np.maximum(s, z, out=s)  # the numerator: 1 for v >= 0, else z
        s /= d
        d *= d
        z /= d
        z *= x
        if dv is not None:
            z *= dv
        s += z
        return s

    # the generic table's shape: leaky_relu's f' from y is its f' from x (for a >= 0)
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


# ---------------------------------------------------------------------- bfloat16
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


def _up(a: Any) -> Any:
    return a.astype(F32) if type(a) is np.ndarray and a.dtype.char in "eE" else a


def _down(r: Any, low: np.dtype) -> Any:
    if type(r) is tuple:
        return tuple(_down(x, low) for x in r)
    if isinstance(r, (np.ndarray, np.float32)) and r.dtype is F32:  # (0-d reductions: scalars)
        return np.asarray(r).astype(low)
    return r


def through_float32(method: Any, first: Any, *rest: Any, **params: Any) -> Any:
    """``method(first, *rest, **params)`` for bfloat16 (or float16) arrays, computed in float32
    and rounded once to nearest even: NumPy has no bfloat16 or float16 BLAS (its float16
    matmul is a plain loop, 240 times slower), and ml_dtypes' own loops round after every
    ufunc and sum in bfloat16. A method returning None writes ``first``, which is computed
    in float32 and rounded back into it."""
    low = next(a.dtype for a in (first, *rest) if getattr(a, "dtype", F32).char in "eE")
    out = _up(first)
    result = method(out, *[_up(a) for a in rest], **params)
    if result is None and out is not first:
        first[...] = out.astype(low)
        return None
    return _down(result, low)
