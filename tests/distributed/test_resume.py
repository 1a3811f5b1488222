"""Resuming a run under another world size: the weights, the optimizer and the epochs' data
order continue exactly; each rank's dropout stream is new, its own, and the same on every run
(``gpunet.checkpoint.rank_rng_state``). The 2-rank runs are ``mpiexec -n 2`` with a hard limit
(test_data_parallel's helpers), so a hung rank fails the test."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from test_data_parallel import mpiexec  # (its folder is on the path: pytest's rootdir mode)

import gpunet
import gpunet.nn.functional as F
from gpunet import distributed, job
from gpunet.checkpoint import CheckpointError, rank_rng_state
from gpunet.cli import main
from gpunet.data import DataLoader, Dataset
from gpunet.random import Generator, default_generator
from gpunet.train import History

RESUME = ["--epochs", "4", "--hidden", "32", "--no-progress", "--device", "cpu", "--dropout", "0.2"]


@pytest.fixture(autouse=True)
def _default_generator_kept() -> Iterator[None]:
    """These tests restore states into the default generator (stand-in device streams among
    them): give the tests after them the generator as it was."""
    state = default_generator.get_state()
    yield
    default_generator.set_state(state)


def _states(seeds: list[int], draws: int = 3) -> list[dict]:
    """Host generator states as a checkpoint's ``rng_ranks`` holds them, each a few draws on."""
    out = []
    for s in seeds:
        g = Generator(s)
        g.host_rng.random(draws)
        out.append({k: v for k, v in g.get_state().items() if k != "devices"})
    return out


def test_the_same_world_size_resumes_each_ranks_own_state() -> None:
    saved = _states([10, 11, 12])
    assert [rank_rng_state(saved, r, 3) for r in range(3)] == saved


def test_another_world_size_derives_a_distinct_reproducible_stream_per_rank() -> None:
    saved = _states([10, 11])
    for size in (1, 3, 4):
        states = [rank_rng_state(saved, r, size) for r in range(size)]
        assert states == [rank_rng_state(_states([10, 11]), r, size) for r in range(size)]
        hosts = {str(s["host"]) for s in states} | {str(s["host"]) for s in saved}
        assert len(hosts) == size + len(saved)  # distinct from each other and from the saved
        first = []
        for s in states:  # what dropout draws: each rank's numbers differ
            g = Generator()
            g.set_state(s)
            first.append(g.host_rng.random())
        assert len(set(first)) == size
    moved = _states([10, 11], draws=4)  # a step later in the saved streams: other new streams
    assert rank_rng_state(moved, 0, 3) != rank_rng_state(saved, 0, 3)
    assert rank_rng_state(saved, 0, 3) != rank_rng_state(saved, 0, 4)


@pytest.mark.parametrize(("rank", "size"), [(2, 2), (0, 0), (-1, 2)])
def test_a_bad_rank_is_refused(rank: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"0 <= rank < size, got rank {rank}, size {size}"):
        rank_rng_state(_states([1]), rank, size)
    with pytest.raises(ValueError, match="no saved generator state"):
        rank_rng_state([], 0, 1)


def _cut_run(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-process run with dropout, interrupted in its third epoch (saved, resumable)."""
    real, calls = F.cross_entropy, [0]

    def loss(out: gpunet.Tensor, y: gpunet.Tensor, **kw: object) -> gpunet.Tensor:
        if gpunet.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 20 * 2 + 5:  # digits: 20 steps an epoch
                raise KeyboardInterrupt
        return real(out, y, **kw)

    with monkeypatch.context() as m:
        m.setattr(F, "cross_entropy", loss)
        # (eager: a captured step would not call the patched loss again)
        assert main(["train", *RESUME, "--no-capture", "--out", str(out)]) == 130
    (run,) = out.iterdir()
    return run


def _resume_on_two_ranks(run: Path) -> dict[str, np.ndarray]:
    done = mpiexec(sys.executable, "-m", "gpunet.cli", "train", "--resume", str(run), timeout=120)
    assert done.returncode == 0 and "x 2 ranks (mpi)" in done.stdout, done.stderr[-3000:]
    assert "resumed after epoch 2" in done.stdout
    ranks = json.loads((run / "metrics.json").read_text())["ranks"]
    assert ranks["world_size"] == 2 and ranks["engine"] == "mpi"
    return safetensors.numpy.load_file(str(run / "model.safetensors"))


def test_a_one_process_run_resumed_on_two_ranks_and_back_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 -> 2 ranks: twice from copies of one cut, the same weights bit for bit and the same
    saved streams, one per rank and different (from rank 0's stream on both ranks, the same
    draws would leave the two streams equal). 2 -> 1: the restored stream is the derived one."""
    cut = _cut_run(tmp_path / "cut", monkeypatch)
    again = tmp_path / "again"
    shutil.copytree(cut, again)
    one, two = _resume_on_two_ranks(cut), _resume_on_two_ranks(again)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)
    metas = [gpunet.load(r / "checkpoint.safetensors", rng=False) for r in (cut, again)]
    ranks = metas[0]["rng_ranks"]
    assert metas[1]["rng_ranks"] == ranks and len(ranks) == 2 and ranks[0] != ranks[1]

    args = argparse.Namespace(**metas[0]["args"])
    model, opt = job.build(args, [64, *args.hidden, 10], gpunet.device("cpu"))
    loader = DataLoader(Dataset(np.zeros((4, 64), np.float32), np.zeros(4)), 2, shuffle=True)
    checkpoints = job._Checkpoints(cut, model, opt, loader, {}, distributed.LocalComm())
    checkpoints.restore()
    host = default_generator.get_state()["host"]
    assert host == rank_rng_state(ranks, 0, 1)["host"] and host != ranks[0]["host"]


class _Rank1Of2(distributed.LocalComm):
    rank, size = 1, 2


def test_each_ranks_device_streams_are_saved_and_resumed_under_the_same_world_size(
    tmp_path: Path,
) -> None:
    """The device streams (CuPy's, on GPUs) travel beside the host ones: here stand-in byte
    arrays, since the CPU has none; rank 1 of 2 resumes both of its own, bit for bit."""
    ranks = _states([10, 11])
    devices = [np.arange(16, dtype=np.uint8) + r for r in range(2)]
    for r, array in enumerate(devices):
        ranks[r]["devices"] = {"cuda:0": array}
    model = gpunet.nn.Linear(3, 2)
    opt = gpunet.optim.SGD(model.parameters(), lr=0.1)
    history = History()
    history.train_loss.append(1.0)
    loader = DataLoader(Dataset(np.zeros((4, 3), np.float32), np.zeros(4)), 2, shuffle=True)
    extra = {"history": history.as_dict(), "loader": loader.state_dict()}
    gpunet.save(tmp_path / "checkpoint.safetensors", model, opt, rng_ranks=ranks, **extra)
    meta = gpunet.load(tmp_path / "checkpoint.safetensors", rng=False)
    for r in range(2):
        np.testing.assert_array_equal(meta["rng_ranks"][r]["devices"]["cuda:0"], devices[r])
        assert meta["rng_ranks"][r]["host"] == ranks[r]["host"]
    checkpoints = job._Checkpoints(tmp_path, model, opt, loader, {}, _Rank1Of2())
    checkpoints.restore()
    state = default_generator.get_state()
    assert state["host"] == ranks[1]["host"] and state["seed"] == 11
    np.testing.assert_array_equal(state["devices"]["cuda:0"], devices[1])


def test_a_device_stream_of_no_saved_rank_is_a_checkpoint_error(tmp_path: Path) -> None:
    model = gpunet.nn.Linear(3, 2)
    ranks = _states([1])
    ranks[0]["devices"] = {"cuda:0": np.zeros(4, np.uint8)}
    gpunet.save(tmp_path / "c.safetensors", model, rng_ranks=ranks)
    tensors = safetensors.numpy.load_file(str(tmp_path / "c.safetensors"))
    tensors["rng_ranks.3.cuda:0"] = np.zeros(4, np.uint8)  # rank 3 of a world of one
    header = safetensors.safe_open(str(tmp_path / "c.safetensors"), "np").metadata()
    safetensors.numpy.save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header)
    target = gpunet.nn.Linear(3, 2)
    before = [p.numpy().copy() for p in target.parameters()]
    with pytest.raises(CheckpointError, match=r"'rng_ranks\.3\.cuda:0' holds a device stream"):
        gpunet.load(tmp_path / "bad.safetensors", target)
    assert all(np.array_equal(p.numpy(), b) for p, b in zip(target.parameters(), before))
    assert gpunet.load(tmp_path / "c.safetensors")["rng_ranks"][0]["devices"]["cuda:0"].size == 4
