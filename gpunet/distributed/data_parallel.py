"""Data parallelism in Horovod's shape: the optimizer, wrapped, averages the gradients.

``DistributedOptimizer(opt)`` checks that every rank holds the same model (a shape signature,
compared before anything else moves), broadcasts rank 0's parameters (one ``broadcast`` per
flat parameter buffer: one call for a float32 model), and from then on each ``step()`` first
averages the flat gradient buffer over the ranks (one all-reduce per buffer), then runs the
optimizer's own fused update, so ``p.grad`` reads the average, as in PyTorch. (Over MPI the
mean is the sum and then a scaling pass. Handing the 1/N to the fused update as its
``grad_scale`` saves that pass but makes the update write the average back into ``p.grad``:
measured equal on the medium MLP, 0.3 ms saved and 0.3 ms spent, so the pass stays.) Every
rank then applies the same update to the same weights, so their parameters stay
bit-identical with no further broadcast.

Why no buckets overlapping the backward (PyTorch DDP's): on a CPU with one core per rank MPI
progresses a non-blocking all-reduce only inside MPI calls, so nothing would overlap, and the
all-reduce of the medium MLP is a small share of its step (README, Data parallelism); on GPUs
the roofline model (``gpunet.roofline.data_parallel_step``) shows where it would start to pay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import autodiff
from ..autodiff import CAPTURE, STATE, bump_version, call, enable_grad, refuse
from ..tensor import Tensor
from .comm import Communicator

_CLASSES: dict[type, type] = {}


def signature(optimizer: Any) -> list[str]:
    """What must match on every rank: each flat buffer's device, dtype and parameter shapes."""
    return [
        f"{flat.backend.device} {flat.dtype} {[tuple(s) for s in flat.shapes]}"
        for flat in optimizer._flats
    ]


def check_same_model(comm: Communicator, mine: list[str], what: str) -> None:
    """Raise on every rank, naming the first rank that differs from rank 0, when the ranks'
    signatures differ: all ranks see the same gathered list, so they all raise (no hang)."""
    every = comm.all_gather_object(mine)
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            raise ValueError(
                f"{what}: the ranks hold different models; rank 0 has {every[0]}, rank {r} has "
                f"{theirs} (build the same model, with the same sizes and dtype, on every rank)"
            )


def broadcast_parameters(model: Any, comm: Communicator | None = None, root: int = 0) -> None:
    """Give every rank rank ``root``'s parameters (for a model without an optimizer; one call
    per parameter, after the same shape check as ``DistributedOptimizer``)."""
    from . import init

    comm = init() if comm is None else comm
    params = list(model.parameters())
    check_same_model(comm, [f"{p.device} {p.dtype} {p.shape}" for p in params], "broadcast")
    for p in params:
        data = p.data if p.data.flags.c_contiguous else p._backend.copy(p.data)
        with comm.during("broadcast_parameters", agreed=True):
            comm.broadcast(data, root)
        if data is not p.data:
            p.data = data
        bump_version(p)  # (written: autocast's low-precision copy of it is stale)


def DistributedOptimizer(optimizer: Any, comm: Communicator | None = None) -> Any:
    """Make ``optimizer`` data-parallel over ``comm`` (default: ``gpunet.distributed.init()``)
    and return it: the same object, its class now a subclass of its own class of the same name
    (so ``isinstance``, schedulers and checkpoints see the optimizer they know). Every rank
    must call it; it takes rank 0's parameters."""
    from . import init

    comm = init() if comm is None else comm
    for group in optimizer.param_groups:
        if group.get("in_backward"):
            raise ValueError(
                "DistributedOptimizer: SGD(in_backward=True) steps each weight inside backward "
                "from this rank's own gradient, before an all-reduce could average it, so the "
                "ranks' weights would drift apart; use SGD(in_backward=False) under data "
                "parallelism"
            )
    if isinstance(optimizer, _DataParallel):
        raise ValueError("DistributedOptimizer: this optimizer is already data-parallel")
    _take_rank_0(optimizer, comm, "DistributedOptimizer")
    base = type(optimizer)
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(base.__name__, (_DataParallel, base), {})
        cls.__qualname__ = base.__qualname__
        cls.__doc__ = f"{base.__name__}, data-parallel: {_DataParallel.__doc__}"
    optimizer.__class__ = cls
    optimizer.communicator = comm
    optimizer._no_sync = 0
    optimizer._synced_at = None
    return optimizer


def _take_rank_0(optimizer: Any, comm: Communicator, what: str) -> None:
    """Check that every rank holds the same model, then give it rank 0's parameters: one
    broadcast per flat parameter buffer."""
    check_same_model(comm, signature(optimizer), what)
    # An optimizer that stepped before the wrap holds each rank's own moments (or momentum):
    # rank 0's go to every rank with its weights, or the same averaged gradient would move
    # the ranks' weights apart. One small gather when no rank has stepped.
    if any(comm.all_gather_object(bool(optimizer.state))):
        state = comm.broadcast_object(optimizer.state_dict() if comm.rank == 0 else None)
        if comm.rank != 0:
            optimizer.load_state_dict(state)
    for flat in optimizer._flats:
        flat.sync_params()
        with comm.during(what, agreed=True):
            call("broadcast", comm.broadcast, flat.data, root=0)
        for p in flat.params:  # (written: autocast's low-precision copies are stale)
            bump_version(p)


class _DataParallel:
    """step() averages the flat gradients over the ranks first; ``no_sync()`` for
    accumulation; ``synchronize()`` to average before clipping."""

    communicator: Communicator
    _no_sync: int
    _synced_at: int | None  # the backward sweeps counted when synchronize() last averaged
    _flats: list[Any]

    @property
    def _synced(self) -> bool:
        """Are the gradients those synchronize() averaged? Not after a backward since (the
        loop may have skipped the step after it), nor after a step."""
        return self._synced_at == autodiff.grad_sweeps

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The optimizer's own, then the wrap's check and rank 0's parameters (every rank
        calls it): a group added later would otherwise keep each rank's own initial values."""
        super().add_param_group(param_group)  # type: ignore[misc]
        _take_rank_0(self, self.communicator, "DistributedOptimizer.add_param_group")

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes here accumulate local gradients only (as any second backward
        without ``zero_grad`` does); the next ``step()`` outside averages the sum. A step inside
        would update each rank from its own gradient: it raises."""
        self._no_sync += 1
        try:
            yield
        finally:
            self._no_sync -= 1

    def synchronize(self, op: str = "mean") -> None:
        """Average the gradients over the ranks now (to clip or read them before ``step()``,
        which then does not average again). A parameter without a gradient on this rank counts
        as a zero gradient, so every rank reduces the same buffer; one without a gradient on
        any rank keeps none, as in one process (no decay, no state)."""
        if STATE.flags & CAPTURE:  # (its Python decides per step which gradients exist)
            refuse(
                "DistributedOptimizer.step",
                "is not capturable yet",
                "Run the data-parallel step without capture (fit and gpunet train do).",
            )
        if self._no_sync:
            raise RuntimeError(
                "DistributedOptimizer: step() or synchronize() inside no_sync() would update "
                "each rank from its own gradient and the ranks' weights would drift apart; call "
                "it after leaving no_sync()"
            )
        comm, caller = self.communicator, "DistributedOptimizer.step() or synchronize()"
        # The flags' all-reduce is checked (one tiny round trip more): a rank stepping where
        # another reduces or broadcasts fails there, naming both; the buffers after it were
        # compared at wrap time.
        with comm.during(caller):
            anywhere = self._grads_anywhere()
        with comm.during(caller, agreed=True):
            for flat, there in zip(self._flats, anywhere):
                flat.sync_params()
                views = flat.grad_views
                for i, p in enumerate(flat.params):
                    if p.grad is None and there[i]:
                        views[i][...] = 0
                        p.grad = Tensor._wrap(views[i], flat.backend)
                flat.gather_grads([i for i, p in enumerate(flat.params) if p.grad is not None])
                call("all_reduce", self.communicator.all_reduce, flat.grad, op=op)
        self._synced_at = autodiff.grad_sweeps

    def _grads_anywhere(self) -> list[np.ndarray]:
        """Per flat buffer, which parameters have a gradient on some rank: one small host
        all-reduce (max) of flags, so that every rank leaves the same parameters alone."""
        flags = np.array([p.grad is not None for f in self._flats for p in f.params], np.int32)
        self.communicator.host.all_reduce(flags, "max")
        return np.split(flags, np.cumsum([len(f.params) for f in self._flats])[:-1])

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        if not self._synced:
            self.synchronize()
        self._synced_at = None
        super().step()  # type: ignore[misc]
        return loss
