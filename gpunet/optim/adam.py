"""Adam (L2 weight decay added to the gradient) and AdamW (decoupled decay), as torch.optim."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from ..autodiff import CAPTURE, STATE, Dynamic, call
from ..backend.updates import AdamHyper
from ..tensor import Tensor
from .flat import FlatBuffer
from .optimizer import Optimizer, check_lr


class Adam(Optimizer):
    """m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps); g += wd p first.

    Each parameter's step count t (``state[p]["step"]``) is a 0-d int64 array on its device,
    advanced by the fused update itself unless a loss scaler skips the step, and the bias
    corrections are computed from it there: a step reads nothing on the host. With
    ``capturable=True`` the lr is a device array too (``Optimizer._lr``), so a captured step
    can replay as a CUDA graph; ``state_dict()`` gives the counts as ints."""

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
        *,
        capturable: bool = False,
    ) -> None:
        check_lr(lr, capturable)
        if eps < 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}; each must be in [0, 1)")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, capturable=capturable
        )
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], flat: FlatBuffer, indices: list[int]) -> None:
        m, v = flat.buffer("exp_avg"), flat.buffer("exp_avg_sq")
        for i in indices:
            st = self.state.setdefault(flat.params[i], {})
            if not st:
                st.update(
                    step=flat.count_view(i), exp_avg=flat.view(m, i), exp_avg_sq=flat.view(v, i)
                )
        hyper: Any = _hyper(group, self.decoupled, self._lr(group, flat))
        if STATE.flags & CAPTURE:  # a capture replays these with the group's values of the
            # moment (the step counts are arrays that the update advances: nothing to redo)
            hyper = Dynamic(hyper, functools.partial(self._hyper_now, group, flat))
        # Neighbours that share a step count share one fused update, which advances the count
        # (unless the loss scaler skips the step) and computes the bias corrections from it.
        for start, stop, count in flat.step_spans(indices):
            call(
                "adam_update",
                flat.backend.adam_update,
                *(flat.data[start:stop], flat.grad[start:stop], m[start:stop], v[start:stop]),
                hyper=hyper,
                step=count,
                **self._fused_args(flat, start, stop),
            )
        if flat.lowp is not None:
            flat.lowp_written(indices)

    def _hyper_now(self, group: dict[str, Any], flat: FlatBuffer) -> AdamHyper:
        return _hyper(group, self.decoupled, self._lr(group, flat))


def _hyper(group: dict[str, Any], decoupled: bool, lr: Any) -> AdamHyper:
    """The update's hyperparameters, from the group now (``lr``: its float or device array)."""
    beta1, beta2 = group["betas"]
    return AdamHyper(lr, beta1, beta2, group["eps"], group["weight_decay"], decoupled)


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
        *,
        capturable: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, capturable=capturable)
