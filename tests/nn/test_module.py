"""Module mechanics: registration, traversal, modes, devices/dtypes, state dicts, repr."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import gpunet
from gpunet import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.scale = nn.Parameter(gpunet.ones(4))
        self.act = nn.ReLU()
        self.plain = gpunet.ones(2)  # not a Parameter: not registered

    def forward(self, x: gpunet.Tensor) -> gpunet.Tensor:
        return self.act(self.fc(x)) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2, bias=False)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: gpunet.Tensor) -> gpunet.Tensor:
        return self.head(self.drop(self.block(x)))


def test_parameters_in_registration_order_with_dotted_names() -> None:
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    # as in PyTorch: a module's own parameters, then its children's, depth first
    assert names == ["block.scale", "block.fc.weight", "block.fc.bias", "head.weight"]
    assert [id(p) for p in net.parameters()] == [id(p) for _, p in net.named_parameters()]
    assert [n for n, _ in net.named_children()] == ["block", "head", "drop"]
    assert [type(m).__name__ for m in net.modules()] == [
        "Net", "Block", "Linear", "ReLU", "Linear", "Dropout",
    ]  # fmt: skip
    assert all(p.requires_grad and p.is_leaf for p in net.parameters())


def test_parameter_is_a_leaf_tensor_subclass() -> None:
    data = gpunet.zeros(3)
    p = nn.Parameter(data)
    assert isinstance(p, gpunet.Tensor) and isinstance(p, nn.Parameter)
    assert type(p * 2.0) is gpunet.Tensor  # ops on a parameter give plain tensors
    assert not isinstance(data, nn.Parameter) and not isinstance(1.0, nn.Parameter)
    assert p.requires_grad and p.is_leaf
    assert p.data is data.data  # shares memory, as PyTorch's Parameter(tensor) does
    y = (p * 2.0 + 1.0).sum() + (3.0 * p).sum() + (p + p).sum()
    y.backward()
    np.testing.assert_allclose(p.grad.numpy(), [7.0, 7.0, 7.0])
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q, nn.Parameter) and q.requires_grad and q.tolist() == p.tolist()


def test_shared_parameter_appears_once_and_reassignment_replaces() -> None:
    a = nn.Linear(2, 2)
    seq = nn.Sequential(a, nn.ReLU(), a)
    assert len(list(seq.parameters())) == 2
    new = nn.Parameter(gpunet.zeros(2, 2))
    a.weight = new
    assert a.weight is new and next(iter(a.parameters())) is new
    del a.weight  # (a plain tensor cannot replace a parameter: it is deleted first)
    a.weight = gpunet.zeros(2, 2)
    assert [n for n, _ in a.named_parameters()] == ["bias"]
    del a.bias
    assert list(a.parameters()) == []


def test_assignment_before_init_is_a_clear_error() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            self.w = nn.Parameter(gpunet.zeros(1))

    with pytest.raises(AttributeError, match="super"):
        Bad()


def test_train_eval_reaches_every_module_and_drives_dropout() -> None:
    gpunet.manual_seed(0)
    net = Net()
    x = gpunet.randn(64, 3)
    assert all(m.training for m in net.modules())
    assert net.eval() is net and not any(m.training for m in net.modules())
    np.testing.assert_array_equal(net(x).numpy(), net(x).numpy())  # deterministic in eval
    net.train()
    assert all(m.training for m in net.modules())
    drop = nn.Dropout(0.5)
    ones = gpunet.ones(1000)
    out = drop(ones).numpy()
    assert set(np.unique(out)) <= {0.0, 2.0} and 0.4 < (out == 0).mean() < 0.6
    drop.eval()
    assert drop(ones) is ones


def test_zero_grad() -> None:
    net = Net().eval()
    net(gpunet.randn(2, 3)).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    net.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.numpy().any() for p, g in zip(net.parameters(), grads))
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_to_dtype_moves_in_place_and_returns_self() -> None:
    net = Net()
    params = list(net.parameters())
    assert net.to(gpunet.float64) is net
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 and p.requires_grad for p in params)
    assert net.to("cpu") is net
    out = net.eval()(gpunet.randn(2, 3, dtype=gpunet.float64))
    assert out.dtype == np.float64


def test_state_dict_round_trip() -> None:
    src, dst = Net(), Net()
    state = src.state_dict()
    assert list(state) == [n for n, _ in src.named_parameters()]
    assert all(not t.requires_grad for t in state.values())
    result = dst.load_state_dict({k: v.numpy() for k, v in state.items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = gpunet.randn(4, 3)
    np.testing.assert_array_equal(src.eval()(x).numpy(), dst.eval()(x).numpy())
    # values are copied into the existing tensors, not aliased
    assert dst.block.fc.weight.data is not src.block.fc.weight.data
    # tensors load too, converted to each parameter's dtype
    wide = Net().double()
    weight = dst.block.fc.weight
    dst.load_state_dict(wide.state_dict())
    assert dst.block.fc.weight is weight and weight.dtype == np.float32
    np.testing.assert_allclose(weight.numpy(), wide.block.fc.weight.numpy(), rtol=1e-6)


def test_strict_load_lists_every_problem_and_changes_nothing() -> None:
    net = Net()
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    bad = {k: v.numpy() + 1 for k, v in Net().state_dict().items()}
    del bad["head.weight"]
    bad["extra.weight"] = np.zeros(3)
    bad["block.fc.bias"] = np.zeros(5)
    with pytest.raises(RuntimeError) as err:
        net.load_state_dict(bad)
    msg = str(err.value)
    assert msg.index("Missing key(s) in state_dict") < msg.index("Unexpected key(s)")
    assert "'head.weight'" in msg and "'extra.weight'" in msg
    assert "size mismatch for block.fc.bias" in msg and "(5,)" in msg and "(4,)" in msg
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k])
    # non-strict: key problems are reported, not raised; shape problems still raise
    del bad["block.fc.bias"]
    result = net.load_state_dict(bad, strict=False)
    assert result.missing_keys == ["block.fc.bias", "head.weight"]
    assert result.unexpected_keys == ["extra.weight"]
    np.testing.assert_array_equal(net.block.scale.numpy(), before["block.scale"] + 1)


def test_repr_is_nested_like_pytorch() -> None:
    assert repr(Net()) == (
        "Net(\n"
        "  (block): Block(\n"
        "    (fc): Linear(in_features=3, out_features=4, bias=True)\n"
        "    (act): ReLU()\n"
        "  )\n"
        "  (head): Linear(in_features=4, out_features=2, bias=False)\n"
        "  (drop): Dropout(p=0.5)\n"
        ")"
    )


def test_forward_must_be_defined() -> None:
    with pytest.raises(NotImplementedError, match="Empty"):

        class Empty(nn.Module):
            pass

        Empty()(1)


def test_deepcopy_copies_arrays_and_keeps_structure() -> None:
    net = Net().eval()
    shared = nn.Linear(2, 2)
    net.twice = nn.Sequential(shared, shared)
    net(gpunet.randn(2, 3)).sum().backward()
    twin = copy.deepcopy(net)
    assert repr(twin) == repr(net)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in net.named_parameters()]
    for p, q in zip(net.parameters(), twin.parameters()):
        assert isinstance(q, nn.Parameter) and q.requires_grad and q.data is not p.data
        np.testing.assert_array_equal(p.numpy(), q.numpy())
        if p.grad is not None:
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())
    assert twin.twice[0] is twin.twice[1] and twin.twice[0] is not shared
    assert twin.block.plain.data is not net.block.plain.data and not twin.training
    with gpunet.no_grad():
        twin.head.weight[...] = 0.0
    assert net.head.weight.numpy().any()


@pytest.mark.gpu
def test_to_cuda_moves_in_place_and_trains_like_the_cpu() -> None:
    gpunet.manual_seed(0)
    cpu = Net().eval()
    gpu = copy.deepcopy(cpu).to("cuda")
    params = list(gpu.parameters())
    assert all(p.device.type == "cuda" for p in params)
    x = gpunet.randn(5, 3)
    np.testing.assert_allclose(gpu(x.to("cuda")).numpy(), cpu(x).numpy(), rtol=1e-5, atol=1e-6)
    gpu(x.to("cuda")).sum().backward()
    cpu(x).sum().backward()
    for p, q in zip(cpu.parameters(), params):
        np.testing.assert_allclose(q.grad.numpy(), p.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert gpu.cpu() is gpu and all(p.device.type == "cpu" for p in params)
    assert all(p.grad.device.type == "cpu" for p in params)


def test_apply_visits_children_first_and_nn_is_reachable_from_gpunet() -> None:
    net = Net()
    seen: list[str] = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen == ["Linear", "ReLU", "Block", "Linear", "Dropout", "Net"]
    assert gpunet.nn is nn


def test_to_a_non_floating_dtype_is_refused_before_anything_moves() -> None:
    """PyTorch: 'nn.Module.to only accepts floating point or complex dtypes'; it was a
    silent no-op (the model stayed float32 while the user asked for int32)."""
    model = nn.MLP([2, 3, 1])
    before = [p.data for p in model.parameters()]
    with pytest.raises(TypeError, match=r"MLP\.to: .*floating.*got int32"):
        model.to(gpunet.int32)
    with pytest.raises(TypeError, match=r"MLP\.to: .*got int64"):
        model.to("cpu", dtype=gpunet.int64)
    assert all(
        p.data is b and p.dtype == gpunet.float32 for p, b in zip(model.parameters(), before)
    )


def test_load_of_a_value_that_cannot_convert_names_it_and_changes_nothing() -> None:
    """A text array for one key raised NumPy's bare 'could not convert string to float'
    after the keys before it had been written: half a load."""
    model = nn.MLP([2, 3, 1])
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    state = {k: np.full(v.shape, 7.0) for k, v in before.items()}
    state["0.bias"] = np.array(["a", "b", "c"])
    with pytest.raises(
        RuntimeError, match=r"for MLP:\n\tcannot convert 0\.bias .*<U1.* to float32"
    ):
        model.load_state_dict(state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)


def test_add_module_refuses_what_is_not_a_module() -> None:
    """Sequential(nn.ReLU(), lambda x: x) was accepted, and a 3 failed only at the forward
    pass with "'int' object is not callable"."""
    with pytest.raises(TypeError, match=r"Sequential: child 1 is of type 'function', not a Module"):
        nn.Sequential(nn.ReLU(), lambda x: x)
    seq = nn.Sequential(nn.ReLU())
    with pytest.raises(TypeError, match=r"Sequential: child 1 is of type 'int', not a Module"):
        seq.append(3)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"Sequential: a child's name cannot contain '\.'"):
        seq.add_module("a.b", nn.ReLU())
    assert len(seq) == 1 and list(seq._modules) == ["0"]
    seq.add_module("gap", None)  # (a declared, absent child, as in PyTorch)
    assert list(seq.children()) == [seq[0]]


# ------------------------------------------------- every module against PyTorch's contract
def _every_module() -> dict[str, tuple[nn.Module, str]]:
    """Each module in gpunet.nn, made as a user would, with its repr (PyTorch's, less
    Dropout's inplace and Softplus's threshold, which gpunet does not have)."""
    made = {
        "Linear": (nn.Linear(4, 3), "Linear(in_features=4, out_features=3, bias=True)"),
        "LayerNorm": (nn.LayerNorm(4), "LayerNorm((4,), eps=1e-05, elementwise_affine=True)"),
        "Dropout": (nn.Dropout(0.25), "Dropout(p=0.25)"),
        "Sequential": (nn.Sequential(nn.Linear(4, 4), nn.Tanh()), None),
        "MLP": (nn.MLP([4, 5, 3], "gelu", dropout=0.1, norm="layernorm"), None),
        "ReLU": (nn.ReLU(), "ReLU()"),
        "LeakyReLU": (nn.LeakyReLU(), "LeakyReLU(negative_slope=0.01)"),
        "ELU": (nn.ELU(), "ELU(alpha=1.0)"),
        "Sigmoid": (nn.Sigmoid(), "Sigmoid()"),
        "Tanh": (nn.Tanh(), "Tanh()"),
        "Softplus": (nn.Softplus(), "Softplus(beta=1.0)"),
        "SiLU": (nn.SiLU(), "SiLU()"),
        "GELU": (nn.GELU(), "GELU(approximate='none')"),
    }
    return {k: (m, r or "") for k, (m, r) in made.items()}


LOSSES = {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss", "BCELoss"}


def test_the_sweep_holds_every_module_of_gpunet_nn() -> None:
    exported = {n for n in nn.__all__ if isinstance(getattr(nn, n), type)}
    modules = {n for n in exported if issubclass(getattr(nn, n), nn.Module)}
    assert modules - {"Module"} == set(_every_module()) | LOSSES


@pytest.mark.parametrize("name", sorted(_every_module()))
def test_every_module_keeps_pytorchs_contract(name: str) -> None:
    gpunet.manual_seed(0)
    module, text = _every_module()[name]
    if text:
        assert repr(module) == text
    x = gpunet.tensor(np.random.default_rng(0).standard_normal((2, 4)), dtype=gpunet.float32)
    names = [n for n, _ in module.named_parameters()]
    assert names == list(module.state_dict()) and len(set(names)) == len(names)
    assert [id(p) for p in module.parameters()] == [id(p) for _, p in module.named_parameters()]
    # a state_dict loaded into a fresh module of other weights: the same outputs, bit for bit
    module.eval()
    want = module(x).numpy()
    gpunet.manual_seed(1)
    fresh = _every_module()[name][0].eval()
    assert fresh.load_state_dict(module.state_dict()) == ([], [])
    np.testing.assert_array_equal(fresh(x).numpy(), want)
    # train()/eval() reach every module; apply visits each once, children first
    module.train()
    assert all(m.training for m in module.modules())
    assert module.eval() is module and not any(m.training for m in module.modules())
    seen: list[nn.Module] = []
    assert module.apply(seen.append) is module
    assert sorted(map(id, seen)) == sorted(map(id, module.modules())) and seen[-1] is module
    assert list(module.children()) == [m for _, m in module.named_children()]
    # gradients: zero_grad forgets them; requires_grad_(False) stops them
    if names:
        module(x).sum().backward()
        assert all(p.grad is not None for p in module.parameters())
        module.zero_grad()
        assert all(p.grad is None for p in module.parameters())
        module.requires_grad_(False)
        assert not module(x).requires_grad
        module.requires_grad_(True)
    # to(float64) in place: the same objects, the outputs in float64; and back
    params = list(module.parameters())
    assert module.to(gpunet.float64) is module
    assert [id(p) for p in module.parameters()] == list(map(id, params))
    assert module(x.to(gpunet.float64)).dtype == gpunet.float64
    module.to(gpunet.float32)
    np.testing.assert_array_equal(module(x).numpy(), want)
    np.testing.assert_array_equal(copy.deepcopy(module)(x).numpy(), want)


def test_train_takes_a_bool() -> None:
    """model.train("False") put the model in training mode (bool("False") is True); PyTorch
    raises ValueError for a mode that is not a bool."""
    model = nn.MLP([2, 3, 1], dropout=0.5).eval()
    with pytest.raises(ValueError, match=r"MLP\.train: mode must be True or False, got 'False'"):
        model.train("False")  # type: ignore[arg-type]
    assert not any(m.training for m in model.modules())
    model.train(np.bool_(True))  # (NumPy's bool is a bool here)
    assert all(m.training for m in model.modules())


def test_load_state_dict_of_something_not_a_mapping_says_so() -> None:
    """A list reported every parameter missing and its items as 'unexpected keys' 1, 2."""
    model = nn.MLP([2, 3, 1])
    with pytest.raises(TypeError, match=r"MLP\.load_state_dict: expected a mapping .*got list"):
        model.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_register_refuses_what_would_break_the_module_later() -> None:
    """register_buffer("q", 3) was accepted and state_dict() then failed on an int;
    a dotted name made a key no load could tell apart; register_parameter("forward", ...)
    replaced the method, so the module could no longer be called."""
    block = Block()
    with pytest.raises(TypeError, match=r"Block: buffer 'q' must be a Tensor or None, got int"):
        block.register_buffer("q", 3)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"Block: a buffer's name cannot contain '\.'"):
        block.register_buffer("a.b", gpunet.zeros(1))
    with pytest.raises(KeyError, match=r"Block: a parameter's name cannot contain '\.'"):
        block.register_parameter("a.b", nn.Parameter(gpunet.zeros(1)))
    with pytest.raises(KeyError, match=r"Block: 'forward' is already an attribute"):
        block.register_parameter("forward", nn.Parameter(gpunet.zeros(1)))
    assert list(block.state_dict()) == ["scale", "fc.weight", "fc.bias"]  # (own ones first)
    assert block(gpunet.ones(2, 3)).shape == (2, 4)


def test_requires_grad_takes_a_bool() -> None:
    """requires_grad_("no") left every parameter requiring gradients (the string is truthy)."""
    model = nn.MLP([2, 3, 1])
    with pytest.raises(ValueError, match=r"MLP\.requires_grad_: requires_grad must be True or"):
        model.requires_grad_("no")  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in model.requires_grad_(False).parameters())


def test_to_with_a_dtype_or_device_given_twice_is_refused() -> None:
    """to(gpunet.float64, dtype=gpunet.float32) converted to float64: the keyword lost."""
    model = nn.MLP([2, 3, 1])
    with pytest.raises(TypeError, match=r"MLP\.to: two dtypes given \(float64 and float32\)"):
        model.to(gpunet.float64, dtype=gpunet.float32)
    with pytest.raises(TypeError, match=r"MLP\.to: two devices given \('cpu' and 'cuda'\)"):
        model.to("cpu", device="cuda")
    assert all(p.dtype == gpunet.float32 for p in model.parameters())


def test_assigning_a_plain_value_over_a_parameter_or_child_is_refused() -> None:
    """layer.weight = gpunet.randn(...) dropped weight from parameters() and state_dict()
    without a word (an optimizer made after would not train it; a save would lack it);
    block.fc = 3 dropped the child. PyTorch refuses both with a TypeError."""
    block = Block()
    with pytest.raises(TypeError, match=r"Linear: cannot assign a Tensor as parameter 'weight'.*"
                       r"nn\.Parameter"):  # fmt: skip
        block.fc.weight = gpunet.ones(3, 4)
    with pytest.raises(TypeError, match=r"Block: cannot assign int as child 'fc'"):
        block.fc = 3  # type: ignore[assignment]
    assert list(block.state_dict()) == ["scale", "fc.weight", "fc.bias"]
    block.fc.weight = nn.Parameter(gpunet.ones(3, 4))  # (a Parameter replaces it, in place)
    block.fc.bias = None  # (None declares it absent, as in PyTorch)
    assert list(block.state_dict()) == ["scale", "fc.weight"]


def test_sequential_index_out_of_range_names_it() -> None:
    seq = nn.Sequential(nn.ReLU(), nn.Tanh())
    assert seq[-1] is list(seq)[1] and len(seq[0:1]) == 1
    with pytest.raises(IndexError, match=r"Sequential: index 2 is out of range for 2 modules"):
        seq[2]


def test_state_dict_of_a_shared_layer_holds_every_name_as_pytorchs_does() -> None:
    """Sequential(a, ReLU(), a): PyTorch's state_dict holds 0.* and 2.* (parameters() each
    once); gpunet's held 0.* alone, so PyTorch's dict for the same model was refused as
    having unexpected keys 2.weight and 2.bias."""
    a = nn.Linear(2, 2)
    seq = nn.Sequential(a, nn.ReLU(), a)
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    state = {k: np.full(v.shape, 3.0) for k, v in seq.state_dict().items()}
    assert seq.load_state_dict(state) == ([], [])
    np.testing.assert_array_equal(a.weight.numpy(), np.full((2, 2), 3.0))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: '2\.weight'"):
        seq.load_state_dict({k: v for k, v in state.items() if k != "2.weight"})
