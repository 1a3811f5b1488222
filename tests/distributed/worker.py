"""Run under ``mpiexec -n 2`` by test_data_parallel.py: each check computes, on every rank, the
data-parallel result and the one-process reference on the concatenated batch, and rank 0
writes {check: [ok, detail]} as JSON to argv[2]. ``argv[1]`` picks the scenario: ``checks``
(the numerical checks), ``raise`` (rank 1 raises), ``hang`` (rank 1 skips a collective),
``skip_step`` (rank 1 never calls step()), ``extra_step`` (rank 0 calls it once more),
``raise_in_fit`` (rank 1 raises in the middle of an epoch)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import sys
import traceback
from collections.abc import Callable

import numpy as np

import gpunet
import gpunet.distributed as dist
import gpunet.nn.functional as F
from gpunet import nn, optim
from gpunet.data import DataLoader, Dataset

COMM = dist.init()
R, N = COMM.rank, COMM.size
RESULTS: dict[str, list] = {}
CHECKS: list[Callable[[], str]] = []


def check(fn: Callable[[], str]) -> Callable[[], str]:
    CHECKS.append(fn)
    return fn


def run(fn: Callable[[], str]) -> None:
    """Record fn's detail (ok) or its exception (failed), agreed over the ranks."""
    try:
        detail, ok = fn(), True
    except Exception:
        detail, ok = traceback.format_exc(), False
    every = COMM.all_gather_object((ok, detail))
    RESULTS[fn.__name__] = [all(o for o, _ in every), [d for _, d in every]]


def batch(dtype: str, rows: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 6)).astype(dtype), rng.integers(0, 3, rows)


def model_and_opt(dtype: str, opt: str, seed: int = 1) -> tuple[nn.Module, optim.Optimizer]:
    gpunet.manual_seed(seed + 100 * R)  # different on each rank: the wrap must broadcast
    model = nn.MLP([6, 8, 3], activation="tanh", dtype=dtype)
    kinds = {
        "sgd": lambda p: optim.SGD(p, lr=0.1),
        "momentum": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        "adam": lambda p: optim.Adam(p, lr=1e-2),
    }
    return model, kinds[opt](model.parameters())


def params(model: nn.Module) -> list[np.ndarray]:
    return [p.numpy().copy() for p in model.parameters()]


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(np.ascontiguousarray(p.numpy()).tobytes())
    return h.hexdigest()


def train(dtype: str, opt: str, steps: int, parallel: bool) -> tuple[list, list[str]]:
    """``steps`` steps on 16-row batches: this rank's half (parallel) or all 16 rows."""
    model, o = model_and_opt(dtype, opt)
    if parallel:
        o = dist.DistributedOptimizer(o)
    else:  # the reference starts from rank 0's weights too
        gpunet.manual_seed(1)
        ref = nn.MLP([6, 8, 3], activation="tanh", dtype=dtype)
        for p, q in zip(model.parameters(), ref.parameters()):
            p.data[...] = q.data
    hashes = []
    for step in range(steps):
        x, y = batch(dtype, seed=step)
        if parallel:
            x, y = x[R * 8 : (R + 1) * 8], y[R * 8 : (R + 1) * 8]
        o.zero_grad()
        F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y)).backward()
        o.step()
        hashes.append(digest(model))
    return params(model), hashes


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


def close(dtype: str, opt: str, steps: int, tol: float) -> str:
    mine, hashes = train(dtype, opt, steps, parallel=True)
    ref, _ = train(dtype, opt, steps, parallel=False)
    diff = max_diff(mine, ref)
    every = COMM.all_gather_object(hashes)
    assert all(h == every[0] for h in every), "the ranks' parameters differ after some step"
    assert diff <= tol, f"{dtype} {opt} x{steps}: max |dp - single| = {diff:.3g} > {tol}"
    return f"{dtype} {opt} x{steps}: max diff {diff:.3g}, bit-identical on {N} ranks every step"


# (dtype, optimizer, steps, tolerance against the one-process run on the whole batch)
CLOSE = {
    "one_step_float64": ("float64", "sgd", 1, 1e-12),
    "one_step_float32": ("float32", "sgd", 1, 1e-6),
    "momentum_100_steps_float32": ("float32", "momentum", 100, 1e-6),
    "adam_100_steps_float32": ("float32", "adam", 100, 1e-6),
}
for _name, _case in CLOSE.items():
    _fn = functools.partial(close, *_case)
    _fn.__name__ = _name  # type: ignore[attr-defined]
    check(_fn)  # type: ignore[arg-type]


@check
def two_runs_bit_identical() -> str:
    a, _ = train("float32", "adam", 20, parallel=True)
    b, _ = train("float32", "adam", 20, parallel=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "two runs differ"
    return "20 Adam steps twice: identical bits"


@check
def a_scaled_step_skips_on_every_rank_when_one_rank_overflows() -> str:
    """GradScaler over a DistributedOptimizer: the gradients are averaged before the inf/NaN
    check, so an overflow on rank 1 alone skips the step on both ranks (each deciding from
    its own gradients, rank 0 would step and the ranks' weights would part)."""
    model, o = model_and_opt("float32", "adam")
    o = dist.DistributedOptimizer(o)
    scaler = gpunet.amp.GradScaler()
    before = params(model)
    for step in range(3):
        x, y = batch("float32", seed=step)
        x = x[R * 8 : (R + 1) * 8]
        if step == 0 and R == 1:
            x[0, 0] = np.inf  # this rank's loss and gradients overflow
        o.zero_grad()
        loss = F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y[R * 8 : (R + 1) * 8]))
        scaler.scale(loss).backward()
        scaler.step(o)
        scaler.update()
        if step == 0:
            assert all(np.array_equal(a, b) for a, b in zip(params(model), before)), "stepped"
    every = COMM.all_gather_object(digest(model))
    assert len(set(every)) == 1, every
    return "rank 1's inf skipped the step on both ranks; then both stepped alike"


def autocast_step(model: nn.Module, o: optim.Optimizer, step: int) -> None:
    """One bfloat16 autocast step on this rank's half of batch ``step``."""
    x, y = batch("float32", seed=step)
    o.zero_grad()
    with gpunet.autocast(dtype=gpunet.bfloat16):
        out = model(gpunet.tensor(x[R * 8 : (R + 1) * 8]))
        loss = F.cross_entropy(out, gpunet.tensor(y[R * 8 : (R + 1) * 8]))
    loss.backward()
    o.step()


@check
def autocast_steps_stay_identical_across_ranks() -> str:
    """bfloat16 autocast under a DistributedOptimizer: float32 master weights and gradients,
    so the one all-reduce and the update keep the ranks bit-identical."""
    model, o = model_and_opt("float32", "adam")
    o = dist.DistributedOptimizer(o)
    for step in range(5):
        autocast_step(model, o, step)
        every = COMM.all_gather_object(digest(model))
        assert len(set(every)) == 1, (step, every)
    assert all(p.dtype == gpunet.float32 for p in model.parameters())
    return "5 Adam steps under bfloat16 autocast: the ranks' weights identical after each"


@check
def autocast_weight_copies_equal_casting_across_ranks() -> str:
    """The optimizer's bfloat16 weight copy under a DistributedOptimizer: one step before the
    wrap makes it current on each rank's own weights, the wrap's broadcast of rank 0's makes
    it stale, and the steps after equal, bit for bit, a run that casts every weight."""
    from gpunet.optim.flat import FlatBuffer

    def steps(copies: bool) -> str:  # (plain SGD: no state of the step before the wrap)
        model, o = model_and_opt("float32", "sgd")
        keep = FlatBuffer.lowp_view
        if not copies:  # (the reference: no copy offered, every weight cast)
            FlatBuffer.lowp_view = lambda self, i, dtype: None  # type: ignore[method-assign]
        try:
            for step in range(4):
                if step == 1:
                    o = dist.DistributedOptimizer(o)
                autocast_step(model, o, step)
        finally:
            FlatBuffer.lowp_view = keep  # type: ignore[method-assign]
        assert (o._flats[0].lowp is not None) == copies
        return digest(model)

    with_copies = steps(True)
    assert with_copies == steps(False)
    assert len(set(COMM.all_gather_object(with_copies))) == 1
    return "3 SGD steps after the wrap, reading the weight copy: the casting run's bits"


@check
def no_sync_accumulates_like_the_larger_batch() -> str:
    model, o = model_and_opt("float64", "momentum")
    o = dist.DistributedOptimizer(o)
    x, y = batch("float64", rows=32, seed=7)
    halves = [slice(R * 8, (R + 1) * 8), slice(16 + R * 8, 16 + (R + 1) * 8)]
    o.zero_grad()
    with o.no_sync():  # micro-batch 1: local only
        (
            F.cross_entropy(model(gpunet.tensor(x[halves[0]])), gpunet.tensor(y[halves[0]])) / 2
        ).backward()
        try:
            o.step()
            raise AssertionError("step() inside no_sync() did not raise")
        except RuntimeError as e:
            assert "drift apart" in str(e)
    (
        F.cross_entropy(model(gpunet.tensor(x[halves[1]])), gpunet.tensor(y[halves[1]])) / 2
    ).backward()
    o.step()
    ref, ro = model_and_opt("float64", "momentum")
    gpunet.manual_seed(1)
    for p, q in zip(
        ref.parameters(), nn.MLP([6, 8, 3], activation="tanh", dtype="float64").parameters()
    ):
        p.data[...] = q.data
    ro.zero_grad()
    F.cross_entropy(ref(gpunet.tensor(x)), gpunet.tensor(y)).backward()
    ro.step()
    diff = max_diff(params(model), params(ref))
    assert diff <= 1e-12, f"no_sync accumulation differs from the 32-row batch by {diff:.3g}"
    return f"2 micro-batches x {N} ranks = one 32-row batch: max diff {diff:.3g}"


@check
def a_parameter_unused_on_every_rank_keeps_no_gradient() -> str:
    gpunet.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(2, 2))
    o = dist.DistributedOptimizer(optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1))
    unused = list(model[1].parameters())
    before = [p.numpy().copy() for p in unused]
    x, y = batch("float32", rows=8, seed=R)
    for _ in range(2):
        o.zero_grad()
        F.cross_entropy(model[0](gpunet.tensor(x)), gpunet.tensor(y)).backward()
        o.step()
    assert all(p.grad is None and not o.state.get(p) for p in unused), "given a gradient"
    assert all(np.array_equal(p.numpy(), b) for p, b in zip(unused, before)), "moved"
    every = COMM.all_gather_object(digest(model))
    assert len(set(every)) == 1, "the ranks' weights differ"
    return "unused on both ranks: no gradient, no Adam state, not decayed"


@check
def a_group_added_after_the_wrap_takes_rank_0s_parameters() -> str:
    gpunet.manual_seed(10 + R)  # each rank its own initial weights, as gpunet train seeds them
    body, head = nn.Linear(6, 4), nn.Linear(4, 3)
    o = dist.DistributedOptimizer(optim.SGD(body.parameters(), lr=0.1))
    o.add_param_group({"params": list(head.parameters()), "lr": 0.05})
    x, y = batch("float32", rows=8, seed=R)
    for _ in range(2):
        o.zero_grad()
        F.cross_entropy(head(body(gpunet.tensor(x))), gpunet.tensor(y)).backward()
        o.step()
    every = COMM.all_gather_object([digest(body), digest(head)])
    assert all(e == every[0] for e in every), "the ranks' weights differ"
    return "add_param_group after the wrap: rank 0's new parameters everywhere, in step"


@check
def sampler_covers_every_example_once() -> str:
    n = 37
    data = Dataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n))
    loader = DataLoader(data, 4, shuffle=True, seed=3, num_replicas=N, rank=R)
    orders = []
    for _ in range(3):
        mine = np.concatenate([y.numpy() for _, y in loader]).tolist()
        every = COMM.all_gather_object(mine)
        assert len({len(e) for e in every}) == 1, f"uneven steps: {[len(e) for e in every]}"
        flat = sorted(i for e in every for i in e)
        padded = -(-n // N) * N
        assert len(flat) == padded and sorted(set(flat)) == list(range(n)), flat
        orders.append(every[0])
    assert orders[0] != orders[1], "the second epoch was not reshuffled"
    return f"{n} rows over {N} ranks: each once (+{-(-n // N) * N - n} padded), reshuffled"


@check
def mismatched_models_are_refused_at_wrap() -> str:
    model = nn.MLP([6, 8 + R, 3])  # rank 1 has a different hidden size
    try:
        dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1))
    except ValueError as e:
        assert "rank 1 has" in str(e) and "(6, 9)" in str(e), e
        return str(e)[:120]
    raise AssertionError("a different model on rank 1 was accepted")


@check
def sgd_in_backward_is_refused() -> str:
    model = nn.MLP([6, 8, 3])
    try:
        dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1, in_backward=True))
    except ValueError as e:
        assert "in_backward" in str(e) and "drift apart" in str(e), e
        return str(e)[:80]
    raise AssertionError("SGD(in_backward=True) was accepted")


@check
def collectives_on_tensors() -> str:
    t = gpunet.tensor([float(R), 10.0 * R])
    dist.all_reduce(t, "sum")
    assert t.tolist() == [sum(range(N)), 10.0 * sum(range(N))], t.tolist()
    b = gpunet.tensor([float(R + 5)])
    dist.broadcast(b, root=N - 1)
    assert b.tolist() == [float(N - 1 + 5)], b.tolist()
    m = np.array([R + 1.0])
    COMM.all_reduce(m, "max")
    assert m.tolist() == [float(N)]
    return "all_reduce(sum, max) and broadcast from the last rank"


@check
def wrapping_after_a_step_takes_rank_0s_optimizer_state() -> str:
    """An optimizer that stepped alone before the wrap kept each rank's own moments, so the
    ranks' weights drifted apart silently after it; the wrap now gives every rank rank 0's."""
    for kind in ("adam", "momentum"):
        model, o = model_and_opt("float32", kind)
        x, y = batch("float32", rows=8, seed=R)  # each rank its own data
        for wrapped in (False, True):
            o = dist.DistributedOptimizer(o) if wrapped else o
            for _ in range(1 + 2 * wrapped):
                o.zero_grad()
                F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y)).backward()
                o.step()
        every = COMM.all_gather_object(digest(model))
        assert len(set(every)) == 1, f"{kind}: the ranks' weights differ after the wrap"
    return "Adam and SGD-momentum stepped before the wrap: bit-identical weights after it"


@check
def the_gradients_after_a_step_are_the_average() -> str:
    """Over MPI the step folds 1/N into the update, and left p.grad holding the ranks' sum:
    N times the average PyTorch leaves there (and fit's gradient norms N times too large), so
    a second step() without a backward took an N times larger gradient."""
    for kind in ("sgd", "adam"):
        model, o = model_and_opt("float32", kind)
        o = dist.DistributedOptimizer(o)
        x, y = batch("float32", rows=8, seed=R)
        o.zero_grad()
        F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y)).backward()
        local = [p.grad.numpy().copy() for p in model.parameters()]
        every = COMM.all_gather_object(local)
        o.step()
        after = [p.grad.numpy().copy() for p in model.parameters()]
        for i, got in enumerate(after):
            want = np.sum([e[i] for e in every], axis=0) * np.float32(1.0 / N)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{kind} {i}")
        o.step()  # the same gradient again, as in one process
        for a, p in zip(after, model.parameters()):
            assert np.array_equal(p.grad.numpy(), a), f"{kind}: a second step changed p.grad"
    return "p.grad after step() is the average over the ranks, and stays it over a second step"


@check
def collectives_on_tensors_of_every_kind() -> str:
    """PyTorch users pass tensors: one that requires grad, a slice (a view: its base sees
    the result), a 0-d one, and float16, bfloat16, float64, int64 and int32 ones."""
    total = float(sum(range(1, N + 1)))
    leaf = gpunet.tensor([1.0 + R, 2.0], requires_grad=True)
    assert dist.all_reduce(leaf).tolist() == [total, 2.0 * N] and leaf.requires_grad
    base = gpunet.tensor([1.0, 2.0, 3.0, 4.0]) * (R + 1)
    dist.all_reduce(base[1:3], "max")
    assert base.tolist() == [1.0 + R, 2.0 * N, 3.0 * N, 4.0 * (R + 1)], base.tolist()
    assert dist.all_reduce(gpunet.tensor(1.0 + R), "mean").item() == total / N
    assert dist.broadcast(gpunet.tensor(5.0 + R), root=N - 1).item() == 4.0 + N
    for dtype in (gpunet.float16, gpunet.bfloat16, gpunet.float64, gpunet.int64, gpunet.int32):
        t = gpunet.tensor([1.0 + R, 3.0]).to(dtype)
        assert dist.all_reduce(t).numpy().tolist() == [total, 3.0 * N] and t.dtype == dtype
        b = gpunet.tensor([float(R)] * 2).to(dtype)
        assert dist.broadcast(b, root=1).numpy().tolist() == [1, 1] and b.dtype == dtype
    return "requires_grad, a slice, 0-d and five dtypes: reduced and broadcast in place"


@check
def a_bad_root_or_a_strided_array_is_refused_by_name() -> str:
    """A root outside the world was MPI's own error stack from inside Bcast; now the same
    ValueError as in a world of one, raised on every rank before any collective."""
    for call, want in [
        (lambda: dist.broadcast(np.zeros(2), root=N), f"root must be a rank in 0..{N - 1}"),
        (lambda: COMM.broadcast_object("x", root=-1), f"root must be a rank in 0..{N - 1}"),
        (lambda: dist.all_reduce(gpunet.ones(2, 3).T), "contiguous"),
    ]:
        try:
            call()
            raise AssertionError(f"accepted; wanted {want}")
        except ValueError as e:
            assert want in str(e), e
    return "root N, root -1 and a transposed tensor refused with ValueError"


def refused(call: Callable[[], object], *wanted: str) -> str:
    """The ValueError ``call`` raises on this rank, checked to name every ``wanted``."""
    try:
        call()
    except ValueError as e:
        assert all(w in str(e) for w in wanted), (wanted, str(e))
        return str(e)
    raise AssertionError(f"accepted; wanted an error naming {wanted}")


@check
def ranks_passing_different_arrays_ops_or_roots_are_refused_naming_each() -> str:
    """A rank's all_reduce of another shape or dtype than the others' was MPI's error stack
    from deep inside (a truncated message) or, where the byte counts agreed ((2, 3) against
    (3, 2), or another op), a silent result; now a ValueError on every rank naming each
    rank's call, and the ranks stay in step."""
    said = refused(
        lambda: dist.all_reduce(np.ones(3 + 2 * R, np.float32)),
        "rank 0: all_reduce(sum) of (3,) float32",
        "rank 1: all_reduce(sum) of (5,) float32",
    )
    refused(lambda: dist.all_reduce(np.ones((2, 3) if R == 0 else (3, 2))), "(2, 3)", "(3, 2)")
    refused(lambda: COMM.all_reduce(np.ones(4, ["float32", "float64"][R % 2])), "float64")
    refused(lambda: dist.all_reduce(gpunet.ones(2), ["sum", "max"][R % 2]), "all_reduce(max)")
    refused(lambda: COMM.broadcast(np.ones(2 + R), root=0), "broadcast(root=0) of (3,)")
    refused(lambda: dist.broadcast(np.ones(2), root=R), "broadcast(root=1)")
    t = gpunet.tensor([1.0 + R])
    assert dist.all_reduce(t).tolist() == [float(sum(range(1, N + 1)))], "out of step after"
    return said[:160]


@check
def integer_means_are_refused_and_bfloat16_reduces_through_float32() -> str:
    try:
        COMM.all_reduce(np.array([R + 1, 3]), "mean")
        raise AssertionError("all_reduce(mean) of int64 was accepted")
    except TypeError as e:
        assert "'sum'" in str(e), e
    t = gpunet.tensor([1.0 + R, 0.5]).to(gpunet.bfloat16)
    dist.all_reduce(t, "mean")
    want = np.array([np.mean([1.0 + r for r in range(N)]), 0.5], np.float32).astype(t.dtype)
    assert t.dtype == gpunet.bfloat16 and np.array_equal(t.numpy(), want), t.numpy()
    b = gpunet.tensor([3.0 + R]).to(gpunet.bfloat16)
    dist.broadcast(b, root=0)
    assert b.numpy().tolist() == [3.0], b.numpy()
    gpunet.manual_seed(1 + R)
    model = nn.MLP([6, 8, 3]).to(gpunet.bfloat16)
    o = dist.DistributedOptimizer(optim.Adam(model.parameters(), lr=1e-2))
    x, y = batch("float32", rows=8, seed=R)
    for _ in range(2):
        o.zero_grad()
        F.cross_entropy(model(gpunet.tensor(x).to(gpunet.bfloat16)), gpunet.tensor(y)).backward()
        o.step()
    every = COMM.all_gather_object(digest(model))
    assert len(set(every)) == 1, "the ranks' bfloat16 weights differ"
    return "mean of int64 refused; bfloat16 all_reduce, broadcast and a bfloat16 model's steps"


@check
def broadcast_parameters_gives_rank_0s_model() -> str:
    gpunet.manual_seed(R)  # a different initialisation on each rank
    model = nn.MLP([6, 8, 3])
    dist.broadcast_parameters(model)
    every = COMM.all_gather_object(digest(model))
    assert all(d == every[0] for d in every), "the ranks' parameters differ"
    return "every rank holds rank 0's parameters"


@check
def fit_refuses_an_unsharded_loader() -> str:
    from gpunet.train import fit

    model, o = model_and_opt("float32", "sgd")
    o = dist.DistributedOptimizer(o)
    x, y = batch("float32", rows=16)
    loader = DataLoader(Dataset(x, y), 4, shuffle=True, seed=R)  # unsharded, seeds differ
    try:
        fit(model, F.cross_entropy, o, loader, epochs=1, progress=False)
    except ValueError as e:
        assert "num_replicas=size" in str(e), e
        return str(e)[:100]
    raise AssertionError("an unsharded loader was accepted under data parallelism")


@check
def fit_refuses_ranks_loaders_of_different_batch_sizes_or_data() -> str:
    """Rank 0 on 16 rows in batches of 4, rank 1 on 8 in batches of 2: the same 2 steps, so
    fit ran, averaging a 4-row mean with a 2-row one as if equal (not the one-process step
    on the 6 rows, silently); refused before the first step, naming each rank's loader."""
    from gpunet.train import fit

    model, o = model_and_opt("float32", "sgd")
    o = dist.DistributedOptimizer(o)
    before = digest(model)
    x, y = batch("float32", rows=16 >> R)
    loader = DataLoader(Dataset(x, y), 4 >> R, shuffle=True, seed=0, num_replicas=N, rank=R)
    said = refused(
        lambda: fit(model, F.cross_entropy, o, loader, epochs=1, progress=False),
        "(batch_size, rows) = [(4, 16), (2, 8)]",
    )
    assert digest(model) == before, "fit stepped before refusing"
    return said[:120]


@check
def fit_refuses_a_validation_loader_that_pads() -> str:
    """3 validation rows over 2 ranks with the default pad=True: one row was evaluated twice,
    so the validation loss and accuracy (which pick the best epoch and stop early) were
    silently not the set's (1.1013 against 1.1091); refused before the first step, and by
    evaluate, naming pad=False. A validation set smaller than the world, unpadded, and an
    unsharded one (each rank evaluates all of it) work."""
    from gpunet.train import evaluate, fit

    model, o = model_and_opt("float32", "sgd")
    o = dist.DistributedOptimizer(o)
    before = digest(model)
    x, y = batch("float32", rows=16)
    shard = {"num_replicas": N, "rank": R}
    loader = DataLoader(Dataset(x, y), 4, shuffle=True, seed=0, **shard)
    padded = DataLoader(Dataset(x[:3], y[:3]), 4, **shard)
    said = refused(
        lambda: fit(model, F.cross_entropy, o, loader, padded, epochs=1, progress=False),
        "fit: the validation loader pads its 3 rows to 4",
        "pad=False",
    )
    assert digest(model) == before, "fit stepped before refusing"
    refused(lambda: evaluate(model, F.cross_entropy, padded, COMM), "evaluate: the loader pads")
    for rows, kw in ((1, {"pad": False, **shard}), (3, {})):  # rank 1 no rows; unsharded
        val = DataLoader(Dataset(x[:rows], y[:rows]), 4, **kw)
        h = fit(model, F.cross_entropy, o, loader, val, epochs=1, progress=False)
        want, _ = evaluate(model, F.cross_entropy, DataLoader(Dataset(x[:rows], y[:rows]), 4))
        assert abs(h.val_loss[0] - want) <= 1e-6 * want, (rows, h.val_loss, want)
    return said[:120]


AGREED = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "best_epoch")


@check
def fit_refuses_shards_of_unequal_steps() -> str:
    """5 rows, pad=False: rank 0 took 3 steps, rank 1 two, and rank 0's step all-reduce met
    rank 1's end-of-epoch one (MPI's 'Message truncated' from deep inside, or wrong sums when
    the sizes matched); refused on every rank before the first step."""
    from gpunet.train import fit

    model, o = model_and_opt("float32", "sgd")
    o = dist.DistributedOptimizer(o)
    x, y = batch("float32", rows=5)
    loader = DataLoader(Dataset(x, y), 1, shuffle=True, seed=0, num_replicas=N, rank=R, pad=False)
    try:
        fit(model, F.cross_entropy, o, loader, epochs=1, progress=False)
        raise AssertionError("fit ran shards of unequal steps")
    except ValueError as e:
        assert "same number of steps" in str(e) and "[3, 2]" in str(e), e
    return "refused on every rank, naming each rank's batch count"


@check
def fit_reduces_validation_and_every_rank_stops_alike() -> str:
    """fit on 2 ranks with a validation set of 13 rows (shards of 7 and 6): each epoch's
    validation loss is the one-process loss over all 13 rows, every rank records the same
    history and stops early at the same epoch (noise labels: it overfits), and only rank 0
    draws a progress bar."""
    from gpunet.train import evaluate, fit

    gpunet.manual_seed(3 + R)  # (the wrap gives every rank rank 0's weights)
    model = nn.MLP([6, 32, 3], activation="tanh")  # (float32: the loaders' dtype)
    o = dist.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    x, y = batch("float32", rows=32, seed=5)
    vx, vy = batch("float32", rows=13, seed=6)
    shard = {"num_replicas": N, "rank": R}
    loader = DataLoader(Dataset(x, y), 4, shuffle=True, seed=0, **shard)
    val = DataLoader(Dataset(vx, vy), 5, pad=False, **shard)
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):
        h = fit(model, F.cross_entropy, o, loader, val, epochs=40, early_stopping=2)
    loss, acc = evaluate(model, F.cross_entropy, DataLoader(Dataset(vx, vy), 13))  # best weights
    assert abs(loss - h.val_loss[h.best_epoch]) <= 1e-6 * loss, (loss, h.val_loss)
    assert acc == h.val_accuracy[h.best_epoch], (acc, h.val_accuracy)
    mine = ({k: getattr(h, k) for k in AGREED}, h.stopped_early, len(h.train_loss))
    every = COMM.all_gather_object((mine, bool(bar.getvalue())))
    assert all(e[0] == every[0][0] for e in every), "the ranks' histories differ"
    assert h.stopped_early and len(h.train_loss) < 40, "it did not stop early"
    assert [drew for _, drew in every] == [True] + [False] * (N - 1), "progress bars"
    return f"stopped after epoch {len(h.train_loss)} (best {h.best_epoch + 1}) on every rank"


@check
def fit_gives_every_rank_rank_0s_frozen_part_outside_the_optimizer() -> str:
    """A frozen first layer outside the optimizer (fine-tuning a backbone), each rank
    seeded apart: the wrap broadcast the head only, so each rank's outputs, losses and
    history were its own, silently; fit now starts from rank 0's whole model."""
    from gpunet.train import fit

    gpunet.manual_seed(3 + R)
    model = nn.MLP([6, 16, 3], activation="tanh")
    body = list(model.parameters())[:-2]
    for p in body:
        p.requires_grad = False
    o = dist.DistributedOptimizer(optim.SGD(list(model.parameters())[-2:], lr=0.3))
    x, y = batch("float32", rows=32, seed=5)
    loader = DataLoader(Dataset(x, y), 4, shuffle=True, seed=0, num_replicas=N, rank=R)
    h = fit(model, F.cross_entropy, o, loader, epochs=2, progress=False)
    every = COMM.all_gather_object((digest(model), h.train_loss))
    assert all(e == every[0] for e in every), "the ranks' models or losses differ"
    gpunet.manual_seed(3)
    assert all(
        np.array_equal(p.numpy(), q.numpy()) for p, q in zip(body, nn.MLP([6, 16, 3]).parameters())
    )
    return "the frozen layer is rank 0's on every rank; the same losses"


def pair(
    dtype: str, make: Callable
) -> tuple[nn.Module, optim.Optimizer, nn.Module, optim.Optimizer]:
    """A data-parallel model and optimizer (each rank seeded apart: the wrap takes rank 0's
    weights) and the one-process reference from the same weights, with its own optimizer."""
    gpunet.manual_seed(1 + 100 * R)
    model = nn.MLP([6, 8, 3], activation="tanh", dtype=dtype)
    o = dist.DistributedOptimizer(make(model.parameters()))
    gpunet.manual_seed(1)
    ref = nn.MLP([6, 8, 3], activation="tanh", dtype=dtype)
    assert digest(ref) == digest(model)
    return model, o, ref, make(ref.parameters())


def mine(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This rank's half of a 16-row batch."""
    return x[R * 8 : (R + 1) * 8], y[R * 8 : (R + 1) * 8]


def backward(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y)).backward()


def same_on_every_rank(model: nn.Module) -> None:
    every = COMM.all_gather_object(digest(model))
    assert len(set(every)) == 1, "the ranks' weights differ"


@check
def clipping_after_synchronize_equals_one_process() -> str:
    """synchronize(), clip_grad_norm_, step(): the averaged gradient clipped, as PyTorch DDP
    clips after backward; the same norm on every rank and the one-process step."""
    model, o, ref, ro = pair("float64", lambda p: optim.SGD(p, lr=0.5, momentum=0.9))
    for step in range(5):
        x, y = batch("float64", seed=step)
        o.zero_grad()
        backward(model, *mine(x, y))
        o.synchronize()
        norm = float(optim.clip_grad_norm_(model.parameters(), 0.05))
        o.step()
        ro.zero_grad()
        backward(ref, x, y)
        want = float(optim.clip_grad_norm_(ref.parameters(), 0.05))
        ro.step()
        assert want > 0.05 and abs(norm - want) <= 1e-12 * want, (norm, want)
        assert len(set(COMM.all_gather_object(norm))) == 1, "the ranks' norms differ"
    same_on_every_rank(model)
    diff = max_diff(params(model), params(ref))
    assert diff <= 1e-12, f"{diff:.3g}"
    return f"5 clipped steps: max diff {diff:.3g}"


@check
def clipping_after_unscale_equals_one_process() -> str:
    """GradScaler: scaler.unscale_(opt) averages first, so clipping after it clips the
    average, as one process does; float32 to 1e-6."""
    model, o, ref, ro = pair("float32", lambda p: optim.SGD(p, lr=0.5, momentum=0.9))
    scalers = [gpunet.amp.GradScaler(init_scale=2.0**8) for _ in range(2)]
    for step in range(5):
        x, y = batch("float32", seed=step)
        for m, opt, scaler, (bx, by) in (
            (model, o, scalers[0], mine(x, y)),
            (ref, ro, scalers[1], (x, y)),
        ):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(m(gpunet.tensor(bx)), gpunet.tensor(by))).backward()
            scaler.unscale_(opt)
            assert float(optim.clip_grad_norm_(m.parameters(), 0.05)) > 0.05, "not clipping"
            scaler.step(opt)
            scaler.update()
    same_on_every_rank(model)
    diff = max_diff(params(model), params(ref))
    assert diff <= 1e-6, f"{diff:.3g}"
    return f"5 scaled, unscaled, clipped SGD steps: max diff {diff:.3g}"


@check
def clipping_before_synchronize_clips_each_rank_and_keeps_them_identical() -> str:
    """clip_grad_norm_ before step() without synchronize(): each rank clips its own gradient
    by its own norm, then step() averages (Horovod's behaviour): not the one-process step,
    but the ranks cannot drift, since every rank applies the same average."""
    model, o, ref, ro = pair("float64", lambda p: optim.SGD(p, lr=0.5))
    x, y = batch("float64")
    o.zero_grad()
    backward(model, *mine(x, y))
    norms = COMM.all_gather_object(float(optim.clip_grad_norm_(model.parameters(), 0.05)))
    o.step()
    ro.zero_grad()
    backward(ref, x, y)
    optim.clip_grad_norm_(ref.parameters(), 0.05)
    ro.step()
    same_on_every_rank(model)
    assert len(set(norms)) == N, norms  # each rank's own norm
    assert max_diff(params(model), params(ref)) > 1e-6, "equal to one process: not per rank"
    return f"each rank clipped by its own norm {norms}; the ranks' weights identical"


@check
def a_step_skipped_after_synchronize_leaves_the_next_step_averaged() -> str:
    """synchronize(), the averaged norm read, the step skipped (a loop that skips a step
    whose norm is too large): the next step() took each rank's own gradient, unaveraged, and
    the ranks' weights parted silently; now it averages, as one process steps."""
    out = []
    for zeroing in ("optimizer", "model"):
        model, o, ref, ro = pair("float64", lambda p: optim.SGD(p, lr=0.5, momentum=0.9))
        for step in range(4):
            x, y = batch("float64", seed=step)
            (o if zeroing == "optimizer" else model).zero_grad()
            backward(model, *mine(x, y))
            ro.zero_grad()
            backward(ref, x, y)
            if step == 1:
                o.synchronize()  # (and not step(): skipped by the loop)
                continue
            o.step()
            ro.step()
        same_on_every_rank(model)
        diff = max_diff(params(model), params(ref))
        assert diff <= 1e-12, f"{zeroing}.zero_grad(): {diff:.3g}"
        out.append(f"{zeroing}.zero_grad() {diff:.2g}")
    return "one step skipped after synchronize(): " + ", ".join(out)


SCHEDULED = {
    "AdamW + cosine": (
        lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda o: optim.lr_scheduler.CosineAnnealingLR(o, T_max=50),
    ),
    "Adam(weight_decay) + linear warmup": (
        lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.01),
        lambda o: optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
    ),
    "SGD nesterov + StepLR": (
        lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda o: optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    ),
}


@check
def schedules_and_weight_decay_for_50_steps_equal_one_process() -> str:
    """50 float64 steps under a schedule, zero_grad(set_to_none=False): the one-process run
    on the whole batch to 1e-12, the same lr, identical ranks."""
    out = []
    for name, (make, schedule) in SCHEDULED.items():
        model, o, ref, ro = pair("float64", make)
        schedules = [schedule(o), schedule(ro)]
        for step in range(50):
            x, y = batch("float64", seed=step)
            o.zero_grad(set_to_none=False)
            backward(model, *mine(x, y))
            o.step()
            ro.zero_grad(set_to_none=False)
            backward(ref, x, y)
            ro.step()
            for s in schedules:
                s.step()
        same_on_every_rank(model)
        assert o.param_groups[0]["lr"] == ro.param_groups[0]["lr"], name
        diff = max_diff(params(model), params(ref))
        assert diff <= 1e-12, f"{name}: {diff:.3g}"
        out.append(f"{name} {diff:.2g}")
    return ", ".join(out)


@check
def scaled_low_precision_steps_equal_one_process() -> str:
    """GradScaler + float16 (and bfloat16) autocast over 10 Adam steps, an inf in rank 1's
    half of step 3: the same skip and scale as one process on the whole batch, identical
    ranks, and the one-process weights to the low precision's rounding of the sums."""
    out = []
    for dtype, tol in ((gpunet.float16, 2e-4), (gpunet.bfloat16, 1e-3)):
        model, o, ref, ro = pair("float32", lambda p: optim.Adam(p, lr=1e-2))
        scalers = [gpunet.amp.GradScaler(init_scale=2.0**10) for _ in range(2)]
        for step in range(10):
            x, y = batch("float32", seed=step)
            if step == 3:
                x[9, 0] = np.inf  # row 9 is rank 1's: rank 0's half stays finite
            runs = ((model, o, scalers[0], mine(x, y)), (ref, ro, scalers[1], (x, y)))
            for m, opt, scaler, (bx, by) in runs:
                opt.zero_grad()
                with gpunet.autocast(dtype=dtype), np.errstate(over="ignore", invalid="ignore"):
                    loss = F.cross_entropy(m(gpunet.tensor(bx)), gpunet.tensor(by))
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                scaler.update()
        same_on_every_rank(model)
        scales = [s.get_scale() for s in scalers]
        assert scales[0] == scales[1] == 2.0**9, scales  # one backoff: the same skip
        diff = max_diff(params(model), params(ref))
        assert diff <= tol, f"{dtype}: {diff:.3g}"
        out.append(f"{dtype} {diff:.2g}")
    return "scale 512 after the skip in both; max diff " + ", ".join(out)


@check
def checkpoints_from_every_rank_load_in_any_world() -> str:
    """gpunet.save from every rank to one path (atomic: the same bytes, the last rename
    wins); that 2-rank checkpoint continued in one process, and a one-process checkpoint
    loaded on rank 0 only before the wrap (which takes rank 0's weights and moments)
    continued on 2 ranks: each equal to the other world's run, float64 to 1e-12."""
    import os
    import tempfile

    from gpunet.checkpoint import load, save

    folder = COMM.broadcast_object(tempfile.mkdtemp() if R == 0 else None)
    adam = lambda p: optim.Adam(p, lr=1e-2)
    model, o, one, oo = pair("float64", adam)
    steps = iter(range(9))

    def both(dp: nn.Module, dpo: optim.Optimizer) -> None:
        for _ in range(3):
            x, y = batch("float64", seed=next(steps))
            dpo.zero_grad()
            backward(dp, *mine(x, y))
            dpo.step()
            oo.zero_grad()
            backward(one, x, y)
            oo.step()

    both(model, o)
    path = os.path.join(folder, "two.safetensors")
    save(path, model, o)  # on every rank
    COMM.barrier()
    load(path, one, oo)  # the one-process run continues from the 2-rank checkpoint
    both(model, o)
    diffs = [max_diff(params(model), params(one))]
    path = os.path.join(folder, "one.safetensors")
    if R == 0:
        save(path, one, oo)
    COMM.barrier()
    gpunet.manual_seed(7 + R)
    two = nn.MLP([6, 8, 3], activation="tanh", dtype="float64")
    to = adam(two.parameters())
    if R == 0:
        load(path, two, to)
    to = dist.DistributedOptimizer(to)
    both(two, to)
    same_on_every_rank(two)
    diffs.append(max_diff(params(two), params(one)))
    assert max(diffs) <= 1e-12, diffs
    return f"2 ranks -> 1 process -> 2 ranks: max diffs {diffs}"


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == "raise":
        if R == 1:
            raise RuntimeError("rank one broke on purpose")
        COMM.barrier()  # rank 0 waits here; the excepthook on rank 1 must end it
    elif scenario == "skip_step":  # rank 1 never steps: rank 0 waits inside step()
        model, o = model_and_opt("float32", "sgd")
        o = dist.DistributedOptimizer(o)
        x, y = batch("float32", rows=8, seed=R)
        F.cross_entropy(model(gpunet.tensor(x)), gpunet.tensor(y)).backward()
        if R == 0:
            o.step()
        else:
            import time

            time.sleep(60)
    elif scenario == "extra_step":  # rank 0 steps once more at each epoch's end, inside fit
        from gpunet.train import fit

        model, o = model_and_opt("float32", "sgd")
        o = dist.DistributedOptimizer(o)
        x, y = batch("float32", rows=16)
        loader = DataLoader(Dataset(x, y), 4, shuffle=True, seed=0, num_replicas=N, rank=R)
        extra = lambda epoch, h: o.step() if R == 0 else None
        fit(model, F.cross_entropy, o, loader, epochs=3, progress=False, on_epoch_end=extra)
    elif scenario == "raise_in_fit":  # rank 1's loss raises at its third step
        from gpunet.train import fit

        model, o = model_and_opt("float32", "sgd")
        o = dist.DistributedOptimizer(o)
        x, y = batch("float32", rows=16)
        loader = DataLoader(Dataset(x, y), 2, shuffle=True, seed=0, num_replicas=N, rank=R)
        calls = iter(range(100))

        def loss(out: gpunet.Tensor, target: gpunet.Tensor) -> gpunet.Tensor:
            if R == 1 and next(calls) == 2:
                raise RuntimeError("rank 1's loss broke at step 3")
            return F.cross_entropy(out, target)

        fit(model, loss, o, loader, epochs=2, progress=False)
    elif scenario == "hang":
        if R == 0:
            COMM.all_reduce(np.zeros(3, np.float32))  # rank 1 never joins
        else:
            import time

            time.sleep(60)
    else:
        for fn in CHECKS:
            run(fn)
    if R == 0:
        with open(out, "w") as f:
            json.dump(RESULTS, f)


if __name__ == "__main__":
    main()
