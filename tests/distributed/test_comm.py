"""The communicators in one process: the world of one, NCCL's calls through a stand-in for
``cupy.cuda.nccl`` (no GPU), NCCL on a real GPU (gpu-marked), and the optimizer wrapper in a
world of one."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

import gpunet
import gpunet.distributed as dist
import gpunet.nn.functional as F
from gpunet import nn, optim
from gpunet.cli import main
from gpunet.distributed.comm import Communicator, NCCLComm


def test_a_process_without_mpiexec_is_a_world_of_one() -> None:
    comm = dist.init()
    assert (comm.rank, comm.size, dist.rank(), dist.world_size()) == (0, 1, 0, 1)
    x = gpunet.tensor([1.0, 2.0])
    assert dist.all_reduce(x, "mean") is x and x.tolist() == [1.0, 2.0]
    assert dist.broadcast(x) is x
    dist.barrier()
    assert comm.all_gather_object("a") == ["a"] and comm.broadcast_object(3) == 3
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(np.zeros(2), "avg")
    with pytest.raises(RuntimeError, match="already initialized with 'local'"):
        dist.init(backend="mpi")


class _FakeNCCL(types.SimpleNamespace):
    """The names gpunet uses from cupy.cuda.nccl; records every call."""

    def __init__(self) -> None:
        super().__init__(
            available=True,
            NCCL_FLOAT16=6,
            NCCL_FLOAT32=7,
            NCCL_FLOAT64=8,
            NCCL_SUM=0,
            NCCL_MAX=2,
            NCCL_MIN=3,
            NCCL_AVG=4,
            calls=[],
        )
        fake = self

        class Communicator:
            def __init__(self, size: int, uid: bytes, rank: int) -> None:
                fake.calls.append(("init", size, uid, rank))

            def allReduce(self, *args: int) -> None:
                fake.calls.append(("allReduce", *args))

            def bcast(self, *args: int) -> None:
                fake.calls.append(("bcast", *args))

        self.NcclCommunicator = Communicator

    def get_unique_id(self) -> bytes:
        return b"uid"


class _DeviceArray:
    """A stand-in CuPy array: .data.ptr, .size, .dtype, .flags."""

    def __init__(self, n: int, dtype: str) -> None:
        self.size, self.dtype = n, np.dtype(dtype)
        self.nbytes = n * self.dtype.itemsize
        self.data = types.SimpleNamespace(ptr=0xABC0)
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.strides = (self.dtype.itemsize,)


def test_nccl_calls_cupy_with_the_buffer_count_dtype_op_and_current_stream() -> None:
    fake = _FakeNCCL()
    sync = lambda: fake.calls.append(("synchronize",))
    comm = NCCLComm(Communicator(), 0, nccl=fake, stream_ptr=lambda: 77, synchronize=sync)
    assert fake.calls == [("init", 1, b"uid", 0)]  # rank 0's unique id, broadcast over MPI
    g = _DeviceArray(1000, "float32")
    comm.all_reduce(g, "mean")  # ncclAvg: the 1/size is folded into the reduction
    comm.broadcast(_DeviceArray(10, "float64"), root=0)
    assert fake.calls[1:] == [
        ("allReduce", 0xABC0, 0xABC0, 1000, 7, 4, 77),
        ("synchronize",),  # the gradient's wait, under the watchdog's limit
        ("bcast", 0xABC0, 10, 8, 0, 77),
    ]
    with pytest.raises(TypeError, match="NCCL takes float16, float32, float64, got int64"):
        comm.all_reduce(_DeviceArray(3, "int64"))
    del fake.NCCL_AVG  # an NCCL without ncclAvg: sum, then one scaling pass
    comm = NCCLComm(Communicator(), 0, nccl=fake, stream_ptr=lambda: 77)
    assert "mean" not in comm.ops and comm.ops["sum"] == 0


def test_nccl_compares_the_ranks_calls_over_its_host_first_unless_agreed() -> None:
    """A mismatched NCCL call would hang the GPUs: the check runs over MPI (the host)
    before NCCL is called, and inside during(..., agreed=True) (the gradients) not at all."""
    asked: list[str] = []

    class Host(Communicator):
        def check_same_call(self, what: str, array: object) -> None:
            if not self._agreed:
                asked.append(what)
                raise ValueError("differ")

    fake = _FakeNCCL()
    comm = NCCLComm(Host(), 0, nccl=fake, stream_ptr=lambda: 77)
    with pytest.raises(ValueError, match="differ"):
        comm.all_reduce(_DeviceArray(4, "float32"), "max")
    with pytest.raises(ValueError, match="differ"):
        comm.broadcast(_DeviceArray(4, "float32"), root=0)
    assert asked == ["all_reduce(max)", "broadcast(root=0)"] and fake.calls[1:] == []
    with comm.during("a step", agreed=True):
        comm.all_reduce(_DeviceArray(4, "float32"), "sum")
    assert len(asked) == 2 and fake.calls[1][0] == "allReduce" and comm.host._agreed == 0
    assert comm._during is None and comm.host._during is None


def test_nccl_without_the_library_says_what_to_install() -> None:
    fake = _FakeNCCL()
    fake.available = False
    with pytest.raises(RuntimeError, match="nvidia-nccl-cu12"):
        NCCLComm(Communicator(), 0, nccl=fake, stream_ptr=lambda: 0)


@pytest.mark.gpu
def test_nccl_on_one_gpu_all_reduces_and_broadcasts() -> None:
    """A world of one GPU through the real cupy.cuda.nccl: the code path of every rank."""
    import cupy
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("CuPy has no NCCL here (install nvidia-nccl-cu12)")
    comm = NCCLComm(Communicator(), 0)
    x = cupy.arange(1000, dtype=cupy.float32)
    comm.all_reduce(x, "mean")
    comm.broadcast(x)
    cupy.cuda.get_current_stream().synchronize()
    assert cupy.asnumpy(x).tolist() == list(range(1000))


def _fit_steps(wrap: bool) -> list[np.ndarray]:
    gpunet.manual_seed(0)
    model = nn.MLP([4, 5, 2])
    opt = optim.Adam(model.parameters(), lr=0.01)
    if wrap:
        opt = dist.DistributedOptimizer(opt)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = rng.standard_normal((6, 4)).astype(np.float32), rng.integers(0, 2, 6)
        opt.zero_grad()
        F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y)).backward()
        opt.step()
    return [p.numpy() for p in model.parameters()]


def test_a_wrapped_optimizer_in_a_world_of_one_is_the_optimizer() -> None:
    for a, b in zip(_fit_steps(True), _fit_steps(False)):
        np.testing.assert_array_equal(a, b)
    opt = dist.DistributedOptimizer(optim.Adam(nn.MLP([2, 2]).parameters()))
    assert isinstance(opt, optim.Adam) and type(opt).__name__ == "Adam"
    with pytest.raises(ValueError, match="already data-parallel"):
        dist.DistributedOptimizer(opt)
    with pytest.raises(RuntimeError, match="drift apart"), opt.no_sync():
        opt.step()


def test_sgd_in_backward_is_refused_with_the_reason() -> None:
    opt = optim.SGD(nn.MLP([2, 2]).parameters(), lr=0.1, in_backward=True)
    with pytest.raises(ValueError, match="before an all-reduce could average it"):
        dist.DistributedOptimizer(opt)


def test_info_lists_the_engines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mpi: mpi4py " in out.replace("  ", "") and "nccl:" in out


def test_engines_names_what_is_missing_and_the_versions_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata as md

    found = {"mpi4py": "4.1.2", "mpich": "5.0.2", "nvidia-nccl-cu12": "2.27.3"}

    def version(name: str) -> str:
        if name not in found:
            raise md.PackageNotFoundError(name)
        return found[name]

    monkeypatch.setattr(md, "version", version)
    every = dist.engines()
    assert every["mpi"].startswith("mpi4py 4.1.2, mpich 5.0.2; mpiexec: ")
    assert every["nccl"] == "nvidia-nccl-cu12 2.27.3"
    found.clear()
    assert dist.engines() == {
        "mpi": "not installed (pip install 'gpunet[mpi]')",
        "nccl": "no nvidia-nccl-cu12/-cu13 wheel (CuPy's NCCL)",
    }


def test_nproc_under_mpiexec_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PMI_SIZE", "2")
    assert main(["train", "--nproc", "2"]) == 2
    assert "leave it out" in capsys.readouterr().err


def test_init_refuses_a_bad_backend_and_a_launch_without_mpi4py(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="backend must be 'mpi', 'nccl' or 'local', got 'tcp'"):
        dist.init(backend="tcp")
    monkeypatch.setattr(dist, "_WORLD", None)
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setattr(dist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"launched with 4 ranks.*pip install 'gpunet\[mpi\]'"):
        dist.init()
    assert dist._WORLD is None


def test_the_profiler_counts_the_gradient_all_reduce_in_the_optimizer_phase() -> None:
    model = nn.MLP([4, 5, 2])
    opt = dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1))
    x, y = gpunet.randn(3, 4), gpunet.tensor([0, 1, 0])
    with gpunet.profile() as p:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    (r,) = [r for r in p.records if r.name == "all_reduce"]
    n = 4 * 5 + 5 + 5 * 2 + 2  # the flat gradient buffer: one read and one write of it
    assert (r.phase, r.cost.launches, r.cost.bytes) == ("optimizer", 1, 2 * 4 * n)


def test_nproc_runs_the_same_command_under_the_venvs_mpiexec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    started = {}

    class Proc:
        def __init__(self, argv: list[str], env: dict[str, str]) -> None:
            started.update(argv=argv, env=env)

        def wait(self) -> int:
            return 7

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(subprocess, "Popen", Proc)
    assert main(["train", "--nproc=2", "--epochs", "5", "--nproc", "3", "--no-progress"]) == 7
    argv = started["argv"]
    assert argv[1:3] == ["-n", "3"] and argv[0].endswith("mpiexec")
    assert argv[3:] == [
        sys.executable,
        "-m",
        "gpunet.cli",
        "train",
        "--epochs",
        "5",
        "--no-progress",
    ]
    assert started["env"]["OPENBLAS_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))


def test_a_mean_of_integers_is_refused_in_every_world() -> None:
    """all_reduce(mean) of an integer array gave zeros over MPI (the sum times int(1/N));
    NCCL's average takes floats only too. Refused everywhere, a world of one included, so a
    script that runs alone does not break only under mpiexec."""
    comm = dist.init()
    with pytest.raises(TypeError, match=r"mean.*int64.*'sum'"):
        comm.all_reduce(np.array([1, 3]), "mean")
    with pytest.raises(TypeError, match=r"mean.*int64.*'sum'"):
        dist.all_reduce(gpunet.tensor([1, 3]), "mean")
    assert dist.all_reduce(gpunet.tensor([1, 3]), "sum").tolist() == [1, 3]


def test_a_world_of_one_refuses_what_mpi_refuses() -> None:
    """A script that ran alone broke only under mpiexec: the world of one took a transposed
    tensor, a root outside the world and a Python float, which every other world refuses."""
    comm = dist.init()
    with pytest.raises(ValueError, match=r"all_reduce: .*contiguous.*\.contiguous\(\)"):
        dist.all_reduce(gpunet.ones(2, 3).T)
    with pytest.raises(ValueError, match=r"broadcast: root must be a rank in 0\.\.0, got 1"):
        dist.broadcast(np.zeros(2), root=1)
    with pytest.raises(ValueError, match=r"broadcast_object: root must be a rank in 0\.\.0"):
        comm.broadcast_object("x", root=-1)
    with pytest.raises(TypeError, match=r"broadcast: .*an array, got float"):
        comm.broadcast(3.0)
    assert dist.all_reduce(gpunet.ones(2, 3)).tolist() == [[1.0] * 3] * 2


def test_a_bool_all_reduce_is_refused_in_every_world() -> None:
    """all_reduce of a bool array ran alone and was MPI's 'Invalid MPI_Op' error stack under
    mpiexec (MPI defines no sum, max or min of booleans); refused everywhere, saying what to
    pass instead."""
    with pytest.raises(TypeError, match=r"all_reduce: .*bool.*int32.*any.*all"):
        dist.all_reduce(gpunet.tensor([True, False]), "max")
    with pytest.raises(TypeError, match=r"all_reduce: .*bool"):
        dist.init().all_reduce(np.array([True]))
    assert dist.broadcast(gpunet.tensor([True, False])).tolist() == [True, False]


def test_torch_distributed_names_are_the_same_functions() -> None:
    """A PyTorch user writes dist.get_rank(), get_world_size(), is_initialized(): they were
    AttributeErrors; they are gpunet's rank(), world_size(), initialized()."""
    assert dist.get_rank is dist.rank and dist.get_world_size is dist.world_size
    assert dist.is_initialized is dist.initialized
    assert (dist.get_rank(), dist.get_world_size(), dist.is_initialized()) == (0, 1, True)


def test_pytorchs_engine_names_are_refused_saying_which_to_pass() -> None:
    for name in ("gloo", "ucc"):
        with pytest.raises(ValueError, match=rf"got '{name}'.*'mpi' for CPUs.*'nccl' for GPUs"):
            dist.init(backend=name)


def test_nccl_without_a_gpu_is_refused_before_mpi_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """init(backend='nccl') on a machine without a GPU made the MPI communicator (MPI up, a
    watchdog thread) before finding no device; now it is refused first, nothing made."""
    import gpunet.backend

    made: list[object] = []
    monkeypatch.setattr(dist, "_WORLD", None)
    monkeypatch.setattr(dist, "MPIComm", lambda **kw: made.append(kw))
    no_gpu = gpunet.backend.CudaProbe(available=False, reason="no driver")
    monkeypatch.setattr(gpunet.backend, "probe_cuda", lambda: no_gpu)
    with pytest.raises(RuntimeError, match=r"init\(backend='nccl'\): no CUDA device \(no driver\)"):
        dist.init(backend="nccl")
    assert made == [] and dist._WORLD is None


def test_init_after_an_implicit_one_says_what_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    """dist.rank() before dist.init(backend='nccl') makes the default world; the refusal said
    'init once per process' to a user who had called init once."""
    monkeypatch.setattr(dist, "_WORLD", None)
    assert dist.rank() == 0
    with pytest.raises(RuntimeError, match=r"already initialized with 'local'.*rank\(\).*first"):
        dist.init(backend="mpi")


def test_a_captured_data_parallel_step_is_refused_naming_it() -> None:
    """gpunet.capture around a step that calls DistributedOptimizer.step raises CaptureError
    (its Python decides per step which gradients exist), in a world of one as under mpiexec,
    and leaves the optimizer usable eagerly."""
    model = nn.MLP([4, 5, 2])
    opt = dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1))
    x, y = gpunet.ones(3, 4), gpunet.tensor([0, 1, 0])

    def step() -> gpunet.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    with pytest.raises(gpunet.CaptureError, match=r"DistributedOptimizer\.step.*not capturable"):
        gpunet.capture(step)()
    before = [p.numpy().copy() for p in model.parameters()]
    step()
    assert any(not np.array_equal(a, p.numpy()) for a, p in zip(before, model.parameters()))
