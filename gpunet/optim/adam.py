"""Adam (L2 weight decay added to the gradient) and AdamW (decoupled decay), as torch.optim."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from ..autodiff import CAPTURE, STATE, Dynamic, call
from ..backend.updates import AdamHyper
from ..tensor import Tensor
from .flat import FlatBuffer
from .optimizer import Optimizer


class Adam(Optimizer):
    """m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps); g += wd p first."""

    decoupled = False
    _capturable = True
    _fused_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}; each must be in [0, 1)")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], flat: FlatBuffer, indices: list[int]) -> None:
        m, v = flat.buffer("exp_avg"), flat.buffer("exp_avg_sq")
        scaling = self._scaling()
        found = scaling.get("found_inf")
        states = []
        for i in indices:
            st = self.state.setdefault(flat.params[i], {})
            if not st:
                st.update(step=0, exp_avg=flat.view(m, i), exp_avg_sq=flat.view(v, i))
            states.append(st)
        _advance(states, found)

        hyper: Any = _hyper(group, self.decoupled)
        capturing = STATE.flags & CAPTURE
        if capturing:  # a capture replays these with the group's values of the moment, each
            # replay advancing the step counts of the parameters in the span and using them
            hyper = Dynamic(hyper, functools.partial(_hyper, group, self.decoupled))
        # Neighbours at the same step count share one fused update.
        for start, stop, step in flat.spans(indices, [st["step"] for st in states]):
            arrays = (flat.data[start:stop], flat.grad[start:stop], m[start:stop], v[start:stop])
            count: Any = max(step, 1)  # (a first step skipped by the scaler: the kernel skips)
            if capturing:
                span = [st for i, st in zip(indices, states) if start <= flat.offsets[i] < stop]
                count = Dynamic(count, functools.partial(_advance, span, found))
            call(
                "adam_update",
                flat.backend.adam_update,
                *arrays,
                hyper=hyper,
                step=count,
                **scaling,
            )


def _hyper(group: dict[str, Any], decoupled: bool) -> AdamHyper:
    """The update's hyperparameters, from the group now."""
    beta1, beta2 = group["betas"]
    return AdamHyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], decoupled)


def _advance(states: list[dict[str, Any]], found_inf: Any = None) -> int:
    """One more step for each of ``states`` (a span sharing one count) unless a loss scaler's
    ``found_inf`` is set (a skipped step, as PyTorch's): the count to update with (from 1).
    The one host read of the flag: the bias corrections are computed on the host."""
    if found_inf is None or not float(found_inf.reshape(-1)[0]):
        for st in states:
            st["step"] += 1
    return max(states[0]["step"], 1)


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr wd before the Adam step."""

    decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)
