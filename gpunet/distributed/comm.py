"""Communicators: the engines that move gradients between processes, behind one small interface.

``all_reduce(array, op)`` and ``broadcast(array, root)`` work in place on a contiguous array;
``barrier()``, ``broadcast_object`` and ``all_gather_object`` carry small Python values (a seed,
a run folder, a shape signature). Three implementations, none of them a communication layer of
gpunet's own:

- ``LocalComm``: a world of one; every call returns at once (``mean`` of one rank is the array).
- ``MPIComm``: mpi4py on host (NumPy) arrays, ``Allreduce(IN_PLACE, buf)`` and ``Bcast``.
- ``NCCLComm``: CuPy's ``cupy.cuda.nccl`` on device arrays, on the current stream; the unique
  id is made on rank 0 and broadcast over MPI (ChainerMN's bootstrap), so NCCL needs MPI too.

Every rank must make the same call: ``all_reduce`` and ``broadcast`` first compare the ranks'
(name, op or root, shape, dtype) with one tiny all-reduce and raise on every rank, naming each
rank's call, where they differ (MPI would fail deep inside, hang, or reduce mismatched
elements silently where the byte counts agree). Callers that proved the arrays alike (the
gradient buffers, checked when the optimizer is wrapped) skip it (``during(..., agreed=True)``).

A collective that waits longer than ``timeout`` seconds (``GPUNET_DIST_TIMEOUT``, default 300)
for the other ranks ends every rank (``MPI_Abort``) after printing what it waited for: a rank
that failed or took another path must fail the job, never hang it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import dtypes

Array = Any
OPS = ("sum", "mean", "max", "min")
DEFAULT_TIMEOUT = 300.0


def default_timeout() -> float:
    """Seconds a collective may wait for the other ranks: ``GPUNET_DIST_TIMEOUT`` or 300."""
    text = os.environ.get("GPUNET_DIST_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"GPUNET_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def describe(array: Array) -> str:
    """'1,234 float32 (4.8 KiB)': what a collective carries, for messages."""
    return f"{array.size:,} {array.dtype} ({array.nbytes / 1024:.1f} KiB)"


class Communicator:
    """The interface (and the world of one): rank, size, collectives in place."""

    name = "local"
    rank, size = 0, 1
    _agreed = 0  # > 0 inside during(..., agreed=True): the caller proved the arrays alike
    _during: str | None = None  # the caller during() names, for messages

    def all_reduce(self, array: Array, op: str = "sum") -> Array:
        """array <- op over ranks of array (``mean``: the sum / size), in place; returns it."""
        _check_op(op, array)
        return _contiguous(array, "all_reduce")

    def broadcast(self, array: Array, root: int = 0) -> Array:
        """array <- rank ``root``'s array, in place; returns it."""
        _check_root(root, self.size, "broadcast")
        return _contiguous(array, "broadcast")

    def barrier(self) -> None:
        """Wait until every rank has called barrier()."""

    def check_same_call(self, what: str, array: Array) -> None:
        """Raise on every rank unless every rank calls ``what`` on an array of this shape
        and dtype (nothing to compare in a world of one)."""

    @contextlib.contextmanager
    def during(self, caller: str, agreed: bool = False) -> Iterator[None]:
        """Collectives inside run for ``caller``, which a mismatch's or a timeout's message
        names (what every rank must call); ``agreed``: the caller proved every rank's arrays
        alike (a model compared at wrap time), so they skip ``check_same_call``'s round trip."""
        comms = [self] if self.host is self else [self, self.host]
        before = [(c._agreed, c._during) for c in comms]
        for c in comms:
            c._agreed += agreed
            c._during = caller
        try:
            yield
        finally:
            for c, (was_agreed, was_during) in zip(comms, before):
                c._agreed, c._during = was_agreed, was_during

    def _waiting_for(self, what: str) -> str:
        """``what`` a collective waits for, with the caller during() named."""
        return what if self._during is None else f"{what} in {self._during}"

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``value`` (a small picklable object), on every rank."""
        _check_root(root, self.size, "broadcast_object")
        return value

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        return [value]

    def abort(self, code: int = 1) -> None:
        """End every rank now with exit ``code`` (a world of one: this process)."""
        sys.stderr.flush()
        os._exit(code)

    @property
    def host(self) -> Communicator:
        """The communicator for small host arrays (loss values, counts): itself, or NCCL's MPI."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


LocalComm = Communicator


def _contiguous(array: Array, what: str) -> Array:
    """The same refusals in every world, a world of one included (where nothing moves)."""
    flags = getattr(array, "flags", None)
    if flags is None:
        raise TypeError(f"{what}: works in place on an array, got {type(array).__name__}")
    if not flags.c_contiguous:
        raise ValueError(
            f"{what}: the array must be contiguous, got shape {array.shape} strides "
            f"{array.strides}; pass a contiguous copy (t.contiguous()) and use the copy"
        )
    return array


def _check_root(root: int, size: int, what: str) -> None:
    if not 0 <= root < size:
        raise ValueError(f"{what}: root must be a rank in 0..{size - 1}, got {root}")


def _check_op(op: str, array: Array) -> None:
    if op not in OPS:
        raise ValueError(f"all_reduce: op must be one of {', '.join(OPS)}, got {op!r}")
    if np.dtype(array.dtype).kind == "b":
        raise TypeError(
            f"all_reduce: MPI and NCCL reduce numbers, got {describe(array)}; convert to int32 "
            "first (then 'sum' counts the True, 'max' is any, 'min' is all)"
        )
    if op == "mean" and np.dtype(array.dtype).kind not in "fcV":  # (V: bfloat16)
        raise TypeError(
            f"all_reduce: op 'mean' averages floating arrays, got {describe(array)}; reduce "
            "with 'sum' and divide, or convert to a floating dtype first"
        )


class Watchdog:
    """Ends every rank when one collective waits longer than ``timeout`` seconds.

    One daemon thread; arming it costs two attribute writes, so a collective keeps MPI's own
    blocking call (a poll loop of MPI_Test would add its latency to every small all-reduce).
    mpi4py releases the GIL inside MPI calls, so the thread runs while the main one waits."""

    def __init__(self, timeout: float, expire: Callable[[str, float], None]) -> None:
        self.timeout, self._expire = timeout, expire
        self._what: str | None = None
        self._since = 0.0
        self._armed = threading.Event()
        threading.Thread(target=self._run, name="gpunet-dist-watchdog", daemon=True).start()

    def arm(self, what: str) -> None:
        self._since, self._what = time.monotonic(), what
        self._armed.set()

    def disarm(self) -> None:
        self._what = None

    def _run(self) -> None:
        while True:
            self._armed.wait()
            what, since = self._what, self._since
            if what is None:
                self._armed.clear()
                if self._what is not None:  # armed again between the read and the clear
                    self._armed.set()
                continue
            waited = time.monotonic() - since
            if waited >= self.timeout:
                self._expire(what, waited)
                return
            time.sleep(min(self.timeout - waited, 0.25))


class MPIComm(Communicator):
    """MPI through mpi4py: host (NumPy) arrays, one MPI call per collective."""

    name = "mpi"

    def __init__(self, comm: Any = None, timeout: float | None = None) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self.watchdog = Watchdog(timeout or default_timeout(), self._timed_out)

    def _timed_out(self, what: str, waited: float) -> None:
        print(
            f"gpunet.distributed: rank {self.rank} of {self.size} waited {waited:.0f} s for "
            f"{what}: another rank never joined it (it failed, hangs, or took another path; "
            "GPUNET_DIST_TIMEOUT sets the limit); ending every rank",
            file=sys.stderr,
            flush=True,
        )
        self.abort(1)

    def _host_array(self, array: Array, op: str) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"{op}: the MPI communicator takes NumPy arrays, got {type(array).__name__} "
                "(device arrays go through NCCL: gpunet.distributed.init(backend='nccl'))"
            )
        return _contiguous(array, op)

    def all_reduce(self, array: Array, op: str = "sum") -> Array:
        _check_op(op, array)
        buf = self._host_array(array, "all_reduce")
        if self.size > 1:
            self.check_same_call(f"all_reduce({op})", buf)
            self._all_reduce(buf, op)
        return array

    def _all_reduce(self, buf: np.ndarray, op: str) -> None:
        if buf.dtype == dtypes.bfloat16:  # (MPI has no bfloat16: reduced in float32, rounded once)
            wide = buf.astype(np.float32)
            self._all_reduce(wide, op)
            buf[...] = wide.astype(buf.dtype)
            return
        what = f"all_reduce({op}) of {describe(buf)}"
        self._guarded(what, self.comm.Allreduce, self.MPI.IN_PLACE, buf, self._ops[op])
        if op == "mean":  # MPI has no average: one scaling pass after the sum
            np.multiply(buf, buf.dtype.type(1.0 / self.size), out=buf)

    def broadcast(self, array: Array, root: int = 0) -> Array:
        _check_root(root, self.size, "broadcast")
        buf = self._host_array(array, "broadcast")
        if self.size > 1:
            self.check_same_call(f"broadcast(root={root})", buf)
            if buf.dtype == dtypes.bfloat16:  # (MPI has no bfloat16: its bits, as uint16)
                buf = buf.view(np.uint16)
            what = f"broadcast from rank {root} of {describe(buf)}"
            self._guarded(what, self.comm.Bcast, buf, root)
        return array

    def check_same_call(self, what: str, array: Array) -> None:
        """One all-reduce (max) of a checksum of this rank's call and of its negation: equal
        on every rank only if every rank's call is; where not, every rank sees it, gathers
        each rank's call and raises the same error (so none waits for the others)."""
        if self._agreed or self.size == 1:
            return
        mine = self._waiting_for(f"{what} of {tuple(array.shape)} {array.dtype}")
        code = zlib.crc32(mine.encode())
        both = np.array([code, -code], np.int64)
        check = f"{what} of {describe(array)} (comparing the ranks' calls first)"
        self._guarded(check, self.comm.Allreduce, self.MPI.IN_PLACE, both, self.MPI.MAX)
        if both[0] == -both[1]:
            return
        calls = "; ".join(f"rank {r}: {c}" for r, c in enumerate(self.all_gather_object(mine)))
        raise ValueError(
            f"{what.split('(')[0]}: the ranks' calls differ ({calls}); every rank must make "
            "the same calls in the same order (a step() on every rank or none), each with an "
            "array of the same shape and dtype and the same op or root (pad each rank's part "
            "to one size, or exchange differing sizes with all_gather_object)"
        )

    def barrier(self) -> None:
        self._guarded("barrier", self.comm.Barrier)

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        _check_root(root, self.size, "broadcast_object")
        return self._guarded(f"broadcast_object from rank {root}", self.comm.bcast, value, root)

    def all_gather_object(self, value: Any) -> list[Any]:
        return self._guarded("all_gather_object", self.comm.allgather, value)

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        self.watchdog.arm(self._waiting_for(what))
        try:
            return fn(*args)
        finally:
            self.watchdog.disarm()

    def local_rank(self) -> int:
        """This process's rank among the ranks on its machine (which GPU it takes)."""
        shared = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return shared.Get_rank()
        finally:
            shared.Free()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # mpiexec forwards each rank's output through its own proxy while MPI_Abort kills the
        # job: without a pause the rank's last lines (the reason it ends) were lost in about
        # one run in six; a failing job can spare half a second
        time.sleep(0.5)
        self.comm.Abort(code)


def _nccl_tables(nccl: Any) -> tuple[dict[str, int], dict[str, int]]:
    """NCCL's dtype and op codes by name (``avg`` where the NCCL in use has ncclAvg)."""
    dtypes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32}
    dtypes["float64"] = nccl.NCCL_FLOAT64
    ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
    avg = getattr(nccl, "NCCL_AVG", None)
    if avg is not None:
        ops["mean"] = avg
    return dtypes, ops


class NCCLComm(Communicator):
    """NCCL through CuPy: device arrays, collectives enqueued on the current stream.

    The gradient all-reduce waits for its stream under the watchdog: NCCL's kernels spin on the
    device while a peer is missing, so a host wait with a limit is what turns a dead rank into
    an error (fit reads the loss each step, so this sync costs no overlap it had).

    ``nccl``, ``stream_ptr`` and ``synchronize`` default to ``cupy.cuda.nccl`` and the current
    stream's handle and wait; a test passes stand-ins to check the calls made without a GPU."""

    name = "nccl"

    def __init__(
        self,
        host: Communicator,
        device_id: int,
        nccl: Any = None,
        stream_ptr: Callable[[], int] | None = None,
        synchronize: Callable[[], None] | None = None,
    ) -> None:
        if nccl is None:
            from cupy.cuda import nccl
        if not getattr(nccl, "available", True):
            raise RuntimeError(
                "gpunet.distributed: CuPy has no NCCL library; install nvidia-nccl-cu12 "
                "(or -cu13) beside cupy-cuda12x, or use backend='mpi' on the CPU"
            )
        if stream_ptr is None:
            import cupy

            cupy.cuda.Device(device_id).use()  # NCCL binds the communicator to this GPU
            stream_ptr = lambda: cupy.cuda.get_current_stream().ptr
            synchronize = lambda: cupy.cuda.get_current_stream().synchronize()
        self.nccl, self.stream_ptr, self._host = nccl, stream_ptr, host
        self.synchronize = synchronize or (lambda: None)
        self.rank, self.size, self.device_id = host.rank, host.size, device_id
        self.dtypes, self.ops = _nccl_tables(nccl)
        uid = nccl.get_unique_id() if host.rank == 0 else None
        uid = host.broadcast_object(uid)
        self.watchdog = getattr(host, "watchdog", None)  # (a world of one has none)
        what = f"NCCL communicator set-up ({self.size} ranks)"
        self.comm = self._bounded(what, nccl.NcclCommunicator, self.size, uid, self.rank)

    def _bounded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.watchdog is None:
            return fn(*args)
        self.watchdog.arm(self._waiting_for(what))
        try:
            return fn(*args)
        finally:
            self.watchdog.disarm()

    @property
    def host(self) -> Communicator:
        return self._host

    def _code(self, array: Array, what: str) -> int:
        code = self.dtypes.get(str(array.dtype))
        if code is None:
            raise TypeError(f"{what}: NCCL takes {', '.join(self.dtypes)}, got {array.dtype}")
        _contiguous(array, what)
        return code

    def all_reduce(self, array: Array, op: str = "sum") -> Array:
        _check_op(op, array)
        dtype = self._code(array, "all_reduce")
        self.check_same_call(f"all_reduce({op})", array)
        code = self.ops.get(op, self.ops["sum"])  # mean without ncclAvg: sum, then scale
        ptr = array.data.ptr
        self.comm.allReduce(ptr, ptr, array.size, dtype, code, self.stream_ptr())
        if op == "mean" and "mean" not in self.ops:
            array *= 1.0 / self.size
        self._bounded(f"NCCL all_reduce({op}) of {describe(array)}", self.synchronize)
        return array

    def broadcast(self, array: Array, root: int = 0) -> Array:
        _check_root(root, self.size, "broadcast")
        dtype = self._code(array, "broadcast")
        self.check_same_call(f"broadcast(root={root})", array)
        self.comm.bcast(array.data.ptr, array.size, dtype, root, self.stream_ptr())
        return array

    def barrier(self) -> None:
        self._host.barrier()

    def check_same_call(self, what: str, array: Array) -> None:
        """Compared over MPI, before NCCL runs: a mismatched NCCL call would hang the GPUs."""
        if not self._agreed:
            self._host.check_same_call(what, array)

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        return self._host.broadcast_object(value, root)

    def all_gather_object(self, value: Any) -> list[Any]:
        return self._host.all_gather_object(value)

    def abort(self, code: int = 1) -> None:
        try:
            self.comm.abort()
        finally:
            self._host.abort(code)
