"""Data parallelism on 2 MPI ranks: each run is ``mpiexec -n 2`` started from pytest with a hard
timeout, so a hung rank fails the test instead of stalling the suite. The numerical checks
run in one launch (worker.py) and are reported one test each."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpunet
from gpunet import nn, optim

HERE = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
CI = os.environ.get("CI") == "true"
CHECKS = [
    "one_step_float64",
    "one_step_float32",
    "momentum_100_steps_float32",
    "adam_100_steps_float32",
    "two_runs_bit_identical",
    "a_scaled_step_skips_on_every_rank_when_one_rank_overflows",
    "autocast_steps_stay_identical_across_ranks",
    "autocast_weight_copies_equal_casting_across_ranks",
    "no_sync_accumulates_like_the_larger_batch",
    "a_parameter_unused_on_every_rank_keeps_no_gradient",
    "a_group_added_after_the_wrap_takes_rank_0s_parameters",
    "sampler_covers_every_example_once",
    "mismatched_models_are_refused_at_wrap",
    "sgd_in_backward_is_refused",
    "collectives_on_tensors",
    "collectives_on_tensors_of_every_kind",
    "a_bad_root_or_a_strided_array_is_refused_by_name",
    "the_gradients_after_a_step_are_the_average",
    "wrapping_after_a_step_takes_rank_0s_optimizer_state",
    "integer_means_are_refused_and_bfloat16_reduces_through_float32",
    "ranks_passing_different_arrays_ops_or_roots_are_refused_naming_each",
    "broadcast_parameters_gives_rank_0s_model",
    "fit_refuses_an_unsharded_loader",
    "fit_refuses_shards_of_unequal_steps",
    "fit_refuses_ranks_loaders_of_different_batch_sizes_or_data",
    "fit_refuses_a_validation_loader_that_pads",
    "fit_reduces_validation_and_every_rank_stops_alike",
    "clipping_after_synchronize_equals_one_process",
    "clipping_after_unscale_equals_one_process",
    "clipping_before_synchronize_clips_each_rank_and_keeps_them_identical",
    "schedules_and_weight_decay_for_50_steps_equal_one_process",
    "scaled_low_precision_steps_equal_one_process",
    "checkpoints_from_every_rank_load_in_any_world",
    "a_step_skipped_after_synchronize_leaves_the_next_step_averaged",
    "fit_gives_every_rank_rank_0s_frozen_part_outside_the_optimizer",
]


def mpiexec(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """``mpiexec -n 2 args...`` with a hard limit; one BLAS thread per rank (2 cores)."""
    return run_bounded([str(MPIEXEC), "-n", "2", *args], timeout, **env)


def need_mpiexec() -> None:
    """Skip without the venv's mpiexec, saying why; under CI (the dev extra installs mpich)
    its absence is a failure."""
    if not MPIEXEC.exists():
        if CI:
            pytest.fail(f"no {MPIEXEC}: the dev extra should install mpich")
        pytest.skip(f"no {MPIEXEC} (pip install -e '.[mpi]')")


def start(argv: list[str], **env: str) -> subprocess.Popen:
    """``argv`` in a session of its own (so that one signal reaches mpiexec and every rank),
    one BLAS thread per rank."""
    need_mpiexec()
    full = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **env}
    full.pop("GPUNET_DEVICE", None)
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full,
        start_new_session=True,
    )


def run_bounded(argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own process group, killed whole (mpiexec and every rank) at the
    limit: a hung rank fails the test instead of stalling the suite."""
    proc = start(argv, **env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv)} hung past {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    out = tmp_path_factory.mktemp("dp") / "results.json"
    done = mpiexec(sys.executable, str(HERE / "worker.py"), "checks", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", CHECKS)
def test_two_ranks(results: dict[str, list], name: str) -> None:
    ok, details = results[name]
    assert ok, "\n".join(details)


def test_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path: Path) -> None:
    done = mpiexec(sys.executable, str(HERE / "worker.py"), "raise", str(tmp_path / "r.json"))
    assert done.returncode != 0
    assert "rank 1 of 2 failed" in done.stderr and "rank one broke on purpose" in done.stderr


def test_an_error_on_one_rank_inside_fit_ends_every_rank_with_its_message(tmp_path: Path) -> None:
    done = mpiexec(sys.executable, str(HERE / "worker.py"), "raise_in_fit", str(tmp_path / "r"))
    assert done.returncode != 0 and "waited" not in done.stderr  # (ended, not timed out)
    assert "rank 1 of 2 failed" in done.stderr and "loss broke at step 3" in done.stderr


def test_a_rank_that_never_joins_ends_the_run_after_the_timeout(tmp_path: Path) -> None:
    done = mpiexec(
        sys.executable,
        str(HERE / "worker.py"),
        "hang",
        str(tmp_path / "r.json"),
        timeout=90,  # (the limit for a stuck job, not the expected time: about 3 s when quiet)
        GPUNET_DIST_TIMEOUT="1",
    )
    assert done.returncode != 0
    # (under load the wait overshoots the 1 s limit by a poll or more: any whole seconds)
    said = re.search(r"rank 0 of 2 waited (\d+) s for all_reduce\(sum\) of 3 float32", done.stderr)
    assert said and 1 <= int(said[1]) <= 30, done.stderr


def test_a_rank_that_never_steps_ends_the_run_naming_the_step(tmp_path: Path) -> None:
    """The message named only 'all_reduce(max) of 4 int32': nothing a user wrote; now it
    names the DistributedOptimizer's step that every rank must call."""
    done = mpiexec(
        sys.executable,
        str(HERE / "worker.py"),
        "skip_step",
        str(tmp_path / "r.json"),
        timeout=90,  # (the limit for a stuck job, not the expected time)
        GPUNET_DIST_TIMEOUT="1",
    )
    assert done.returncode != 0
    said = r"rank 0 of 2 waited \d+ s for all_reduce\(max\) of 4 int32 .* in DistributedOptimizer"
    assert re.search(said + r"\.step\(\) or synchronize\(\)", done.stderr), done.stderr


def test_a_rank_that_steps_once_more_ends_the_run_naming_both_calls(tmp_path: Path) -> None:
    """Rank 0's extra step() (in fit's on_epoch_end) met rank 1's next step in fit: MPI's
    'Message truncated' error stack and an abort from inside MPI; now every rank raises
    naming each rank's call and where it ran."""
    done = mpiexec(
        sys.executable, str(HERE / "worker.py"), "extra_step", str(tmp_path / "r.json"), timeout=90
    )
    assert done.returncode != 0
    said = (
        "the ranks' calls differ (rank 0: all_reduce(max) of (4,) int32 in DistributedOptimizer"
        ".step() or synchronize(); rank 1: all_reduce(min) of (2,) float64 in fit)"
    )
    assert said in done.stderr and "error stack" not in done.stderr, done.stderr


def test_gpunet_train_on_two_ranks_reaches_the_one_process_accuracy(tmp_path: Path) -> None:
    """``gpunet train --nproc 2``: it starts the venv's mpiexec, which starts ``gpunet train``
    on 2 ranks; rank 0 alone prints and saves; the test accuracy is in the one-process band
    (0.963-1.000 over seeds 0-9), and the checkpoint loads into one process."""
    gpunet_cli = str(Path(sys.executable).parent / "gpunet")
    argv = [gpunet_cli, "train", "--nproc", "2", "--no-progress", "--out", str(tmp_path)]
    done = run_bounded(argv, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1 and "x 2 ranks (mpi)" in done.stdout
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95, metrics["test_accuracy"]
    want = {"world_size": 2, "engine": "mpi", "samples_per_step_per_rank": 64}
    assert metrics["ranks"] == {**want, "samples_per_step": 128}
    model = nn.MLP([64, 256, 128, 10])
    opt = optim.Adam(model.parameters())
    meta = gpunet.load(run / "checkpoint.safetensors", model, opt)  # a world of one
    assert meta["history"]["val_loss"] and opt.state_dict()["state"]


def test_ctrl_c_stops_every_rank_after_the_same_step_and_saves(tmp_path: Path) -> None:
    """Ctrl-C at the terminal (SIGINT to the whole process group) once training runs: the
    ranks agree to stop, rank 0 saves the best weights, exit 130; a rank left waiting would
    trip the 20 s limit instead."""
    gpunet_cli = str(Path(sys.executable).parent / "gpunet")
    argv = [gpunet_cli, "train", "--nproc", "2", "--no-progress", "--out", str(tmp_path)]
    argv += ["--epochs", "100000", "--patience", "100000"]
    proc = start(argv, GPUNET_CHECKPOINT_SECONDS="0", GPUNET_DIST_TIMEOUT="20")
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/checkpoint.safetensors")):  # an epoch has ended
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted after" in out and "waited" not in err
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "metrics.json").read_text())["interrupted"]


def test_a_usage_error_under_mpiexec_is_one_line_per_rank_and_exit_2(tmp_path: Path) -> None:
    done = mpiexec(sys.executable, "-m", "gpunet.cli", "train", "--epochs", "0")
    assert done.returncode == 2
    message = "gpunet train: error: --epochs must be >= 1, got 0"  # each rank's (interleaved)
    assert done.stderr.count(message) in (1, 2) and "Traceback" not in done.stderr, done.stderr


def test_the_sharded_loaders_of_the_ranks_are_disjoint_without_mpi() -> None:
    """The sampler's arithmetic for 3 ranks, in one process: disjoint, complete, padded to
    equal steps, reshuffled each epoch, and num_replicas=1 gives the unsharded batches."""
    from gpunet.data import DataLoader, Dataset

    n = 20
    data = Dataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n))
    loaders = [DataLoader(data, 3, shuffle=True, seed=5, num_replicas=3, rank=r) for r in range(3)]
    assert {len(ld) for ld in loaders} == {3}  # ceil(20 / 3) = 7 rows each: 3 batches
    epochs = []
    for _ in range(2):
        rows = [np.concatenate([y.numpy() for _, y in ld]) for ld in loaders]
        assert [len(r) for r in rows] == [7, 7, 7]
        every = np.concatenate(rows)
        assert sorted(set(every.tolist())) == list(range(n)) and len(every) == 21
        epochs.append(every)
    assert not np.array_equal(epochs[0], epochs[1])
    one = DataLoader(data, 3, shuffle=True, seed=5, num_replicas=1, rank=0)
    plain = DataLoader(data, 3, shuffle=True, seed=5)
    assert all(np.array_equal(a[1].numpy(), b[1].numpy()) for a, b in zip(one, plain))
    uneven = [DataLoader(data, 8, num_replicas=3, rank=r, pad=False) for r in range(3)]
    assert sorted(np.concatenate([y.numpy() for u in uneven for _, y in u]).tolist()) == list(
        range(n)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shuffle": True, "num_replicas": 2, "rank": 0}, "needs seed="),
        ({"num_replicas": 2, "rank": 2}, "0 <= rank < num_replicas"),
        ({"rank": 0}, "num_replicas=None"),
    ],
)
def test_a_bad_shard_is_refused(kwargs: dict, message: str) -> None:
    from gpunet.data import DataLoader, Dataset

    data = Dataset(np.zeros((4, 1), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=message):
        DataLoader(data, 2, **kwargs)


@pytest.mark.parametrize("kind", ["adam", "sgd-momentum-decay"])
def test_a_parameter_no_rank_differentiates_is_left_alone_as_without_the_wrap(kind: str) -> None:
    """A parameter outside the loss on every rank keeps grad None, its optimizer state and its
    value (as one process and PyTorch's DDP leave it); it was averaged as a zero gradient and
    then moved by weight decay and given Adam state. A world of one shows it without MPI."""
    import gpunet.distributed as dist
    import gpunet.nn.functional as F

    def make() -> tuple[nn.Module, optim.Optimizer]:
        gpunet.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(2, 2)).to(gpunet.float64)
        params = model.parameters()
        if kind == "adam":
            return model, optim.Adam(params, lr=0.1, weight_decay=0.1)
        return model, optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)

    x = gpunet.tensor(np.linspace(-1, 1, 20).reshape(5, 4))
    y = gpunet.tensor(np.array([0, 1, 2, 1, 0]))
    runs = []
    for wrap in (False, True):
        model, opt = make()
        if wrap:
            opt = dist.DistributedOptimizer(opt, dist.Communicator())
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model[0](x), y).backward()
            opt.step()
        unused = list(model[1].parameters())
        assert all(p.grad is None for p in unused)
        assert all(len(opt.state.get(p, {})) == 0 for p in unused)
        runs.append([p.numpy().copy() for p in model.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
