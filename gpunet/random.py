"""Seedable random numbers: ``gpunet.manual_seed``, ``gpunet.Generator``, ``randn``, ``rand``.

A Generator owns a NumPy PCG64 stream for the CPU and, lazily, one CuPy stream per GPU,
all derived from its seed, so a seeded program is reproducible on each device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import autodiff, dtypes
from .backend import Device, default_device, get_backend
from .tensor import Tensor


class Generator:
    """A source of random tensors; ``Generator(seed)`` or ``.manual_seed(seed)``."""

    def __init__(self, seed: int | None = None) -> None:
        self.manual_seed(seed)

    def manual_seed(self, seed: int | None) -> Generator:
        if autodiff.STATE.flags & autodiff.CAPTURE:  # (a replay would draw on, unseeded)
            autodiff.refuse(
                "seeding a generator (manual_seed, Generator(seed))",
                "would happen only while the step records, not at each replay",
                "Seed before calling the captured step, or make the Generator outside it.",
            )
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        self.host_rng = np.random.Generator(np.random.PCG64(self.seed))
        self._device_rngs: dict[Any, tuple[Any, Any]] = {}  # device -> (backend, rng)
        # device states restored before the device's first use (or on a machine without it)
        self._pending: dict[str, np.ndarray] = {}
        return self

    def initial_seed(self) -> int:
        return self.seed

    def device_rng(self, backend: Any) -> Any:
        entry = self._device_rngs.get(backend.device)
        if entry is None:
            seed = (self.seed, backend.device.index or 0)
            child = np.random.SeedSequence(seed).generate_state(1)[0]
            rng = backend._new_rng(int(child))
            state = self._pending.pop(str(backend.device), None)
            if state is not None:
                backend._set_rng_state(rng, state)
            entry = self._device_rngs[backend.device] = (backend, rng)
        return entry[1]

    def get_state(self) -> dict[str, Any]:
        """The seed, the host stream's state (JSON-able) and each device stream's state
        (a NumPy array of bytes, keyed by the device's name)."""
        devices = dict(self._pending)
        for dev, (backend, rng) in self._device_rngs.items():
            devices[str(dev)] = backend._rng_state(rng)
        return {"seed": self.seed, "host": self.host_rng.bit_generator.state, "devices": devices}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``get_state`` was taken (device streams at their first
        use; a state without ``devices``, from an older checkpoint, reseeds them)."""
        self.manual_seed(state["seed"])
        self.host_rng.bit_generator.state = state["host"]
        self._pending = dict(state.get("devices", {}))


default_generator = Generator(0)


def manual_seed(seed: int) -> Generator:
    """Seed the default generator (every device)."""
    return default_generator.manual_seed(seed)


def _draw(
    kind: str,
    shape: Sequence[Any],
    dtype: Any,
    device: str | Device | None,
    generator: Generator | None,
    requires_grad: bool,
) -> Tensor:
    if len(shape) == 1 and not isinstance(shape[0], int):
        shape = tuple(shape[0])
    dt = dtypes.DEFAULT_FLOAT if dtype is None else dtypes.as_dtype(dtype)
    if not dtypes.is_floating(dt):
        raise TypeError(
            f"gpunet.{'randn' if kind == 'normal' else 'rand'}: dtype must be floating, got {dt}"
        )
    backend = get_backend(default_device() if device is None else device)
    gen = generator or default_generator
    if autodiff.STATE.flags & autodiff.CAPTURE:  # a call a capture replays: fresh draws each time
        data = autodiff.call(
            "random", backend.random, generator=gen, kind=kind, shape=tuple(shape), dtype=dt
        )
    else:
        data = backend.random(gen, kind, tuple(shape), dt)
    t = Tensor._wrap(data, backend)
    t.requires_grad = requires_grad
    return t


def randn(
    *shape: Any,
    dtype: Any = None,
    device: str | Device | None = None,
    generator: Generator | None = None,
    requires_grad: bool = False,
) -> Tensor:
    """Samples from the standard normal distribution N(0, 1)."""
    return _draw("normal", shape, dtype, device, generator, requires_grad)


def rand(
    *shape: Any,
    dtype: Any = None,
    device: str | Device | None = None,
    generator: Generator | None = None,
    requires_grad: bool = False,
) -> Tensor:
    """Samples from the uniform distribution on [0, 1)."""
    return _draw("uniform", shape, dtype, device, generator, requires_grad)
