"""gpunet.profile: FLOP, byte and launch counts against hand counts, the roofline model by hand,
the fused/unfused expansions, and a cost rule for every primitive (driven by the registry)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from primitives.specs import SPECS

import gpunet
from gpunet import costs, optim
from gpunet import primitives as P
from gpunet.costs import Cost, chain
from gpunet.formatting import seconds
from gpunet.profiler import OpRecord, Profile, format_report, mlp_step_report, profile_mlp_step
from gpunet.roofline import DEFAULT_LAUNCH_OVERHEAD_US, GPUS, GPUSpec

F32 = 4
VIEWS = {"broadcast_to", "reshape", "transpose", "slice", "stop_gradient"}


def _randn(*shape: int, dtype: object = np.float32, grad: bool = False) -> gpunet.Tensor:
    a = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    return gpunet.tensor(a, requires_grad=grad)


def _only(p: Profile, name: str, phase: str | None = None) -> OpRecord:
    found = [r for r in p.records if r.name == name and phase in (None, r.phase)]
    assert len(found) == 1, [(r.name, r.phase) for r in p.records]
    return found[0]


# ---------------------------------------------------------------------- hand counts
def test_linear_layer_forward_and_backward_by_hand() -> None:
    """y = x W + b, x (32, 64), W (64, 16), b (16,), then y.backward(G)."""
    n, i, o = 32, 64, 16
    x, w, b = _randn(n, i, grad=True), _randn(i, o, grad=True), _randn(o, grad=True)
    g = _randn(n, o)
    with gpunet.profile() as p:
        y = x @ w + b
        y.backward(g)

    fwd = [r for r in p.records if r.phase == "forward"]
    assert [r.name for r in fwd] == ["matmul", "broadcast_to", "add"]
    gemm, bcast, add = fwd
    assert gemm.shapes == ((n, i), (i, o)) and gemm.out_shape == (n, o)
    assert gemm.flops == 2 * n * i * o
    assert gemm.bytes_read == (n * i + i * o) * F32 and gemm.bytes_written == n * o * F32
    assert bcast.cost == Cost() and bcast.is_view  # a view: no launch, no traffic
    # the broadcast bias is read once (its 16 elements), not 32 times
    assert add.bytes_read == (n * o + o) * F32 and add.bytes_written == n * o * F32
    assert add.flops == n * o and add.launches == 1

    bwd = {r.out_shape: r for r in p.records if r.phase == "backward"}
    assert sorted(r.name for r in bwd.values()) == ["matmul", "matmul", "sum"]
    dw, dx, db = bwd[(i, o)], bwd[(n, i)], bwd[(o,)]
    assert dw.params["tx"] and dw.flops == 2 * i * o * n  # dW = x^T dY
    assert dw.bytes_read == (n * i + n * o) * F32 and dw.bytes_written == i * o * F32
    assert dx.params["ty"] and dx.flops == 2 * n * i * o  # dX = dY W^T
    assert dx.bytes_read == (n * o + i * o) * F32 and dx.bytes_written == n * i * F32
    assert db.name == "sum" and db.flops == n * o  # db = sum of dY over the batch
    assert db.bytes_read == n * o * F32 and db.bytes_written == o * F32

    s = p.summary()
    assert s.launches == 5 and s.views == 1 and s.records == 6
    assert s.flops == 3 * 2 * n * i * o + 2 * n * o
    assert s.by_phase["forward"].launches == 2 and s.by_phase["backward"].launches == 3
    assert s.bytes == sum(r.bytes_read + r.bytes_written for r in p.records)
    assert s.intensity == pytest.approx(s.flops / s.bytes)
    for r in p.records:
        assert r.dtype == "float32" and r.device == "cpu"


@pytest.mark.parametrize("dtype, size", [(np.float32, 4), (np.float64, 8)])
def test_activation_forward_and_backward_by_hand(dtype: type, size: int) -> None:
    """relu on 1000 elements: forward reads x and writes y; the fused backward reads g and
    y and writes dx; unfused it is y > 0 (a bool mask) then g * mask."""
    n = 1000
    x, g = _randn(n, dtype=dtype, grad=True), _randn(n, dtype=dtype)
    with gpunet.profile() as p:
        gpunet.relu(x).backward(g)
    fwd, bwd = _only(p, "relu", "forward"), _only(p, "activation_backward", "backward")
    assert (fwd.bytes_read, fwd.bytes_written, fwd.flops, fwd.launches) == (
        n * size,
        n * size,
        n,
        1,
    )
    assert fwd.unfused == fwd.cost  # max(x, 0) is one operation already
    assert (bwd.bytes_read, bwd.bytes_written, bwd.flops, bwd.launches) == (
        2 * n * size,
        n * size,
        2 * n,
        1,
    )
    assert bwd.params == {"name": "relu", "alpha": 0.0, "from_output": True}
    assert bwd.dtype == np.dtype(dtype).name
    assert bwd.unfused == Cost(2 * n, n * size + (n * size + n), n + n * size, 2)


def test_cross_entropy_by_hand() -> None:
    n, c = 8, 5
    z = _randn(n, c, grad=True)
    y = gpunet.tensor(np.arange(n) % c)
    with gpunet.profile() as p:
        gpunet.nn.functional.cross_entropy(z, y).backward()
    ce, ceb = _only(p, "cross_entropy"), _only(p, "cross_entropy_backward")
    # one row kernel (logits and int64 labels in, a loss per row out), then the mean
    assert ce.launches == 2
    assert ce.bytes_read == n * c * F32 + n * 8 + n * F32
    assert ce.bytes_written == n * F32 + F32
    assert ceb.launches == 1 and ceb.bytes_written == n * c * F32
    assert ceb.bytes_read == F32 + n * c * F32 + n * 8  # g (a scalar), logits, labels
    assert ce.unfused.launches > ce.launches and ce.unfused.bytes > ce.bytes


def test_views_move_nothing_and_a_copying_reshape_is_a_copy() -> None:
    x = _randn(6, 4)
    with gpunet.profile() as p:
        t = x.transpose(1, 0)
        gpunet.reshape(x, (4, 6))
        gpunet.reshape(t, (24,))  # a transposed layout cannot be viewed flat: a copy
    transpose, view, copy = p.records
    assert transpose.cost == view.cost == Cost()
    assert copy.cost == Cost(0, 24 * F32, 24 * F32, 1)


# ---------------------------------------------------------------------- full steps
def test_mlp_sgd_step_counts_every_kernel() -> None:
    p, n_params = profile_mlp_step((64, 32, 10), 32)
    assert n_params == 64 * 32 + 32 + 32 * 10 + 10
    s = p.summary()
    launching = [r for r in p.records if not r.is_view]
    fused_act = [
        r for r in launching if r.name == "linear_activation" and r.params.get("activation")
    ]
    # one launch per non-view call, plus the reduction of the cross-entropy's mean and the
    # activation pass after a linear's GEMM (MLP runs Linear + ReLU as one linear card)
    assert len(fused_act) == 1 and fused_act[0].params["activation"] == "relu"
    assert s.launches == len(launching) + 1 + len(fused_act)
    assert all(
        r.launches == 1 for r in launching if r.name != "cross_entropy" and r not in fused_act
    )
    assert all(r.name in VIEWS for r in p.records if r.is_view)
    names = {phase: [r.name for r in p.records if r.phase == phase] for phase in s.by_phase}
    gemms = [n for n in names["forward"] if n in ("matmul", "linear_activation")]  # x W (+ b fused)
    assert len(gemms) == 2 and "relu" not in names["forward"]
    assert names["backward"].count("matmul") == 3  # dW twice, dX of the hidden layer
    assert "activation_backward" in names["backward"]
    assert "cross_entropy_backward" in names["backward"]
    step = _only(p, "sgd_update", "optimizer")  # the whole model in one fused update
    assert step.shapes == ((n_params,),) * 3
    assert step.bytes_read == 3 * n_params * F32  # p, g and the momentum buffer
    assert step.bytes_written == 2 * n_params * F32  # p and the momentum buffer
    assert step.unfused.launches == 5  # buf *= m; t = (1 - d) g; buf += t; t = lr buf; p -= t


def test_adam_step_is_one_pass_of_28_bytes_per_parameter() -> None:
    model = gpunet.nn.Linear(10, 3)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    model(_randn(4, 10)).sum().backward()
    with gpunet.profile() as p:
        opt.step()
    (rec,) = p.records  # the gradients are in the flat buffer already: no copy
    assert rec.name == "adam_update" and rec.phase == "optimizer"
    assert rec.bytes == 28 * 33 and rec.launches == 1
    assert rec.unfused.launches == 13 and rec.unfused.bytes > 4 * rec.bytes


def test_unfused_activation_backward_matches_the_readme_table() -> None:
    """Kernels and bytes per float32 element of the plain expressions (README, "Fused
    activation backward: bytes per element")."""
    table = {
        ("relu", True): (2, 14),
        ("leaky_relu", True): (3, 22),
        ("elu", True): (3, 28),
        ("sigmoid", True): (3, 32),
        ("tanh", True): (3, 32),
        ("softplus", True): (4, 36),
        ("silu", False): (9, 84),
        ("gelu", False): (11, 104),
        ("gelu_tanh", False): (19, 188),
    }
    for key, (kernels, per_element) in table.items():
        c = chain(1, F32, costs.BACKWARD[key])
        assert (c.launches, c.bytes) == (kernels, per_element), key


def test_outside_a_profile_nothing_is_recorded() -> None:
    with gpunet.profile() as p:
        pass
    gpunet.relu(_randn(3) * 2.0)
    assert p.records == [] and p.summary().launches == 0
    assert p.roofline().total_s == 0.0


# ---------------------------------------------------------------------- the roofline
def test_roofline_of_one_gemm_on_h100_by_hand() -> None:
    m, k, n = 256, 512, 1024
    a, b = _randn(m, k), _randn(k, n)
    with gpunet.profile() as p:
        a @ b
    flops, moved = 2 * m * n * k, (m * k + k * n + m * n) * F32
    est = p.roofline("H100")
    compute, memory, launch = flops / 67e12, moved / 3.35e12, DEFAULT_LAUNCH_OVERHEAD_US * 1e-6
    assert est.compute_s == pytest.approx(compute) and est.memory_s == pytest.approx(memory)
    assert est.total_s == pytest.approx(max(compute, memory) + launch)
    assert est.launch_share == pytest.approx(launch / (max(compute, memory) + launch))
    assert est.rows[0].bound == "launch"  # 4.0 us of FLOPs behind a 5 us launch
    # without launch overhead: 4.0 us of FP32 FLOPs against 1.1 us of bytes
    assert p.roofline("H100", launch_overhead_us=0.0).rows[0].bound == "compute"
    tf32 = p.roofline("H100", tf32=True)  # on the tensor cores the bytes dominate
    assert tf32.compute_s == pytest.approx(flops / 494.7e12)
    assert tf32.total_s == pytest.approx(memory + launch)
    assert p.roofline("h200", launch_overhead_us=0.0).total_s == pytest.approx(flops / 67e12)
    a100 = p.roofline("A100", launch_overhead_us=0.0)
    assert a100.total_s == pytest.approx(flops / 19.5e12)
    text = str(est)
    assert "H100 SXM" in text and "matmul" in text and "launch" in text


def test_custom_gpu_spec() -> None:
    toy = GPUSpec("toy", fp32_tflops=1.0, bandwidth_tbs=0.5)
    x = _randn(1000)
    with gpunet.profile() as p:
        x + x
    est = p.roofline(toy, launch_overhead_us=2.0)
    assert est.device is toy
    assert est.total_s == pytest.approx(3 * 1000 * F32 / 0.5e12 + 2e-6)
    assert est.rows[0].bound == "launch"
    assert toy.peak_flops("float32", gemm=True, tf32=True) == 1e12  # no TF32 peak: FP32's


def test_unknown_gpu_names_the_known_ones() -> None:
    with gpunet.profile() as p:
        pass
    with pytest.raises(ValueError, match=r"V100.*H100, A100, H200.*GPUSpec"):
        p.roofline("V100")
    assert set(GPUS) == {"H100", "A100", "H200"}


def test_fusion_saves_launches_and_bytes_in_an_mlp_step() -> None:
    small, large = mlp_step_report([((64, 32, 10), 32), ((784, 1024, 1024, 10), 256)])
    for row in (small, large):
        e = row.estimate
        assert e.unfused_launches > e.cupy_launches > e.launches
        assert e.unfused_total_s > e.cupy_total_s > e.total_s
        assert e.fusion_speedup > 1.0
        assert sum(r.total_s for r in e.rows) == pytest.approx(e.total_s)
    assert small.estimate.launch_share > 0.9 > large.estimate.launch_share
    assert large.summary.flops > 1000 * small.summary.flops
    table = format_report([small, large]).splitlines()
    assert len(table) == 4 and table[2].startswith("| 64-32-10, batch 32 |")
    assert f"{small.estimate.launches} / {small.estimate.cupy_launches} /" in table[2]


def test_a_captured_step_is_counted_at_its_replay_and_priced_as_a_cuda_graph() -> None:
    small, large = mlp_step_report([((64, 32, 10), 32), ((784, 1024, 1024, 10), 256)])
    for row in (small, large):
        e, c = row.estimate, row.captured
        assert c.launches == e.launches  # a replay makes the eager step's calls
        assert c.graph_s == pytest.approx(c.total_s - c.launch_s + c.launches * 1e-6)
        assert c.graph_s < e.total_s
    # the tiny step is all launches: a graph node at 1 us against a launch at 5 us
    assert small.estimate.total_s / small.captured.graph_s > 4.5
    assert large.estimate.total_s / large.captured.graph_s < 3.0  # (its GEMMs stay)
    row = format_report([small]).splitlines()[2]
    assert f"| {small.captured.launches}, {seconds(small.captured.graph_s)} |" in row
    assert "captured, as one CUDA graph (1 us per node)" in str(small.captured)


def test_table_lists_every_primitive_once() -> None:
    p, _ = profile_mlp_step((8, 4, 3), 2)
    table = p.table()
    for name in {r.name for r in p.records}:
        assert sum(line.split()[0] == name for line in table.splitlines()) == 1, name
    assert "H100 SXM" in table and "share" in table
    assert "H100" not in p.table(device=None)


# ---------------------------------------------------------------------- every primitive
def test_every_primitive_and_fused_kernel_has_a_cost_rule() -> None:
    missing = sorted(set(P.REGISTRY) - set(costs.RULES))
    assert not missing, f"primitives without a cost rule in gpunet.costs: {missing}"
    for name in ("activation_backward", "sgd_update", "adam_update"):
        assert name in costs.RULES
    with pytest.raises(KeyError, match="no cost rule for 'nope'"):
        costs.cost_of("nope", [], None, {})


@pytest.mark.parametrize("name", sorted(P.REGISTRY))
@settings(max_examples=5)
@given(data=st.data())
def test_primitive_costs(name: str, data: st.DataObject) -> None:
    """Each primitive's forward and backward, as the primitive suite draws them, is counted:
    views cost nothing, every kernel writes what it returns, nothing is negative, and
    fusion never costs more than the unfused sequence."""
    case = SPECS[name](data.draw)
    xs = [gpunet.tensor(a, requires_grad=True) for a in case.args]
    with gpunet.profile() as p:
        out = case.fn(*xs)
        if out.requires_grad and out.numel():
            out.backward(gpunet.ones_like(out))
    for r in p.records:
        c, u = r.cost, r.unfused
        assert min(c.flops, c.bytes_read, c.bytes_written, c.launches) >= 0, r
        assert u.launches >= c.launches and u.bytes >= c.bytes and u.flops >= c.flops, r
        if r.name in VIEWS and not r.params.get("copied"):
            assert c == Cost(), r
        elif r.out_shape is not None and np.prod(r.out_shape) > 0:
            assert c.launches >= 1 and c.bytes_written > 0, r


def test_the_ring_all_reduce_model_by_hand() -> None:
    """t = 2 (n - 1) / n x bytes / bandwidth: 100 MB over 8 NVLink GPUs (450 GB/s each way)."""
    from gpunet.roofline import LINKS, data_parallel_step, ring_all_reduce_s

    nvlink = LINKS["nvlink"]
    assert ring_all_reduce_s(1e8, 1, nvlink) == 0.0
    assert ring_all_reduce_s(1e8, 8, nvlink) == pytest.approx(2 * 7 / 8 * 1e8 / 450e9)
    d = data_parallel_step(1e-3, 2e-3, 0.5e-3, 1e8, 2, LINKS["pcie"])  # 1.5625 ms on PCIe
    assert d.all_reduce_s == pytest.approx(1e8 / 64e9)
    assert d.serial_s == pytest.approx(3.5e-3 + 1e8 / 64e9)
    assert d.overlapped_s == pytest.approx(3.5e-3) and d.hidden
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        ring_all_reduce_s(1.0, 0, nvlink)


def test_the_data_parallel_report_models_the_phases_of_a_step() -> None:
    from gpunet.profiler import data_parallel_report

    text = data_parallel_report((8, 16, 4), 32, ranks=(1, 2))
    assert "8-16-4, batch 32 per GPU, 212 parameters" in text
    assert text.count("\n| 2 |") == 3  # one row per link
