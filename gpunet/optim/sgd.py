"""SGD with momentum, dampening, Nesterov and weight decay, as torch.optim.SGD."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..autodiff import OBSERVE, STATE, observe
from ..tensor import Tensor
from .flat import FlatBuffer
from .optimizer import Optimizer


class SGD(Optimizer):
    """d = g + wd p; with momentum, buf = d on the first step, else momentum buf +
    (1 - dampening) d, and d = d + momentum buf (Nesterov) or buf; p -= lr d."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], flat: FlatBuffer, indices: list[int]) -> None:
        momentum = group["momentum"]
        states = [self.state.setdefault(flat.params[i], {}) for i in indices]
        # A parameter's first step with momentum starts its buffer: a run of its own.
        firsts = [momentum != 0 and st.get("momentum_buffer") is None for st in states]
        buf = flat.buffer("momentum_buffer") if momentum != 0 else None
        for start, stop, first in flat.spans(indices, firsts):
            arrays = (
                flat.data[start:stop],
                flat.grad[start:stop],
                None if buf is None else buf[start:stop],
            )
            hyper = dict(
                lr=group["lr"],
                momentum=momentum,
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                first_step=first,
            )
            flat.backend.sgd_update(*arrays, **hyper)
            if STATE.flags & OBSERVE:  # gpunet.profile sees the fused kernel
                observe("sgd_update", arrays, hyper, arrays[0])
        for i, st in zip(indices, states):
            st["momentum_buffer"] = None if buf is None else flat.view(buf, i)
