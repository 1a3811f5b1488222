"""The work that ``gpunet bench`` and ``benchmarks/`` time, written once per framework.

Two families, each a set of factories that build their state and return a ``Workload`` whose
zero-argument ``step`` is the timed call:

- MLP training steps (``MLP_IMPLS``): forward (Linear, ReLU, ..., Linear), softmax
  cross-entropy with integer labels, backward and a plain SGD update, float32, from the same
  ``MlpState``. ``gemm-floor`` (the step's GEMMs alone, on preallocated outputs: the practical
  limit) and ``numpy`` (the step by hand, in place: the no-framework floor) run on NumPy, or on
  CuPy for ``device="cuda"``; ``gpunet`` is ``nn.MLP`` + ``F.cross_entropy`` + ``optim.SGD``;
  the peers are PyTorch eager, JAX ``jit`` and HIPS autograd.
- Single ops (``OP_IMPLS``): activations forward and forward+backward, a square matmul and a
  full sum, at a given element count.

Peers are imported when a workload is built; a framework that is not installed, or cannot run
on the device asked for, raises ``Unavailable`` with the reason (the run lists it as skipped).
Every step returns its result (the loss, for MLP steps) without waiting for it, so that tests
can hold the frameworks to the same numbers and timers decide when to synchronize.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LR = 0.01
SQRT_HALF = np.float32(1 / math.sqrt(2))
INV_SQRT_2PI = np.float32(1 / math.sqrt(2 * math.pi))

# name -> (layer sizes, batch)
MLP_SIZES: dict[str, tuple[tuple[int, ...], int]] = {
    "tiny": ((64, 32, 10), 32),
    "small": ((784, 128, 10), 64),
    "medium": ((784, 1024, 1024, 10), 256),
    "large": ((2048, 4096, 4096, 4096, 10), 512),
}


class Unavailable(RuntimeError):
    """This workload cannot run here: its framework is not installed, or not on that device."""


@dataclass
class Workload:
    """A built workload: ``step()`` does the timed work once and returns its result;
    ``weights()`` (MLP steps) gives the current parameters as NumPy arrays, W1, b1, W2, ..."""

    step: Callable[[], Any]
    weights: Callable[[], list[np.ndarray]] | None = None


# ---------------------------------------------------------------------- helpers
def require(module: str) -> Any:
    """Import a peer framework, or raise Unavailable naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"{module} is not installed (pip install 'gpunet[bench]'): {e}") from None


def array_module(device: str) -> Any:
    """NumPy for ``"cpu"``, CuPy for ``"cuda"`` (Unavailable, with the reason, without a GPU)."""
    if device == "cpu":
        return np
    if device == "cuda":
        from .timing import require_cuda

        try:
            return require_cuda()
        except RuntimeError as e:
            raise Unavailable(str(e)) from None
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


def to_numpy(value: Any) -> np.ndarray:
    """Any framework's array or scalar as a NumPy array (copied off a GPU)."""
    from ..tensor import Tensor

    if isinstance(value, Tensor):
        return value.numpy()
    if hasattr(value, "detach"):  # torch
        return value.detach().cpu().numpy()
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        return value.get()
    return np.asarray(value)


def _erf(xp: Any) -> Callable[[Any], Any]:
    if xp is np:
        import scipy.special

        return scipy.special.erf
    import cupyx.scipy.special

    return cupyx.scipy.special.erf


# ---------------------------------------------------------------------- MLP state
@dataclass
class MlpState:
    """Starting weights (W: (in, out)), biases, one batch of inputs and integer labels."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    x: np.ndarray
    y: np.ndarray

    @property
    def sizes(self) -> list[int]:
        return [self.weights[0].shape[0]] + [w.shape[1] for w in self.weights]

    @property
    def batch(self) -> int:
        return len(self.x)

    def initial(self) -> list[np.ndarray]:
        """The starting parameters in ``Workload.weights`` order: W1, b1, W2, b2, ..."""
        return [a for pair in zip(self.weights, self.biases) for a in pair]


def mlp_state(sizes: Sequence[int], batch: int, seed: int = 0) -> MlpState:
    """Weights ~ N(0, 1/fan_in), biases ~ 0.1 N(0, 1), inputs ~ N(0, 1), labels uniform."""
    r = np.random.default_rng(seed)
    pairs = list(itertools.pairwise(sizes))
    return MlpState(
        weights=[(r.standard_normal((a, b)) * a**-0.5).astype(np.float32) for a, b in pairs],
        biases=[(r.standard_normal(b) * 0.1).astype(np.float32) for _, b in pairs],
        x=r.standard_normal((batch, sizes[0])).astype(np.float32),
        y=r.integers(0, sizes[-1], batch).astype(np.int64),
    )


def parameter_count(sizes: Sequence[int]) -> int:
    """Weights and biases of an MLP with these layer sizes."""
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def flops_per_step(sizes: Sequence[int], batch: int) -> int:
    """2 * batch * (in * out) per GEMM, three GEMMs per layer (forward, dX, dW), less the
    first layer's dX (nobody needs the input's gradient)."""
    macs = sum(a * b for a, b in itertools.pairwise(sizes))
    return 2 * batch * (3 * macs - sizes[0] * sizes[1])


# ---------------------------------------------------------------------- MLP steps: floors
def numpy_step(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """The step by hand, in place where it can be: float32, no framework (NumPy or CuPy)."""
    xp = array_module(device)
    ws = [xp.array(w) for w in s.weights]
    bs = [xp.array(b) for b in s.biases]
    x, y = xp.asarray(s.x), xp.asarray(s.y)
    rows = xp.arange(len(s.y))
    last = len(ws) - 1

    def step() -> Any:
        acts = [x]
        for i, (w, b) in enumerate(zip(ws, bs)):
            z = acts[-1] @ w
            z += b
            if i < last:
                xp.maximum(z, 0, out=z)  # relu in place; z > 0 is its mask
            acts.append(z)
        z = acts[-1]  # logits, no longer needed as such: shift in place
        z -= z.max(axis=1, keepdims=True)
        e = xp.exp(z)
        total = e.sum(axis=1, keepdims=True)
        loss = (xp.log(total[:, 0]) - z[rows, y]).mean()  # logsumexp(z) - z[y]
        e /= total  # softmax; dlogits = (softmax - onehot) / batch
        e[rows, y] -= 1.0
        e /= len(s.y)
        g = e
        for i in range(last, -1, -1):
            dw = acts[i].T @ g
            db = g.sum(axis=0)
            if i:  # dX with the weights before their update
                g = g @ ws[i].T
                g *= acts[i] > 0
            dw *= lr
            ws[i] -= dw
            db *= lr
            bs[i] -= db
        return loss

    return Workload(step, lambda: [to_numpy(a) for pair in zip(ws, bs) for a in pair])


def gemm_floor(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """Only the step's GEMMs (forward A W; backward dW = A^T G and, but for the first layer,
    dA = G W^T) on preallocated outputs: what no implementation of the step can beat."""
    xp = array_module(device)
    ws = [xp.asarray(w) for w in s.weights]
    batch = s.batch
    acts = [xp.asarray(s.x)] + [xp.empty((batch, w.shape[1]), np.float32) for w in ws]
    gs = [acts[0]] + [xp.ones((batch, w.shape[1]), np.float32) for w in ws]  # dL/d acts[i]
    grads = [xp.empty_like(w) for w in ws]

    def step() -> None:
        for i, w in enumerate(ws):
            xp.matmul(acts[i], w, out=acts[i + 1])
        for i in range(len(ws) - 1, -1, -1):
            xp.matmul(acts[i].T, gs[i + 1], out=grads[i])
            if i:
                xp.matmul(gs[i + 1], ws[i].T, out=gs[i])

    return Workload(step)


# ---------------------------------------------------------------------- MLP steps: gpunet
def gpunet_step(
    s: MlpState,
    device: str = "cpu",
    lr: float = LR,
    in_backward: bool = False,
    capture: bool = False,
    fold_sgd: bool = False,
) -> Workload:
    """``nn.MLP`` + ``F.cross_entropy`` + ``optim.SGD`` (flat parameter buffer); with
    ``in_backward``, SGD's step taken inside backward (folded into the weight GEMMs); with
    ``capture``, the step recorded once and replayed (``gpunet.capture``), with ``fold_sgd``
    its update folded into the weight GEMMs."""
    import gpunet
    import gpunet.nn.functional as F
    from gpunet import nn, optim

    xp = array_module(device)  # Unavailable without a GPU, before gpunet's own error
    model = nn.MLP(s.sizes, device=device)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with gpunet.no_grad():
        for lin, w, b in zip(linears, s.weights, s.biases):
            lin.weight.data[...] = xp.asarray(w)
            lin.bias.data[...] = xp.asarray(b)
    opt = optim.SGD(model.parameters(), lr=lr, in_backward=in_backward)
    x, y = gpunet.tensor(s.x, device=device), gpunet.tensor(s.y, device=device)

    def step() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def weights() -> list[np.ndarray]:
        return [p.numpy() for lin in linears for p in (lin.weight, lin.bias)]

    if capture:
        captured = gpunet.capture(step, fold_sgd=fold_sgd)
        return Workload(captured, weights)
    return Workload(step, weights)


def gpunet_tensors_step(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """The same step with raw gpunet tensors (``x @ W + b``, relu, ``p -= lr * p.grad`` under
    ``no_grad``): no modules, no optimizer, so tiny sizes measure dispatch alone."""
    import gpunet
    import gpunet.nn.functional as F

    array_module(device)
    params = [gpunet.tensor(a, device=device, requires_grad=True) for a in s.initial()]
    x, y = gpunet.tensor(s.x, device=device), gpunet.tensor(s.y, device=device)
    last = len(params) // 2 - 1

    def step() -> Any:
        h = x
        for i in range(last + 1):
            h = h @ params[2 * i] + params[2 * i + 1]
            if i < last:
                h = h.relu()
        loss = F.cross_entropy(h, y)
        loss.backward()
        with gpunet.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None
        return loss

    return Workload(step, lambda: [p.numpy() for p in params])


# ---------------------------------------------------------------------- MLP steps: peers
def _torch_device(device: str) -> tuple[Any, str]:
    torch = require("torch")
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("this PyTorch build finds no CUDA device")
    return torch, device


def torch_step(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """PyTorch eager, the same ops as the gpunet tensor step (``x @ W + b``, relu,
    ``cross_entropy``, ``backward``, ``p -= lr * p.grad``)."""
    torch, dev = _torch_device(device)
    params = [torch.tensor(a, device=dev, requires_grad=True) for a in s.initial()]
    x, y = torch.tensor(s.x, device=dev), torch.tensor(s.y, device=dev)
    last = len(params) // 2 - 1

    def step() -> Any:
        h = x
        for i in range(last + 1):
            h = h @ params[2 * i] + params[2 * i + 1]
            if i < last:
                h = h.relu()
        loss = torch.nn.functional.cross_entropy(h, y)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None
        return loss

    return Workload(step, lambda: [to_numpy(p) for p in params])


def jax_step(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """JAX: one ``jit``-compiled function of (params, x, y) -> (new params, loss); the step
    waits for it (``block_until_ready``), since JAX dispatches asynchronously."""
    jax = require("jax")
    jnp = require("jax.numpy")
    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise Unavailable(f"JAX has no {device} backend here: {e}") from None
    last = len(s.weights) - 1

    def loss_fn(params: list[Any], x: Any, y: Any) -> Any:
        h = x
        for i in range(last + 1):
            h = h @ params[2 * i] + params[2 * i + 1]
            if i < last:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h, axis=1)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

    @jax.jit
    def update(params: list[Any], x: Any, y: Any) -> tuple[list[Any], Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return [p - lr * g for p, g in zip(params, grads)], loss

    state = {"params": [jax.device_put(a, dev) for a in s.initial()]}
    x, y = jax.device_put(s.x, dev), jax.device_put(s.y.astype(np.int32), dev)

    def step() -> Any:
        state["params"], loss = update(state["params"], x, y)
        return loss.block_until_ready()

    return Workload(step, lambda: [np.asarray(p) for p in state["params"]])


def autograd_step(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """HIPS autograd: ``value_and_grad`` of the loss written in ``autograd.numpy``, then the
    SGD update in place (NumPy only)."""
    if device != "cpu":  # said first: it holds whether or not autograd is installed
        raise Unavailable("HIPS autograd runs on NumPy (the CPU) only")
    autograd = require("autograd")
    anp = require("autograd.numpy")
    params = [a.copy() for a in s.initial()]
    x, y = s.x, s.y
    rows = np.arange(len(y))
    last = len(s.weights) - 1

    def loss_fn(params: list[Any]) -> Any:
        h = x
        for i in range(last + 1):
            h = anp.dot(h, params[2 * i]) + params[2 * i + 1]
            if i < last:
                h = anp.maximum(h, 0.0)
        z = h - anp.max(h, axis=1, keepdims=True)
        logp = z - anp.log(anp.sum(anp.exp(z), axis=1, keepdims=True))
        return -anp.mean(logp[rows, y])

    value_and_grad = autograd.value_and_grad(loss_fn)

    def step() -> Any:
        loss, grads = value_and_grad(params)
        for p, g in zip(params, grads):
            p -= lr * g
        return loss

    return Workload(step, lambda: [p.copy() for p in params])


MlpFactory = Callable[..., Workload]
MLP_FLOORS: dict[str, MlpFactory] = {"gemm-floor": gemm_floor, "numpy": numpy_step}
MLP_PEERS: dict[str, MlpFactory] = {
    "torch": torch_step,
    "jax": jax_step,
    "autograd": autograd_step,
}


def gpunet_step_in_backward(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """``gpunet_step`` with ``SGD(in_backward=True)``: W <- W - lr X^T dY as one GEMM."""
    return gpunet_step(s, device, lr, in_backward=True)


def gpunet_step_captured(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """``gpunet_step`` captured: recorded on its first two calls, replayed after."""
    return gpunet_step(s, device, lr, capture=True)


def gpunet_step_captured_in_backward(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """``gpunet_step`` captured, with SGD's step folded into the weight GEMMs."""
    return gpunet_step(s, device, lr, in_backward=True, capture=True)


def gpunet_step_captured_folded(s: MlpState, device: str = "cpu", lr: float = LR) -> Workload:
    """``gpunet_step`` captured with ``fold_sgd``: ``backward(); step()`` written as usual,
    replayed with the update folded into the weight GEMMs (as in backward)."""
    return gpunet_step(s, device, lr, capture=True, fold_sgd=True)


# gpunet's other ways to run the same step, timed beside "gpunet" (the default way)
MLP_VARIANTS: dict[str, MlpFactory] = {
    "gpunet-in-backward": gpunet_step_in_backward,
    "gpunet-captured": gpunet_step_captured,
}
MLP_IMPLS: dict[str, MlpFactory] = {
    **MLP_FLOORS,
    "gpunet": gpunet_step,
    **MLP_VARIANTS,
    **MLP_PEERS,
}


# ---------------------------------------------------------------------- single ops
ACTIVATIONS = ("relu", "tanh", "gelu")
OPS = (
    *(f"{a} {mode}" for a in ACTIVATIONS for mode in ("fwd", "fwd+bwd")),
    "matmul",
    "sum",
)


def matmul_side(n: int) -> int:
    """Square matmul operands of about ``n`` elements each: side round(sqrt(n))."""
    return max(1, round(math.sqrt(n)))


def op_inputs(op: str, n: int, seed: int = 0) -> list[np.ndarray]:
    """float32 operands: x ~ 3 N(0, 1) (activations cross their bends), g ~ N(0, 1)."""
    r = np.random.default_rng(seed)
    if op == "matmul":
        side = matmul_side(n)
        return [r.standard_normal((side, side)).astype(np.float32) for _ in range(2)]
    if op == "sum":
        return [r.standard_normal(n).astype(np.float32)]
    return [(r.standard_normal(n) * 3).astype(np.float32), r.standard_normal(n).astype(np.float32)]


def _split(op: str) -> tuple[str, bool]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: one of {', '.join(OPS)}")
    name, _, mode = op.partition(" ")
    return name, mode == "fwd+bwd"


def numpy_op(op: str, n: int, device: str = "cpu") -> Workload:
    """The plain array expression (NumPy, or CuPy on ``cuda``): the floor for each op."""
    xp = array_module(device)
    args = [xp.asarray(a) for a in op_inputs(op, n)]
    name, backward = _split(op)
    if name == "matmul":
        a, b = args
        return Workload(lambda: a @ b)
    if name == "sum":
        (x,) = args
        return Workload(lambda: x.sum())
    x, g = args
    erf = _erf(xp) if name == "gelu" else None

    def fwd() -> Any:
        if name == "relu":
            return xp.maximum(x, 0)
        if name == "tanh":
            return xp.tanh(x)
        return x * (0.5 * (1 + erf(x * SQRT_HALF)))

    def fwd_bwd() -> Any:
        if name == "relu":
            y = xp.maximum(x, 0)
            return g * (y > 0)
        if name == "tanh":
            y = xp.tanh(x)
            return g * (1 - y * y)
        cdf = 0.5 * (1 + erf(x * SQRT_HALF))  # of the forward, the part dx needs
        return g * (cdf + x * xp.exp(-0.5 * x * x) * INV_SQRT_2PI)

    return Workload(fwd_bwd if backward else fwd)


def gpunet_op(op: str, n: int, device: str = "cpu") -> Workload:
    """The op through gpunet: a forward with nothing recording, or forward recorded then
    ``y.backward(g)`` (returns dx)."""
    import gpunet

    array_module(device)
    args = [gpunet.tensor(a, device=device) for a in op_inputs(op, n)]
    name, backward = _split(op)
    if name == "matmul":
        a, b = args
        return Workload(lambda: a @ b)
    if name == "sum":
        (x,) = args
        return Workload(lambda: x.sum())
    f = {"relu": gpunet.relu, "tanh": gpunet.tanh, "gelu": gpunet.gelu}[name]
    x, g = args
    if not backward:
        return Workload(lambda: f(x))
    xr = gpunet.tensor(op_inputs(op, n)[0], device=device, requires_grad=True)

    def fwd_bwd() -> Any:
        f(xr).backward(g)
        dx, xr.grad = xr.grad, None
        return dx

    return Workload(fwd_bwd)


def torch_op(op: str, n: int, device: str = "cpu") -> Workload:
    """The op in PyTorch eager (exact GELU, as gpunet's default)."""
    torch, dev = _torch_device(device)
    args = [torch.tensor(a, device=dev) for a in op_inputs(op, n)]
    name, backward = _split(op)
    if name == "matmul":
        a, b = args
        return Workload(lambda: a @ b)
    if name == "sum":
        (x,) = args
        return Workload(lambda: x.sum())
    f = {"relu": torch.relu, "tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[name]
    x, g = args
    if not backward:

        def fwd() -> Any:
            with torch.no_grad():
                return f(x)

        return Workload(fwd)
    xr = x.clone().requires_grad_(True)

    def fwd_bwd() -> Any:
        f(xr).backward(g)
        dx, xr.grad = xr.grad, None
        return dx

    return Workload(fwd_bwd)


def jax_op(op: str, n: int, device: str = "cpu") -> Workload:
    """The op as a ``jit``-compiled JAX function (the VJP for fwd+bwd), waited for."""
    jax = require("jax")
    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise Unavailable(f"JAX has no {device} backend here: {e}") from None
    args = [jax.device_put(a, dev) for a in op_inputs(op, n)]
    name, backward = _split(op)
    if name == "matmul":
        fn = jax.jit(lambda a, b: a @ b)
    elif name == "sum":
        fn = jax.jit(lambda x: x.sum())
    else:
        f = {
            "relu": jax.nn.relu,
            "tanh": jax.numpy.tanh,
            "gelu": lambda v: jax.nn.gelu(v, approximate=False),
        }[name]
        fn = jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0]) if backward else jax.jit(f)
        args = args if backward else args[:1]
    return Workload(lambda: fn(*args).block_until_ready())


OpFactory = Callable[[str, int, str], Workload]
OP_FLOORS: dict[str, OpFactory] = {"numpy": numpy_op}
OP_PEERS: dict[str, OpFactory] = {"torch": torch_op, "jax": jax_op}
OP_IMPLS: dict[str, OpFactory] = {**OP_FLOORS, "gpunet": gpunet_op, **OP_PEERS}
