"""SGD with momentum, dampening, Nesterov and weight decay, as torch.optim.SGD."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from ..autodiff import CAPTURE, STATE, Dynamic, call
from ..backend.updates import SGDHyper
from ..tensor import Tensor
from .flat import FlatBuffer
from .optimizer import Optimizer, check_lr


class SGD(Optimizer):
    """d = g + wd p; with momentum, buf = d on the first step, else momentum buf +
    (1 - dampening) d, and d = d + momentum buf (Nesterov) or buf; p -= lr d.

    ``in_backward=True`` (momentum 0 only) takes the step inside ``backward()``: each
    parameter becomes p <- (1 - lr wd) p - lr g as soon as its gradient g is formed, and g is
    never stored (``.grad`` stays None, no flat gradient array is allocated, ``step()`` has
    nothing left to do). Where a weight's one use is a GEMM (``Linear``), the step *is* that
    GEMM: W <- (1 - lr wd) W - lr X^T dY, with BLAS's alpha and beta, so the update costs no
    pass over memory of its own. ``lr`` is read at each backward, so schedulers work;
    gradient clipping and per-parameter gradient norms do not (there is no gradient).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        in_backward: bool = False,
        capturable: bool = False,
    ) -> None:
        check_lr(lr, capturable)
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
            in_backward=bool(in_backward),
            capturable=bool(capturable),
        )
        super().__init__(params, defaults)

    def _add_group(self, group: dict[str, Any]) -> None:
        merged = {**self.defaults, **group}
        if merged["in_backward"] != self.defaults["in_backward"]:
            raise ValueError(
                "SGD: in_backward is set for the whole optimizer, not per parameter group "
                f"(this one has {merged['in_backward']}, the optimizer {not merged['in_backward']})"
            )
        if merged["in_backward"] and merged["momentum"] != 0.0:
            raise ValueError(
                f"SGD(in_backward=True) with momentum {merged['momentum']}: a step inside "
                "backward uses each gradient once, as it is formed, and keeps no gradient, so "
                "it has no momentum; use momentum=0, or in_backward=False for momentum"
            )
        super()._add_group(group)

    def group_problems(self, groups: list[dict[str, Any]], source: str) -> list[str]:
        """``in_backward`` must match: it decides where gradients go, so it is fixed when the
        optimizer is made."""
        mine = self.defaults["in_backward"]
        return [
            f"param group {i} was saved with in_backward={saved} in {source}, this optimizer "
            f"has in_backward={mine}; make the optimizer with in_backward={saved} to load it"
            for i, saved in enumerate(g.get("in_backward", False) for g in groups)
            if saved != mine
        ]

    _capturable = True
    _fused_scaling = True

    def _grad_buffers(self) -> bool:
        return not self.defaults["in_backward"]

    def _in_backward(self, index: int) -> InBackward | None:
        return InBackward(self, index) if self.defaults["in_backward"] else None

    def _update(self, group: dict[str, Any], flat: FlatBuffer, indices: list[int]) -> None:
        hyper: Any = _hyper(group, self._lr(group, flat))
        if STATE.flags & CAPTURE:  # a capture replays these with the group's values of the moment
            hyper = Dynamic(hyper, functools.partial(self._hyper_now, group, flat))
        if group["momentum"] == 0:
            for start, stop, _ in flat.spans(indices, [None] * len(indices)):
                call(
                    "sgd_update",
                    flat.backend.sgd_update,
                    *(flat.data[start:stop], flat.grad[start:stop], None),
                    hyper=hyper,
                    first_step=False,
                    **self._fused_args(flat, start, stop),
                )
            if flat.lowp is not None:
                flat.lowp_written(indices)
            for i in indices:
                self.state.setdefault(flat.params[i], {})["momentum_buffer"] = None
            return
        buf = flat.buffer("momentum_buffer")
        for i in indices:
            st = self.state.setdefault(flat.params[i], {})
            if "step" not in st:  # (a state from before step counts: its buffer has begun)
                flat.set_count(i, 0 if st.get("momentum_buffer") is None else 1)
                st["step"] = flat.count_view(i)
            st["momentum_buffer"] = flat.view(buf, i)
        # The first step (buf = d) is the one whose count becomes 1, decided on the device:
        # a first step skipped by the loss scaler leaves the next one first, as in PyTorch.
        for start, stop, count in flat.step_spans(indices):
            call(
                "sgd_update",
                flat.backend.sgd_update,
                *(flat.data[start:stop], flat.grad[start:stop], buf[start:stop]),
                hyper=hyper,
                first_step=False,
                step=count,
                **self._fused_args(flat, start, stop),
            )
        if flat.lowp is not None:
            flat.lowp_written(indices)

    def _hyper_now(self, group: dict[str, Any], flat: FlatBuffer) -> SGDHyper:
        return _hyper(group, self._lr(group, flat))


def _hyper(group: dict[str, Any], lr: Any) -> SGDHyper:
    """The update's hyperparameters, from the group now (``lr``: its float or device array)."""
    return SGDHyper(
        lr, group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"]
    )


class InBackward:
    """A parameter's ``in_backward`` step for SGD(in_backward=True): backward applies
    p <- alpha g + beta p with alpha = -lr and beta = 1 - lr wd, read from the parameter's
    group when backward runs. It holds the optimizer, so the steps go on for as long as the
    parameter lives, whether or not the caller kept the optimizer, until an optimizer made
    later over the parameter replaces it (or its group's ``in_backward`` is set False by hand)."""

    __slots__ = ("_index", "_optimizer")

    def __init__(self, optimizer: SGD, index: int) -> None:
        self._optimizer = optimizer
        self._index = index

    def alpha_beta(self) -> tuple[float, float] | None:
        """(-lr, 1 - lr wd) from the group now; None when its ``in_backward`` is off."""
        group = self._optimizer.param_groups[self._index]
        if not group["in_backward"]:
            return None
        lr = float(group["lr"])
        return -lr, 1.0 - lr * float(group["weight_decay"])
