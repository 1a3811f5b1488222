"""Shared test set-up: hypothesis profiles, the GPU marker's skip, and Ctrl-C as a terminal
delivers it."""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI: the same number of examples, derandomized so that a red run is reproducible.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")

# A suite started in the background (a job of a shell without job control, some CI runners)
# inherits SIGINT ignored, and so would every process it starts: the Ctrl-C tests would see
# nothing. Python's own handler here; a process started from it gets the default at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, with the reason, where no CUDA device answers."""
    from gpunet.backend import probe_cuda

    found = probe_cuda()
    if found.available:
        return
    skip = pytest.mark.skip(reason=f"no CUDA device: {found.reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
